// cuda_sim stand-in for c10/cuda/CUDAException.h: launches report their own
// errors (cudasim::run_grid throws), so the launch check has nothing to do;
// the runtime calls it emulates (cuda_sim.h) return their error codes.
#pragma once
#include <c10/util/Exception.h>
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)
#define C10_CUDA_CHECK(expr) TORCH_CHECK((expr) == cudaSuccess, "CUDA error from ", #expr)

// CUDA kernels of the prototype update (mirrors csrc/cpu/prototype_update_cpu.cpp).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../checks.h"
#include "../protoseg_math.h"

namespace protoseg {
namespace {

constexpr int kEmaThreads = 128;

// Block reduction of one float/double across kEmaThreads threads.
template <typename T>
__device__ T block_sum(T v, T* scratch) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T total = 0;
  for (int w = 0; w < kEmaThreads / 32; ++w) total += scratch[w];
  __syncthreads();  // scratch is reused by the next call
  return total;
}

// Launch: one block of kEmaThreads threads per prototype (grid = C*K).
// Bounds: thread t touches columns d = t, t + 128, ... < D of row blockIdx.x.
// Sync: rows are disjoint across blocks; block_sum's __syncthreads orders the
// shared scratch; every thread reaches every barrier (no divergent return).
template <typename T>
__global__ void prototype_ema_kernel(const T* __restrict__ protos, const T* __restrict__ sums,
                                     const T* __restrict__ counts, T* __restrict__ out, int64_t D, T gamma) {
  __shared__ T scratch[kEmaThreads / 32];
  const int64_t j = blockIdx.x;
  const T* p = protos + j * D;
  const T* s = sums + j * D;
  T* o = out + j * D;
  const bool update = counts[j] > T(0);
  T inv_f = T(0);
  if (update) {
    T sq = 0;
    for (int64_t d = threadIdx.x; d < D; d += kEmaThreads) sq += s[d] * s[d];
    inv_f = inv_norm(block_sum(sq, scratch));
  }
  T sq = 0;
  for (int64_t d = threadIdx.x; d < D; d += kEmaThreads) {
    const T v = update ? ema(p[d], s[d] * inv_f, gamma) : p[d];
    o[d] = v;
    sq += v * v;
  }
  const T inv = inv_norm(block_sum(sq, scratch));
  for (int64_t d = threadIdx.x; d < D; d += kEmaThreads) o[d] *= inv;
}

}  // namespace

at::Tensor prototype_ema_cuda(const at::Tensor& protos, const at::Tensor& sums, const at::Tensor& counts,
                              double gamma) {
  check_dim(protos, 3, "protos", "(C, K, D)");
  check_floating(protos, "protos");
  const int64_t C = protos.size(0), K = protos.size(1), D = protos.size(2), CK = C * K;
  TORCH_CHECK_VALUE(sums.numel() == CK * D, "sums must have C*K*D = ", CK * D, " elements, got shape ", sums.sizes());
  TORCH_CHECK_VALUE(counts.numel() == CK, "counts must have C*K = ", CK, " elements, got shape ", counts.sizes());
  TORCH_CHECK_VALUE(gamma >= 0 && gamma <= 1, "gamma must be in [0, 1], got ", gamma);
  check_same_device(protos, sums, "protos", "sums");
  check_same_device(protos, counts, "protos", "counts");
  c10::cuda::CUDAGuard guard(protos.device());
  const auto acc = acc_type(protos.scalar_type());
  at::Tensor p = protos.reshape({CK, D}).to(acc).contiguous();
  at::Tensor s = sums.reshape({CK, D}).to(acc).contiguous();
  at::Tensor cnt = counts.reshape({CK}).to(acc).contiguous();
  at::Tensor out = at::empty({CK, D}, p.options());
  if (CK > 0) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "prototype_ema_cuda", [&] {
      prototype_ema_kernel<scalar_t><<<CK, kEmaThreads, 0, stream>>>(
          p.data_ptr<scalar_t>(), s.data_ptr<scalar_t>(), cnt.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), D,
          scalar_t(gamma));
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out.view({C, K, D}).to(protos.scalar_type());
}

TORCH_LIBRARY_IMPL(protoseg_ext, CUDA, m) { m.impl("prototype_ema", &prototype_ema_cuda); }

}  // namespace protoseg

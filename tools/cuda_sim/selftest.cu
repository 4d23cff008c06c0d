// Kernels that check the emulator itself (tests/test_cuda_sim.py): each case
// either computes something the test knows, or must fail with a given error.
// Compiled into the emulator library by build.py, through the same rewrite
// as csrc/cuda; registered as protoseg_cudasim::cudasim_selftest(case, x).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string>

namespace cudasim_selftest {

// y[i] = x[i + shift] for i < n: shift = 1 reads one past the end of x.
__global__ void shifted_copy_kernel(const float* __restrict__ x, float* __restrict__ y, int64_t n, int64_t shift) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) y[i] = x[i + shift];
}

// y[i - 1] = x[i]: thread 0 writes before the start of y.
__global__ void write_before_start_kernel(const float* __restrict__ x, float* __restrict__ y, int64_t n) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) y[i - 1] = x[i];
}

// Half of the block waits at one __syncthreads, half at another.
__global__ void divergent_barrier_kernel(float* y) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  y[threadIdx.x] = 1.0f;
}

// Lanes 16..31 of warp 0 wait at a barrier that the others of their warp never
// reach, while lanes 0..15 wait at a shuffle that lanes 16..31 never reach.
__global__ void deadlock_kernel(float* y) {
  float v = float(threadIdx.x);
  if (threadIdx.x < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
  __syncthreads();
  y[threadIdx.x] = v;
}

// Lanes 16..31 exit, then lanes 0..15 shuffle with a full mask.
__global__ void shuffle_exited_lane_kernel(float* y) {
  if (threadIdx.x >= 16) return;
  y[threadIdx.x] = __shfl_xor_sync(0xffffffffu, float(threadIdx.x), 1);
}

// Each thread reads the shared slot of its neighbour, which that neighbour
// writes after the barrier: without one before the read, the read is NaN.
__global__ void unpublished_shared_kernel(float* y) {
  __shared__ float s[64];
  const int t = threadIdx.x;
  const float v = s[(t + 1) % 64];
  __syncthreads();
  s[t] = float(t);
  y[t] = v;
}

// Threads >= 32 leave before the barrier; the others still meet (only live
// threads count) and read slots nobody wrote.
__global__ void early_exit_kernel(float* y) {
  __shared__ float s[64];
  const int t = threadIdx.x;
  if (t >= 32) return;
  s[t] = float(t);
  __syncthreads();
  y[t] = s[t + 32];
  y[t + 32] = s[t];
}

// A correct block reduction (barriers in place): y[b] = sum of x over block b.
__global__ void __launch_bounds__(128, 4) block_sum_kernel(const float* __restrict__ x, float* __restrict__ y) {
  __shared__ float s[128];
  const int t = threadIdx.x;
  s[t] = x[blockIdx.x * 128 + t];
  __syncthreads();
  for (int w = 64; w > 0; w >>= 1) {
    if (t < w) s[t] += s[t + w];
    __syncthreads();
  }
  if (t == 0) y[blockIdx.x] = s[0];
}

// Warp collectives of one warp: out[c * 32 + lane] for each case c.
__global__ void warp_ops_kernel(const int* __restrict__ x, int* __restrict__ out) {
  const int lane = threadIdx.x;
  const int v = x[lane];
  out[0 * 32 + lane] = __shfl_sync(0xffffffffu, v, 5);
  out[1 * 32 + lane] = __shfl_sync(0xffffffffu, v, lane + 3, 8);
  out[2 * 32 + lane] = __shfl_xor_sync(0xffffffffu, v, 6);
  out[3 * 32 + lane] = __shfl_up_sync(0xffffffffu, v, 3, 16);
  out[4 * 32 + lane] = __shfl_down_sync(0xffffffffu, v, 2);
  out[5 * 32 + lane] = int(__ballot_sync(0xffffffffu, v > 10) & 0x7fffffffu);
  out[6 * 32 + lane] = __any_sync(0xffffffffu, v == 7) ? 1 : 0;
  out[7 * 32 + lane] = __all_sync(0xffffffffu, v >= 0) ? 1 : 0;
  out[8 * 32 + lane] = __all_sync(0xffffffffu, v > 0) ? 1 : 0;
}

// Every thread of every block adds 1 to count[0], and its value to sums[t % 4].
__global__ void atomics_kernel(const int* __restrict__ x, unsigned long long* count, int* sums) {
  atomicAdd(count, 1ull);
  atomicAdd(sums + threadIdx.x % 4, x[blockIdx.x * blockDim.x + threadIdx.x]);
}

// Dynamic shared memory of n floats: y[t] = t-th value written by thread n-1-t;
// with n smaller than the block, threads beyond it write out of bounds.
__global__ void dynamic_shared_kernel(float* y) {
  extern __shared__ float dyn[];
  const int t = threadIdx.x, n = blockDim.x;
  dyn[t] = float(t * 10);
  __syncthreads();
  y[t] = dyn[n - 1 - t];
}


// ---- the race checker: each kernel below has one race, or none ----

// Each thread reads its neighbour's slot with no barrier after the writes.
__global__ void shared_race_kernel(float* y) {
  __shared__ float s[64];
  const int t = threadIdx.x;
  s[t] = float(t);
  y[t] = s[(t + 1) % 64];
}

// The same exchange inside one warp, ordered by __syncwarp: no race. With
// `across` set, lanes read the slot of the other warp: __syncwarp orders
// only its own warp, a race.
__global__ void warp_exchange_kernel(float* y, bool across) {
  __shared__ float s[64];
  const int t = threadIdx.x;
  s[t] = float(t);
  __syncwarp();
  y[t] = across ? s[(t + 32) % 64] : s[(t & ~31) + (t + 1) % 32];
}

// One thread in each of two blocks adds 1 to y[0] with a plain read-modify-write.
__global__ void global_race_kernel(float* y) { y[0] += 1.0f; }

// Block 0 adds atomically, block 1 plainly, to one location.
__global__ void atomic_plain_kernel(float* y) {
  if (blockIdx.x == 0) atomicAdd(y, 1.0f);
  else y[0] += 1.0f;
}

// A scalar __shared__ flag that thread 0 sets and every thread reads: with
// `sync`, after a barrier (no race), else in the same epoch (a race).
__global__ void shared_scalar_kernel(float* y, bool sync) {
  __shared__ float flag;
  if (threadIdx.x == 0) flag = 7.0f;
  if (sync) __syncthreads();
  y[threadIdx.x] = flag;
}

// A two-dimensional shared array indexed one past its row: s[1][8] is s[2][0]
// in memory, but out of bounds of row 1.
__global__ void shared_2d_kernel(float* y, int col) {
  __shared__ float s[4][8];
  const int t = threadIdx.x;
  s[t / 8][t % 8] = float(t);
  __syncthreads();
  if (t == 0) y[0] = s[1][col];
}

// A local array indexed by the argument: i = 4 is one past its end.
__global__ void local_array_kernel(float* y, int i) {
  float a[4];
  for (int k = 0; k < 4; ++k) a[k] = float(k + 1);
  y[0] = a[i];
}

// y[i] = x[i] for i < n, x the view the host passes (half of a longer buffer):
// n one more than the view reads past it, inside the storage.
__global__ void view_copy_kernel(const float* __restrict__ x, float* __restrict__ y, int64_t n) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) y[i] = x[i];
}

// ---- the traffic meter: kernels whose counts tests/test_cuda_sim.py computes by hand ----

// y[i] = x[i * stride] for i < n.
__global__ void strided_copy_kernel(const float* __restrict__ x, float* __restrict__ y, int64_t n, int64_t stride) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) y[i] = x[i * stride];
}

// y[i] = x[0] for i < n: every lane loads one address.
__global__ void broadcast_kernel(const float* __restrict__ x, float* __restrict__ y, int64_t n) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) y[i] = x[0];
}

// Dynamic shared memory above 48 KiB (n floats) beside a static array, as the
// opt-in of cudaFuncSetAttribute allows: y[t] = (b - 1 - t) + the sum of the
// entries n - 1 - i over thread t's slice i = t, t + b, ... (b = blockDim.x).
// One instance per case: the opt-in belongs to the kernel, for the process.
template <int Case>
__global__ void big_dynamic_shared_kernel(float* y, int n) {
  extern __shared__ float big[];
  __shared__ float fixed[1024];
  const int t = threadIdx.x, b = blockDim.x;
  fixed[t] = float(t);
  for (int i = t; i < n; i += b) big[i] = float(i);
  __syncthreads();
  float s = fixed[b - 1 - t];
  for (int i = t; i < n; i += b) s += big[n - 1 - i];
  y[t] = s;
}

__global__ void assert_kernel(const int* __restrict__ x) {
  CUDA_KERNEL_ASSERT_MSG(x[threadIdx.x] >= 0, "x: an entry is negative");
}

at::Tensor run_case(const std::string& name, const at::Tensor& x_in) {
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor x = x_in.contiguous();
  const int64_t n = x.numel();
  auto fopt = x.options().dtype(at::kFloat);
  if (name == "strided_copy") {  // y[i] = x[2 i], n / 2 entries
    at::Tensor y = at::empty({n / 2}, fopt);
    strided_copy_kernel<<<(n / 2 + 63) / 64, 64, 0, stream>>>(x.data_ptr<float>(), y.data_ptr<float>(), n / 2, 2);
    return y;
  }
  if (name == "broadcast") {
    at::Tensor y = at::empty({n}, fopt);
    broadcast_kernel<<<(n + 63) / 64, 64, 0, stream>>>(x.data_ptr<float>(), y.data_ptr<float>(), n);
    return y;
  }
  if (name == "gemm" || name == "gemm_bf16") {  // x viewed as (n / 8, 8) times its transpose
    at::Tensor a = x.view({n / 8, 8});
    if (name == "gemm_bf16") {
      a = a.to(at::kBFloat16);
      at::Tensor out = at::empty({n / 8, n / 8}, fopt);
      at::mm_out(out, a, a.t(), at::kFloat);
      return out;
    }
    at::Tensor out = at::empty({n / 8, n / 8}, fopt);
    at::mm_out(out, a, a.t());
    return out;
  }
  if (name == "gemm_strided") {  // x as an (8, n / 8) plane: its first 8 columns, as (8 pixels, 8 channels), times
                                 // their transpose (the GEMM operand of a tile of an NCHW map)
    at::Tensor a = x.view({8, n / 8}).narrow(1, 0, 8).t();
    at::Tensor out = at::empty({8, 8}, fopt);
    at::mm_out(out, a, a.t());
    return out;
  }
  if (name == "partial_write") {  // a buffer of 128 of which the kernel writes n
    at::Tensor y = at::empty({128}, fopt);
    shifted_copy_kernel<<<(n + 63) / 64, 64, 0, stream>>>(x.data_ptr<float>(), y.data_ptr<float>(), n, 0);
    return y;
  }
  if (name == "shifted_copy" || name == "oob_read") {
    at::Tensor y = at::empty({n}, fopt);
    shifted_copy_kernel<<<(n + 63) / 64, 64, 0, stream>>>(x.data_ptr<float>(), y.data_ptr<float>(), n,
                                                          name == "oob_read" ? 1 : 0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return y;
  }
  if (name == "oob_write") {
    at::Tensor y = at::empty({n}, fopt);
    write_before_start_kernel<<<(n + 63) / 64, 64, 0, stream>>>(x.data_ptr<float>(), y.data_ptr<float>(), n);
    return y;
  }
  at::Tensor y = at::zeros({64}, fopt);
  if (name == "divergent_barrier") {
    divergent_barrier_kernel<<<1, 32, 0, stream>>>(y.data_ptr<float>());
  } else if (name == "deadlock") {
    deadlock_kernel<<<1, 64, 0, stream>>>(y.data_ptr<float>());
  } else if (name == "shuffle_exited_lane") {
    shuffle_exited_lane_kernel<<<1, 32, 0, stream>>>(y.data_ptr<float>());
  } else if (name == "unpublished_shared") {
    unpublished_shared_kernel<<<1, 64, 0, stream>>>(y.data_ptr<float>());
  } else if (name == "early_exit") {
    early_exit_kernel<<<1, 64, 0, stream>>>(y.data_ptr<float>());
  } else if (name == "block_sum" || name == "launch_bounds" || name == "empty_grid") {
    const int64_t blocks = name == "empty_grid" ? 0 : n / 128;
    at::Tensor s = at::empty({std::max<int64_t>(blocks, 1)}, fopt);
    block_sum_kernel<<<blocks, name == "launch_bounds" ? 256 : 128, 0, stream>>>(x.data_ptr<float>(),
                                                                                   s.data_ptr<float>());
    return s;
  } else if (name == "warp_ops") {
    at::Tensor out = at::empty({9 * 32}, x.options());
    warp_ops_kernel<<<1, 32, 0, stream>>>(x.data_ptr<int>(), out.data_ptr<int>());
    return out;
  } else if (name == "atomics") {
    at::Tensor count = at::zeros({1}, x.options().dtype(at::kLong));
    at::Tensor sums = at::zeros({4}, x.options());
    atomics_kernel<<<n / 64, 64, 0, stream>>>(x.data_ptr<int>(),
                                               reinterpret_cast<unsigned long long*>(count.data_ptr<int64_t>()),
                                               sums.data_ptr<int>());
    return at::cat({count.to(at::kInt), sums});
  } else if (name == "dynamic_shared" || name == "dynamic_shared_oob") {
    const int threads = 64;
    const size_t bytes = (name == "dynamic_shared" ? threads : threads / 2) * sizeof(float);
    dynamic_shared_kernel<<<1, threads, bytes, stream>>>(y.data_ptr<float>());
  } else if (name == "big_dynamic_shared") {  // 64 KiB with the opt-in
    const int floats = 16384;
    C10_CUDA_CHECK(cudaFuncSetAttribute(big_dynamic_shared_kernel<0>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        int(floats * sizeof(float))));
    big_dynamic_shared_kernel<0><<<1, 64, floats * sizeof(float), stream>>>(y.data_ptr<float>(), floats);
  } else if (name == "big_dynamic_shared_no_optin") {  // 64 KiB without it: an invalid launch
    big_dynamic_shared_kernel<1><<<1, 64, 16384 * sizeof(float), stream>>>(y.data_ptr<float>(), 16384);
  } else if (name == "big_dynamic_shared_beside_static") {  // 45 KiB + the 4 KiB static array > 48 KiB, no opt-in
    big_dynamic_shared_kernel<2><<<1, 64, 11520 * sizeof(float), stream>>>(y.data_ptr<float>(), 11520);
  } else if (name == "big_dynamic_shared_above_device") {  // the device's 227 KiB with the opt-in + 4 KiB static
    const int floats = 227 * 256;
    C10_CUDA_CHECK(cudaFuncSetAttribute(big_dynamic_shared_kernel<3>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        int(floats * sizeof(float))));
    big_dynamic_shared_kernel<3><<<1, 64, floats * sizeof(float), stream>>>(y.data_ptr<float>(), floats);
  } else if (name == "big_dynamic_shared_above_optin") {  // 80 KiB after an opt-in of 64 KiB
    C10_CUDA_CHECK(cudaFuncSetAttribute(big_dynamic_shared_kernel<5>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        64 << 10));
    big_dynamic_shared_kernel<5><<<1, 64, 80 << 10, stream>>>(y.data_ptr<float>(), 20480);
  } else if (name == "optin_above_device") {  // more than the device has: the call fails
    C10_CUDA_CHECK(cudaFuncSetAttribute(big_dynamic_shared_kernel<4>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        228 << 10));
  } else if (name == "shared_race") {
    shared_race_kernel<<<1, 64, 0, stream>>>(y.data_ptr<float>());
  } else if (name == "warp_exchange" || name == "warp_exchange_across") {
    warp_exchange_kernel<<<1, 64, 0, stream>>>(y.data_ptr<float>(), name == "warp_exchange_across");
  } else if (name == "global_race") {
    global_race_kernel<<<2, 1, 0, stream>>>(y.data_ptr<float>());
  } else if (name == "atomic_plain") {
    atomic_plain_kernel<<<2, 1, 0, stream>>>(y.data_ptr<float>());
  } else if (name == "shared_scalar" || name == "shared_scalar_race") {
    shared_scalar_kernel<<<1, 64, 0, stream>>>(y.data_ptr<float>(), name == "shared_scalar");
  } else if (name == "shared_2d" || name == "shared_2d_oob") {
    shared_2d_kernel<<<1, 32, 0, stream>>>(y.data_ptr<float>(), name == "shared_2d" ? 7 : 8);
  } else if (name == "local_array" || name == "local_array_oob") {
    local_array_kernel<<<1, 1, 0, stream>>>(y.data_ptr<float>(), name == "local_array" ? 3 : 4);
  } else if (name == "view_copy" || name == "view_copy_oob") {
    at::Tensor xv = x.narrow(0, 0, n / 2);  // half of x: the kernel may read n / 2 entries
    at::Tensor out = at::zeros({n}, fopt);
    view_copy_kernel<<<1, 64, 0, stream>>>(xv.data_ptr<float>(), out.data_ptr<float>(),
                                           name == "view_copy" ? n / 2 : n / 2 + 1);
    return out;
  } else if (name == "device_assert") {
    assert_kernel<<<1, int(n), 0, stream>>>(x.data_ptr<int>());
  } else {
    TORCH_CHECK_VALUE(false, "case: unknown self-test case '", name, "'");
  }
  return y;
}

}  // namespace cudasim_selftest

TORCH_LIBRARY_FRAGMENT(protoseg_cudasim, m) {
  m.def("cudasim_selftest(str case, Tensor x) -> Tensor", &cudasim_selftest::run_case);
}

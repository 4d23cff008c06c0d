// Device helpers shared by the CUDA kernels of protoseg_ext (csrc/cuda/*.cu).
//
// Reductions here run in a fixed order (xor butterflies, fixed trees), so a
// kernel built on them gives the same bits on every run. Everything indexes
// in int64.
//
// Kernels declare __launch_bounds__(threads, min_blocks) with both arguments:
// with the block size alone, ptxas may aim at full occupancy (32 registers at
// 256 threads) and spill; a minimum of blocks per SM caps registers at 64
// instead. tools/ptxas_report.py prints the resulting usage of every kernel.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <limits>

#include "../protoseg_math.h"

namespace protoseg {
namespace cuda {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Shared memory per block. Without the opt-in a kernel's static and dynamic
// shared memory share 48 KiB; above that, up to the device's
// cudaDevAttrMaxSharedMemoryPerBlockOptin (227 KiB on an H100, 163 KiB on an
// A100), only after cudaFuncSetAttribute(kernel,
// cudaFuncAttributeMaxDynamicSharedMemorySize, bytes).
constexpr size_t kDefaultSmemBytes = size_t(48) << 10;

// Whether a launch of a kernel with `static_bytes` of static shared memory
// may take `dynamic_bytes` of dynamic shared memory on the current device.
inline bool smem_fits(size_t static_bytes, size_t dynamic_bytes) {
  if (static_bytes + dynamic_bytes <= kDefaultSmemBytes) return true;
  int device = 0, optin = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return static_bytes + dynamic_bytes <= size_t(optin);
}

// Before a launch of `kernel` (static_bytes of static shared memory) with
// dynamic_bytes of dynamic shared memory that smem_fits allows: the opt-in,
// when the two exceed 48 KiB (per device and kernel; a cheap call).
template <typename Kernel>
void allow_dynamic_smem(Kernel kernel, size_t static_bytes, size_t dynamic_bytes) {
  if (static_bytes + dynamic_bytes > kDefaultSmemBytes)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(dynamic_bytes)));
}

// Sum over the 32 lanes of a warp; every lane gets the same bits (each
// butterfly step adds the same two values, and addition commutes).
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

// Merge of online log-sum-exp states over a warp (same butterfly argument).
template <typename T>
__device__ __forceinline__ LseState<T> warp_lse_merge(LseState<T> s) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) {
    LseState<T> o{__shfl_xor_sync(kFullMask, s.max, off), __shfl_xor_sync(kFullMask, s.sum, off)};
    s = lse_merge(s, o);
  }
  return s;
}

// Sum of one value per thread over a block of kThreads threads (a multiple of
// 32), in a fixed order; every thread gets the result. `scratch` holds
// kThreads / 32 values. Every thread of the block must call it (barriers).
template <int kThreads, typename T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
  v = warp_sum(v);
  const int lane = threadIdx.x & (kWarp - 1), warp = threadIdx.x / kWarp;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T total = T(0);
#pragma unroll
  for (int w = 0; w < kThreads / kWarp; ++w) total += scratch[w];
  __syncthreads();  // scratch may be reused by the next call
  return total;
}

// First index i in [0, n) with keys[i] >= value (keys sorted ascending), or n.
template <typename Key>
__device__ __forceinline__ int64_t lower_bound(const Key* keys, int64_t n, int64_t value) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (int64_t(keys[mid]) < value) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

// Segment offsets of sorted keys: bounds[s] = first row with key >= s, for s
// in [0, num_segments]; keys lie in [0, num_segments] (num_segments marks a
// row that belongs to no segment, sorted last), so segment s is rows
// [bounds[s], bounds[s + 1]) and bounds[num_segments] counts the valid rows.
// Launch: 1-D, one thread per s, grid-stride. Bounds: s <= num_segments, and
// lower_bound reads keys[0, n) only. No shared state, no race.
template <typename Key>
__global__ void segment_bounds_kernel(const Key* __restrict__ sorted_keys, int64_t n, int64_t num_segments,
                                      int64_t* __restrict__ bounds) {
  for (int64_t s = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; s <= num_segments;
       s += int64_t(gridDim.x) * blockDim.x) {
    bounds[s] = lower_bound(sorted_keys, n, s);
  }
}

// bounds (num_segments + 1,) int64 of the sorted int32 keys; see above. (A
// template, so that only the files that use it compile the kernel.)
template <typename Key = int32_t>
at::Tensor segment_bounds(const at::Tensor& sorted_keys, int64_t num_segments, cudaStream_t stream) {
  at::Tensor bounds = at::empty({num_segments + 1}, sorted_keys.options().dtype(at::kLong));
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>(ceil_div(num_segments + 1, threads), 4096);
  segment_bounds_kernel<Key><<<blocks, threads, 0, stream>>>(sorted_keys.data_ptr<Key>(), sorted_keys.numel(),
                                                            num_segments, bounds.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return bounds;
}

}  // namespace cuda
}  // namespace protoseg

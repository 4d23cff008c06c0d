// CUDA kernels of `prototype_sums` and `prototype_ema` (mirrors
// csrc/cpu/prototype_update_cpu.cpp).
//
// prototype_sums: sums[s] = sum of feats[n] (L2-normalised first if
// normalize) over rows with slot[n] == s and a finite feature row, counts[s] =
// how many. Two paths:
//   - deterministic (at::globalContext().deterministicAlgorithms()): a row key
//     (slot, or num_slots for a row that takes no part) is sorted with a
//     stable at::sort, each slot becomes a contiguous segment, and one block
//     per (slot, 32-column chunk of D) sums its segment in a fixed order in
//     float64: bitwise the same on every run, no atomics;
//   - otherwise, one warp per row adds the row into the sums with
//     floating-point atomics (one pass over feats, no sort).
// Counts are exact in both (integer atomics, or segment lengths).
// prototype_ema: one block per prototype: normalise + momentum + renormalise.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../checks.h"
#include "../protoseg_math.h"
#include "cuda_common.cuh"

namespace protoseg {
namespace {

using cuda::ceil_div;
using cuda::kFullMask;
using cuda::kWarp;

constexpr int kRowThreads = 256;  // warp-per-row kernels: 8 rows per block
constexpr int kRowsPerBlock = kRowThreads / kWarp;
constexpr int kSegThreads = 512;  // segment kernel: 16 warps share a (slot, column chunk)
constexpr int kSegWarps = kSegThreads / kWarp;
constexpr int kEmaThreads = 128;

// Whether every entry of feature row f[0, D) is finite, and (if want_sq) the
// row's sum of squares in float64; the lanes of a warp split the row and
// reduce, so all lanes get the same answers (all 32 lanes must call it).
template <typename scalar_t>
__device__ __forceinline__ bool warp_row_check(const scalar_t* f, int64_t D, int lane, bool want_sq, double& sq) {
  using acc_t = at::opmath_type<scalar_t>;
  bool finite = true;
  double s = 0.0;
  for (int64_t d = lane; d < D; d += kWarp) {
    const acc_t v = static_cast<acc_t>(f[d]);
    finite = finite && is_finite(v);
    if (want_sq) s += double(v) * double(v);
  }
  if (want_sq) sq = cuda::warp_sum(s);
  return __all_sync(kFullMask, finite);
}

// Row key of the deterministic path: slot[n] if slot[n] >= 0 and row n is
// finite, else num_slots (sorted last, part of no segment); with scale given
// (normalize), also scale[n] = 1 / max(||x_n||, eps) in float64. Asserts
// slot[n] < num_slots. Launch: kRowThreads threads, one warp per row, grid
// ceil(N / 8). Bounds: n < N (warp-uniform return), d < D. Sync: lane 0 of
// the row's warp is the one writer of key[n] and scale[n]; the vote and the
// reduction have all 32 lanes present (slot[n] is the same for the warp).
template <typename scalar_t>
__global__ void __launch_bounds__(kRowThreads, 4)
    prototype_keys_kernel(const scalar_t* __restrict__ feats, const int64_t* __restrict__ slot, int64_t N, int64_t D,
                          int64_t num_slots, int32_t* __restrict__ key, double* __restrict__ scale) {
  const int64_t n = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x & (kWarp - 1);
  if (n >= N) return;
  const int64_t s = slot[n];
  CUDA_KERNEL_ASSERT_MSG(s < num_slots, "slot: an entry is >= num_slots");
  double sq = 0.0;
  const bool ok = s >= 0 && warp_row_check(feats + n * D, D, lane, scale != nullptr, sq);
  if (lane == 0) {
    key[n] = ok ? int32_t(s) : int32_t(num_slots);
    if (scale != nullptr) scale[n] = inv_norm(sq);
  }
}

// Deterministic sums: block (s, j) sums columns d = 32*j + lane of the rows of
// segment s = rows bounds[s] .. bounds[s+1]-1 of the sorted order (feature row
// perm[i]). Warp w adds rows w, w + 16, ... of the segment in that order
// (four loads in flight per step), then warp 0 adds the 16 warp partials in
// warp order: a fixed summation tree, float64 throughout. With scale given
// (normalize), row n enters as feats[n] * scale[n].
// Launch: grid (num_slots, ceil(D / 32)), kSegThreads threads. Bounds: i in
// the segment (subset of [0, N)), perm[i] < N, d < D checked; shared index
// [w][lane] < 16*32. Sync: one __syncthreads between the shared writes and
// warp 0's reads, reached by every thread; block (s, j) is the one writer of
// sums[s, 32j .. 32j+31] and block (s, 0) of counts[s].
// Hot kernel: must not spill.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kSegThreads, 2)
    prototype_sums_segment_kernel(const scalar_t* __restrict__ feats, const int64_t* __restrict__ perm,
                                  const int64_t* __restrict__ bounds, const double* __restrict__ scale, int64_t D,
                                  acc_t* __restrict__ sums, acc_t* __restrict__ counts) {
  __shared__ double part[kSegWarps][kWarp];
  const int64_t s = blockIdx.x;
  const int lane = threadIdx.x & (kWarp - 1), warp = threadIdx.x / kWarp;
  const int64_t d = int64_t(blockIdx.y) * kWarp + lane;
  const bool col = d < D;
  const int64_t b0 = bounds[s], b1 = bounds[s + 1];
  double acc = 0.0;
  int64_t i = b0 + warp;
  const bool scaled = scale != nullptr;
  for (; i + 3 * kSegWarps < b1; i += 4 * kSegWarps) {
    const int64_t n0 = perm[i], n1 = perm[i + kSegWarps], n2 = perm[i + 2 * kSegWarps], n3 = perm[i + 3 * kSegWarps];
    if (col) {
      double v0 = static_cast<double>(feats[n0 * D + d]), v1 = static_cast<double>(feats[n1 * D + d]);
      double v2 = static_cast<double>(feats[n2 * D + d]), v3 = static_cast<double>(feats[n3 * D + d]);
      if (scaled) {
        v0 *= scale[n0];
        v1 *= scale[n1];
        v2 *= scale[n2];
        v3 *= scale[n3];
      }
      acc += v0;
      acc += v1;
      acc += v2;
      acc += v3;
    }
  }
  for (; i < b1; i += kSegWarps) {
    if (!col) continue;
    const int64_t n = perm[i];
    const double v = static_cast<double>(feats[n * D + d]);
    acc += scaled ? v * scale[n] : v;
  }
  part[warp][lane] = acc;
  __syncthreads();
  if (warp == 0) {
    double total = 0.0;
    for (int w = 0; w < kSegWarps; ++w) total += part[w][lane];
    if (col) sums[s * D + d] = static_cast<acc_t>(total);
    if (blockIdx.y == 0 && lane == 0) counts[s] = static_cast<acc_t>(b1 - b0);
  }
}

// Atomic sums: the warp of row n adds the row (times 1 / max(||x_n||, eps)
// with normalize) into sums[slot[n]] (one atomic per entry) and lane 0 counts
// it, if slot[n] >= 0 and the row is finite.
// Launch: kRowThreads threads, one warp per row, grid ceil(N / 8). Bounds:
// n < N (warp-uniform return), 0 <= slot[n] < num_slots (asserted), d < D.
// Sync: concurrent rows of one slot meet only in atomicAdd; the order of the
// additions, and so the rounding, varies between runs (not deterministic).
// Hot kernel: must not spill.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kRowThreads, 4)
    prototype_sums_atomic_kernel(const scalar_t* __restrict__ feats, const int64_t* __restrict__ slot, int64_t N,
                                 int64_t D, int64_t num_slots, bool normalize, acc_t* __restrict__ sums,
                                 unsigned long long* __restrict__ counts) {
  const int64_t n = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x & (kWarp - 1);
  if (n >= N) return;
  const int64_t s = slot[n];
  CUDA_KERNEL_ASSERT_MSG(s < num_slots, "slot: an entry is >= num_slots");
  if (s < 0) return;  // warp-uniform: every lane read the same slot
  const scalar_t* f = feats + n * D;
  double sq = 0.0;
  if (!warp_row_check(f, D, lane, normalize, sq)) return;  // a non-finite row must not reach the prototypes
  acc_t* dst = sums + s * D;
  if (normalize) {
    const double w = inv_norm(sq);
    for (int64_t d = lane; d < D; d += kWarp) atomicAdd(dst + d, static_cast<acc_t>(static_cast<double>(f[d]) * w));
  } else {
    for (int64_t d = lane; d < D; d += kWarp) atomicAdd(dst + d, static_cast<acc_t>(f[d]));
  }
  if (lane == 0) atomicAdd(counts + s, 1ull);
}

// EMA of one prototype: f = sums / ||sums||, p = gamma * p + (1 - gamma) * f
// where counts > 0, then p / ||p|| (all prototypes).
// Launch: one block of kEmaThreads threads per prototype (grid = C*K).
// Bounds: thread t touches columns d = t, t + 128, ... < D of row blockIdx.x.
// Sync: rows are disjoint across blocks; block_sum's barriers order the
// shared scratch, and every thread reaches every barrier (no early return).
template <typename T>
__global__ void __launch_bounds__(kEmaThreads, 8)
    prototype_ema_kernel(const T* __restrict__ protos, const T* __restrict__ sums, const T* __restrict__ counts,
                         T* __restrict__ out, int64_t D, T gamma) {
  __shared__ T scratch[kEmaThreads / kWarp];
  const int64_t j = blockIdx.x;
  const T* p = protos + j * D;
  const T* s = sums + j * D;
  T* o = out + j * D;
  const bool update = counts[j] > T(0);
  T inv_f = T(0);
  if (update) {  // block-uniform: counts[j] is the same for every thread
    T sq = 0;
    for (int64_t d = threadIdx.x; d < D; d += kEmaThreads) sq += s[d] * s[d];
    inv_f = inv_norm(cuda::block_sum<kEmaThreads>(sq, scratch));
  }
  T sq = 0;
  for (int64_t d = threadIdx.x; d < D; d += kEmaThreads) {
    const T v = update ? ema(p[d], s[d] * inv_f, gamma) : p[d];
    o[d] = v;
    sq += v * v;
  }
  const T inv = inv_norm(cuda::block_sum<kEmaThreads>(sq, scratch));
  for (int64_t d = threadIdx.x; d < D; d += kEmaThreads) o[d] *= inv;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> prototype_sums_cuda(const at::Tensor& feats, const at::Tensor& slot,
                                                       int64_t num_slots, bool normalize) {
  check_prototype_sums_args(feats, slot, num_slots);
  c10::cuda::CUDAGuard guard(feats.device());
  const int64_t N = feats.size(0), D = feats.size(1);
  TORCH_CHECK_VALUE(ceil_div(D, kWarp) <= 65535, "feats: D must be <= ", 65535 * kWarp, ", got ", D);
  const auto acc = acc_type(feats.scalar_type());
  at::Tensor sums = at::zeros({num_slots, D}, feats.options().dtype(acc));
  at::Tensor counts = at::zeros({num_slots}, feats.options().dtype(acc));
  if (N == 0 || num_slots == 0) return {sums, counts};
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor f = feats.contiguous();
  at::Tensor sl = slot.to(at::kLong).contiguous();
  const int64_t row_blocks = ceil_div(N, kRowsPerBlock);

  if (at::globalContext().deterministicAlgorithms()) {
    at::Tensor key = at::empty({N}, feats.options().dtype(at::kInt));
    at::Tensor scale = normalize ? at::empty({N}, feats.options().dtype(at::kDouble)) : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "prototype_keys_cuda", [&] {
      prototype_keys_kernel<scalar_t><<<row_blocks, kRowThreads, 0, stream>>>(
          f.data_ptr<scalar_t>(), sl.data_ptr<int64_t>(), N, D, num_slots, key.data_ptr<int32_t>(),
          normalize ? scale.data_ptr<double>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    at::Tensor sorted_key, perm;
    std::tie(sorted_key, perm) = at::sort(key, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    at::Tensor bounds = cuda::segment_bounds(sorted_key, num_slots, stream);
    if (D == 0) {  // no columns to sum: the counts are the segment lengths
      counts.copy_(bounds.narrow(0, 1, num_slots) - bounds.narrow(0, 0, num_slots));
      return {sums, counts};
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "prototype_sums_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const dim3 grid(static_cast<unsigned>(num_slots), static_cast<unsigned>(ceil_div(D, kWarp)));
      prototype_sums_segment_kernel<scalar_t, acc_t><<<grid, kSegThreads, 0, stream>>>(
          f.data_ptr<scalar_t>(), perm.data_ptr<int64_t>(), bounds.data_ptr<int64_t>(),
          normalize ? scale.data_ptr<double>() : nullptr, D, sums.data_ptr<acc_t>(), counts.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return {sums, counts};
  }

  at::Tensor icounts = at::zeros({num_slots}, feats.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "prototype_sums_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    prototype_sums_atomic_kernel<scalar_t, acc_t><<<row_blocks, kRowThreads, 0, stream>>>(
        f.data_ptr<scalar_t>(), sl.data_ptr<int64_t>(), N, D, num_slots, normalize, sums.data_ptr<acc_t>(),
        reinterpret_cast<unsigned long long*>(icounts.data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  counts.copy_(icounts);
  return {sums, counts};
}

at::Tensor prototype_ema_cuda(const at::Tensor& protos, const at::Tensor& sums, const at::Tensor& counts,
                              double gamma) {
  check_prototype_ema_args(protos, sums, counts, gamma);
  const int64_t C = protos.size(0), K = protos.size(1), D = protos.size(2), CK = C * K;
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
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return out.view({C, K, D}).to(protos.scalar_type());
}

TORCH_LIBRARY_IMPL(protoseg_ext, CUDA, m) {
  m.impl("prototype_sums", &prototype_sums_cuda);
  m.impl("prototype_ema", &prototype_ema_cuda);
}

}  // namespace protoseg

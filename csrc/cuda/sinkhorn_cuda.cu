// CUDA kernel of `sinkhorn` (mirrors csrc/cpu/sinkhorn_cpu.cpp): Sinkhorn-Knopp
// of every class at once, as segmented reductions keyed by label.
//
// Rows are sorted by key (label of a valid row, C for ignored or non-finite
// rows) with a stable at::sort, so each class is a contiguous segment of the
// sorted order and its rows are copied once into a working buffer W (N, K).
// Each segment is cut into G parts (G depends on N and C only); one block per
// (class, part) runs a pass over its rows and writes per-part column partials
// (C, G, K); a one-thread-per-column kernel merges them in part order. Column
// sums are accumulated in float64, and every reduction has a fixed order, so
// the result is bitwise the same on every run (deterministic in any mode).
// Passes: gather + column max, exp + column sums, then one pass per iteration
// (column scale, row scale, next column sums); the last one scatters Q.
// Nothing here reads a value back to the host.
#include <ATen/ATen.h>
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

constexpr int kThreads = 256;  // threads of a (class, part) block; >= K (K <= 256)

// Parts per class: enough blocks for a GPU when one class holds most pixels,
// few enough that C*G stays below ~8k (most blocks of small classes are empty).
int64_t parts_per_class(int64_t N, int64_t C) {
  const int64_t by_rows = ceil_div(N, 4096);
  const int64_t by_blocks = std::max<int64_t>(1, 8192 / C);
  return std::max<int64_t>(1, std::min<int64_t>({by_rows, by_blocks, 256}));
}

// Block layout of the (class, part) kernels: thread t handles column k = t % K
// of rows rr = t / K, rr + rpp, rr + 2*rpp, ... of the part, where rpp =
// kThreads / K rows are read per step. A step reads rpp*K consecutive entries
// of W: coalesced, and a thread's column never changes, so its column partial
// lives in one register.
struct PartLayout {
  int64_t k, rr, rpp;
  bool active;
  __device__ PartLayout(int64_t K) {
    rpp = kThreads / K;
    k = threadIdx.x % K;
    rr = threadIdx.x / K;
    active = rr < rpp;
  }
};

// Row key: label of a row that takes part (label a class and finite scores),
// else C. Asserts the label contract (a class or ignore_index).
// Launch: 1-D, kThreads threads, one thread per row, grid-stride.
// Bounds: n < N; reads own[n*K, n*K + K). Sync: one writer per key[n].
template <typename scalar_t>
__global__ void sinkhorn_keys_kernel(const scalar_t* __restrict__ own, const int64_t* __restrict__ labels, int64_t N,
                                     int64_t K, int64_t C, int64_t ignore_index, int32_t* __restrict__ key) {
  for (int64_t n = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; n < N; n += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = labels[n];
    CUDA_KERNEL_ASSERT_MSG(label_in_range(c, C) || c == ignore_index,
                           "labels: a label is outside [0, C) and is not ignore_index");
    bool ok = label_in_range(c, C);
    for (int64_t k = 0; ok && k < K; ++k) ok = is_finite(static_cast<at::opmath_type<scalar_t>>(own[n * K + k]));
    key[n] = ok ? int32_t(c) : int32_t(C);
  }
}

// Pass 1: W[r] = own[perm[r]] (working dtype) for the part's rows, and the
// part's column max.
// Launch: grid (C, G), kThreads threads, PartLayout. Bounds: rows r in the
// part [a, b) of segment [bounds[c], bounds[c+1]) (a subset of [0, N)), k < K,
// perm[r] < N. Sync: rows of different parts are disjoint, each W entry has
// one writer; the loop bound is block-uniform, so every thread reaches the
// __syncthreads before the shared-memory reduction.
template <typename scalar_t, typename T>
__global__ void __launch_bounds__(kThreads, 4) sinkhorn_gather_max_kernel(
    const scalar_t* __restrict__ own, const int64_t* __restrict__ perm, const int64_t* __restrict__ bounds, int64_t K,
    int64_t G, T* __restrict__ W, T* __restrict__ part_max) {
  __shared__ T red[kThreads];
  const int64_t c = blockIdx.x, g = blockIdx.y;
  int64_t a, b;
  segment_part(bounds[c], bounds[c + 1], g, G, a, b);
  const PartLayout L(K);
  T m = -INFINITY;
  for (int64_t base = a; base < b; base += L.rpp) {
    const int64_t r = base + L.rr;
    if (L.active && r < b) {
      const T v = static_cast<T>(own[perm[r] * K + L.k]);
      W[r * K + L.k] = v;
      m = fmax(m, v);  // rows are finite (keys kernel)
    }
  }
  red[threadIdx.x] = m;
  __syncthreads();
  if (threadIdx.x < K) {
    T mm = -INFINITY;
    for (int64_t q = 0; q < L.rpp; ++q) mm = fmax(mm, red[q * K + threadIdx.x]);
    part_max[(c * G + g) * K + threadIdx.x] = mm;
  }
}

// Column max of each (class, prototype) from the part maxima.
// Launch: 1-D, one thread per column j = c*K + k < C*K. Bounds: reads
// part_max[(c*G + g)*K + k], g < G. Sync: one writer per column.
template <typename T>
__global__ void sinkhorn_colmax_kernel(const T* __restrict__ part_max, int64_t CK, int64_t K, int64_t G,
                                       T* __restrict__ colmax) {
  const int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= CK) return;
  const int64_t c = j / K, k = j - c * K;
  T m = -INFINITY;
  for (int64_t g = 0; g < G; ++g) m = fmax(m, part_max[(c * G + g) * K + k]);
  colmax[j] = m;
}

// Pass 2: L = exp((S - colmax) / eps) in place, and the part's column sums
// (float64). Launch, bounds and sync as sinkhorn_gather_max_kernel.
template <typename T>
__global__ void __launch_bounds__(kThreads, 4)
    sinkhorn_init_kernel(T* __restrict__ W, const int64_t* __restrict__ bounds, const T* __restrict__ colmax, T eps,
                         int64_t K, int64_t G, double* __restrict__ part_sum) {
  __shared__ double red[kThreads];
  const int64_t c = blockIdx.x, g = blockIdx.y;
  int64_t a, b;
  segment_part(bounds[c], bounds[c + 1], g, G, a, b);
  const PartLayout L(K);
  const T cm = L.active ? colmax[c * K + L.k] : T(0);
  double sum = 0.0;
  for (int64_t base = a; base < b; base += L.rpp) {
    const int64_t r = base + L.rr;
    if (L.active && r < b) {
      const T v = sinkhorn_init(W[r * K + L.k], cm, eps);
      W[r * K + L.k] = v;
      sum += double(v);
    }
  }
  red[threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.x < K) {
    double s = 0.0;
    for (int64_t q = 0; q < L.rpp; ++q) s += red[q * K + threadIdx.x];
    part_sum[(c * G + g) * K + threadIdx.x] = s;
  }
}

// Column scale of each (class, prototype): merge the part sums in part order,
// then 1 / (colsum * K) (sinkhorn_col_scale).
// Launch: 1-D, one thread per column j < C*K. Bounds and sync as
// sinkhorn_colmax_kernel.
template <typename T>
__global__ void sinkhorn_colscale_kernel(const double* __restrict__ part_sum, int64_t CK, int64_t K, int64_t G,
                                         T* __restrict__ colscale) {
  const int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= CK) return;
  const int64_t c = j / K, k = j - c * K;
  double s = 0.0;
  for (int64_t g = 0; g < G; ++g) s += part_sum[(c * G + g) * K + k];
  colscale[j] = sinkhorn_col_scale<T>(s, K);
}

// One Sinkhorn iteration over a part: scale columns (colscale), then rows
// (sinkhorn_row_scale, with the final L *= n_c folded into the last one), and
// the next column sums; the last iteration scatters the rows to Q[perm[r]].
// Launch: grid (C, G), kThreads threads, PartLayout. A step holds rpp rows in
// shared memory; thread t < rpp sums row t's K entries in k order (the CPU
// order).
// Bounds: as sinkhorn_gather_max_kernel; shared indices q*K + k < rpp*K <=
// kThreads. Sync: the step loop bound is block-uniform, so all threads meet
// both barriers of every step: the first publishes vals before the row sums
// read them, the second publishes rs before it is read, and no thread can
// overwrite vals or rs of the next step before every thread has passed the
// second barrier of this one. W rows and Q rows have one writer each.
// Hot kernel: must not spill.
template <typename T>
__global__ void __launch_bounds__(kThreads, 4) sinkhorn_iterate_kernel(
    T* __restrict__ W, const int64_t* __restrict__ perm, const int64_t* __restrict__ bounds,
    const T* __restrict__ colscale, int64_t K, int64_t G, bool last, double* __restrict__ part_sum,
    T* __restrict__ Q) {
  __shared__ T vals[kThreads];
  __shared__ T rs[kThreads];
  __shared__ double red[kThreads];
  const int64_t c = blockIdx.x, g = blockIdx.y;
  const int64_t n_c = bounds[c + 1] - bounds[c];
  int64_t a, b;
  segment_part(bounds[c], bounds[c + 1], g, G, a, b);
  const PartLayout L(K);
  const T cs = L.active ? colscale[c * K + L.k] : T(0);
  double sum = 0.0;
  for (int64_t base = a; base < b; base += L.rpp) {
    const int64_t r = base + L.rr;
    const bool valid = L.active && r < b;
    T v = valid ? W[r * K + L.k] * cs : T(0);  // each prototype column to 1/K
    vals[threadIdx.x] = v;
    __syncthreads();
    if (threadIdx.x < L.rpp && base + threadIdx.x < b) {
      T rowsum = T(0);
      for (int64_t q = 0; q < K; ++q) rowsum += vals[threadIdx.x * K + q];
      rs[threadIdx.x] = sinkhorn_row_scale(rowsum, n_c, last);  // each pixel row to 1/n_c (1 at the end)
    }
    __syncthreads();
    if (valid) {
      v *= rs[L.rr];
      if (last) {
        Q[perm[r] * K + L.k] = v;
      } else {
        W[r * K + L.k] = v;
        sum += double(v);
      }
    }
  }
  if (last) return;  // block-uniform: no barrier follows for anyone
  red[threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.x < K) {
    double s = 0.0;
    for (int64_t q = 0; q < L.rpp; ++q) s += red[q * K + threadIdx.x];
    part_sum[(c * G + g) * K + threadIdx.x] = s;
  }
}

}  // namespace

at::Tensor sinkhorn_cuda(const at::Tensor& own, const at::Tensor& labels, int64_t num_classes, int64_t ignore_index,
                         int64_t iters, double eps) {
  check_sinkhorn_args(own, labels, num_classes, iters, eps);
  TORCH_CHECK_VALUE(own.size(1) <= kThreads, "own: K (prototypes per class) must be <= ", kThreads, ", got ",
                    own.size(1));
  c10::cuda::CUDAGuard guard(own.device());
  const int64_t N = own.size(0), K = own.size(1), C = num_classes, CK = C * K;
  const auto acc = acc_type(own.scalar_type());
  at::Tensor Q = at::zeros({N, K}, own.options().dtype(acc));  // ignored rows stay zero
  if (N == 0 || K == 0) return Q;
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor S = own.contiguous();
  at::Tensor lab = labels.to(at::kLong).contiguous();
  auto iopt = own.options().dtype(at::kInt);

  at::Tensor key = at::empty({N}, iopt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, S.scalar_type(), "sinkhorn_keys_cuda", [&] {
    const int64_t blocks = std::min<int64_t>(ceil_div(N, kThreads), 65536);
    sinkhorn_keys_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(S.data_ptr<scalar_t>(), lab.data_ptr<int64_t>(),
                                                                    N, K, C, ignore_index, key.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  at::Tensor sorted_key, perm;
  std::tie(sorted_key, perm) = at::sort(key, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  at::Tensor bounds = cuda::segment_bounds(sorted_key, C, stream);  // class c: rows [bounds[c], bounds[c+1])

  const int64_t G = parts_per_class(N, C);
  const dim3 grid(static_cast<unsigned>(C), static_cast<unsigned>(G));
  const int64_t col_blocks = ceil_div(CK, kThreads);
  at::Tensor W = at::empty({N, K}, own.options().dtype(acc));
  at::Tensor part_sum = at::empty({C, G, K}, own.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, S.scalar_type(), "sinkhorn_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    at::Tensor part_max = at::empty({C, G, K}, own.options().dtype(acc));
    at::Tensor colstat = at::empty({CK}, own.options().dtype(acc));  // column max, then column scale
    const int64_t* pp = perm.data_ptr<int64_t>();
    const int64_t* bp = bounds.data_ptr<int64_t>();
    sinkhorn_gather_max_kernel<scalar_t, T><<<grid, kThreads, 0, stream>>>(
        S.data_ptr<scalar_t>(), pp, bp, K, G, W.data_ptr<T>(), part_max.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sinkhorn_colmax_kernel<T><<<col_blocks, kThreads, 0, stream>>>(part_max.data_ptr<T>(), CK, K, G,
                                                                    colstat.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // The official global normalisation L /= sum(L) is a no-op for the result (column scaling).
    sinkhorn_init_kernel<T><<<grid, kThreads, 0, stream>>>(W.data_ptr<T>(), bp, colstat.data_ptr<T>(), T(eps), K, G,
                                                           part_sum.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    for (int64_t it = 0; it < iters; ++it) {
      const bool last = it + 1 == iters;
      sinkhorn_colscale_kernel<T><<<col_blocks, kThreads, 0, stream>>>(part_sum.data_ptr<double>(), CK, K, G,
                                                                        colstat.data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      sinkhorn_iterate_kernel<T><<<grid, kThreads, 0, stream>>>(W.data_ptr<T>(), pp, bp, colstat.data_ptr<T>(), K, G,
                                                                last, part_sum.data_ptr<double>(), Q.data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return Q;
}

TORCH_LIBRARY_IMPL(protoseg_ext, CUDA, m) { m.impl("sinkhorn", &sinkhorn_cuda); }

}  // namespace protoseg

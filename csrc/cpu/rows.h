// Row helpers of the CPU kernels: one pass over a contiguous row, vectorised.
//
// `omp simd reduction` lets the compiler split a sum into vector lanes (a
// fixed order for a given build and row length, so results never depend on
// the thread count). The extension is compiled with -fopenmp, which honours
// the pragma; elsewhere it is ignored and the loops stay correct.
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>
#include <algorithm>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "../protoseg_math.h"
#include "cpu_isa.h"

// In the variant's namespace: each compiled copy of a kernel calls its own
// copy of these helpers (cpu_isa.h).
namespace protoseg {
namespace PROTOSEG_CPU_CAPABILITY {
namespace rows {

// Reductions of long rows run in kLanes independent partial sums (lane j
// takes the entries d = j mod kLanes, in order; the lanes are combined
// pairwise), so the adds of a row are not one serial chain of dependent
// instructions. The order is fixed by the row length alone. Rows shorter
// than kLanesMin use a single accumulator (the lane split would not pay).
constexpr int kLanes = 8;
constexpr int64_t kLanesMin = 64;

// sum over d < n of f(d), accumulated in Acc
template <typename Acc, typename F>
inline Acc sum_of(int64_t n, F f) {
  if (n < kLanesMin) {
    Acc s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t d = 0; d < n; ++d) s += f(d);
    return s;
  }
  Acc p[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes) {
#pragma omp simd
    for (int j = 0; j < kLanes; ++j) p[j] += f(d + j);
  }
  for (int j = 0; d + j < n; ++j) p[j] += f(d + j);
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int j = 0; j < w; ++j) p[j] += p[j + w];
  return p[0];
}

// sum_d x[d]^2, accumulated in Acc.
template <typename Acc, typename T>
inline Acc sumsq(const T* x, int64_t n) {
  return sum_of<Acc>(n, [x](int64_t d) { return Acc(x[d]) * Acc(x[d]); });
}

// sum_d x[d]
template <typename T>
inline T sum(const T* x, int64_t n) {
  return sum_of<T>(n, [x](int64_t d) { return x[d]; });
}

// max_d x[d], NaN if any entry is NaN (torch.amax semantics); -inf when n = 0.
// Branch-free: a max reduction across vector lanes and a separate NaN flag.
template <typename T>
inline T max_nan(const T* x, int64_t n) {
  T m = -INFINITY;
  bool nan = false;
#pragma omp simd reduction(max : m) reduction(| : nan)
  for (int64_t d = 0; d < n; ++d) {
    m = x[d] > m ? x[d] : m;
    nan = nan | (x[d] != x[d]);
  }
  return nan ? std::numeric_limits<T>::quiet_NaN() : m;
}

// Per-class max and arg-max over K of one row s (K*C, k-major: entry k*C + c
// is prototype k of class c), scaling the row by a in place first (the row's
// 1 / ||x||; 1 leaves it exact). max_push semantics: first maximum wins, NaN
// counts as the largest. k-major keeps the K steps across classes in vector
// lanes, branch-free: the positions of maxima are data dependent, so a branch
// per entry mispredicts.
template <typename T>
inline void class_max(T* s, int64_t C, int64_t K, T a, T* best, int32_t* arg) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    s[c] *= a;
    best[c] = s[c];
    arg[c] = 0;
  }
  for (int32_t k = 1; k < K; ++k) {
    T* v = s + k * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      v[c] *= a;
      const bool take = max_takes(v[c], best[c]);
      best[c] = take ? v[c] : best[c];
      arg[c] = take ? k : arg[c];
    }
  }
}

// x[d] *= a
template <typename T>
inline void scale(T* x, T a, int64_t n) {
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) x[d] *= a;
}

// y[d] = x[d] * a
template <typename T>
inline void scale_to(T* y, const T* x, T a, int64_t n) {
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) y[d] = x[d] * a;
}

// y[d] = x[d] / a - b
template <typename T>
inline void div_sub(T* y, const T* x, T a, T b, int64_t n) {
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) y[d] = x[d] / a - b;
}

// y[d] = x[d] - b
template <typename T>
inline void sub(T* y, const T* x, T b, int64_t n) {
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) y[d] = x[d] - b;
}

// dst[d] += Acc(src[d]) * w
template <typename Acc, typename T>
inline void axpy(Acc* dst, const T* src, Acc w, int64_t n) {
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) dst[d] += Acc(src[d]) * w;
}

// dst[0:n] = src[0:n] with non-temporal (streaming) stores where the ISA has
// them: for a result written once and read much later, which would otherwise
// first be read into the cache and then evict useful lines. Call
// stream_fence() before other threads read dst.
template <typename T>
inline void stream_copy(T* dst, const T* src, int64_t n) {
  int64_t d = 0;
#if defined(__SSE2__)
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    constexpr int64_t w = 16 / sizeof(T);  // entries per 16-byte store
    for (; d < n && (reinterpret_cast<uintptr_t>(dst + d) & 15) != 0; ++d) dst[d] = src[d];
    for (; d + w <= n; d += w) {
      if constexpr (std::is_same_v<T, float>) {
        _mm_stream_ps(dst + d, _mm_loadu_ps(src + d));
      } else {
        _mm_stream_pd(dst + d, _mm_loadu_pd(src + d));
      }
    }
  }
#endif
  for (; d < n; ++d) dst[d] = src[d];
}
inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// Backward of f = x / max(||x||, eps) for one row, in place on g = dL/df
// (normalize_grad of protoseg_math.h, entry by entry). Three passes over the
// row, in L1: ||x||^2, x . g, the update.
template <typename T>
inline void normalize_backward(T* g, const T* x, int64_t n) {
  const T sq = sumsq<T>(x, n);  // ||x||^2
  const T xg = sum_of<T>(n, [x, g](int64_t d) { return x[d] * g[d]; });
  const T inv = inv_norm(sq);
  // (f . g) is taken as 0 where ||x|| <= eps; a NaN norm propagates
  const T f_dot_g = std::sqrt(sq) <= T(kNormEps) ? T(0) : xg * inv;
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) g[d] = normalize_grad(g[d], x[d], inv, f_dot_g);
}

// The scale of a row in the sums (1 / max(||x||, eps) when normalising, else
// 1), or false when the row has a NaN or inf entry. The squared norm is
// summed in Acc; a float32 sum that overflows is redone in float64 (float32,
// half and bfloat16 squares cannot overflow a double sum), so only a
// non-finite entry rejects a row. float64 rows are checked entry by entry.
template <typename Acc, typename T>
inline bool row_scale(const T* x, int64_t D, bool normalize, Acc& w) {
  const Acc sq = rows::sumsq<Acc>(x, D);
  if (is_finite(sq)) {
    w = normalize ? inv_norm(sq) : Acc(1);
    return true;
  }
  const double sq64 = rows::sumsq<double>(x, D);
  if (!is_finite(sq64)) return false;
  w = normalize ? Acc(inv_norm(sq64)) : Acc(1);
  return true;
}
template <>
inline bool row_scale<double, double>(const double* x, int64_t D, bool normalize, double& w) {
  bool bad = false;
  for (int64_t d = 0; d < D; ++d) bad |= !is_finite(x[d]);
  w = normalize ? inv_norm(rows::sumsq<double>(x, D)) : 1.0;
  return !bad;
}
// Per-slot running sums of rows in the accumulation type T, flushed into a
// float64 partial (slots x D): the scratch of the deterministic prototype sums.
template <typename T>
struct SlotSums {
  int64_t D;
  std::vector<T> sums;
  std::vector<uint8_t> touched;
  std::vector<int64_t> used;  // the slots with a nonzero row
  SlotSums(int64_t num_slots, int64_t d) : D(d), sums(num_slots * d, T(0)), touched(num_slots, 0) {}
  // slot s's running row (marked for the next flush)
  T* row(int64_t s) {
    if (!touched[s]) {
      touched[s] = 1;
      used.push_back(s);
    }
    return sums.data() + s * D;
  }
  // partial[s] += the running row of s, which restarts from zero
  void flush(double* partial) {
    for (int64_t s : used) {
      T* r = sums.data() + s * D;
      double* p = partial + s * D;
      for (int64_t d = 0; d < D; ++d) p[d] += double(r[d]);
      std::fill(r, r + D, T(0));
      touched[s] = 0;
    }
    used.clear();
  }
};

}  // namespace rows
}  // namespace PROTOSEG_CPU_CAPABILITY
}  // namespace protoseg

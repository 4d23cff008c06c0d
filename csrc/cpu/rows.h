// Row helpers of the CPU kernels: one pass over a contiguous row, vectorised.
//
// `omp simd reduction` lets the compiler split a sum into vector lanes (a
// fixed order for a given build and row length, so results never depend on
// the thread count). The extension is compiled with -fopenmp, which honours
// the pragma; elsewhere it is ignored and the loops stay correct.
#pragma once
#include <cmath>
#include <cstdint>

#include "../protoseg_math.h"

namespace protoseg {
namespace rows {

// sum_d x[d]^2, accumulated in Acc.
template <typename Acc, typename T>
inline Acc sumsq(const T* x, int64_t n) {
  Acc s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < n; ++d) s += Acc(x[d]) * Acc(x[d]);
  return s;
}

// sum_d x[d]
template <typename T>
inline T sum(const T* x, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < n; ++d) s += x[d];
  return s;
}

// max_d x[d], NaN if any entry is NaN (torch.amax semantics); -inf when n = 0
template <typename T>
inline T max_nan(const T* x, int64_t n) {
  T m = -INFINITY;
  for (int64_t d = 0; d < n; ++d) m = (x[d] > m || x[d] != x[d]) ? x[d] : m;
  return m;
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

// Backward of f = x / max(||x||, eps) for one row, in place on g = dL/df
// (normalize_grad of protoseg_math.h, entry by entry). Two passes over the row.
template <typename T>
inline void normalize_backward(T* g, const T* x, int64_t n) {
  T sq = 0, xg = 0;  // ||x||^2 and x . g in one pass
#pragma omp simd reduction(+ : sq, xg)
  for (int64_t d = 0; d < n; ++d) {
    sq += x[d] * x[d];
    xg += x[d] * g[d];
  }
  const T inv = inv_norm(sq);
  // (f . g) is taken as 0 where ||x|| <= eps; a NaN norm propagates
  const T f_dot_g = std::sqrt(sq) <= T(kNormEps) ? T(0) : xg * inv;
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) g[d] = normalize_grad(g[d], x[d], inv, f_dot_g);
}

}  // namespace rows
}  // namespace protoseg

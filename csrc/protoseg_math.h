// Per-element math of the ProtoSeg ops, shared by the CPU (C++) and CUDA kernels.
//
// Every function here is __host__ __device__, so the CPU kernels (and therefore
// the CPU tests) exercise exactly the code that the CUDA kernels run.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define PSE_HD __host__ __device__ __forceinline__
#else
#define PSE_HD inline
#endif

namespace protoseg {

// Smallest norm F.normalize divides by (official l2_normalize uses its default).
constexpr double kNormEps = 1e-12;

#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
PSE_HD float fexp(float x) { return expf(x); }
PSE_HD double fexp(double x) { return exp(x); }
PSE_HD float flog(float x) { return logf(x); }
PSE_HD double flog(double x) { return log(x); }
PSE_HD float fsqrt(float x) { return sqrtf(x); }
PSE_HD double fsqrt(double x) { return sqrt(x); }
PSE_HD bool is_finite(float x) { return isfinite(x); }
PSE_HD bool is_finite(double x) { return isfinite(x); }
#else
PSE_HD float fexp(float x) { return std::exp(x); }
PSE_HD double fexp(double x) { return std::exp(x); }
PSE_HD float flog(float x) { return std::log(x); }
PSE_HD double flog(double x) { return std::log(x); }
PSE_HD float fsqrt(float x) { return std::sqrt(x); }
PSE_HD double fsqrt(double x) { return std::sqrt(x); }
PSE_HD bool is_finite(float x) { return std::isfinite(x); }
PSE_HD bool is_finite(double x) { return std::isfinite(x); }
#endif

// A label selects a class when it lies in [0, C); ignore_index selects none.
PSE_HD bool label_in_range(int64_t label, int64_t num_classes) {
  return label >= 0 && label < num_classes;
}

// The own-class column of a PPC/PPD target t = c*K + k: t mod K in [0, K),
// floor mod as torch.remainder, for any integer t (ppc_ppd).
PSE_HD int64_t own_column(int64_t t, int64_t K) {
  const int64_t k = t % K;
  return k < 0 ? k + K : k;
}

// ---- nearest prototype of a class (seg head) ----
// Running max over the K similarities of one class, keeping its index: the
// first maximum wins and NaN counts as the largest value (torch.max(dim)
// semantics). Start from best = -INFINITY, arg = 0.
template <typename T>
PSE_HD bool max_takes(T v, T best) {
  return v > best || (v != v && best == best);
}
template <typename T>
PSE_HD void max_push(T& best, int64_t& arg, T v, int64_t k) {
  if (max_takes(v, best)) {
    best = v;
    arg = k;
  }
}

// ---- log-sum-exp over the C*K similarities of a pixel (PPC) ----
// A running (max, sum) pair: the value it stands for is log(sum) + max.
template <typename T>
struct LseState {
  T max;
  T sum;
};

template <typename T>
PSE_HD LseState<T> lse_init() {
  return {-INFINITY, T(0)};
}

// Add one logit x to the running state (online softmax normaliser).
template <typename T>
PSE_HD void lse_push(LseState<T>& s, T x) {
  if (x > s.max) {
    s.sum = s.sum * fexp(s.max - x) + T(1);
    s.max = x;
  } else {
    s.sum += fexp(x - s.max);
  }
}

// Merge two partial states (e.g. two column tiles of the same row).
template <typename T>
PSE_HD LseState<T> lse_merge(LseState<T> a, LseState<T> b) {
  if (b.max == -INFINITY) return a;
  if (a.max == -INFINITY) return b;
  if (a.max >= b.max) return {a.max, a.sum + b.sum * fexp(b.max - a.max)};
  return {b.max, b.sum + a.sum * fexp(a.max - b.max)};
}

template <typename T>
PSE_HD T lse_value(LseState<T> s) {
  return s.max + flog(s.sum);
}

// ---- PPC / PPD terms of one pixel ----
// PPC term: lse(S/tau) - S[target]/tau; PPD term: (1 - S[target])^2.
template <typename T>
PSE_HD T ppc_term(T lse, T s_target, T temperature) {
  return lse - s_target / temperature;
}
template <typename T>
PSE_HD T ppd_term(T s_target) {
  return (T(1) - s_target) * (T(1) - s_target);
}
// d lse(S/tau) / d S_j = softmax_j(S/tau) / tau, scaled by the upstream gradient.
template <typename T>
PSE_HD T lse_grad(T s, T lse, T temperature, T grad_lse) {
  return fexp(s / temperature - lse) * (grad_lse / temperature);
}
// softmax_j(S / tau) from the row's log-sum-exp (the cached softmax rows).
template <typename T>
PSE_HD T softmax_prob(T s, T lse, T temperature) {
  return fexp(s / temperature - lse);
}
// d lse(S/tau) / d S_j from the cached softmax row p_j = softmax_j(S / tau).
template <typename T>
PSE_HD T softmax_grad(T p, T temperature, T grad_lse) {
  return p * (grad_lse / temperature);
}
// Entry of d loss / d S[n, c*K + k] (similarity backward), the three terms
// added in this order: the softmax term (lse_grad or softmax_grad; 0 without
// grad_lse), the seg term (the max over K routes grad_seg[n, c] to k ==
// argk[n, c]) and the own-class term (if c == labels[n]).
template <typename T>
PSE_HD T similarity_grad_entry(T softmax_term, bool is_argmax, T grad_seg, bool is_own, T grad_own) {
  T g = softmax_term;
  if (is_argmax) g += grad_seg;
  if (is_own) g += grad_own;
  return g;
}

// ---- Sinkhorn-Knopp, one class at a time, as a segmented reduction ----
// The kernels work on L[n, k] = exp((S[n, k] - colmax[c, k]) / eps). Scaling a
// column by a constant does not change the result (the first column
// normalisation removes it), so the shift keeps exp() in range for any eps
// without changing the official result. Column scale of an iteration:
// L[n, k] /= colsum[c, k] * K.
template <typename T>
PSE_HD T sinkhorn_exponent(T s, T colmax, T eps) {
  return (s - colmax) / eps;
}
template <typename T>
PSE_HD T sinkhorn_init(T s, T colmax, T eps) {
  return fexp(sinkhorn_exponent(s, colmax, eps));
}
template <typename T>
PSE_HD T sinkhorn_col_scale(double colsum, int64_t K) {
  return colsum > 0 ? T(1.0 / (colsum * double(K))) : T(0);
}
// Row scale: rows sum to 1 / n_c inside the loop (official L /= rowsum; L /= B)
// and to 1 after the final L *= n_c, which the last iteration folds in.
template <typename T>
PSE_HD T sinkhorn_row_scale(T rowsum, int64_t n_c, bool last) {
  if (!(rowsum > T(0))) return T(0);
  return last ? T(1) / rowsum : T(1) / (rowsum * T(n_c));
}

// Sinkhorn: start/end of part g of G of the segment [begin, end) (rows in
// sorted order); parts are contiguous, cover the segment and depend only on
// its bounds, so a reduction over them in part order is deterministic.
PSE_HD void segment_part(int64_t begin, int64_t end, int64_t g, int64_t G, int64_t& part_begin, int64_t& part_end) {
  const int64_t len = end - begin;
  part_begin = begin + len * g / G;
  part_end = begin + len * (g + 1) / G;
}

// ---- Prototype update ----
// 1 / max(||x||, 1e-12) from the squared norm (F.normalize semantics).
template <typename T>
PSE_HD T inv_norm(T sqnorm) {
  T n = fsqrt(sqnorm);
  return T(1) / (n > T(kNormEps) ? n : T(kNormEps));
}
// Backward of f = x / max(||x||, eps) (F.normalize) for entry d, given
// inv = 1 / max(||x||, eps) and f_dot_g = (f . g), taken as 0 where ||x|| <= eps
// (there f = x / eps is not a unit vector and the scale is a constant):
// d loss / d x_d = (g_d - f_d (f . g)) * inv.
template <typename T>
PSE_HD T normalize_grad(T g, T x, T inv, T f_dot_g) {
  return (g - (x * inv) * f_dot_g) * inv;
}
// Official momentum update.
template <typename T>
PSE_HD T ema(T old_value, T new_value, T gamma) {
  return gamma * old_value + (T(1) - gamma) * new_value;
}

}  // namespace protoseg

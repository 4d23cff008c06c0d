// The head's embedding read from an image's (D, HW) plane as it lies: no
// transposed copy of a tile, no LayerNorm'd copy, forward or backward.
//
// A tile is n pixels (columns) of one plane, D rows of stride ld. For pixel j
// with LayerNorm (weight w, bias b) and L2 normalisation:
//   xhat = (x - mu) r,  y = xhat * w + b,  z = y * inv,  inv = 1 / max(||y||, eps)
// and its scores against prototype p_c (k-major column c of S):
//   z . p_c = inv * (r * (x . (w p_c) - mu * rho_c) + beta_c),
//   rho_c = sum_d w_d p_cd,  beta_c = sum_d b_d p_cd,
// so the GEMM runs on the raw plane (BLAS reads it as it lies, the right
// operand of (w P) x; see raw_scores) against the prototypes scaled by w, and
// the LayerNorm becomes a per-row affine map of S. Every per-pixel sum the
// forward and backward need comes from one pass over the tile in row order
// (each row a contiguous run of n pixels), in vector lanes across pixels,
// shifted by the pixel's first value k = x_0 so that the sums of squares do
// not cancel:
//   s1 = sum (x - k), s2 = sum (x - k)^2, s3 = sum (x - k)^2 w^2,
//   s4 = sum (x - k) w^2, s5 = sum (x - k) w b.
// With delta = s1 / D (mu = k + delta), the LayerNorm's statistics and
//   Q = sum (x - mu)^2 w^2 = s3 - 2 delta s4 + delta^2 sum w^2,
//   L = sum (x - mu) w b   = s5 - delta sum w b,
//   M = sum (x - mu) w^2   = s4 - delta sum w^2,
//   ||y||^2 = r^2 Q + 2 r L + sum b^2
// follow. The GEMM's rounding grows with |mu| while the result scales with
// 1 / r: a tile with a pixel whose |mu| r exceeds kMaxOffset (or a NaN) takes
// the row path of similarity_cpu.h instead (see finish_stats).
//
// Backward, given G = d loss / d z as a (D, n) tile (P^T dS^T, one GEMM), with
// t1 = sum (x - k) w g, t2 = sum w g, t3 = sum b g (one pass):
//   y . g = r (t1 - delta t2) + t3,  f_dot_g = (y . g) inv (0 where ||y|| <= eps),
//   g_y = a g - c y  (a = inv, c = inv^2 f_dot_g: the L2 normalisation's backward),
//   m1 = mean_d w g_y = (a t2 - c (r M + sum w b)) / D,
//   m2 = mean_d w g_y xhat = (a r (t1 - delta t2) - c (r^2 Q + r L)) / D,
//   dx = r (w g_y - m1 - xhat m2),  dw += g_y xhat,  db += g_y
// (the LayerNorm's backward), written into the gradient's plane in a second pass.
// Without the LayerNorm (w = 1, b = 0, mu = 0, r = 1) only the L2 part remains.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../protoseg_math.h"
#include "cpu_isa.h"

namespace protoseg {
namespace PROTOSEG_CPU_CAPABILITY {
namespace plane {

// Largest |mean| / std of a pixel whose LayerNorm is folded into the GEMM. A
// conservative bound: measured at D = 720, the fold's float32 error at
// |mean| / std = 500 was still only 2.4x the row path's.
constexpr double kMaxOffset = 16.0;

// The LayerNorm folded into the prototypes (k-major rows of P).
template <typename T>
struct Fold {
  bool ln = false;
  at::Tensor Pw;              // (CK, D): P * w (P without LayerNorm)
  std::vector<T> rho, beta;   // (CK,)
  std::vector<T> w, b;        // (D,)
  T W2 = 0, WB = 0, B2 = 0;   // sum w^2, sum w b, sum b^2
  double eps = 0;

  Fold(const at::Tensor& P, const at::Tensor& weight, const at::Tensor& bias, double ln_eps) : eps(ln_eps) {
    ln = weight.defined();
    if (!ln) {
      Pw = P;
      return;
    }
    const int64_t D = weight.size(0);
    if (P.defined()) {  // (the prototype sums need the statistics alone)
      Pw = (P * weight.unsqueeze(0)).contiguous();
      at::Tensor r = at::mv(P, weight), bt = at::mv(P, bias);
      rho.assign(r.data_ptr<T>(), r.data_ptr<T>() + r.numel());
      beta.assign(bt.data_ptr<T>(), bt.data_ptr<T>() + bt.numel());
    }
    w.assign(weight.data_ptr<T>(), weight.data_ptr<T>() + D);
    b.assign(bias.data_ptr<T>(), bias.data_ptr<T>() + D);
    for (int64_t d = 0; d < D; ++d) {
      W2 += w[d] * w[d];
      WB += w[d] * b[d];
      B2 += b[d] * b[d];
    }
  }
};

// Per-pixel statistics of one tile, and scratch for the backward's sums.
template <typename T>
struct Stats {
  std::vector<T> k, delta, r, inv, sq, Q, L, M, s1, s2, s3, s4, s5, t1, t2, t3;
  std::vector<uint8_t> finite;  // the pixel's sums are finite (no NaN or inf entry, no overflow)
  explicit Stats(int64_t T_max) : finite(T_max) {
    for (auto* v : {&k, &delta, &r, &inv, &sq, &Q, &L, &M, &s1, &s2, &s3, &s4, &s5, &t1, &t2, &t3}) v->resize(T_max);
  }
};

// The per-pixel statistics from the sums s1..s5 (s2 alone without the
// LayerNorm); true when every pixel is finite and within kMaxOffset (the
// tile can then take the plane path).
template <typename T>
bool finish_stats(int64_t n, int64_t D, const Fold<T>& f, Stats<T>& st) {
  bool ok = true;
  if (!f.ln) {
    for (int64_t j = 0; j < n; ++j) {
      const T sq = st.s2[j];
      st.sq[j] = sq;
      st.inv[j] = inv_norm(sq);
      st.finite[j] = std::isfinite(sq);
      ok = ok && st.finite[j];
    }
    return ok;
  }
  const T Dt = T(D);
  for (int64_t j = 0; j < n; ++j) {
    const T s1 = st.s1[j], s2 = st.s2[j], s4 = st.s4[j];
    const T dl = s1 / Dt;
    const T var = std::max(s2 / Dt - dl * dl, T(0));
    const T r = T(1) / std::sqrt(var + T(f.eps));
    const T Q = std::max(st.s3[j] - T(2) * dl * s4 + dl * dl * f.W2, T(0));
    const T L = st.s5[j] - dl * f.WB;
    const T sq = std::max(r * r * Q + T(2) * r * L + f.B2, T(0));
    st.delta[j] = dl;
    st.r[j] = r;
    st.Q[j] = Q;
    st.L[j] = L;
    st.M[j] = s4 - dl * f.W2;
    st.sq[j] = sq;
    st.inv[j] = inv_norm(sq);
    const T off = std::abs(st.k[j] + dl) * r;
    st.finite[j] = std::isfinite(s1) && std::isfinite(s2) && std::isfinite(sq);
    ok = ok && off <= T(kMaxOffset) && st.finite[j];  // false for NaN
  }
  return ok;
}

// Zeroes the sums of `stats` (and takes the shifts k from the first row).
template <typename T>
void start_stats(const T* x, int64_t n, const Fold<T>& f, Stats<T>& st) {
  std::fill(st.s2.begin(), st.s2.begin() + n, T(0));
  if (!f.ln) return;
  std::copy(x, x + n, st.k.begin());
  for (auto* v : {&st.s1, &st.s3, &st.s4, &st.s5}) std::fill(v->begin(), v->begin() + n, T(0));
}

// Adds row d of the tile (n pixels, xr) into the sums of the statistics:
// s1..s5 (s2 alone without the LayerNorm), or with kGivenMean
// (add_given_row, LayerNorm only) s3..s5 alone, the shift k being the mean.
template <typename T, bool kGivenMean = false>
inline void add_stats_row(const T* xr, int64_t d, int64_t n, const Fold<T>& f, Stats<T>& st) {
  T* s2 = st.s2.data();
  if (!f.ln) {
    if constexpr (!kGivenMean) {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) s2[j] += xr[j] * xr[j];
    }
    return;
  }
  T* s1 = st.s1.data();
  T* s3 = st.s3.data();
  T* s4 = st.s4.data();
  T* s5 = st.s5.data();
  const T* k = st.k.data();
  const T w2 = f.w[d] * f.w[d], wb = f.w[d] * f.b[d];
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const T v = xr[j] - k[j];
    if constexpr (!kGivenMean) {
      s1[j] += v;
      s2[j] += v * v;
    }
    s3[j] += v * v * w2;
    s4[j] += v * w2;
    s5[j] += v * wb;
  }
}

// The LayerNorm's statistics of the tile from embed_similarity's stats (gs:
// the tile's first pixel of its first 3 rows, row stride N): the shift k is
// the mean (delta = 0) and r is given, so the sums left (add_given_row) are
// s3, s4 and s5 about the mean, i.e. Q, M and L themselves.
template <typename T>
void start_given(const T* gs, int64_t N, int64_t n, Stats<T>& st) {
  for (int64_t j = 0; j < n; ++j) {
    st.k[j] = gs[j];
    st.delta[j] = T(0);
    st.r[j] = gs[N + j];
    st.finite[j] = std::isfinite(gs[2 * N + j]);  // (NaN in all three where not finite)
  }
  for (auto* v : {&st.s3, &st.s4, &st.s5}) std::fill(v->begin(), v->begin() + n, T(0));
}

// start_given, and inv from the stats too, for the scores' epilogue and the prototype sums; true
// when the tile can take the plane path (finish_stats' rule).
template <typename T>
bool given_stats(const T* gs, int64_t N, int64_t n, Stats<T>& st) {
  start_given(gs, N, n, st);
  bool ok = true;
  for (int64_t j = 0; j < n; ++j) {
    st.inv[j] = gs[2 * N + j];
    ok = ok && st.finite[j] && std::abs(st.k[j]) * st.r[j] <= T(kMaxOffset);  // false for NaN
  }
  return ok;
}

template <typename T>
inline void add_given_row(const T* xr, int64_t d, int64_t n, const Fold<T>& f, Stats<T>& st) {
  add_stats_row<T, true>(xr, d, n, f, st);
}

template <typename T>
void finish_given(int64_t n, const Fold<T>& f, Stats<T>& st) {
  for (int64_t j = 0; j < n; ++j) {
    const T r = st.r[j];
    st.Q[j] = std::max(st.s3[j], T(0));
    st.L[j] = st.s5[j];
    st.M[j] = st.s4[j];
    const T sq = std::max(r * r * st.Q[j] + T(2) * r * st.L[j] + f.B2, T(0));
    st.sq[j] = sq;
    st.inv[j] = inv_norm(sq);
    st.finite[j] = st.finite[j] && std::isfinite(sq);
  }
}

// The statistics of the n pixels of the tile x (D rows of stride ld), in one
// pass; returns finish_stats'.
template <typename T>
bool stats(const T* x, int64_t ld, int64_t n, int64_t D, const Fold<T>& f, Stats<T>& st) {
  start_stats(x, n, f, st);
  for (int64_t d = 0; d < D; ++d) add_stats_row(x + d * ld, d, n, f, st);
  return finish_stats(n, D, f, st);
}

// S (n, CK) = x^T Pw^T from the GEMM -> the scores z . p of the tile (in place).
template <typename T>
void scores_epilogue(T* S, int64_t n, int64_t CK, const Fold<T>& f, const Stats<T>& st) {
  for (int64_t i = 0; i < n; ++i) {
    T* s = S + i * CK;
    const T inv = st.inv[i];
    if (!f.ln) {
#pragma omp simd
      for (int64_t c = 0; c < CK; ++c) s[c] *= inv;
      continue;
    }
    const T a = st.r[i] * inv, mu = st.k[i] + st.delta[i];
    const T* rho = f.rho.data();
    const T* beta = f.beta.data();
#pragma omp simd
    for (int64_t c = 0; c < CK; ++c) s[c] = a * (s[c] - mu * rho[c]) + inv * beta[c];
  }
}

// S (n, CK) <- x^T Pw^T, the raw scores of the tile xview (the (D, n) plane
// view). BLAS runs it as Pw (CK, D) @ xview (D, n), both operands read as they
// lie, into the scratch ST (at least CK * n entries), transposed into S in
// cache by ATen's vectorised transposing copy: measured here (one thread, D =
// 720, n = 1024, CK = 190, MKL) that GEMM and the copy take 25% less time than
// BLAS reading the plane as the transposed operand of x^T Pw^T. (The copy
// takes 0.106 ms a tile on one thread; 16 x 16 blocks transposed in
// registers, transpose.h, took 0.099 ms: not worth a second path.) The
// forward and the backward's recompute both call this: the same S, bit for
// bit.
template <typename T>
void raw_scores(const at::Tensor& xview, const at::Tensor& Pw, at::Tensor& ST_buf, at::Tensor& S) {
  const int64_t n = xview.size(1), CK = Pw.size(0);
  at::Tensor ST = ST_buf.view(-1).narrow(0, 0, CK * n).view({CK, n});
  at::mm_out(ST, Pw, xview);
  S.copy_(ST.t());
}

// The scores of the tile x (D rows of stride ld, n pixels) into S (n, CK):
// false (S untouched) when the tile must take the row path. ST_buf: scratch
// of raw_scores.
template <typename T>
bool scores(const T* x, const at::Tensor& xview, int64_t ld, int64_t n, int64_t D, const Fold<T>& f, Stats<T>& st,
            at::Tensor& S, at::Tensor& ST_buf) {
  if (!stats(x, ld, n, D, f, st)) return false;
  raw_scores<T>(xview, f.Pw, ST_buf, S);
  scores_epilogue(S.data_ptr<T>(), n, S.size(1), f, st);
  return true;
}

// Where the backward's statistics come from: already in Stats (the forward's
// recompute), embed_similarity's stats (LayerNorm only: Q, M, L are still
// summed), or the first pass.
enum class StatsFrom { kHave, kGiven, kPass };

// pass 1: t1, t2, t3 per pixel (and the statistics' sums the StatsFrom
// leaves, the row still in L1); gs: embed_similarity's stats of the tile
// (kGiven, row stride N)
template <typename T>
void backward_sums(const T* x, int64_t ld, const T* G, int64_t n, int64_t D, const Fold<T>& f, Stats<T>& st,
                   StatsFrom from, const T* gs, int64_t N) {
  T* t1 = st.t1.data();
  T* t2 = st.t2.data();
  T* t3 = st.t3.data();
  const T* k = st.k.data();
  if (from == StatsFrom::kPass) start_stats(x, n, f, st);
  if (from == StatsFrom::kGiven) start_given(gs, N, n, st);
  for (T* t : {t1, t2, t3}) std::fill(t, t + n, T(0));
  for (int64_t d = 0; d < D; ++d) {
    const T* xr = x + d * ld;
    const T* g = G + d * n;
    if (from == StatsFrom::kPass) add_stats_row(xr, d, n, f, st);
    if (from == StatsFrom::kGiven) add_given_row(xr, d, n, f, st);
    if (!f.ln) {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) t1[j] += xr[j] * g[j];
      continue;
    }
    const T wd = f.w[d], bd = f.b[d];
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const T wg = wd * g[j];
      t1[j] += (xr[j] - k[j]) * wg;
      t2[j] += wg;
      t3[j] += bd * g[j];
    }
  }
  if (from == StatsFrom::kPass) finish_stats(n, D, f, st);
  if (from == StatsFrom::kGiven) finish_given(n, f, st);
}

// pass 2 without the LayerNorm: gx = a g - c x (a = inv, c = inv^2 f_dot_g)
template <typename T>
void normalize_backward(const T* x, int64_t ld, const T* G, T* gx, int64_t ld_out, int64_t n, int64_t D,
                        Stats<T>& st) {
  T* a = st.s1.data();
  T* c = st.s3.data();
  for (int64_t j = 0; j < n; ++j) {
    const T inv = st.inv[j];
    const T fdg = std::sqrt(st.sq[j]) <= T(kNormEps) ? T(0) : st.t1[j] * inv;
    a[j] = inv;
    c[j] = inv * inv * fdg;
  }
  for (int64_t d = 0; d < D; ++d) {
    const T* xr = x + d * ld;
    const T* g = G + d * n;
    T* o = gx + d * ld_out;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) o[j] = a[j] * g[j] - c[j] * xr[j];
  }
}

// pass 2 with the LayerNorm, given the per-pixel coefficients mu, a, c, m1,
// m2 (in the scratch of the sums s1..s5) and r: gx, and the tile's d w, d b
// added into dw, db
template <typename T>
void layer_norm_backward_apply(const T* x, int64_t ld, const T* G, T* gx, int64_t ld_out, int64_t n, int64_t D,
                               const Fold<T>& f, Stats<T>& st, T* dw, T* db) {
  const T* mu = st.s1.data();
  const T* a = st.s2.data();
  const T* c = st.s3.data();
  const T* m1 = st.s4.data();
  const T* m2 = st.s5.data();
  const T* r = st.r.data();
  for (int64_t d = 0; d < D; ++d) {
    const T* xr = x + d * ld;
    const T* g = G + d * n;
    T* o = gx + d * ld_out;
    const T wd = f.w[d], bd = f.b[d];
    T sw = 0, sb = 0;
#pragma omp simd reduction(+ : sw, sb)
    for (int64_t j = 0; j < n; ++j) {
      const T xh = (xr[j] - mu[j]) * r[j];
      const T gy = a[j] * g[j] - c[j] * (xh * wd + bd);
      o[j] = r[j] * (wd * gy - m1[j] - xh * m2[j]);
      sw += gy * xh;
      sb += gy;
    }
    dw[d] += sw;
    db[d] += sb;
  }
}

// Pixel j's coefficients of layer_norm_backward_apply, into the scratch of
// the sums s1..s5: its mean, a = inv, c = inv^2 f_dot_g, and m1, m2 (sums over
// D, divided by D here).
template <typename T>
inline void set_coefficients(Stats<T>& st, int64_t j, T mu, T inv, T c, T m1_sum, T m2_sum, T D) {
  st.s1[j] = mu;
  st.s2[j] = inv;
  st.s3[j] = c;
  st.s4[j] = m1_sum / D;
  st.s5[j] = m2_sum / D;
}

// pass 2 with the LayerNorm: the per-pixel coefficients from the sums of
// pass 1, then layer_norm_backward_apply
template <typename T>
void layer_norm_backward(const T* x, int64_t ld, const T* G, T* gx, int64_t ld_out, int64_t n, int64_t D,
                         const Fold<T>& f, Stats<T>& st, T* dw, T* db) {
  for (int64_t j = 0; j < n; ++j) {
    const T r = st.r[j], inv = st.inv[j], dl = st.delta[j];
    const T wgx = r * (st.t1[j] - dl * st.t2[j]);  // sum w g xhat
    const T fdg = std::sqrt(st.sq[j]) <= T(kNormEps) ? T(0) : (wgx + st.t3[j]) * inv;
    const T cj = inv * inv * fdg;
    set_coefficients(st, j, st.k[j] + dl, inv, cj, inv * st.t2[j] - cj * (r * st.M[j] + f.WB),
                     inv * wgx - cj * (r * r * st.Q[j] + r * st.L[j]), T(D));
  }
  layer_norm_backward_apply(x, ld, G, gx, ld_out, n, D, f, st, dw, db);
}

// True when the tile's n pixels have every one of embed_similarity's
// kStatsRows rows (gs: the tile's first pixel, row stride N) finite: the
// tile can take backward_given.
template <typename T>
bool given_all(const T* gs, int64_t N, int64_t n, int64_t rows) {
  bool ok = true;
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < n; ++j) ok = ok && std::isfinite(gs[i * N + j]);
  return ok;
}

// The backward of a tile with the LayerNorm from sums that need no pass over
// the map: embed_similarity's stats (gs: mean, r, inv, wy = sum w y =
// r M + sum w b, wxy = sum w xhat y = r^2 Q + r L; row stride N; all finite,
// so ||y|| > eps) and, per pixel in st.t1, st.t2, st.t3, the sums over the
// scores of the row dS (k-major) of
//   sdot = dS . S = z . g  (= f_dot_g),  t2 = dS . rho = sum w g,  t3 = dS . beta = sum b g
// (G = dS P, rho = P w, beta = P b; dS . S from the softmax cache and the
// stats' sum p S: BackwardPass::score_sums). Then y . g = sdot / inv and
// sum w g xhat = y . g - t3, so
//   c = inv^2 sdot,  m1 = (inv t2 - c wy) / D,  m2 = (sdot - inv t3 - c wxy) / D
// and pass 2 alone reads x and G: one read of the map instead of two.
template <typename T>
void backward_given(const T* x, int64_t ld, const T* G, T* gx, int64_t ld_out, int64_t n, int64_t D,
                    const Fold<T>& f, Stats<T>& st, const T* gs, int64_t N, T* dw, T* db) {
  for (int64_t j = 0; j < n; ++j) {
    const T inv = gs[2 * N + j], wy = gs[3 * N + j], wxy = gs[4 * N + j];
    const T sdot = st.t1[j];
    const T cj = inv * inv * sdot;
    st.r[j] = gs[N + j];
    set_coefficients(st, j, gs[j], inv, cj, inv * st.t2[j] - cj * wy, sdot - inv * st.t3[j] - cj * wxy, T(D));
  }
  layer_norm_backward_apply(x, ld, G, gx, ld_out, n, D, f, st, dw, db);
}

// d loss / d x of the tile into gx (D rows of stride ld_out), from G = d loss
// / d z (D, n) contiguous; adds the tile's d w and d b into dw, db (LayerNorm
// only). Two passes over x and G (backward_sums, then the L2 normalisation's
// and the LayerNorm's backward); the tile's statistics as `from` says (gs, N:
// backward_sums'). False (nothing written) when a pixel is not finite: the
// tile then takes the row path.
// (Passes over chunks of 64 pixels, so that x and G stay in L2 between them,
// measured 14-16% slower here: rows of 256 bytes, 720 pages apart, defeat the
// prefetchers.)
template <typename T>
bool backward(const T* x, int64_t ld, const T* G, T* gx, int64_t ld_out, int64_t n, int64_t D, const Fold<T>& f,
              Stats<T>& st, StatsFrom from, const T* gs, int64_t N, T* dw, T* db) {
  backward_sums(x, ld, G, n, D, f, st, from, gs, N);
  for (int64_t j = 0; j < n; ++j)
    if (!st.finite[j]) return false;
  if (f.ln) {
    layer_norm_backward(x, ld, G, gx, ld_out, n, D, f, st, dw, db);
  } else {
    normalize_backward(x, ld, G, gx, ld_out, n, D, st);
  }
  return true;
}

}  // namespace plane
}  // namespace PROTOSEG_CPU_CAPABILITY
}  // namespace protoseg

// CPU kernels of `similarity` and `similarity_backward`, and the tiled
// forward and backward the head's embedding runs too (embed_cpu.cpp).
//
// S = feats @ protos.view(C*K, D).T is processed in row tiles of a fixed size
// (independent of the thread count, so results are the same for any number of
// threads), with its columns in k-major order (column k*C + c is prototype k
// of class c): the per-class max over K then runs across classes in vector
// lanes with no transpose. The softmax cache `probs` has that order too; it
// is this backend's own, read only by its backward. Each tile's GEMM is a
// single-threaded BLAS call inside at::parallel_for, and its epilogue
// (per-class max and arg-max, row log-sum-exp, own-class scores) runs while
// the tile is in cache; S itself is never stored. The softmax rows
// softmax(S / tau) are kept for the backward only when they fit the caller's
// `cache_bytes` budget (a step then costs two GEMMs, the floor); otherwise the
// backward recomputes S tile by tile.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <memory>
#include <vector>

#include "../checks.h"
#include "../protoseg_math.h"
#include "buffer_pool.h"
#include "cpu_isa.h"
#include "plane_embed.h"
#include "rows.h"
#include "similarity_cpu.h"

namespace protoseg {
namespace PROTOSEG_CPU_CAPABILITY {  // one copy per instruction-set variant (cpu_isa.h)
namespace {

// |row max of S / tau| up to which exp(S / tau) is taken without the shift by
// the max: e^60 times 2^31 columns stays below the float32 maximum, e^-60 far
// above its smallest normal number.
constexpr double kDirectExp = 60.0;

// Smallest cached softmax entry whose score the backward reads back as
// tau (log p + lse) (BackwardPass::score_sums): far above float32's smallest
// normal number (1.2e-38), where log p keeps float32's relative precision.
constexpr double kMinCachedP = 1e-30;

// Labels as int64, checked: each in [0, C) or equal to ignore_index.
at::Tensor checked_labels(const at::Tensor& labels, int64_t C, int64_t ignore_index) {
  at::Tensor lab = labels.to(at::kLong).contiguous();
  const int64_t* p = lab.data_ptr<int64_t>();
  for (int64_t i = 0, n = lab.numel(); i < n; ++i) {
    TORCH_CHECK_VALUE(label_in_range(p[i], C) || p[i] == ignore_index, "labels[", i, "] = ", p[i],
                      " is outside [0, ", C, ") and is not ignore_index (", ignore_index, ")");
  }
  return lab;
}

// Scales each row of S (rows, CK) by 1 / max(||x_n||, eps), the F.normalize
// scale of its feature row x (rows, D), contiguous.
template <typename T>
void scale_rows_by_inv_norm(T* S, const T* x, int64_t rows, int64_t CK, int64_t D) {
  for (int64_t i = 0; i < rows; ++i) rows::scale(S + i * CK, inv_norm(rows::sumsq<T>(x + i * D, D)), CK);
}

// protos (C, K, D) as the (K*C, D) matrix of the k-major columns of S.
at::Tensor kmajor_protos(const at::Tensor& protos, at::ScalarType acc) {
  return protos.to(acc).transpose(0, 1).reshape({protos.size(0) * protos.size(1), protos.size(2)}).contiguous();
}

bool cache_fits(int64_t N, int64_t CK, at::ScalarType acc, int64_t cache_bytes) {
  return cache_bytes > 0 && N * CK * int64_t(at::elementSize(acc)) <= cache_bytes;
}

// LayerNorm backward of one row, in place on g = dL/dy (y = xhat * w + b):
// dL/dx = rstd * (w g - mean(w g) - xhat * mean(w g xhat)); adds g * xhat and
// g to the weight and bias gradients dw, db.
template <typename T>
void layer_norm_backward_row(T* g, const T* xhat, T rstd, const T* w, T* dw, T* db, int64_t D) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) {
    dw[d] += g[d] * xhat[d];
    db[d] += g[d];
  }
  const T m1 = rows::sum_of<T>(D, [g, w](int64_t d) { return w[d] * g[d]; }) / T(D);
  const T m2 = rows::sum_of<T>(D, [g, w, xhat](int64_t d) { return w[d] * g[d] * xhat[d]; }) / T(D);
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) g[d] = rstd * (w[d] * g[d] - m1 - xhat[d] * m2);
}

// Per-class max and arg-max over K of the rows of S (k-major), into seg
// (rows, C) and ak (rows, C); on the row path (x given: the tile's rows) each
// row of S is first scaled by its 1 / ||x||, as the rows of feats.
template <typename acc_t>
void class_max_rows(acc_t* s, int64_t rows, int64_t C, int64_t K, const acc_t* x, int64_t D, acc_t* seg,
                    uint8_t* ak, std::vector<int32_t>& abuf) {
  for (int64_t i = 0; i < rows; ++i) {
    const acc_t a = x != nullptr ? inv_norm(rows::sumsq<acc_t>(x + i * D, D)) : acc_t(1);
    rows::class_max(s + i * C * K, C, K, a, seg + i * C, abuf.data());
    std::copy(abuf.begin(), abuf.end(), ak + i * C);  // int32 -> uint8
  }
}

// own[i, k] = S[i, k*C + label_i] for the rows with a label in [0, C)
// (ignored rows stay 0)
template <typename acc_t>
void own_rows(const acc_t* s, int64_t rows, int64_t C, int64_t K, const int64_t* lab, acc_t* own) {
  for (int64_t i = 0; i < rows; ++i) {
    if (!label_in_range(lab[i], C)) continue;
    for (int64_t k = 0; k < K; ++k) own[i * K + k] = s[i * C * K + k * C + lab[i]];
  }
}

// Row log-sum-exp of S / tau into lse: the row max (from seg when it is
// there), e = exp(S / tau - max) in place in the tile with ATen's vectorised
// exp (faster here than any loop the compiler vectorises for the baseline
// ISA, or than MKL's exp called row by row), then row sums. When tau = 1 and
// every row max of the tile is in [-kDirectExp, kDirectExp] (always, for unit
// rows and prototypes), exp(S) can neither overflow nor vanish: e = exp(S)
// directly, one pass fewer. With `probs`, the softmax rows e / sum(e) go there
// with streaming stores: written once, read only by the backward. With `ps`
// (embed_similarity's row 5, kStatsRows), also sum_k softmax(S / tau)_k S_k of
// each row: e is then taken out of place into e_buf (the tile's shape), so
// that the shifted scores u = S / tau - shift stay in S for sum e u, in the
// pass that sums e.
template <typename acc_t>
void lse_rows(at::Tensor& S, int64_t C, const acc_t* seg, double temperature, acc_t* lse, acc_t* probs,
              acc_t* ps = nullptr, at::Tensor* e_buf = nullptr) {
  const int64_t rows = S.size(0), CK = S.size(1);
  acc_t* s = S.data_ptr<acc_t>();
  const acc_t tau = static_cast<acc_t>(temperature);
  bool direct = temperature == 1.0;
  for (int64_t i = 0; i < rows; ++i) {
    acc_t m = seg ? rows::max_nan(seg + i * C, C) : rows::max_nan(s + i * CK, CK);
    m = m / tau;
    direct = direct && m >= -kDirectExp && m <= kDirectExp;  // false for NaN
    lse[i] = std::isinf(m) ? acc_t(0) : m;  // the shift, until the sum is known (inf rows: keep exp() finite)
  }
  if (!direct) {
    for (int64_t i = 0; i < rows; ++i) {
      if (temperature == 1.0) {
        rows::sub(s + i * CK, s + i * CK, lse[i], CK);  // x / 1 is x: same values, no division
      } else {
        rows::div_sub(s + i * CK, s + i * CK, tau, lse[i], CK);
      }
    }
  }
  acc_t* e = s;
  if (ps != nullptr) {
    at::Tensor E = e_buf->view(-1).narrow(0, 0, rows * CK).view({rows, CK});
    at::exp_out(E, S);
    e = E.data_ptr<acc_t>();
  } else {
    S.exp_();
  }
  for (int64_t i = 0; i < rows; ++i) {
    acc_t* ei = e + i * CK;
    const acc_t z = rows::sum(ei, CK);
    if (ps != nullptr) {  // sum p u = sum p S / tau - shift
      const acc_t* ui = s + i * CK;
      const acc_t eu = rows::sum_of<acc_t>(CK, [ei, ui](int64_t c) { return ei[c] * ui[c]; });
      ps[i] = tau * (eu / z + (direct ? acc_t(0) : lse[i]));
    }
    lse[i] = (direct ? acc_t(0) : lse[i]) + std::log(z);
    if (probs != nullptr) rows::scale(ei, acc_t(1) / z, CK);
  }
  if (probs != nullptr) rows::stream_copy(probs, e, rows * CK);
}

// embed_similarity's stats of the tile's rows r0.. (st: rows (kStatsRows,
// N)), all but row 5 (lse_rows'): on the plane path from the tile's
// statistics (fold: its LayerNorm), else the row path's mean and rstd
// (already there with the LayerNorm) and 1 / ||y|| of its rows x, rows 3 and
// 4 +inf (not kept); NaN in rows 0-4 for a pixel whose statistics are not
// finite.
template <typename acc_t>
void tile_stats(acc_t* st, int64_t N, int64_t r0, int64_t rows, const plane::Stats<acc_t>* ps,
                const plane::Fold<acc_t>* fold, bool ln, const acc_t* x, int64_t D) {
  acc_t* mean = st + r0;
  acc_t* rstd = st + N + r0;
  acc_t* inv = st + 2 * N + r0;
  acc_t* wy = st + 3 * N + r0;
  acc_t* wxy = st + 4 * N + r0;
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  for (int64_t i = 0; i < rows; ++i) {
    bool ok;
    wy[i] = wxy[i] = std::numeric_limits<acc_t>::infinity();
    if (ps != nullptr) {
      const acc_t r = ps->r[i];
      mean[i] = ln ? ps->k[i] + ps->delta[i] : acc_t(0);
      rstd[i] = ln ? r : acc_t(1);
      inv[i] = ps->inv[i];
      ok = ps->finite[i];
      if (ln && ok && std::sqrt(ps->sq[i]) > acc_t(kNormEps)) {
        wy[i] = r * ps->M[i] + fold->WB;
        wxy[i] = r * r * ps->Q[i] + r * ps->L[i];
      }
    } else {
      if (!ln) {
        mean[i] = acc_t(0);
        rstd[i] = acc_t(1);
      }
      const acc_t sq = rows::sumsq<acc_t>(x + i * D, D);
      inv[i] = inv_norm(sq);
      ok = std::isfinite(sq) && std::isfinite(mean[i]) && std::isfinite(rstd[i]);
    }
    if (!ok) mean[i] = rstd[i] = inv[i] = wy[i] = wxy[i] = nan;
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> similarity_impl(
    const Source& src, const at::Tensor& protos, const at::Tensor& labels, int64_t ignore_index, double temperature,
    bool compute_seg, bool compute_lse, bool compute_own, int64_t cache_bytes, bool normalize, at::Tensor* stats) {
  at::NoGradGuard no_grad;  // autograd is handled in Python; inner ATen calls record nothing
  const at::Tensor& feats = src.feats;
  const int64_t N = src.N, D = src.D, C = protos.size(0), K = protos.size(1), CK = C * K;
  const auto acc = src.acc;
  const bool cache = compute_lse && cache_fits(N, CK, acc, cache_bytes);
  auto fopt = feats.options();
  auto aopt = fopt.dtype(acc);
  at::Tensor seg = at::empty(compute_seg ? at::IntArrayRef({N, C}) : at::IntArrayRef({0}), fopt);
  at::Tensor argk = at::empty(compute_seg ? at::IntArrayRef({N, C}) : at::IntArrayRef({0}), fopt.dtype(at::kByte));
  at::Tensor lse = at::empty(compute_lse ? at::IntArrayRef({N}) : at::IntArrayRef({0}), aopt);
  at::Tensor own = compute_own ? at::zeros({N, K}, aopt) : at::empty({0}, aopt);
  at::Tensor probs = cache ? BufferPool::get().empty({N, CK}, aopt) : at::empty({0}, aopt);
  const bool any_out = compute_seg || compute_lse || compute_own;
  if (stats != nullptr) *stats = at::empty(any_out ? at::IntArrayRef({kStatsRows, N}) : at::IntArrayRef({0}), aopt);
  // row 5 (sum p S) with the softmax cache and the plane path's LayerNorm, where the backward reads it
  // (else +inf: not kept)
  const bool keep_ps = stats != nullptr && cache && src.plane_path(normalize) && src.ln();
  if (stats != nullptr && any_out && !keep_ps) stats->select(0, 5).fill_(std::numeric_limits<double>::infinity());
  if (N == 0 || !any_out) return {seg, argk, lse, own, probs};
  at::Tensor lab = compute_own ? checked_labels(labels, C, ignore_index) : at::Tensor();
  at::Tensor Pt = kmajor_protos(protos, acc).t();  // (D, K*C)
  const int64_t T = src.T, ntiles = src.ntiles;

  AT_DISPATCH_FLOATING_TYPES(acc, "similarity_cpu", [&] {
    using acc_t = scalar_t;
    // the map's planes read as they lie (plane_embed.h), tiles that qualify
    std::unique_ptr<plane::Fold<acc_t>> fold;
    if (src.plane_path(normalize)) fold = std::make_unique<plane::Fold<acc_t>>(Pt.t(), src.weight, src.bias, src.eps);
    at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
      at::NoGradGuard no_grad_worker;  // grad mode is per thread: OpenMP workers start with it on
      at::Tensor S_buf = at::empty({T, CK}, aopt);  // this task's tile, reused
      at::Tensor ST_buf = fold ? at::empty({CK, T}, aopt) : at::Tensor();  // the plane path's GEMM output
      std::vector<int32_t> abuf(compute_seg ? C : 0);     // one row's arg-max k per class
      std::unique_ptr<plane::Stats<acc_t>> st(fold ? new plane::Stats<acc_t>(T) : nullptr);
      at::Tensor e_buf = keep_ps ? at::empty({T, CK}, aopt) : at::Tensor();  // lse_rows' exp, out of place
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t r0 = src.row0(t), rows = src.rows(t);
        at::Tensor S = S_buf.narrow(0, 0, rows);
        // S (rows, K*C), in cache: scaled as the rows of feats already on the plane path
        at::Tensor xt;
        const bool scaled = fold && src.plane_scores<acc_t>(t, *fold, *st, S, ST_buf);
        acc_t* stp = stats != nullptr ? stats->data_ptr<acc_t>() : nullptr;
        if (!scaled) {
          xt = stp != nullptr && src.ln() ? src.load<acc_t>(t, nullptr, nullptr, stp + r0, N) : src.load<acc_t>(t);
          at::mm_out(S, xt, Pt);
        }
        if (stp != nullptr) tile_stats(stp, N, r0, rows, scaled ? st.get() : nullptr, fold.get(), src.ln(),
                                       scaled ? nullptr : xt.data_ptr<acc_t>(), D);
        acc_t* s = S.data_ptr<acc_t>();
        const acc_t* x = normalize && !scaled ? xt.data_ptr<acc_t>() : nullptr;  // rows to scale S by
        at::Tensor seg_t;  // this tile's seg rows, in acc_t
        if (compute_seg) seg_t = feats.scalar_type() == acc ? seg.narrow(0, r0, rows) : at::empty({rows, C}, aopt);
        acc_t* sv = compute_seg ? seg_t.data_ptr<acc_t>() : nullptr;
        if (compute_seg) {
          class_max_rows(s, rows, C, K, x, D, sv, argk.data_ptr<uint8_t>() + r0 * C, abuf);
        } else if (x != nullptr) {  // rows of S scale like the rows of feats
          scale_rows_by_inv_norm(s, x, rows, CK, D);
        }
        if (compute_own) own_rows(s, rows, C, K, lab.data_ptr<int64_t>() + r0, own.data_ptr<acc_t>() + r0 * K);
        if (compute_lse)
          lse_rows(S, C, sv, temperature, lse.data_ptr<acc_t>() + r0,
                   cache ? probs.data_ptr<acc_t>() + r0 * CK : nullptr, keep_ps ? stp + 5 * N + r0 : nullptr,
                   &e_buf);
        if (compute_seg && feats.scalar_type() != acc) seg.narrow(0, r0, rows).copy_(seg_t);
      }
      rows::stream_fence();
    });
  });
  return {seg, argk, lse, own, probs};
}

namespace {

// The backward's reads, shared by every tile (acc dtype, contiguous), and its
// two ways through a tile.
template <typename acc_t>
struct BackwardPass {
  const Source& src;
  int64_t C, K, CK, D;
  bool has_seg, has_lse, has_own, cached, normalize, tiled;
  double temperature;
  at::Tensor probs, gseg, ak, glse, lse, gown, lab;
  bool given_sums = false;  // plane tiles may take plane::backward_given
  at::Tensor P;     // (CK, D): k-major as dS on the dense path, rows of protos on the sparse one
  at::Tensor grad;  // (the layout of feats, acc dtype)
  at::Tensor dw_parts, db_parts;  // (ntiles, D) with the LayerNorm
  std::unique_ptr<plane::Fold<acc_t>> fold;  // the plane path (plane_embed.h): dense dS only

  // A task's scratch, reused across its tiles.
  struct Scratch {
    at::Tensor dS, out, ST;  // (T, CK), (T, D), (CK, T) when S is recomputed on the plane path
    at::Tensor lp;           // (T, C + K): score_sums' log p
    std::unique_ptr<plane::Stats<acc_t>> st;
  };
  Scratch scratch() const {
    Scratch sc;
    const int64_t T = src.T;
    if (has_lse) sc.dS = at::empty({T, CK}, P.options());
    if (has_lse || tiled) sc.out = at::empty({T, D}, P.options());
    if (fold && !cached) sc.ST = at::empty({CK, T}, P.options());
    if (fold) sc.st.reset(new plane::Stats<acc_t>(T));
    if (given_sums) sc.lp = at::empty({T, C + K}, P.options());
    return sc;
  }

  // e = exp(S / tau - lse) * grad_lse / tau, in place on the recomputed S
  // (flash-attention style: the forward's lse, no cache)
  void softmax_from_lse(at::Tensor& dS, int64_t r0, int64_t rows) const {
    if (temperature != 1.0) dS.div_(temperature);
    dS.sub_(lse.narrow(0, r0, rows).unsqueeze(1)).exp_().mul_(glse.narrow(0, r0, rows).unsqueeze(1));
  }

  // dS (rows, CK) of the rows from r0, given e (recomputed), or from the
  // cache: the softmax part, then the arg-max and own-class entries
  void complete_dS(acc_t* d, int64_t r0, int64_t rows) const {
    const acc_t* gli = glse.data_ptr<acc_t>() + r0;
    for (int64_t i = 0; i < rows; ++i) {
      if (cached) rows::scale_to(d + i * CK, probs.data_ptr<acc_t>() + (r0 + i) * CK, gli[i], CK);
      if (has_seg) {
        const acc_t* gs = gseg.data_ptr<acc_t>() + (r0 + i) * C;
        const uint8_t* a = ak.data_ptr<uint8_t>() + (r0 + i) * C;
        for (int64_t c = 0; c < C; ++c) d[i * CK + a[c] * C + c] += gs[c];  // max routes to arg-max
      }
      if (has_own) {
        const int64_t lb = lab.data_ptr<int64_t>()[r0 + i];
        if (!label_in_range(lb, C)) continue;
        const acc_t* go = gown.data_ptr<acc_t>() + (r0 + i) * K;
        for (int64_t k = 0; k < K; ++k) d[i * CK + k * C + lb] += go[k];
      }
    }
  }

  // d loss / d f (rows, D) += the sparse dS (C + K entries per row) times
  // the prototypes: gathered rows of P instead of a GEMM
  void sparse_rows(acc_t* g, int64_t r0, int64_t rows) const {
    const acc_t* pp = P.data_ptr<acc_t>();
    for (int64_t i = 0; i < rows; ++i) {
      acc_t* gi = g + i * D;
      if (has_seg) {
        const acc_t* gs = gseg.data_ptr<acc_t>() + (r0 + i) * C;
        const uint8_t* a = ak.data_ptr<uint8_t>() + (r0 + i) * C;
        for (int64_t c = 0; c < C; ++c) rows::axpy(gi, pp + (c * K + a[c]) * D, gs[c], D);
      }
      if (has_own) {
        const int64_t lb = lab.data_ptr<int64_t>()[r0 + i];
        if (!label_in_range(lb, C)) continue;
        const acc_t* go = gown.data_ptr<acc_t>() + (r0 + i) * K;
        for (int64_t k = 0; k < K; ++k) rows::axpy(gi, pp + (lb * K + k) * D, go[k], D);
      }
    }
  }

  // The per-pixel sums of plane::backward_given from the tile's dS (rows,
  // CK; k-major as rho and beta) into st.t1 (dS . S), st.t2 (dS . rho),
  // st.t3 (dS . beta). dS . S = grad_lse / tau times sum p S (stats row 5,
  // ps), plus the scores at the entries complete_dS adds, grad_seg at the
  // arg-max k of each class and grad_own at the label's K, each read back
  // from the cache as S = tau (log p + lse): their p gathered into lp (rows,
  // C + K) and taken the log of at once. False (nothing written) when one of
  // those p is below kMinCachedP (a vanishing or underflowed softmax entry,
  // whose log would not give S back; from temperatures below about 0.03):
  // the tile then reads the map for its sums.
  bool score_sums(const acc_t* dS, int64_t r0, int64_t rows, plane::Stats<acc_t>& st, at::Tensor& lp_buf) const {
    const int64_t J = C + K;
    at::Tensor lp = lp_buf.narrow(0, 0, rows);
    acc_t* l = lp.data_ptr<acc_t>();
    const acc_t* pr = probs.data_ptr<acc_t>() + r0 * CK;
    const int64_t* lb = has_own ? lab.data_ptr<int64_t>() + r0 : nullptr;
    const acc_t p_min = acc_t(kMinCachedP);
    bool ok = true;
    for (int64_t i = 0; i < rows; ++i) {
      const acc_t* p = pr + i * CK;
      acc_t* li = l + i * J;
      if (has_seg) {
        const uint8_t* a = ak.data_ptr<uint8_t>() + (r0 + i) * C;
        for (int64_t c = 0; c < C; ++c) li[c] = p[a[c] * C + c];
      } else {
        std::fill(li, li + C, acc_t(1));
      }
      const bool own_row = has_own && label_in_range(lb[i], C);
      for (int64_t k = 0; k < K; ++k) li[C + k] = own_row ? p[k * C + lb[i]] : acc_t(1);
      for (int64_t j = has_seg ? 0 : C; j < J; ++j) ok = ok && li[j] >= p_min;  // false for NaN
    }
    if (!ok) return false;
    lp.log_();
    const acc_t* rho = fold->rho.data();
    const acc_t* beta = fold->beta.data();
    const acc_t* ps = src.stats.data_ptr<acc_t>() + 5 * src.N + r0;
    const acc_t* gli = glse.data_ptr<acc_t>() + r0;
    const acc_t* ls = lse.data_ptr<acc_t>() + r0;
    const acc_t tau = acc_t(temperature);
    for (int64_t i = 0; i < rows; ++i) {
      const acc_t* d = dS + i * CK;
      acc_t t2 = 0, t3 = 0;
#pragma omp simd reduction(+ : t2, t3)
      for (int64_t c = 0; c < CK; ++c) {
        t2 += d[c] * rho[c];
        t3 += d[c] * beta[c];
      }
      // sum_j g_j S_j over the sparse entries = tau (sum_j g_j log p_j + lse sum_j g_j)
      const acc_t* li = l + i * J;
      acc_t gl = 0, gsum = 0;
      if (has_seg) {
        const acc_t* gs = gseg.data_ptr<acc_t>() + (r0 + i) * C;
        for (int64_t c = 0; c < C; ++c) {
          gl += gs[c] * li[c];
          gsum += gs[c];
        }
      }
      if (has_own && label_in_range(lb[i], C)) {
        const acc_t* go = gown.data_ptr<acc_t>() + (r0 + i) * K;
        for (int64_t k = 0; k < K; ++k) {
          gl += go[k] * li[C + k];
          gsum += go[k];
        }
      }
      st.t1[i] = gli[i] * ps[i] + tau * (gl + ls[i] * gsum);
      st.t2[i] = t2;
      st.t3[i] = t3;
    }
    return true;
  }

  // Tile t on the plane path: dS, G = d loss / d z as a (D, rows) tile (one
  // GEMM into the out buffer), then d loss / d x straight into the
  // gradient's plane. False (nothing written) when the tile must take the row
  // path: a pixel beyond the GEMM's guard or not finite.
  bool plane_tile(int64_t t, Scratch& sc) const {
    const int64_t r0 = src.row0(t), rows = src.rows(t);
    at::Tensor v = src.plane_tile(t);
    const acc_t* xp = v.data_ptr<acc_t>();
    plane::Stats<acc_t>& st = *sc.st;
    // embed_similarity's stats when given (LayerNorm only: without it they save nothing), else
    // recomputing S needs the statistics first and with the cache the backward's first pass takes them
    const bool given = src.ln() && src.stats.defined();
    const acc_t* gs = given ? src.stats.data_ptr<acc_t>() + r0 : nullptr;
    if (!cached && !(given ? plane::given_stats(gs, src.N, rows, st) : plane::stats(xp, v.stride(0), rows, D, *fold,
                                                                                    st))) {
      return false;
    }
    at::Tensor dS = sc.dS.narrow(0, 0, rows);
    if (!cached) {  // S recomputed on the plane path: the forward's S, bit for bit
      plane::raw_scores<acc_t>(v, fold->Pw, sc.ST, dS);
      plane::scores_epilogue(dS.data_ptr<acc_t>(), rows, CK, *fold, st);
      softmax_from_lse(dS, r0, rows);
    }
    complete_dS(dS.data_ptr<acc_t>(), r0, rows);
    at::Tensor G = sc.out.view(-1).narrow(0, 0, D * rows).view({D, rows});
    at::mm_out(G, P.t(), dS.t());
    at::Tensor gp = grad.select(0, t / src.per_image).narrow(1, (t % src.per_image) * src.T, rows);
    acc_t* dw = src.ln() ? dw_parts.data_ptr<acc_t>() + t * D : nullptr;
    acc_t* db = src.ln() ? db_parts.data_ptr<acc_t>() + t * D : nullptr;
    if (given_sums && plane::given_all(gs, src.N, rows, kStatsRows) &&
        score_sums(dS.data_ptr<acc_t>(), r0, rows, st, sc.lp)) {  // one pass over the map
      plane::backward_given(xp, v.stride(0), G.data_ptr<acc_t>(), gp.data_ptr<acc_t>(), gp.stride(0), rows, D,
                            *fold, st, gs, src.N, dw, db);
      return true;
    }
    const auto from = given ? plane::StatsFrom::kGiven : cached ? plane::StatsFrom::kPass : plane::StatsFrom::kHave;
    return plane::backward(xp, v.stride(0), G.data_ptr<acc_t>(), gp.data_ptr<acc_t>(), gp.stride(0), rows, D, *fold,
                           st, from, gs, src.N, dw, db);
  }

  // Tile t on the row path: its rows loaded (and LayerNorm'd), d loss / d f
  // in the tile buffer (dense) or in grad (sparse, untiled), then the L2
  // normalisation's and the LayerNorm's backward on the rows in cache.
  void row_tile(int64_t t, Scratch& sc) const {
    const int64_t r0 = src.row0(t), rows = src.rows(t);
    at::Tensor out = tiled || has_lse ? sc.out.narrow(0, 0, rows) : at::Tensor();
    acc_t* g = tiled ? out.zero_().data_ptr<acc_t>() : grad.data_ptr<acc_t>() + r0 * D;
    acc_t* o = g;
    at::Tensor xhat, rstd;
    at::Tensor xt = normalize || (has_lse && !cached) || src.ln()
                        ? src.load<acc_t>(t, src.ln() ? &xhat : nullptr, src.ln() ? &rstd : nullptr)
                        : at::Tensor();
    if (has_lse) {
      // dS = softmax(S / tau) * grad_lse / tau + the sparse terms; d feats = dS @ P
      at::Tensor dS = sc.dS.narrow(0, 0, rows);
      if (!cached) {  // S recomputed from the saved lse
        at::mm_out(dS, xt, P.t());
        if (normalize) scale_rows_by_inv_norm(dS.data_ptr<acc_t>(), xt.data_ptr<acc_t>(), rows, CK, D);
        softmax_from_lse(dS, r0, rows);
      }
      complete_dS(dS.data_ptr<acc_t>(), r0, rows);
      // (rows, D), P k-major as dS, into the tile buffer: the rows go to
      // grad once final, with streaming stores
      at::mm_out(out, dS, P);
      o = out.data_ptr<acc_t>();
    } else {
      sparse_rows(g, r0, rows);
    }
    if (normalize) {  // d loss / d f  ->  d loss / d raw feats, on the tile in cache
      const acc_t* x = xt.data_ptr<acc_t>();
      for (int64_t i = 0; i < rows; ++i) rows::normalize_backward(o + i * D, x + i * D, D);
    }
    if (src.ln()) {  // d loss / d (LayerNorm output) -> d loss / d feats, and the affine's gradients
      const acc_t* xh = xhat.data_ptr<acc_t>();
      const acc_t* rs = rstd.data_ptr<acc_t>();
      const acc_t* w = src.weight.data_ptr<acc_t>();
      acc_t* dw = dw_parts.data_ptr<acc_t>() + t * D;
      acc_t* db = db_parts.data_ptr<acc_t>() + t * D;
      for (int64_t i = 0; i < rows; ++i) layer_norm_backward_row(o + i * D, xh + i * D, rs[i], w, dw, db, D);
    }
    if (tiled) {
      src.store<acc_t>(t, grad, out);
    } else if (o != g) {
      rows::stream_copy(g, o, rows * D);
    }
  }
};

// The LayerNorm's weight and bias gradients: the tiles' partial sums (ntiles,
// D) added in tile order, the same bits for any thread count.
std::tuple<at::Tensor, at::Tensor> merge_tile_partials(const at::Tensor& dw_parts, const at::Tensor& db_parts) {
  const int64_t ntiles = dw_parts.size(0), D = dw_parts.size(1);
  at::Tensor dw = at::zeros({D}, dw_parts.options()), db = at::zeros({D}, db_parts.options());
  AT_DISPATCH_FLOATING_TYPES(dw.scalar_type(), "layer_norm_grads", [&] {
    using acc_t = scalar_t;
    acc_t* w = dw.data_ptr<acc_t>();
    acc_t* b = db.data_ptr<acc_t>();
    for (int64_t t = 0; t < ntiles; ++t) {
      const acc_t* pw = dw_parts.data_ptr<acc_t>() + t * D;
      const acc_t* pb = db_parts.data_ptr<acc_t>() + t * D;
      for (int64_t d = 0; d < D; ++d) {
        w[d] += pw[d];
        b[d] += pb[d];
      }
    }
  });
  return {dw, db};
}

}  // namespace

// d loss / d feats (and, with the LayerNorm, d weight and d bias, else undefined)
std::tuple<at::Tensor, at::Tensor, at::Tensor> similarity_backward_impl(
    const Source& src, const c10::optional<at::Tensor>& grad_seg, const c10::optional<at::Tensor>& grad_lse,
    const c10::optional<at::Tensor>& grad_own, const at::Tensor& protos, const at::Tensor& labels,
    const at::Tensor& argk, const at::Tensor& lse, int64_t ignore_index, double temperature,
    const c10::optional<at::Tensor>& probs_opt, bool normalize, bool cached) {
  const bool has_seg = grad_seg.has_value() && grad_seg->defined();
  const bool has_lse = grad_lse.has_value() && grad_lse->defined();
  const bool has_own = grad_own.has_value() && grad_own->defined();
  at::NoGradGuard no_grad;
  const at::Tensor& feats = src.feats;
  const int64_t N = src.N, D = src.D, C = protos.size(0), K = protos.size(1), CK = C * K;
  const auto acc = src.acc;
  // Rows written through a tile buffer (every row once): the NCHW planes and
  // the LayerNorm; else the dense path writes every row of grad with a GEMM
  // and the sparse one adds into it.
  const bool tiled = src.planes() || src.ln();
  at::Tensor grad = BufferPool::get().empty(feats.sizes(), feats.options().dtype(acc));
  if (!has_lse && !tiled) grad.zero_();
  at::Tensor dw_parts = src.ln() ? at::zeros({src.ntiles, D}, grad.options()) : at::Tensor();
  at::Tensor db_parts = src.ln() ? at::zeros({src.ntiles, D}, grad.options()) : at::Tensor();
  auto finish = [&]() -> std::tuple<at::Tensor, at::Tensor, at::Tensor> {
    if (!src.ln()) return {grad.to(feats.scalar_type()), at::Tensor(), at::Tensor()};
    auto dwdb = merge_tile_partials(dw_parts, db_parts);
    return {grad.to(feats.scalar_type()), std::get<0>(dwdb), std::get<1>(dwdb)};
  };
  if (N == 0 || (!has_seg && !has_lse && !has_own)) {
    if (tiled) grad.zero_();
    return finish();
  }
  // The cache's pages go back to the OS as its tiles are read, where the pool would not keep it
  // when freed (larger than PROTOSEG_POOL_MB, e.g. 1.5 GiB at full resolution): the gradient's
  // pages are faulted in as the cache's go, instead of on top of them. A cache an earlier backward
  // released (a second backward through the same graph, retain_graph=True) is gone: S is
  // recomputed as without it.
  BufferPool& pool = BufferPool::get();
  const auto reading = cached && probs_opt->is_contiguous()
                           ? pool.claim_reading(probs_opt->data_ptr(), probs_opt->nbytes())
                           : BufferPool::Reading::kKept;
  if (reading == BufferPool::Reading::kGone) cached = false;
  const bool release = reading == BufferPool::Reading::kRelease;
  AT_DISPATCH_FLOATING_TYPES(acc, "similarity_backward_cpu", [&] {
    using acc_t = scalar_t;
    BackwardPass<acc_t> bp{src, C, K, CK, D, has_seg, has_lse, has_own, cached, normalize, tiled, temperature};
    if (cached) bp.probs = probs_opt->contiguous();
    if (has_seg) {
      bp.gseg = grad_seg->to(acc).contiguous();
      bp.ak = argk.contiguous();
    }
    if (has_lse) {
      bp.glse = (*grad_lse / temperature).to(acc).contiguous();
      bp.lse = lse.to(acc).contiguous();
    }
    if (has_own) {
      bp.gown = grad_own->to(acc).contiguous();
      bp.lab = checked_labels(labels, C, ignore_index);
    }
    // the dense path works on S in k-major column order, the sparse one on rows of protos
    bp.P = has_lse ? kmajor_protos(protos, acc) : protos.reshape({CK, D}).to(acc).contiguous();
    bp.grad = grad;
    bp.dw_parts = dw_parts;
    bp.db_parts = db_parts;
    if (has_lse && src.plane_path(normalize))
      bp.fold = std::make_unique<plane::Fold<acc_t>>(bp.P, src.weight, src.bias, src.eps);
    // plane::backward_given: the cache, the LayerNorm and the stats' 6 rows
    bp.given_sums = bp.fold && cached && src.ln() && src.stats.defined() && src.stats.size(0) == kStatsRows;
    const size_t row_bytes = static_cast<size_t>(CK) * sizeof(acc_t);
    // With the cache released as it is read and NCHW planes, the tasks take one column of tiles at a
    // time (a parallel_for each): the tiles whose pixels share the gradient's huge pages. A tile writes a
    // few KiB in each of the D planes of the gradient, so its first write faults in a huge page per
    // plane; tasks walking two columns would fault in the gradient twice as fast as the cache's pages go
    // back (at full-resolution Cityscapes the gradient resident halfway through, with half the cache).
    const int64_t column = release && src.planes()
                               ? std::max<int64_t>(1, int64_t(BufferPool::kAlign / sizeof(acc_t)) / src.T)
                               : src.ntiles;
    for (int64_t c0 = 0; c0 < src.ntiles; c0 += column) {
      at::parallel_for(c0, std::min(c0 + column, src.ntiles), 1, [&](int64_t t0, int64_t t1) {
        at::NoGradGuard no_grad_worker;  // grad mode is per thread: OpenMP workers start with it on
        auto sc = bp.scratch();
        size_t released = static_cast<size_t>(src.row0(t0)) * row_bytes;  // this task's rows are read in order
        for (int64_t t = t0; t < t1; ++t) {
          // a NaN or inf pixel (or one beyond the fold's guard): the row path redoes the tile
          if (!bp.fold || !bp.plane_tile(t, sc)) bp.row_tile(t, sc);
          if (release)
            released = pool.release_pages(bp.probs.data_ptr(), released,
                                          static_cast<size_t>(src.row0(t) + src.rows(t)) * row_bytes);
        }
        rows::stream_fence();
      });
    }
  });
  return finish();
}

namespace {

Source plain_source(const at::Tensor& feats, const at::Tensor& protos) {
  const int64_t CK = protos.size(0) * protos.size(1);
  return Source(feats, at::Tensor(), at::Tensor(), 0.0, tile_rows(CK, at::elementSize(acc_type(feats.scalar_type()))));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> similarity_cpu(
    const at::Tensor& feats, const at::Tensor& protos, const at::Tensor& labels, int64_t ignore_index,
    double temperature, bool compute_seg, bool compute_lse, bool compute_own, int64_t cache_bytes, bool normalize) {
  check_similarity_args(feats, protos, labels, compute_own, temperature);
  return similarity_impl(plain_source(feats, protos), protos, labels, ignore_index, temperature, compute_seg,
                         compute_lse, compute_own, cache_bytes, normalize);
}

at::Tensor similarity_backward_cpu(const c10::optional<at::Tensor>& grad_seg,
                                   const c10::optional<at::Tensor>& grad_lse,
                                   const c10::optional<at::Tensor>& grad_own, const at::Tensor& feats,
                                   const at::Tensor& protos, const at::Tensor& labels, const at::Tensor& argk,
                                   const at::Tensor& lse, int64_t ignore_index, double temperature,
                                   const c10::optional<at::Tensor>& probs, bool normalize) {
  const bool has_own = grad_own.has_value() && grad_own->defined();
  check_similarity_args(feats, protos, labels, has_own, temperature);
  const bool cached = check_similarity_backward_args(feats, protos, grad_seg, grad_lse, grad_own, argk, lse, probs);
  return std::get<0>(similarity_backward_impl(plain_source(feats, protos), grad_seg, grad_lse, grad_own, protos,
                                              labels, argk, lse, ignore_index, temperature, probs, normalize, cached));
}

}  // namespace PROTOSEG_CPU_CAPABILITY

#if PROTOSEG_CPU_BASELINE  // registered once, with a dispatcher over the variants
PROTOSEG_CPU_VARIANTS(similarity_cpu)
PROTOSEG_CPU_VARIANTS(similarity_backward_cpu)
TORCH_LIBRARY_IMPL(protoseg_ext, CPU, m) {
  m.impl("similarity", PROTOSEG_CPU_DISPATCH(similarity_cpu));
  m.impl("similarity_backward", PROTOSEG_CPU_DISPATCH(similarity_backward_cpu));
}
#endif

}  // namespace protoseg

// CPU kernels of `similarity` and `similarity_backward`.
//
// S = feats @ protos.view(C*K, D).T is processed in row tiles of a fixed size
// (independent of the thread count, so results are the same for any number of
// threads), with its columns in k-major order (column k*C + c is prototype k
// of class c): the per-class max over K then runs across classes in vector
// lanes with no transpose. The softmax cache `probs` has that order too; it
// is this backend's own, read only by its backward. Each tile's GEMM is a
// single-threaded BLAS call inside at::parallel_for, and its epilogue
// (per-class max and arg-max, row log-sum-exp, own-class scores) runs while
// the tile is in cache; S itself is never stored. The softmax rows softmax(S / tau) are kept for the backward
// only when they fit the caller's `cache_bytes` budget (a step then costs two
// GEMMs, the floor); otherwise the backward recomputes S tile by tile.
//
// The head's embedding (embed_similarity, embed_prototype_sums) reads the
// backbone's map where it lies. Planes of an NCHW map in the accumulation
// dtype take the plane path of plane_embed.h: the GEMMs read the plane, the
// LayerNorm is folded into the prototypes, and the per-pixel passes run in
// plane layout. Everything else (channels-last or (N, D) rows, half-precision
// maps, a tile far from zero mean) takes the row path: the tile's rows are
// loaded (transposed in 16 x 16 blocks from a plane) and LayerNorm'd in cache.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "../checks.h"
#include "../protoseg_math.h"
#include "buffer_pool.h"
#include "cpu_isa.h"
#include "plane_embed.h"
#include "rows.h"

namespace protoseg {
namespace PROTOSEG_CPU_CAPABILITY {  // one copy per instruction-set variant (cpu_isa.h)
namespace {

// |row max of S / tau| up to which exp(S / tau) is taken without the shift by
// the max: e^60 times 2^31 columns stays below the float32 maximum, e^-60 far
// above its smallest normal number.
constexpr double kDirectExp = 60.0;

// Rows per tile: about 1 MiB of S per tile, between 16 and 1024 rows.
int64_t tile_rows(int64_t CK, int64_t elem_size) {
  int64_t rows = (int64_t(1) << 20) / std::max<int64_t>(1, CK * elem_size);
  return std::min<int64_t>(1024, std::max<int64_t>(16, rows));
}

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

// dst (cols, rows) <- the transpose of src (rows, cols), with row strides
// ld_dst and ld_src: a block of an image's (D, HW) plane to (n, D) rows and
// back. 16 x 16 blocks, so both sides stream whole cache lines (a strided
// element-wise copy would touch one line per element).
template <typename T>
void transpose(T* dst, int64_t ld_dst, const T* src, int64_t ld_src, int64_t rows, int64_t cols) {
  constexpr int64_t kB = 16;
  for (int64_t r0 = 0; r0 < rows; r0 += kB) {
    const int64_t r1 = std::min(rows, r0 + kB);
    for (int64_t c0 = 0; c0 < cols; c0 += kB) {
      const int64_t c1 = std::min(cols, c0 + kB);
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = c0; c < c1; ++c) dst[c * ld_dst + r] = src[r * ld_src + c];
    }
  }
}

// Where the rows of the embedding matrix X (N, D) come from: `feats` (N, D)
// with any strides, or the (B, D, HW) planes of an NCHW map (row n = pixel
// n % HW of image n / HW; a tile never crosses an image, so a tile is a
// transposed block of one image's (D, HW) plane, read as it lies). With
// `weight` defined, each row gets the LayerNorm over D (biased variance, then
// the affine weight and bias) as its tile is read: no normalised copy of X is
// ever stored, forward or backward.
struct Source {
  at::Tensor feats, weight, bias;  // weight and bias: acc dtype, contiguous (D,), or undefined
  double eps;
  int64_t N, D, HW, T, per_image, ntiles;
  at::ScalarType acc;

  Source(const at::Tensor& f, const at::Tensor& w, const at::Tensor& b, double ln_eps, int64_t tile)
      : feats(f), eps(ln_eps), T(tile) {
    acc = acc_type(f.scalar_type());
    if (w.defined()) {
      weight = w.to(acc).contiguous();
      bias = b.to(acc).contiguous();
    }
    D = f.size(1);
    if (f.dim() == 3) {
      HW = f.size(2);
      N = f.size(0) * HW;
      per_image = (HW + T - 1) / T;
      ntiles = f.size(0) * per_image;
    } else {
      N = f.size(0);
      HW = N;
      per_image = (N + T - 1) / T;
      ntiles = per_image;
    }
  }
  bool planes() const { return feats.dim() == 3; }
  bool ln() const { return weight.defined(); }
  // first row (in X) and row count of tile t
  int64_t row0(int64_t t) const { return (t / per_image) * HW + (t % per_image) * T; }
  int64_t rows(int64_t t) const { return std::min(T, HW - (t % per_image) * T); }
  // The plane path (plane_embed.h) for the L2-normalised embedding of planes
  // in the acc dtype: the GEMM reads the plane, the LayerNorm is folded.
  bool plane_path(bool normalize) const { return planes() && normalize && feats.scalar_type() == acc; }
  // tile t of the planes, (D, rows), a view of the input
  at::Tensor plane_tile(int64_t t) const {
    return feats.select(0, t / per_image).narrow(1, (t % per_image) * T, rows(t));
  }
  // S (rows, CK) <- the scores of tile t on the plane path, with the tile's
  // statistics in st; false (nothing written) when the tile takes the row path
  template <typename acc_t>
  bool plane_scores(int64_t t, const plane::Fold<acc_t>& fold, plane::Stats<acc_t>& st, at::Tensor& S,
                    at::Tensor& ST_buf) const {
    at::Tensor v = plane_tile(t);
    return plane::scores(v.data_ptr<acc_t>(), v, v.stride(0), rows(t), D, fold, st, S, ST_buf);
  }
  // this tile of feats, (rows, D), a view of the input
  at::Tensor raw(int64_t t) const {
    if (!planes()) return feats.narrow(0, row0(t), rows(t));
    return feats.select(0, t / per_image).narrow(1, (t % per_image) * T, rows(t)).t();
  }

  // The rows of tile t, (rows, D) contiguous in the acc dtype: LayerNorm
  // outputs when ln(). With xhat given (ln() only), also the normalised rows
  // (x - mean) * rstd before the affine, and rstd (rows,).
  template <typename acc_t>
  at::Tensor rows_of(int64_t t, bool own_copy) const {
    if (planes() && feats.scalar_type() == acc) {
      at::Tensor plane = feats.select(0, t / per_image);
      at::Tensor x = at::empty({rows(t), D}, plane.options());
      transpose(x.data_ptr<acc_t>(), D, plane.data_ptr<acc_t>() + (t % per_image) * T, plane.stride(0), D, rows(t));
      return x;
    }
    at::Tensor x = raw(t).to(acc);
    return own_copy ? x.clone(at::MemoryFormat::Contiguous) : x.contiguous();
  }

  template <typename acc_t>
  at::Tensor load(int64_t t, at::Tensor* xhat = nullptr, at::Tensor* rstd = nullptr) const {
    if (!ln()) return rows_of<acc_t>(t, false);
    // the LayerNorm writes into its own copy (contiguous() may return a view of the input)
    at::Tensor x = rows_of<acc_t>(t, true);
    const int64_t n = x.size(0);
    acc_t* p = x.data_ptr<acc_t>();
    acc_t* xh = nullptr;
    acc_t* rs = nullptr;
    if (xhat != nullptr) {
      *xhat = at::empty({n, D}, x.options());
      *rstd = at::empty({n}, x.options());
      xh = xhat->data_ptr<acc_t>();
      rs = rstd->data_ptr<acc_t>();
    }
    const acc_t* w = weight.data_ptr<acc_t>();
    const acc_t* b = bias.data_ptr<acc_t>();
    for (int64_t i = 0; i < n; ++i) {
      acc_t* xi = p + i * D;
      const acc_t mean = rows::sum(xi, D) / acc_t(D);
      const acc_t var = rows::sum_of<acc_t>(D, [xi, mean](int64_t d) { return (xi[d] - mean) * (xi[d] - mean); });
      const acc_t r = acc_t(1) / std::sqrt(var / acc_t(D) + acc_t(eps));
      if (xh != nullptr) {
        rs[i] = r;
        acc_t* hi = xh + i * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) hi[d] = (xi[d] - mean) * r;
      }
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) xi[d] = (xi[d] - mean) * r * w[d] + b[d];
    }
    return x;
  }

  // Writes the gradient rows `g` (rows, D) of tile t into grad (the layout of feats, acc dtype).
  template <typename acc_t>
  void store(int64_t t, const at::Tensor& grad, const at::Tensor& g) const {
    if (!planes()) {
      rows::stream_copy(grad.data_ptr<acc_t>() + row0(t) * D, g.data_ptr<acc_t>(), rows(t) * D);
    } else {
      at::Tensor plane = grad.select(0, t / per_image);
      transpose(plane.data_ptr<acc_t>() + (t % per_image) * T, plane.stride(0), g.data_ptr<acc_t>(), D, rows(t), D);
    }
  }
};

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

}  // namespace

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> similarity_impl(
    const Source& src, const at::Tensor& protos, const at::Tensor& labels, int64_t ignore_index, double temperature,
    bool compute_seg, bool compute_lse, bool compute_own, int64_t cache_bytes, bool normalize) {
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
  if (N == 0 || (!compute_seg && !compute_lse && !compute_own)) return {seg, argk, lse, own, probs};
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
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t r0 = src.row0(t), rows = src.rows(t);
        at::Tensor S = S_buf.narrow(0, 0, rows);
        // S (rows, K*C), in cache: scaled as the rows of feats already on the plane path
        at::Tensor xt;
        const bool scaled = fold && src.plane_scores<acc_t>(t, *fold, *st, S, ST_buf);
        if (!scaled) {
          xt = src.load<acc_t>(t);
          at::mm_out(S, xt, Pt);
        }
        acc_t* s = S.data_ptr<acc_t>();
        const acc_t* x = scaled ? nullptr : xt.data_ptr<acc_t>();
        at::Tensor seg_t;  // this tile's seg rows, in acc_t
        if (compute_seg) seg_t = feats.scalar_type() == acc ? seg.narrow(0, r0, rows) : at::empty({rows, C}, aopt);
        acc_t* sv = compute_seg ? seg_t.data_ptr<acc_t>() : nullptr;
        if (compute_seg) {
          // nearest prototype of each class: max and arg-max over K, on the
          // rows scaled as the rows of feats (in the same pass)
          uint8_t* ak = argk.data_ptr<uint8_t>() + r0 * C;
          for (int64_t i = 0; i < rows; ++i) {
            const acc_t a = normalize && !scaled ? inv_norm(rows::sumsq<acc_t>(x + i * D, D)) : acc_t(1);
            rows::class_max(s + i * CK, C, K, a, sv + i * C, abuf.data());
            std::copy(abuf.begin(), abuf.end(), ak + i * C);  // int32 -> uint8
          }
        } else if (normalize && !scaled) {  // rows of S scale like the rows of feats
          scale_rows_by_inv_norm(s, x, rows, CK, D);
        }
        if (compute_own) {
          acc_t* o = own.data_ptr<acc_t>() + r0 * K;
          const int64_t* l = lab.data_ptr<int64_t>() + r0;
          for (int64_t i = 0; i < rows; ++i) {
            if (!label_in_range(l[i], C)) continue;  // ignored pixel: row stays 0
            for (int64_t k = 0; k < K; ++k) o[i * K + k] = s[i * CK + k * C + l[i]];
          }
        }
        if (compute_lse) {
          // row log-sum-exp of S / tau: the row max (from seg when it is
          // there), e = exp(S / tau - max) in place in the tile with ATen's
          // vectorised exp (faster here than any loop the compiler vectorises
          // for the baseline ISA, or than MKL's exp called row by row), then
          // row sums. When tau = 1 and every row max of the tile is in
          // [-kDirectExp, kDirectExp] (always, for unit rows and prototypes),
          // exp(S) can neither overflow nor vanish: e = exp(S) directly, one
          // pass fewer. The softmax rows e / sum(e) go to the cache with
          // streaming stores: written once, read only by the backward.
          const acc_t tau = static_cast<acc_t>(temperature);
          acc_t* lp = lse.data_ptr<acc_t>() + r0;
          bool direct = temperature == 1.0;
          for (int64_t i = 0; i < rows; ++i) {
            acc_t m = sv ? rows::max_nan(sv + i * C, C) : rows::max_nan(s + i * CK, CK);
            m = m / tau;
            direct = direct && m >= -kDirectExp && m <= kDirectExp;  // false for NaN
            lp[i] = std::isinf(m) ? acc_t(0) : m;  // the shift, until the sum is known (inf rows: keep exp() finite)
          }
          if (!direct) {
            for (int64_t i = 0; i < rows; ++i) {
              if (temperature == 1.0) {
                rows::sub(s + i * CK, s + i * CK, lp[i], CK);  // x / 1 is x: same values, no division
              } else {
                rows::div_sub(s + i * CK, s + i * CK, tau, lp[i], CK);
              }
            }
          }
          S.exp_();
          for (int64_t i = 0; i < rows; ++i) {
            acc_t* ei = s + i * CK;
            const acc_t z = rows::sum(ei, CK);
            lp[i] = (direct ? acc_t(0) : lp[i]) + std::log(z);
            if (cache) rows::scale(ei, acc_t(1) / z, CK);
          }
          if (cache) rows::stream_copy(probs.data_ptr<acc_t>() + r0 * CK, s, rows * CK);
        }
        if (compute_seg && feats.scalar_type() != acc) seg.narrow(0, r0, rows).copy_(seg_t);
      }
      rows::stream_fence();
    });
  });
  return {seg, argk, lse, own, probs};
}

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
    // the tiles' partial sums in tile order: the same bits for any thread count
    at::Tensor dw = at::zeros({D}, grad.options()), db = at::zeros({D}, grad.options());
    AT_DISPATCH_FLOATING_TYPES(acc, "layer_norm_grads", [&] {
      using acc_t = scalar_t;
      acc_t* w = dw.data_ptr<acc_t>();
      acc_t* b = db.data_ptr<acc_t>();
      for (int64_t t = 0; t < src.ntiles; ++t) {
        const acc_t* pw = dw_parts.data_ptr<acc_t>() + t * D;
        const acc_t* pb = db_parts.data_ptr<acc_t>() + t * D;
        for (int64_t d = 0; d < D; ++d) {
          w[d] += pw[d];
          b[d] += pb[d];
        }
      }
    });
    return {grad.to(feats.scalar_type()), dw, db};
  };
  if (N == 0 || (!has_seg && !has_lse && !has_own)) {
    if (tiled) grad.zero_();
    return finish();
  }
  at::Tensor probs = cached ? probs_opt->contiguous() : at::Tensor();
  at::Tensor gseg = has_seg ? grad_seg->to(acc).contiguous() : at::Tensor();
  at::Tensor ak = has_seg ? argk.contiguous() : at::Tensor();
  at::Tensor glse = has_lse ? (*grad_lse / temperature).to(acc).contiguous() : at::Tensor();
  at::Tensor l = has_lse ? lse.to(acc).contiguous() : at::Tensor();
  at::Tensor gown = has_own ? grad_own->to(acc).contiguous() : at::Tensor();
  at::Tensor lab = has_own ? checked_labels(labels, C, ignore_index) : at::Tensor();
  // the dense path works on S in k-major column order, the sparse one on rows of protos
  at::Tensor P = has_lse ? kmajor_protos(protos, acc) : protos.reshape({CK, D}).to(acc).contiguous();
  const int64_t T = src.T, ntiles = src.ntiles;

  AT_DISPATCH_FLOATING_TYPES(acc, "similarity_backward_cpu", [&] {
    using acc_t = scalar_t;
    const acc_t* pp = P.data_ptr<acc_t>();
    // dS (rows, CK) of the rows from r0, given e = exp(S / tau - lse) * grad_lse / tau (recomputed),
    // or from the cache: the softmax part, then the arg-max and own-class entries
    auto complete_dS = [&](acc_t* d, int64_t r0, int64_t rows) {
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
    };
    // the plane path (plane_embed.h): dense dS only (the sparse one gathers rows)
    std::unique_ptr<plane::Fold<acc_t>> fold;
    if (has_lse && src.plane_path(normalize))
      fold = std::make_unique<plane::Fold<acc_t>>(P, src.weight, src.bias, src.eps);
    at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
      at::NoGradGuard no_grad_worker;  // grad mode is per thread: OpenMP workers start with it on
      at::Tensor dS_buf = has_lse ? at::empty({T, CK}, P.options()) : at::Tensor();  // reused across tiles
      at::Tensor out_buf = has_lse || tiled ? at::empty({T, D}, P.options()) : at::Tensor();
      at::Tensor ST_buf = fold && !cached ? at::empty({CK, T}, P.options()) : at::Tensor();  // S recomputed
      std::unique_ptr<plane::Stats<acc_t>> st(fold ? new plane::Stats<acc_t>(T) : nullptr);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t r0 = src.row0(t), rows = src.rows(t);
        if (fold) {
          at::Tensor v = src.plane_tile(t);
          const acc_t* xp = v.data_ptr<acc_t>();
          // recomputing S needs the statistics first (and a tile within the GEMM's guard); with
          // the cache the backward's first pass takes them
          if (cached || plane::stats(xp, v.stride(0), rows, D, *fold, *st)) {
            at::Tensor dS = dS_buf.narrow(0, 0, rows);
            if (!cached) {  // S recomputed on the plane path, then e as below
              plane::raw_scores<acc_t>(v, fold->Pw, ST_buf, dS);  // the forward's S
              plane::scores_epilogue(dS.data_ptr<acc_t>(), rows, CK, *fold, *st);
              if (temperature != 1.0) dS.div_(temperature);
              dS.sub_(l.narrow(0, r0, rows).unsqueeze(1)).exp_().mul_(glse.narrow(0, r0, rows).unsqueeze(1));
            }
            complete_dS(dS.data_ptr<acc_t>(), r0, rows);
            // d loss / d z as a (D, rows) tile (the out buffer, read as such), then d loss / d x
            // straight into the gradient's plane
            at::Tensor G = out_buf.view(-1).narrow(0, 0, D * rows).view({D, rows});
            at::mm_out(G, P.t(), dS.t());
            at::Tensor gp = grad.select(0, t / src.per_image).narrow(1, (t % src.per_image) * T, rows);
            if (plane::backward(xp, v.stride(0), G.data_ptr<acc_t>(), gp.data_ptr<acc_t>(), gp.stride(0), rows, D,
                                *fold, *st, !cached, src.ln() ? dw_parts.data_ptr<acc_t>() + t * D : nullptr,
                                src.ln() ? db_parts.data_ptr<acc_t>() + t * D : nullptr))
              continue;
            // a NaN or inf pixel: the row path below redoes the tile
          }
        }
        // this tile's rows of the gradient: in grad, or in the tile buffer (dense or tiled path)
        at::Tensor out = tiled || has_lse ? out_buf.narrow(0, 0, rows) : at::Tensor();
        acc_t* g = tiled ? out.zero_().data_ptr<acc_t>() : grad.data_ptr<acc_t>() + r0 * D;
        acc_t* o = g;
        at::Tensor xhat, rstd;
        at::Tensor xt = normalize || (has_lse && !cached) || src.ln()
                            ? src.load<acc_t>(t, src.ln() ? &xhat : nullptr, src.ln() ? &rstd : nullptr)
                            : at::Tensor();
        if (has_lse) {
          // dS = softmax(S / tau) * grad_lse / tau + the sparse terms; d feats = dS @ P
          at::Tensor dS = dS_buf.narrow(0, 0, rows);
          if (!cached) {  // S recomputed from the saved lse (flash-attention style)
            at::mm_out(dS, xt, P.t());
            if (normalize) scale_rows_by_inv_norm(dS.data_ptr<acc_t>(), xt.data_ptr<acc_t>(), rows, CK, D);
            if (temperature != 1.0) dS.div_(temperature);
            dS.sub_(l.narrow(0, r0, rows).unsqueeze(1)).exp_().mul_(glse.narrow(0, r0, rows).unsqueeze(1));
          }
          complete_dS(dS.data_ptr<acc_t>(), r0, rows);
          // (rows, D), P k-major as dS, into the tile buffer: the rows go to
          // grad once final, with streaming stores
          at::mm_out(out, dS, P);
          o = out.data_ptr<acc_t>();
        } else {
          // dS is sparse (C + K entries per row): gather the prototypes instead of a GEMM
          for (int64_t i = 0; i < rows; ++i) {
            acc_t* gi = g + i * D;
            if (has_seg) {
              const acc_t* gs = gseg.data_ptr<acc_t>() + (r0 + i) * C;
              const uint8_t* a = ak.data_ptr<uint8_t>() + (r0 + i) * C;
              for (int64_t c = 0; c < C; ++c) {
                const acc_t w = gs[c];
                const acc_t* pr = pp + (c * K + a[c]) * D;
                for (int64_t j = 0; j < D; ++j) gi[j] += w * pr[j];
              }
            }
            if (has_own) {
              const int64_t lb = lab.data_ptr<int64_t>()[r0 + i];
              if (!label_in_range(lb, C)) continue;
              const acc_t* go = gown.data_ptr<acc_t>() + (r0 + i) * K;
              for (int64_t k = 0; k < K; ++k) {
                const acc_t w = go[k];
                const acc_t* pr = pp + (lb * K + k) * D;
                for (int64_t j = 0; j < D; ++j) gi[j] += w * pr[j];
              }
            }
          }
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
      rows::stream_fence();
    });
  });
  return finish();
}

Source plain_source(const at::Tensor& feats, const at::Tensor& protos) {
  const int64_t CK = protos.size(0) * protos.size(1);
  return Source(feats, at::Tensor(), at::Tensor(), 0.0, tile_rows(CK, at::elementSize(acc_type(feats.scalar_type()))));
}

// the LayerNorm's weight and bias (D,): both given or both absent
Source embed_source(const at::Tensor& rows, const c10::optional<at::Tensor>& weight,
                    const c10::optional<at::Tensor>& bias, double eps, int64_t tile) {
  const bool ln = check_embed_layer_norm(rows, weight, bias, eps);
  return Source(rows, ln ? *weight : at::Tensor(), ln ? *bias : at::Tensor(), eps, tile);
}

// the similarity's tile: about 1 MiB of S
int64_t score_tile(const at::Tensor& rows, const at::Tensor& protos) {
  return tile_rows(protos.size(0) * protos.size(1), at::elementSize(acc_type(rows.scalar_type())));
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

// The head's embedding fused into the similarity: feats (N, D) or the NCHW
// map (B, D, H, W) as it lies, the optional LayerNorm over D, the L2
// normalisation, then `similarity`; nothing of size (N, D) is stored.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> embed_similarity_cpu(
    const at::Tensor& feats, const c10::optional<at::Tensor>& ln_weight, const c10::optional<at::Tensor>& ln_bias,
    double ln_eps, const at::Tensor& protos, const at::Tensor& labels, int64_t ignore_index, double temperature,
    bool compute_seg, bool compute_lse, bool compute_own, int64_t cache_bytes) {
  const at::Tensor rows = embed_rows(feats);
  check_similarity_args(embed_checked_shape(rows), protos, labels, compute_own, temperature);
  const Source src = embed_source(rows, ln_weight, ln_bias, ln_eps, score_tile(rows, protos));
  return similarity_impl(src, protos, labels, ignore_index, temperature, compute_seg, compute_lse, compute_own,
                         cache_bytes, true);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> embed_similarity_backward_cpu(
    const c10::optional<at::Tensor>& grad_seg, const c10::optional<at::Tensor>& grad_lse,
    const c10::optional<at::Tensor>& grad_own, const at::Tensor& feats, const c10::optional<at::Tensor>& ln_weight,
    const c10::optional<at::Tensor>& ln_bias, double ln_eps, const at::Tensor& protos, const at::Tensor& labels,
    const at::Tensor& argk, const at::Tensor& lse, int64_t ignore_index, double temperature,
    const c10::optional<at::Tensor>& probs) {
  const bool has_own = grad_own.has_value() && grad_own->defined();
  const at::Tensor rows = embed_rows(feats);
  const at::Tensor shape = embed_checked_shape(rows);
  check_similarity_args(shape, protos, labels, has_own, temperature);
  const bool cached = check_similarity_backward_args(shape, protos, grad_seg, grad_lse, grad_own, argk, lse, probs);
  const Source src = embed_source(rows, ln_weight, ln_bias, ln_eps, score_tile(rows, protos));
  auto out = similarity_backward_impl(src, grad_seg, grad_lse, grad_own, protos, labels, argk, lse, ignore_index,
                                      temperature, probs, true, cached);
  const at::Tensor g = embed_grad_as_feats(std::get<0>(out), rows, feats);  // (N, D) or (B, D, HW) as feats
  at::Tensor dw = std::get<1>(out), db = std::get<2>(out);
  if (dw.defined()) {
    dw = dw.to(ln_weight->scalar_type());
    db = db.to(ln_bias->scalar_type());
  } else {
    dw = at::empty({0}, feats.options());
    db = at::empty({0}, feats.options());
  }
  return {g, dw, db};
}

std::tuple<at::Tensor, at::Tensor> prototype_sums_cpu(const at::Tensor& feats, const at::Tensor& slot,
                                                      int64_t num_slots, bool normalize);  // prototype_update_cpu.cpp

namespace {

constexpr int64_t kSumTile = 1024;    // pixels per tile of the prototype sums
constexpr int64_t kSumBlocks = 16;    // blocks of tiles, at most (each with a float64 partial)
constexpr int64_t kSumPartialBytes = int64_t(128) << 20;  // all partials, at most

// z (D,) <- the embedding of one pixel, column j of a plane tile (D rows of
// stride ld), in float64 (a pixel whose float sums overflowed); false when
// an entry is NaN or inf.
template <typename T>
bool pixel_embedding(const T* x, int64_t ld, int64_t D, const Source& src, T* z) {
  std::vector<double> y(D);
  for (int64_t d = 0; d < D; ++d) {
    y[d] = double(x[d * ld]);
    if (!std::isfinite(y[d])) return false;
  }
  if (src.ln()) {
    double mean = 0, var = 0;
    for (double v : y) mean += v;
    mean /= double(D);
    for (double v : y) var += (v - mean) * (v - mean);
    const double r = 1.0 / std::sqrt(var / double(D) + src.eps);
    const T* w = src.weight.data_ptr<T>();
    const T* b = src.bias.data_ptr<T>();
    for (int64_t d = 0; d < D; ++d) y[d] = (y[d] - mean) * r * double(w[d]) + double(b[d]);
  }
  double sq = 0;
  for (double v : y) sq += v * v;
  const double inv = inv_norm(sq);
  for (int64_t d = 0; d < D; ++d) z[d] = T(y[d] * inv);
  return true;
}

}  // namespace

namespace {

// Scratch of plane_tile_sums, reused across tiles.
template <typename T>
struct TileSums {
  std::vector<int32_t> order, start, used;  // pixels grouped by slot; group s = order[start[s]:start[s+1]]
  std::vector<T> mu, a;                     // per grouped pixel
  TileSums(int64_t n, int64_t num_slots) : order(n), start(num_slots + 1), mu(n), a(n) {}
};

// The plane path of embed_prototype_sums for tile t, added into the block's
// float64 partial `part` laid out (D, num_slots). The embedding of a pixel is
//   z_d = (x_d - mu) a w_d + c b_d  (a = r inv, c = inv; without the
// LayerNorm a = inv, mu = 0 and no w, b), so
//   sums[s][d] = w_d sum_{slot = s} (x_d - mu) a + b_d sum_{slot = s} c:
// the tile's statistics (one pass over the plane), its pixels grouped by slot
// (a counting sort), then for four rows of the plane at a time, each group's
// sum of (x_d - mu) a in registers, added into part once per group and row.
// No store per pixel, and four independent chains of adds per group. Adds
// c to csum[s] and 1 to cnt[s] per pixel with a slot and finite sums; a
// pixel whose float sums overflowed (entries finite) is left to `late`
// (summed in float64 afterwards).
template <typename T>
void plane_tile_sums(const Source& src, int64_t t, const plane::Fold<T>& fold, plane::Stats<T>& st,
                     const int64_t* slot, int64_t num_slots, TileSums<T>& g, double* part, double* csum,
                     double* cnt, std::vector<int64_t>& late) {
  const at::Tensor v = src.plane_tile(t);
  const T* x = v.data_ptr<T>();
  const int64_t ld = v.stride(0), n = src.rows(t), D = src.D;
  plane::stats(x, ld, n, D, fold, st);
  // group the pixels by slot (stable), skipping those that add nothing
  std::fill(g.start.begin(), g.start.end(), 0);
  for (int64_t j = 0; j < n; ++j) {
    const int64_t s = slot[j];
    if (s >= 0 && st.finite[j]) {
      ++g.start[s + 1];
      csum[s] += double(st.inv[j]);
      cnt[s] += 1.0;
    } else if (s >= 0) {
      late.push_back(src.row0(t) + j);
    }
  }
  g.used.clear();
  for (int64_t s = 0; s < num_slots; ++s) {
    if (g.start[s + 1] > 0) g.used.push_back(int32_t(s));
    g.start[s + 1] += g.start[s];
  }
  std::vector<int32_t> fill(g.start.begin(), g.start.end() - 1);
  for (int64_t j = 0; j < n; ++j) {
    const int64_t s = slot[j];
    if (s < 0 || !st.finite[j]) continue;
    const int32_t i = fill[s]++;
    g.order[i] = int32_t(j);
    g.mu[i] = fold.ln ? st.k[j] + st.delta[j] : T(0);
    g.a[i] = fold.ln ? st.r[j] * st.inv[j] : st.inv[j];
  }
  const int32_t* ord = g.order.data();
  const T* mu = g.mu.data();
  const T* a = g.a.data();
  int64_t d = 0;
  for (; d + 4 <= D; d += 4) {
    const T* x0 = x + d * ld;
    const T* x1 = x0 + ld;
    const T* x2 = x1 + ld;
    const T* x3 = x2 + ld;
    double* p = part + d * num_slots;
    for (const int32_t s : g.used) {
      T u0 = 0, u1 = 0, u2 = 0, u3 = 0;
      for (int32_t i = g.start[s], e = g.start[s + 1]; i < e; ++i) {
        const int32_t j = ord[i];
        const T m = mu[i], ai = a[i];
        u0 += (x0[j] - m) * ai;
        u1 += (x1[j] - m) * ai;
        u2 += (x2[j] - m) * ai;
        u3 += (x3[j] - m) * ai;
      }
      p[s] += double(u0);
      p[num_slots + s] += double(u1);
      p[2 * num_slots + s] += double(u2);
      p[3 * num_slots + s] += double(u3);
    }
  }
  for (; d < D; ++d) {
    const T* xr = x + d * ld;
    double* p = part + d * num_slots;
    for (const int32_t s : g.used) {
      T u = 0;
      for (int32_t i = g.start[s], e = g.start[s + 1]; i < e; ++i) u += (xr[ord[i]] - mu[i]) * a[i];
      p[s] += double(u);
    }
  }
}

}  // namespace

// sums[s] = the sum of the head's embedding (LayerNorm'd, L2-normalised: the
// rows embed_similarity scores) over the pixels with slot == s and a finite
// feature row, counts[s] = how many; read from the map as embed_similarity
// reads it, with no (N, D) copy. On the plane path a tile's statistics come
// from one pass over the plane (plane_embed.h) and its sums from a second,
// over the pixels grouped by slot (plane_tile_sums); otherwise from the tile's LayerNorm'd rows.
// Tiles are grouped in blocks (a number fixed by the tile count), each summed
// in the accumulation type and flushed into its float64 partial after every
// tile; partials merge in block order: the same bits for any thread count.
std::tuple<at::Tensor, at::Tensor> embed_prototype_sums_cpu(const at::Tensor& feats,
                                                            const c10::optional<at::Tensor>& ln_weight,
                                                            const c10::optional<at::Tensor>& ln_bias, double ln_eps,
                                                            const at::Tensor& slot, int64_t num_slots) {
  at::NoGradGuard no_grad;
  const at::Tensor rows = check_embed_prototype_sums_args(feats, slot, num_slots);
  const Source src = embed_source(rows, ln_weight, ln_bias, ln_eps, kSumTile);
  if (!src.planes() && !src.ln()) return prototype_sums_cpu(rows, slot, num_slots, true);  // the rows as they are
  const int64_t N = src.N, D = src.D, SD = num_slots * D;
  at::Tensor sums = at::zeros({num_slots, D}, rows.options().dtype(src.acc));
  at::Tensor counts = at::zeros({num_slots}, rows.options().dtype(src.acc));
  if (N == 0 || num_slots == 0) return {sums, counts};
  at::Tensor sl = slot.to(at::kLong).contiguous();
  const int64_t* sp = sl.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK_VALUE(sp[n] < num_slots, "slot[", n, "] = ", sp[n], " is >= num_slots (", num_slots, ")");
  }
  const int64_t nb = std::max<int64_t>(
      1, std::min<int64_t>({kSumBlocks, src.ntiles, kSumPartialBytes / std::max<int64_t>(1, SD * 8)}));
  // from the pool: a fresh buffer this large would page-fault in every step.
  // On the plane path a block's partial is (D, num_slots), on the row path
  // (num_slots, D).
  at::Tensor partial_t = BufferPool::get().empty({nb * SD}, rows.options().dtype(at::kDouble)).zero_();
  double* partial = partial_t.data_ptr<double>();
  std::vector<double> block_counts(nb * num_slots, 0.0), block_csum(nb * num_slots, 0.0);
  std::vector<std::vector<int64_t>> late(nb);  // plane path: pixels summed in float64 afterwards
  const bool on_plane = src.plane_path(true);
  AT_DISPATCH_FLOATING_TYPES(src.acc, "embed_prototype_sums_cpu", [&] {
    using acc_t = scalar_t;
    std::unique_ptr<plane::Fold<acc_t>> fold;
    if (on_plane) fold = std::make_unique<plane::Fold<acc_t>>(at::Tensor(), src.weight, src.bias, src.eps);
    at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
      at::NoGradGuard no_grad_worker;
      rows::SlotSums<acc_t> scratch(on_plane ? 0 : num_slots, D);
      std::unique_ptr<TileSums<acc_t>> groups(on_plane ? new TileSums<acc_t>(kSumTile, num_slots) : nullptr);
      std::unique_ptr<plane::Stats<acc_t>> st(fold ? new plane::Stats<acc_t>(kSumTile) : nullptr);
      for (int64_t b = b0; b < b1; ++b) {
        double* part = partial + b * SD;
        double* cnt = block_counts.data() + b * num_slots;
        for (int64_t t = src.ntiles * b / nb, t1 = src.ntiles * (b + 1) / nb; t < t1; ++t) {
          const int64_t n = src.rows(t);
          const int64_t* s = sp + src.row0(t);
          if (fold) {
            plane_tile_sums(src, t, *fold, *st, s, num_slots, *groups, part, block_csum.data() + b * num_slots, cnt,
                            late[b]);
            continue;
          }
          at::Tensor xt = src.load<acc_t>(t);  // LayerNorm'd rows (n, D)
          const acc_t* x = xt.data_ptr<acc_t>();
          for (int64_t i = 0; i < n; ++i) {
            acc_t a = acc_t(1);
            if (s[i] >= 0 && rows::row_scale<acc_t>(x + i * D, D, true, a)) {
              rows::axpy(scratch.row(s[i]), x + i * D, a, D);
              cnt[s[i]] += 1.0;
            }
          }
          scratch.flush(part);  // the tile into the block's partial
        }
      }
    });
  });
  // merge the partials in block order
  std::vector<double> total(SD, 0.0), total_counts(num_slots, 0.0), total_c(num_slots, 0.0);
  at::parallel_for(0, SD, 4096, [&](int64_t j0, int64_t j1) {
    for (int64_t b = 0; b < nb; ++b)
      for (int64_t j = j0; j < j1; ++j) total[j] += partial[b * SD + j];
  });
  for (int64_t b = 0; b < nb; ++b) {
    for (int64_t j = 0; j < num_slots; ++j) {
      total_counts[j] += block_counts[b * num_slots + j];
      total_c[j] += block_csum[b * num_slots + j];
    }
  }
  at::Tensor out = at::from_blob(total.data(), {num_slots, D}, at::kDouble);
  if (on_plane) {
    // (D, num_slots) sums of (x - mu) a -> (num_slots, D) embeddings: times w_d, plus b_d sum c
    out = at::from_blob(total.data(), {D, num_slots}, at::kDouble).t().contiguous();
    if (src.ln()) {
      at::Tensor csum = at::from_blob(total_c.data(), {num_slots, 1}, at::kDouble);
      out = out * src.weight.to(at::kDouble).unsqueeze(0) + csum * src.bias.to(at::kDouble).unsqueeze(0);
    }
    // pixels whose float sums overflowed (entries finite): in float64, block by block, in order
    AT_DISPATCH_FLOATING_TYPES(src.acc, "embed_prototype_sums_late", [&] {
      using acc_t = scalar_t;
      std::vector<acc_t> z(D);
      double* o = out.data_ptr<double>();
      for (const auto& pixels : late) {
        for (int64_t n : pixels) {
          const int64_t img = n / src.HW, j = n % src.HW;
          const acc_t* x = src.feats.select(0, img).data_ptr<acc_t>() + j;
          if (!pixel_embedding(x, src.feats.stride(1), D, src, z.data())) continue;
          for (int64_t d = 0; d < D; ++d) o[sp[n] * D + d] += double(z[d]);
          total_counts[sp[n]] += 1.0;
        }
      }
    });
  }
  sums.copy_(out);
  counts.copy_(at::from_blob(total_counts.data(), {num_slots}, at::kDouble));
  return {sums, counts};
}

}  // namespace PROTOSEG_CPU_CAPABILITY

#if PROTOSEG_CPU_BASELINE  // registered once, with a dispatcher over the variants
PROTOSEG_CPU_VARIANTS(similarity_cpu)
PROTOSEG_CPU_VARIANTS(similarity_backward_cpu)
PROTOSEG_CPU_VARIANTS(embed_similarity_cpu)
PROTOSEG_CPU_VARIANTS(embed_similarity_backward_cpu)
PROTOSEG_CPU_VARIANTS(embed_prototype_sums_cpu)
TORCH_LIBRARY_IMPL(protoseg_ext, CPU, m) {
  m.impl("similarity", PROTOSEG_CPU_DISPATCH(similarity_cpu));
  m.impl("similarity_backward", PROTOSEG_CPU_DISPATCH(similarity_backward_cpu));
  m.impl("embed_similarity", PROTOSEG_CPU_DISPATCH(embed_similarity_cpu));
  m.impl("embed_similarity_backward", PROTOSEG_CPU_DISPATCH(embed_similarity_backward_cpu));
  m.impl("embed_prototype_sums", PROTOSEG_CPU_DISPATCH(embed_prototype_sums_cpu));
}
#endif

}  // namespace protoseg

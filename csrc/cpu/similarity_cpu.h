// What the CPU similarity kernels (similarity_cpu.cpp) share with the head's
// embedding (embed_cpu.cpp): the tile size, where a tile's rows come from
// (Source), and the tiled forward and backward both run.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <tuple>

#include "../protoseg_math.h"
#include "cpu_isa.h"
#include "plane_embed.h"
#include "rows.h"
#include "transpose.h"

namespace protoseg {
namespace PROTOSEG_CPU_CAPABILITY {  // one copy per instruction-set variant (cpu_isa.h)

// Rows of embed_similarity's stats on this backend (pixels contiguous):
// 0-2 the mean, 1 / std and 1 / ||y|| every backend keeps; then what the
// backward would otherwise read the map for (plane_embed.h, backward_given):
// 3: wy = sum w y, 4: wxy = sum w xhat y (LayerNorm, plane path, ||y|| > eps),
// 5: ps = sum_k softmax(S / tau)_k S_k (softmax cache). +inf where not kept;
// where kept, NaN (as rows 0-2) for a pixel that is not finite.
constexpr int64_t kStatsRows = 6;

// Rows per tile: about 1 MiB of S per tile, between 16 and 1024 rows; from
// 64 rows on, the nearest multiple of 64. A tile's row count is the N of
// its GEMMs (Pw (CK, D) @ the plane's (D, rows) forward, P^T (D, CK) @ dS^T
// backward), and MKL runs an N that is not a multiple of its blocking much
// slower: measured on an Intel Xeon (AVX-512, one thread, D = 720, C*K =
// 1,500) 693 ms per 32,768 pixels at 174 rows (1 MiB of S exactly) and 468
// ms at 192; the ADE20K-size head step went from 832-845 to 637-680 ms.
inline int64_t tile_rows(int64_t CK, int64_t elem_size) {
  int64_t rows = (int64_t(1) << 20) / std::max<int64_t>(1, CK * elem_size);
  if (rows >= 64) rows = (rows + 32) / 64 * 64;
  return std::min<int64_t>(1024, std::max<int64_t>(16, rows));
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
  at::Tensor stats;                // embed_similarity's stats (3 or kStatsRows, N) when given, or undefined
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

  // With ms given (ln() only), also each row's mean at ms[i] and its rstd at ms[ms_ld + i].
  template <typename acc_t>
  at::Tensor load(int64_t t, at::Tensor* xhat = nullptr, at::Tensor* rstd = nullptr, acc_t* ms = nullptr,
                  int64_t ms_ld = 0) const {
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
      if (ms != nullptr) {
        ms[i] = mean;
        ms[ms_ld + i] = r;
      }
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

// The tiled forward of similarity and embed_similarity (similarity_cpu.cpp):
// seg, argk, lse, own and the softmax cache, as the ops return them; with
// stats given (normalize only), embed_similarity's stats (kStatsRows, N) into *stats.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> similarity_impl(
    const Source& src, const at::Tensor& protos, const at::Tensor& labels, int64_t ignore_index, double temperature,
    bool compute_seg, bool compute_lse, bool compute_own, int64_t cache_bytes, bool normalize,
    at::Tensor* stats = nullptr);

// The tiled backward (similarity_cpu.cpp): d loss / d feats in the acc dtype
// and the layout of src.feats, and with the LayerNorm its weight's and bias's
// gradients (else undefined).
std::tuple<at::Tensor, at::Tensor, at::Tensor> similarity_backward_impl(
    const Source& src, const c10::optional<at::Tensor>& grad_seg, const c10::optional<at::Tensor>& grad_lse,
    const c10::optional<at::Tensor>& grad_own, const at::Tensor& protos, const at::Tensor& labels,
    const at::Tensor& argk, const at::Tensor& lse, int64_t ignore_index, double temperature,
    const c10::optional<at::Tensor>& probs_opt, bool normalize, bool cached);

}  // namespace PROTOSEG_CPU_CAPABILITY
}  // namespace protoseg

// CPU kernels of the head's embedding: `embed_similarity`,
// `embed_similarity_backward` and `embed_prototype_sums`.
//
// They read the backbone's map where it lies. Planes of an NCHW map in the
// accumulation dtype take the plane path of plane_embed.h: the GEMMs read the
// plane, the LayerNorm is folded into the prototypes, and the per-pixel
// passes run in plane layout. Everything else (channels-last or (N, D) rows,
// half-precision maps, a tile far from zero mean) takes the row path: the
// tile's rows are loaded (transposed in 16 x 16 blocks from a plane) and
// LayerNorm'd in cache. The similarity's tiles run the forward and backward
// of similarity_cpu.cpp (similarity_cpu.h).
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
#include "similarity_cpu.h"

namespace protoseg {
namespace PROTOSEG_CPU_CAPABILITY {  // one copy per instruction-set variant (cpu_isa.h)
namespace {

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

// The head's embedding fused into the similarity: feats (N, D) or the NCHW
// map (B, D, H, W) as it lies, the optional LayerNorm over D, the L2
// normalisation, then `similarity`; nothing of size (N, D) is stored.
// Also each pixel's statistics (stats), for the backward and the prototype sums.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> embed_similarity_cpu(
    const at::Tensor& feats, const c10::optional<at::Tensor>& ln_weight, const c10::optional<at::Tensor>& ln_bias,
    double ln_eps, const at::Tensor& protos, const at::Tensor& labels, int64_t ignore_index, double temperature,
    bool compute_seg, bool compute_lse, bool compute_own, int64_t cache_bytes) {
  const at::Tensor rows = embed_rows(feats);
  check_similarity_args(embed_checked_shape(rows), protos, labels, compute_own, temperature);
  const Source src = embed_source(rows, ln_weight, ln_bias, ln_eps, score_tile(rows, protos));
  at::Tensor stats;
  auto out = similarity_impl(src, protos, labels, ignore_index, temperature, compute_seg, compute_lse, compute_own,
                             cache_bytes, true, &stats);
  return std::tuple_cat(out, std::make_tuple(stats));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> embed_similarity_backward_cpu(
    const c10::optional<at::Tensor>& grad_seg, const c10::optional<at::Tensor>& grad_lse,
    const c10::optional<at::Tensor>& grad_own, const at::Tensor& feats, const c10::optional<at::Tensor>& ln_weight,
    const c10::optional<at::Tensor>& ln_bias, double ln_eps, const at::Tensor& protos, const at::Tensor& labels,
    const at::Tensor& argk, const at::Tensor& lse, int64_t ignore_index, double temperature,
    const c10::optional<at::Tensor>& probs, const c10::optional<at::Tensor>& stats) {
  const bool has_own = grad_own.has_value() && grad_own->defined();
  const at::Tensor rows = embed_rows(feats);
  const at::Tensor shape = embed_checked_shape(rows);
  check_similarity_args(shape, protos, labels, has_own, temperature);
  const bool cached = check_similarity_backward_args(shape, protos, grad_seg, grad_lse, grad_own, argk, lse, probs);
  Source src = embed_source(rows, ln_weight, ln_bias, ln_eps, score_tile(rows, protos));
  if (check_embed_stats(rows, stats, kStatsRows)) src.stats = *stats;
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

constexpr int64_t kB = kTransposeBlock;  // rows and pixels of a block of plane_tile_sums

// Scratch of plane_tile_sums, reused across tiles.
template <typename T>
struct TileSums {
  std::vector<int32_t> slot, used;  // per pixel: its slot, or -1 (adds nothing); the slots present
  std::vector<uint8_t> present;     // per slot: a pixel of the tile has it
  std::vector<T> mu, a;             // per pixel
  std::vector<T> run;               // (num_slots, 16): one block of rows' running sums per slot
  std::vector<T> block, padded;     // 16 x 16: a transposed block; a block read past the tile's edge
  TileSums(int64_t n, int64_t num_slots)
      : slot(n), present(num_slots), mu(n), a(n), run(num_slots * kB), block(kB * kB), padded(kB * kB) {}
};

// The plane path of embed_prototype_sums for tile t, added into the block's
// float64 partial `part` laid out (num_slots, D). The embedding of a pixel is
//   z_d = (x_d - mu) a w_d + c b_d  (a = r inv, c = inv; without the
// LayerNorm a = inv, mu = 0 and no w, b), so
//   sums[s][d] = w_d sum_{slot = s} (x_d - mu) a + b_d sum_{slot = s} c:
// the tile's statistics (embed_similarity's stats when given, else one pass
// over the plane), then for each block of 16 rows (16 runs of contiguous
// pixels), each 16 x 16 block transposed in registers and each pixel's 16
// values, (x_d - mu) a, added into its slot's running sums (num_slots x 16
// floats, in L1), flushed into part once per block of rows. Adds c to csum[s] and 1 to cnt[s] per pixel with a slot and
// finite sums; a pixel whose float sums overflowed (entries finite) is left
// to `late` (summed in float64 afterwards).
template <typename T>
void plane_tile_sums(const Source& src, int64_t t, const plane::Fold<T>& fold, plane::Stats<T>& st,
                     const int64_t* slot, int64_t num_slots, TileSums<T>& g, double* part, double* csum,
                     double* cnt, std::vector<int64_t>& late) {
  const at::Tensor v = src.plane_tile(t);
  const T* x = v.data_ptr<T>();
  const int64_t ld = v.stride(0), n = src.rows(t), D = src.D, N = src.N;
  if (src.stats.defined()) {  // embed_similarity's first 3 rows; NaN: not finite
    (void)plane::given_stats(src.stats.data_ptr<T>() + src.row0(t), N, n, st);
  } else {
    plane::stats(x, ld, n, D, fold, st);
  }
  std::fill(g.present.begin(), g.present.end(), 0);
  for (int64_t j = 0; j < n; ++j) {
    const int64_t s = slot[j];
    g.slot[j] = -1;
    if (s < 0) continue;
    if (!st.finite[j]) {
      late.push_back(src.row0(t) + j);
      continue;
    }
    const T inv = st.inv[j];
    g.slot[j] = int32_t(s);
    g.mu[j] = fold.ln ? st.k[j] + st.delta[j] : T(0);
    g.a[j] = fold.ln ? st.r[j] * inv : inv;
    csum[s] += double(inv);
    cnt[s] += 1.0;
    g.present[s] = 1;
  }
  g.used.clear();
  for (int64_t s = 0; s < num_slots; ++s)
    if (g.present[s]) g.used.push_back(int32_t(s));
  for (int64_t d0 = 0; d0 < D; d0 += kB) {
    const int64_t nd = std::min(kB, D - d0);
    for (const int32_t s : g.used) std::fill(g.run.begin() + s * kB, g.run.begin() + (s + 1) * kB, T(0));
    for (int64_t j0 = 0; j0 < n; j0 += kB) {
      const int64_t nj = std::min(kB, n - j0);
      const T* blk = x + d0 * ld + j0;
      int64_t bld = ld;
      if (nd < kB || nj < kB) {  // the tile's edge: a zero-padded copy
        std::fill(g.padded.begin(), g.padded.end(), T(0));
        for (int64_t d = 0; d < nd; ++d) std::copy(blk + d * ld, blk + d * ld + nj, g.padded.begin() + d * kB);
        blk = g.padded.data();
        bld = kB;
      }
      transpose_block(blk, bld, g.block.data(), kB);
      for (int64_t jj = 0; jj < nj; ++jj) {
        const int32_t s = g.slot[j0 + jj];
        if (s < 0) continue;
        T* run = g.run.data() + s * kB;
        const T* xj = g.block.data() + jj * kB;
        const T m = g.mu[j0 + jj], a = g.a[j0 + jj];
#pragma omp simd
        for (int64_t d = 0; d < kB; ++d) run[d] += (xj[d] - m) * a;
      }
    }
    for (const int32_t s : g.used) {
      double* p = part + s * D + d0;
      const T* run = g.run.data() + s * kB;
      for (int64_t d = 0; d < nd; ++d) p[d] += double(run[d]);
    }
  }
}

// The row path of embed_prototype_sums for tile t: its LayerNorm'd rows,
// each scaled by its 1 / ||y|| and added into its slot's running row, then
// flushed into the block's float64 partial (num_slots, D).
template <typename acc_t>
void row_tile_sums(const Source& src, int64_t t, const int64_t* slot, rows::SlotSums<acc_t>& scratch, double* part,
                   double* cnt) {
  const int64_t n = src.rows(t), D = src.D;
  at::Tensor xt = src.load<acc_t>(t);  // LayerNorm'd rows (n, D)
  const acc_t* x = xt.data_ptr<acc_t>();
  for (int64_t i = 0; i < n; ++i) {
    acc_t a = acc_t(1);
    if (slot[i] >= 0 && rows::row_scale<acc_t>(x + i * D, D, true, a)) {
      rows::axpy(scratch.row(slot[i]), x + i * D, a, D);
      cnt[slot[i]] += 1.0;
    }
  }
  scratch.flush(part);
}

// The blocks of embed_prototype_sums: a number fixed by the tile count, each
// with its float64 partial sums (from the pool: a fresh buffer this large
// would page-fault in every step), laid out (num_slots, D), its counts, its
// sums of c (plane path) and its pixels left to float64 (plane path).
struct SumBlocks {
  int64_t nb, num_slots, D, SD;
  bool on_plane;
  at::Tensor partial;  // (nb * SD,) float64
  std::vector<double> counts, csum;         // (nb, num_slots)
  std::vector<std::vector<int64_t>> late;   // per block

  SumBlocks(const Source& src, int64_t slots, bool plane_path)
      : num_slots(slots), D(src.D), SD(slots * src.D), on_plane(plane_path) {
    const int64_t fit = kSumPartialBytes / std::max<int64_t>(1, SD * 8);  // partials within the budget
    nb = std::max<int64_t>(1, std::min<int64_t>({kSumBlocks, src.ntiles, fit}));
    partial = BufferPool::get().empty({nb * SD}, src.feats.options().dtype(at::kDouble)).zero_();
    counts.assign(nb * num_slots, 0.0);
    csum.assign(nb * num_slots, 0.0);
    late.resize(nb);
  }
  double* part(int64_t b) { return partial.data_ptr<double>() + b * SD; }

  // sums (num_slots, D) and counts (num_slots,) in float64: the partials
  // merged in block order (the same bits for any thread count); on the plane
  // path (x - mu) a summed per (slot, d) becomes the embeddings' sums (times
  // w_d, plus b_d sum c), then the pixels left to float64 are added.
  std::tuple<at::Tensor, at::Tensor> merge(const Source& src, const int64_t* slot) const {
    at::Tensor total = at::zeros({SD}, at::kDouble);
    double* tp = total.data_ptr<double>();
    const double* pp = partial.data_ptr<double>();
    at::parallel_for(0, SD, 4096, [&](int64_t j0, int64_t j1) {
      for (int64_t b = 0; b < nb; ++b)
        for (int64_t j = j0; j < j1; ++j) tp[j] += pp[b * SD + j];
    });
    at::Tensor cnt = at::zeros({num_slots}, at::kDouble), cs = at::zeros({num_slots, 1}, at::kDouble);
    for (int64_t b = 0; b < nb; ++b) {
      for (int64_t j = 0; j < num_slots; ++j) {
        cnt.data_ptr<double>()[j] += counts[b * num_slots + j];
        cs.data_ptr<double>()[j] += csum[b * num_slots + j];
      }
    }
    at::Tensor out = total.view({num_slots, D});
    if (!on_plane) return {out, cnt};
    if (src.ln()) out = out * src.weight.to(at::kDouble).unsqueeze(0) + cs * src.bias.to(at::kDouble).unsqueeze(0);
    AT_DISPATCH_FLOATING_TYPES(src.acc, "embed_prototype_sums_late", [&] {
      using acc_t = scalar_t;
      std::vector<acc_t> z(D);
      double* o = out.data_ptr<double>();
      for (const auto& pixels : late) {
        for (int64_t n : pixels) {  // finite entries whose float sums overflowed
          const acc_t* x = src.feats.select(0, n / src.HW).data_ptr<acc_t>() + n % src.HW;
          if (!pixel_embedding(x, src.feats.stride(1), D, src, z.data())) continue;
          for (int64_t d = 0; d < D; ++d) o[slot[n] * D + d] += double(z[d]);
          cnt.data_ptr<double>()[slot[n]] += 1.0;
        }
      }
    });
    return {out, cnt};
  }
};

}  // namespace

// sums[s] = the sum of the head's embedding (LayerNorm'd, L2-normalised: the
// rows embed_similarity scores) over the pixels with slot == s and a finite
// feature row, counts[s] = how many; read from the map as embed_similarity
// reads it, with no (N, D) copy. On the plane path a tile's statistics come
// from one pass over the plane (plane_embed.h) and its sums from a second,
// in 16 x 16 blocks transposed in registers (plane_tile_sums); otherwise from the
// tile's LayerNorm'd rows (row_tile_sums). Tiles are grouped in blocks
// (SumBlocks), each summed in the accumulation type and added into its
// float64 partial after every tile; partials merge in block order: the same
// bits for any thread count.
std::tuple<at::Tensor, at::Tensor> embed_prototype_sums_cpu(const at::Tensor& feats,
                                                            const c10::optional<at::Tensor>& ln_weight,
                                                            const c10::optional<at::Tensor>& ln_bias, double ln_eps,
                                                            const at::Tensor& slot, int64_t num_slots,
                                                            const c10::optional<at::Tensor>& stats) {
  at::NoGradGuard no_grad;
  const at::Tensor rows = check_embed_prototype_sums_args(feats, slot, num_slots);
  Source src = embed_source(rows, ln_weight, ln_bias, ln_eps, kSumTile);
  if (check_embed_stats(rows, stats, kStatsRows)) src.stats = *stats;
  if (!src.planes() && !src.ln()) return prototype_sums_cpu(rows, slot, num_slots, true);  // the rows as they are
  const int64_t N = src.N, D = src.D;
  at::Tensor sums = at::zeros({num_slots, D}, rows.options().dtype(src.acc));
  at::Tensor counts = at::zeros({num_slots}, rows.options().dtype(src.acc));
  if (N == 0 || num_slots == 0) return {sums, counts};
  at::Tensor sl = slot.to(at::kLong).contiguous();
  const int64_t* sp = sl.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK_VALUE(sp[n] < num_slots, "slot[", n, "] = ", sp[n], " is >= num_slots (", num_slots, ")");
  }
  SumBlocks blocks(src, num_slots, src.plane_path(true));
  AT_DISPATCH_FLOATING_TYPES(src.acc, "embed_prototype_sums_cpu", [&] {
    using acc_t = scalar_t;
    std::unique_ptr<plane::Fold<acc_t>> fold;
    if (blocks.on_plane) fold = std::make_unique<plane::Fold<acc_t>>(at::Tensor(), src.weight, src.bias, src.eps);
    at::parallel_for(0, blocks.nb, 1, [&](int64_t b0, int64_t b1) {
      at::NoGradGuard no_grad_worker;
      rows::SlotSums<acc_t> scratch(fold ? 0 : num_slots, D);
      std::unique_ptr<TileSums<acc_t>> groups(fold ? new TileSums<acc_t>(kSumTile, num_slots) : nullptr);
      std::unique_ptr<plane::Stats<acc_t>> st(fold ? new plane::Stats<acc_t>(kSumTile) : nullptr);
      for (int64_t b = b0; b < b1; ++b) {
        double* cnt = blocks.counts.data() + b * num_slots;
        for (int64_t t = src.ntiles * b / blocks.nb, t1 = src.ntiles * (b + 1) / blocks.nb; t < t1; ++t) {
          const int64_t* s = sp + src.row0(t);
          if (fold) {
            plane_tile_sums(src, t, *fold, *st, s, num_slots, *groups, blocks.part(b),
                            blocks.csum.data() + b * num_slots, cnt, blocks.late[b]);
          } else {
            row_tile_sums(src, t, s, scratch, blocks.part(b), cnt);
          }
        }
      }
    });
  });
  auto merged = blocks.merge(src, sp);
  sums.copy_(std::get<0>(merged));
  counts.copy_(std::get<1>(merged));
  return {sums, counts};
}

}  // namespace PROTOSEG_CPU_CAPABILITY

#if PROTOSEG_CPU_BASELINE  // registered once, with a dispatcher over the variants
PROTOSEG_CPU_VARIANTS(embed_similarity_cpu)
PROTOSEG_CPU_VARIANTS(embed_similarity_backward_cpu)
PROTOSEG_CPU_VARIANTS(embed_prototype_sums_cpu)
TORCH_LIBRARY_IMPL(protoseg_ext, CPU, m) {
  m.impl("embed_similarity", PROTOSEG_CPU_DISPATCH(embed_similarity_cpu));
  m.impl("embed_similarity_backward", PROTOSEG_CPU_DISPATCH(embed_similarity_backward_cpu));
  m.impl("embed_prototype_sums", PROTOSEG_CPU_DISPATCH(embed_prototype_sums_cpu));
}
#endif

}  // namespace protoseg

// The parts of `similarity` that the head's embedding runs too: the tile
// size, the 16-bit GEMM helpers, the outputs and their epilogue, and the
// backward's dS @ P. Defined in similarity_cuda.cu (its file comment gives
// the reasons for the tiles, the GEMMs and their precision); used by
// similarity_cuda.cu and embed_cuda.cu.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "../protoseg_math.h"
#include "cuda_common.cuh"

namespace protoseg {
namespace cuda {

constexpr int kRowThreads = 256;                   // warp-per-row kernels: 8 rows per block
constexpr int kRowsPerBlock = kRowThreads / kWarp;
constexpr int kEpilogueStage = 512;                // scores of a class group of the forward epilogue, at most (K <= 256)
// Classes per group of the forward epilogue (similarity_epilogue_kernel; its
// launcher sizes the warps' stages from the same count): min(32, kEpilogueStage / K), >= 2.
__host__ __device__ __forceinline__ int epilogue_group(int64_t K) {
  return kEpilogueStage / K < kWarp ? int(kEpilogueStage / K) : kWarp;
}
constexpr int64_t kTileBytes = int64_t(16) << 20;  // bytes of S per tile
constexpr int64_t kMaxTileRows = 32768;            // <= 65535 kGradRows: the backward epilogue's gridDim.y

constexpr double kMaxFoldOffset = 16.0;            // as plane_embed.h's kMaxOffset

// The head's embedding (embed_cuda.cu): a pixel whose scores do not come
// from the folded GEMM's row through the per-row affine map, but from z
// itself: LayerNorm and |mu| r > kMaxFoldOffset (false for NaN statistics).
template <typename acc_t>
__device__ __forceinline__ bool fold_direct(bool ln, acc_t mu, acc_t r) {
  return ln && (mu < 0 ? -mu : mu) * r > acc_t(kMaxFoldOffset);
}

// A row that embed_scores_kernel finishes itself before the epilogue, from
// the stats (mu, r, inv) as stored: fold_direct, or NaN stats (recomputed in
// float64 there). The epilogue applies the affine map to every other row.
template <typename acc_t>
__device__ __forceinline__ bool scores_fixed_row(bool ln, acc_t mu, acc_t r, acc_t inv) {
  return !is_finite(inv) || fold_direct(ln, mu, r);
}

// The score of the folded GEMM's entry e of column j (plus e[half], the
// split GEMM's second half, when half != 0) through the pixel's affine map:
// inv (r (G - mu rho_j) + beta_j); without the LayerNorm (rho == nullptr)
// inv G. (E, R, B: the pointers, as global or shared memory, const or not.)
template <typename acc_t, typename E, typename R, typename B>
__device__ __forceinline__ acc_t folded_score(E e, int64_t half, acc_t mu, acc_t r, acc_t inv, R rho, B beta,
                                              int64_t j) {
  const acc_t g = half != 0 ? e[0] + e[half] : e[0];
  return rho != nullptr ? inv * (r * (g - mu * rho[j]) + beta[j]) : g * inv;
}

// Statistics (mu, r, inv) of one pixel in double, two passes over its D
// entries (stride sd): for a pixel whose stats are NaN (see load_stats).
// NaN in all three if an entry is not finite (stops at the first) or the
// double sums overflow.
template <typename scalar_t, typename acc_t>
__device__ void embed_stats_exact(const scalar_t* x, int64_t sd, int64_t D, const acc_t* w, const acc_t* b, double eps,
                                  acc_t& mu_out, acc_t& r_out, acc_t& inv_out) {
  mu_out = r_out = inv_out = acc_t(NAN);
  double mu = 0, r = 1;
  for (int64_t d = 0; d < D; ++d) {
    const double v = double(static_cast<acc_t>(x[d * sd]));
    if (!is_finite(v)) return;
    mu += v;
  }
  if (w != nullptr) {
    mu /= double(D);
    double var = 0;
    for (int64_t d = 0; d < D; ++d) {
      const double t = double(static_cast<acc_t>(x[d * sd])) - mu;
      var += t * t;
    }
    r = 1.0 / sqrt(var / double(D) + eps);
  } else {
    mu = 0;
  }
  double sq = 0;
  for (int64_t d = 0; d < D; ++d) {
    const double v = double(static_cast<acc_t>(x[d * sd]));
    const double y = w != nullptr ? (v - mu) * r * double(w[d]) + double(b[d]) : v;
    sq += y * y;
  }
  if (!is_finite(sq) || !is_finite(mu) || !is_finite(r)) return;
  mu_out = acc_t(mu);
  r_out = acc_t(r);
  inv_out = acc_t(inv_norm(sq));
}

// The statistics of pixel i as the embedding's kernels use them, from stats st
// (mu, r, inv at st[0], st[ld], st[2 ld]: embed_similarity's stats, or a
// tile's of embed_stats_kernel): a NaN column (a NaN or inf entry, or float
// sums that overflowed; inv NaN) is recomputed by embed_stats_exact from the
// pixel's entries xi (stride sd): finite for a finite pixel whose float sums
// overflowed, NaN again for a non-finite one (after its first bad entry).
// Rare: every other pixel takes three loads.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_stats(const acc_t* st, int64_t ld, const scalar_t* xi, int64_t sd, int64_t D,
                                           const acc_t* w, const acc_t* b, double eps, acc_t& mu, acc_t& r,
                                           acc_t& inv) {
  mu = st[0];
  r = st[ld];
  inv = st[2 * ld];
  if (!is_finite(inv)) embed_stats_exact(xi, sd, D, w, b, eps, mu, r, inv);
}

// A row of a tile of the folded GEMM's output s (entries j < C*K, and j +
// half with the split GEMM's second half), turned into its scores in place by
// one warp (every lane present; lane 0 writes the recomputed entries): its
// stats st (mu, r, inv at st[0], st[sld], st[2 sld]) through load_stats, then
// the affine map (rho, beta: global memory; rho == nullptr without the
// LayerNorm), or, with fold_direct, z . p_j from the pixel's entries xi
// (stride sd), the unfolded prototypes P (C*K, D) and the LayerNorm's w, b.
// For the rows with scores_fixed_row (and every row where the backward
// recomputes S); the caller orders the writes before other lanes' reads.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void fixed_scores_row(acc_t* s, int64_t half, int64_t CK, const acc_t* st, int64_t sld,
                                                 const acc_t* rho, const acc_t* beta, const scalar_t* xi, int64_t sd,
                                                 int64_t D, const acc_t* P, const acc_t* w, const acc_t* b,
                                                 double eps, int lane) {
  acc_t mu, r, inv;
  load_stats(st, sld, xi, sd, D, w, b, eps, mu, r, inv);  // the same in every lane of the warp
  if (!fold_direct(w != nullptr, mu, r)) {
    for (int64_t j = lane; j < CK; j += kWarp) s[j] = folded_score(s + j, half, mu, r, inv, rho, beta, j);
    return;
  }
  for (int64_t j = 0; j < CK; ++j) {
    acc_t a = 0;
    for (int64_t d = lane; d < D; d += kWarp) {
      const acc_t y = (static_cast<acc_t>(xi[d * sd]) - mu) * r * w[d] + b[d];
      a += y * P[j * D + d];
    }
    a = warp_sum(a);
    if (lane == 0) s[j] = a * inv;
  }
}

// Rows per tile at any N: ~kTileBytes of S, a multiple of 128, in [128, kMaxTileRows].
inline int64_t loop_tile_rows(int64_t CK, int64_t elem_size) {
  const int64_t rows = kTileBytes / std::max<int64_t>(1, CK * elem_size);
  return std::min<int64_t>(kMaxTileRows, std::max<int64_t>(128, rows / 128 * 128));
}

// Rows per tile: loop_tile_rows, at most N.
// (tools/gpu_model.py's cuda_tile_rows mirrors this.)
inline int64_t tile_rows(int64_t N, int64_t CK, int64_t elem_size) {
#ifdef CUDASIM  // the emulator's tile count for a launch count (tools/cuda_sim: tile_rows_override)
  if (const int64_t rows = cudasim::tile_rows_override(); rows > 0) return std::min<int64_t>(rows, N);
#endif
  return std::min<int64_t>(loop_tile_rows(CK, elem_size), N);
}

// The traffic meter's view of a host tile loop (tools/cuda_sim, meter_tile):
// next(loop_rows, rows) at the start of each tile (loop_rows: the loop's rows
// per tile at any size, as loop_tile_rows, or 0 for one tile per image), the
// loop's end when it goes out of scope. Nothing outside the emulator.
struct MeterTiles {
#ifdef CUDASIM
  MeterTiles() = default;
  MeterTiles(const MeterTiles&) = delete;
  MeterTiles& operator=(const MeterTiles&) = delete;
  ~MeterTiles() { cudasim::meter_tiles_end(); }
  void next(int64_t loop_rows, int64_t rows) { cudasim::meter_tile(loop_rows, rows); }
#else
  void next(int64_t, int64_t) {}
#endif
};

inline bool is_16bit(at::ScalarType st) { return st == at::kHalf || st == at::kBFloat16; }

// False once this torch turned out to have no 16-bit GEMM with fp32 output
// for the device (the GEMMs then convert to the working dtype).
bool lowp_gemm_available();

// out (fp32) = a @ b for 16-bit a, b of one dtype on tensor cores (mm.dtype_out);
// false (and nothing written) when this torch has no such GEMM for the device.
bool lowp_mm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b);

// The backward's d feats = dS @ P on tensor cores for 16-bit maps, from bf16
// high and low parts of dS and of P (see split_protos in similarity_cuda.cu).
struct SplitProtos {
  at::Tensor B;   // (terms * C*K, D) bf16, or undefined: dS @ P stays in the working dtype
  int terms = 0;  // 2 or 3
};

SplitProtos split_protos(const at::Tensor& P_acc, at::ScalarType map_dtype, at::ScalarType protos_dtype);

// The outputs of `similarity` (and `embed_similarity`) for N pixels, as the
// schema has them; probs (N, C*K), the softmax rows kept for the backward
// (one GEMM saved there), only when they fit the budget.
struct SimilarityOutputs {
  bool compute_seg, compute_lse, compute_own;
  at::Tensor seg, argk, lse, own, probs;

  SimilarityOutputs(const at::TensorOptions& fopt, int64_t N, int64_t C, int64_t K, bool compute_seg,
                    bool compute_lse, bool compute_own, int64_t cache_bytes);
  bool any() const { return compute_seg || compute_lse || compute_own; }
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> tuple() const {
    return {seg, argk, lse, own, probs};
  }
};

// The head's embedding: the per-row affine map from the folded GEMM's
// output to the scores, S = inv (r (G - mu rho_j) + beta_j) (rho, beta
// undefined without the LayerNorm: S = inv G), with G the tile's row, plus
// the entry `half` columns on when the split GEMM wrote two halves (half =
// C*K; 0 otherwise), and pixel i's (mu, r, inv) at stats[c * ld + col + i].
// Rows with scores_fixed_row get their scores in the epilogue itself
// (fixed_scores_row) from the tile x (rows, D), the unfolded prototypes P
// and the LayerNorm's w, b (undefined without it) and eps.
struct ScoreAffine {
  at::Tensor stats, rho, beta;
  int64_t col = 0, half = 0;
  at::Tensor x, P, w, b;
  double eps = 0;
};

// The forward epilogue of the tile S_tile (rows, C*K; any row stride) of
// pixels row0 ...: their rows of out (row i of S scaled by row_scale[i] when
// row_scale is defined, or mapped by affine when that is given: then S_tile
// is the whole rows, (rows, 2 C*K) when affine->half is C*K); labels (N,)
// int64 when out computes own.
void similarity_epilogue(const at::Tensor& S_tile, const at::Tensor& row_scale, int64_t row0, int64_t C, int64_t K,
                         double temperature, const at::Tensor& labels, int64_t ignore_index, SimilarityOutputs& out,
                         cudaStream_t stream, const ScoreAffine* affine = nullptr);

// Blocks of the backward epilogue per row (similarity_grad_epilogue_kernel):
// its threads per block, min(256, C*K rounded up to 32), and their count.
constexpr int kGradThreads = 256;
constexpr int kGradRows = 8;  // rows per block (the LayerNorm's P w, P b loaded once for them)
inline int grad_epilogue_threads(int64_t CK) {
  return int(std::min<int64_t>(kGradThreads, (CK + kWarp - 1) / kWarp * kWarp));
}
inline int64_t grad_epilogue_parts(int64_t CK) {
  const int64_t t = grad_epilogue_threads(CK);
  return (CK + t - 1) / t;
}

// Per-pixel sums the head's embedding backward (embed_cuda.cu) takes from
// the backward epilogue instead of a pass over the map: for pixel i of the
// tile and block q of its row (of grad_epilogue_parts(C*K)), out[(k * parts
// + q) * out.size(1) + i] = the sum over that block's entries j of dS_j S_j
// (k = 0: z . G, G = dS P, as S_j = z . p_j), dS_j pw_j (k = 1: w . G, pw =
// P w) and dS_j pb_j (k = 2: b . G, pb = P b); pw and pb undefined without
// the LayerNorm (rows 1, 2 then 0). With the softmax cache, S_j is taken
// from it, tau (log p_j + lse); an entry whose p_j < kMinCachedProb carries
// no softmax term worth counting, and if it carries a seg or own term (whose
// score is then unknown) the row's k = 0 sum is NaN: the kernel that reads
// the sums then takes its own pass over the map. Written only where the
// loss has the lse term (else the tile holds no S and there is no cache).
struct RowSums {
  at::Tensor out, pw, pb;
};
constexpr double kMinCachedProb = 1e-30;

// The backward's per-pixel inputs, in the working dtype and contiguous
// (undefined where that gradient is absent), and the epilogue that forms dS.
struct GradInputs {
  bool has_seg, has_lse, has_own, cached;
  at::Tensor gseg, ak, glse, l, gown, lab, pr;
  int64_t C, K, ignore_index;
  double temperature;

  GradInputs(const c10::optional<at::Tensor>& grad_seg, const c10::optional<at::Tensor>& grad_lse,
             const c10::optional<at::Tensor>& grad_own, const at::Tensor& labels, const at::Tensor& argk,
             const at::Tensor& lse, const c10::optional<at::Tensor>& probs, bool cached_, int64_t N, int64_t C_,
             int64_t K_, at::ScalarType acc, int64_t ignore_index_, double temperature_);

  // dS_tile (rows, C*K; any row stride) <- d loss / d S of pixels row0 ...
  // (similarity_grad_epilogue_kernel); with split (rows, terms * C*K) bf16
  // given, its bf16 parts go there instead (SplitProtos); with sums given
  // (has_lse only), the row sums of RowSums.
  template <typename acc_t>
  void launch(at::Tensor& dS_tile, const acc_t* row_scale, int64_t row0, cudaStream_t stream,
              at::Tensor* split = nullptr, int terms = 0, const RowSums* sums = nullptr) const;
};

// G_tile (rows, D) = dS @ P for the tile of pixels row0 ...: the grad
// epilogue forms dS, and the GEMM runs on tensor cores from its bf16 parts
// when sp has them (then A holds the parts; dS_tile is only read, for the
// recomputed S), else in the working dtype on dS_tile itself. row_scale as
// for similarity_epilogue (the recomputed S's rows), or undefined. sums: the
// epilogue's RowSums too (GradInputs::launch), or null.
void dS_times_protos(at::Tensor& G_tile, at::Tensor& dS_tile, at::Tensor& A, const SplitProtos& sp,
                     const at::Tensor& P_acc, const GradInputs& gin, const at::Tensor& row_scale, int64_t row0,
                     cudaStream_t stream, const RowSums* sums = nullptr);

}  // namespace cuda
}  // namespace protoseg

// CUDA kernels of the head's embedding fused into `similarity`:
// `embed_similarity`, `embed_similarity_backward` and `embed_prototype_sums`
// (mirrors csrc/cpu/plane_embed.h and the CPU embedding ops). The tiles, the
// GEMMs and the epilogue are those of `similarity` (similarity_cuda.cu,
// through similarity_common.cuh).
//
// The embedding ops read feats as checks.h's embed_rows gives them: one
// image's NCHW planes (a tile is a (pixels, D) view of stride (1, H*W): the
// map as it lies, no transposed copy) or (N, D) rows; every kernel below takes
// a tile through its (pixel, channel) strides. The algebra is that of
// csrc/cpu/plane_embed.h: with y = (x - mu) r w + b the LayerNorm's output
// (r = 1 / sqrt(var + eps)), z = y inv (inv = 1 / max(||y||, eps)) and p a
// prototype, z . p = inv (r (x . (w * p) - mu rho) + beta) where
// rho = sum_d w_d p_d and beta = sum_d b_d p_d. So one GEMM on the raw tile
// against the prototypes times w gives S, after a per-row affine map that
// the forward's epilogue applies as it reads the GEMM's output (the
// backward's recomputed S: embed_scores_kernel), and no normalised copy of
// the tile is ever written.
// That GEMM's rounding grows with |mu| while z . p does not: a pixel with
// |mu| r > kMaxFoldOffset has its row recomputed from z instead.
//
// Backward, with G = dS P = d loss / d z (one GEMM, written into the
// gradient's tile when that has the working dtype): per pixel, from one pass
// over the tile,
//   fg = z . G (0 where ||y|| <= eps: F.normalize's constant scale there),
//   dy = inv (G - z fg)                               (L2 normalisation)
//   m1 = mean_d w dy = inv (sum w G - fg sum w z) / D,
//   m2 = mean_d w dy xhat = inv (sum w G xhat - fg sum w z xhat) / D,
//   d x = r (w dy - m1 - xhat m2),  d w += dy xhat,  d b += dy   (LayerNorm)
// and a second pass writes d x in place of G; d w and d b are per-block
// partial sums, each block's added over the tiles, then summed over the
// blocks once (deterministic). The first pass is skipped where its five sums
// are known without it: z . G = dS . S (S_j = z . p_j), w . G = dS . (P w)
// and b . G = dS . (P b), which the grad epilogue sums as it forms dS
// (cuda::RowSums), give (w xhat) . G = z . G / inv - b . G; w . z and
// (w xhat) . z are rows 3 and 4 of the stats. Then x and G are read once.
//
// Statistics: embed_stats_kernel writes each pixel's (mu, r, inv, w . z,
// (w xhat) . z) straight into the (5, N) `stats` that embed_similarity
// returns (the tile's columns, row stride N); the backward and
// embed_prototype_sums read those when given (the first 3 rows alone are
// taken too) and launch it into a (5, T) tile buffer otherwise, so the map is
// read once for them per step, not three times. The scores' direct path (|mu| r >
// kMaxFoldOffset) and the backward's radial term (inv below 1 / eps) follow
// from the three values; a NaN column (a non-finite entry, or float sums that
// overflowed) is recomputed in float64 by the kernel that reads it
// (load_stats).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../checks.h"
#include "../protoseg_math.h"
#include "cuda_common.cuh"
#include "similarity_common.cuh"

namespace protoseg {
namespace {

using cuda::ceil_div;
using cuda::kRowsPerBlock;
using cuda::kRowThreads;
using cuda::kWarp;

constexpr int kEmbedThreads = 256;                     // 32 pixels (lanes) x 8 channel groups (warps)
constexpr int kEmbedGroups = kEmbedThreads / kWarp;
using cuda::load_stats;
// embed_similarity's stats: rows mu, r, inv, then (LayerNorm; 0 without it)
// w . z and (w xhat) . z, the pixels along each row. The backward reads the
// last two instead of summing them over the map (see embed_backward_kernel);
// stats of 3 rows alone are taken too (the first three).
constexpr int kStatRows = 5;
constexpr int kStatSums = 9;  // per-thread sums of embed_stats_kernel
template <typename acc_t>
constexpr int kEmbedStatsBlocks = sizeof(acc_t) == 8 ? 1 : 2;  // its minimum blocks per SM

// Staging. A block of the per-pixel kernels takes 32 pixels; warp g takes
// the channel chunks [d0, d0 + W), d0 = g W, g W + 8 W, ... Each chunk of the
// map (and of G, out, z) goes through the warp's (32 x W) tile of shared
// memory, loaded and stored along whichever of the pixel and channel strides
// is 1: NCHW planes (pixel stride 1) by 32 pixels of one channel, (N, D)
// rows and channels-last maps (channel stride 1) by W channels of 32 / W
// pixels, so each warp-wide access covers whole 32-byte sectors (W = 16 of
// 4 bytes: 64 B per pixel; 16-bit: 32 B, one sector) in either layout; the
// lane of pixel p then reads row p of the tile. Rows padded to W + 1
// entries against bank conflicts. W = 8 in float64 (64 B per pixel) keeps the
// backward's two tiles and its reductions under 48 KiB of shared memory.
template <typename acc_t>
constexpr int kStageW = sizeof(acc_t) == 8 ? 8 : 16;

// Entry e (0 <= e < 32 W) of a staged tile: pixel p, channel j, consecutive
// e along the pixels (pixel_fast: pixel stride 1) or along the channels.
__device__ __forceinline__ void stage_index(int e, bool pixel_fast, int W, int& p, int& j) {
  if (pixel_fast) {
    p = e & (kWarp - 1);
    j = e / kWarp;
  } else {
    p = e / W;
    j = e - p * W;
  }
}

// The warp's chunk of a (pixel, channel) strided array src (pixel stride
// sp, channel stride sd; `rows` pixels of D channels): pixels p0 .. p0 + 31,
// channels d0 .. d0 + W - 1, into its shared tile t (t[p][j], 32 x (W + 1)),
// in acc_t; the lanes take consecutive entries along the pixels
// (pixel_fast) or along the channels (see kStageW). Entries past the
// pixels or channels are not written. Every lane of the warp calls it; the
// caller syncs the warp before other lanes read the tile.
template <int W, typename acc_t, typename Src, typename Tile>
__device__ __forceinline__ void stage_chunk(Tile t, const Src* src, int64_t sp, int64_t sd, bool pixel_fast,
                                            int64_t p0, int64_t rows, int64_t d0, int64_t D, int lane) {
  for (int e = lane; e < kWarp * W; e += kWarp) {
    int p, j;
    stage_index(e, pixel_fast, W, p, j);
    if (p0 + p < rows && d0 + j < D) t[p][j] = static_cast<acc_t>(src[(p0 + p) * sp + (d0 + j) * sd]);
  }
}

// The converse of stage_chunk: the warp's tile t back to its chunk of dst
// (strides sp, sd), in dst's dtype.
template <int W, typename Dst, typename Tile>
__device__ __forceinline__ void unstage_chunk(Tile t, Dst* dst, int64_t sp, int64_t sd, bool pixel_fast, int64_t p0,
                                              int64_t rows, int64_t d0, int64_t D, int lane) {
  for (int e = lane; e < kWarp * W; e += kWarp) {
    int p, j;
    stage_index(e, pixel_fast, W, p, j);
    if (p0 + p < rows && d0 + j < D) dst[(p0 + p) * sp + (d0 + j) * sd] = static_cast<Dst>(t[p][j]);
  }
}

// Channels of the warp's chunk from d0: W, or fewer at the end of the row.
template <int W>
__device__ __forceinline__ int chunk_width(int64_t D, int64_t d0) {
  return int(D - d0 < W ? D - d0 : W);
}

template <typename T>
__device__ __forceinline__ T clamp_nonneg(T v) {
  return v > T(0) ? v : T(0);
}

// ||y|| > eps, so that the L2 normalisation's backward has its radial term:
// inv below its cap 1 / eps (inv_norm; a norm within rounding of eps, whose
// 1 / ||y|| rounds to the cap, counts as eps; false for NaN).
template <typename acc_t>
__device__ __forceinline__ bool norm_radial(acc_t inv) {
  return inv < acc_t(1) / acc_t(kNormEps);
}

// Warp 0 of embed_stats_kernel: the shift of the sums of the lane's pixel
// p0 + lane (its first entry xi[0]; 0 without the LayerNorm, or past the
// tile), read through warp 0's tile t when the channels are contiguous.
template <int W, typename acc_t, typename scalar_t, typename Tile>
__device__ __forceinline__ acc_t pixel_shift(Tile t, const scalar_t* x, const scalar_t* xi, int64_t sp, int64_t sd,
                                             int64_t p0, int64_t rows, int64_t D, int lane, bool ln) {
  const bool valid = p0 + lane < rows;
  acc_t first = 0;
  if (sp == 1) {
    if (valid) first = static_cast<acc_t>(xi[0]);
  } else {
    stage_chunk<W, acc_t>(t, x, sp, sd, false, p0, rows, 0, D, lane);
    __syncwarp();
    if (valid && D > 0) first = t[lane][0];
  }
  return ln ? first : acc_t(0);
}

// Warp 0 of embed_stats_kernel, one lane per pixel: its statistics out[0],
// out[ld], out[2 ld] (mu, r, inv) from tot, its sums over the 8 groups (s1 ..
// s5, W2, WB, B2 of the shifted entries, and the count of non-finite
// entries), and the shift k; NaN in all three for a non-finite entry or
// sums that overflowed (load_stats recomputes those that are finite). Then
// out[3 ld], out[4 ld]: w . z = inv (r sum w^2 (t - dl) + sum w b) and
// (w xhat) . z = inv (r^2 Q + r L) with the LayerNorm (Q, L as for ||y||^2
// below), 0 without it, NaN with the others.
template <typename acc_t, typename Totals>
__device__ __forceinline__ void pixel_stats(const Totals& tot, acc_t k, int64_t D, bool ln, double eps, acc_t* out,
                                            int64_t ld) {
  acc_t mu = 0, r = 1, sq = tot[1], wzs = 0, wxzs = 0;  // wzs, wxzs: ||y|| (w . z), ||y|| ((w xhat) . z)
  if (ln) {
    const acc_t Dt = acc_t(D);
    const acc_t dl = tot[0] / Dt;
    const acc_t var = clamp_nonneg(tot[1] / Dt - dl * dl);
    r = acc_t(1) / fsqrt(var + acc_t(eps));
    const acc_t Q = clamp_nonneg(tot[2] - acc_t(2) * dl * tot[3] + dl * dl * tot[5]);
    const acc_t L = tot[4] - dl * tot[6];
    sq = clamp_nonneg(r * r * Q + acc_t(2) * r * L + tot[7]);
    mu = k + dl;
    wzs = r * (tot[3] - dl * tot[5]) + tot[6];
    wxzs = r * (r * Q + L);
  }
  acc_t inv = inv_norm(sq), wz = inv * wzs, wxz = inv * wxzs;
  if (tot[8] > acc_t(0) || !is_finite(tot[0]) || !is_finite(tot[1]) || !is_finite(sq)) {
    mu = r = inv = wz = wxz = acc_t(NAN);
  }
  out[0] = mu;
  out[ld] = r;
  out[2 * ld] = inv;
  out[3 * ld] = wz;
  out[4 * ld] = wxz;
}

// stats[c * ld + i], c = 0..4: (mu, r, inv, w . z, (w xhat) . z) of pixel
// i of a tile (w == nullptr: no LayerNorm, mu = 0, r = 1, inv = 1 /
// max(||x||, eps), the last two 0), as
// embed_similarity returns them: stats is the tile's first column of the
// op's (5, N) stats (row stride ld = N) or of a (5, T) tile buffer. A pixel
// with a NaN or inf entry, or whose float sums overflowed, gets NaN in all
// five (the kernels that read stats recompute the latter, load_stats; a
// non-finite pixel's scores and gradient are NaN, as the reference's).
// Sums are shifted by the pixel's first entry (LayerNorm), so that the
// variance does not cancel; W2, WB, B2 (sums of w^2, w b, b^2) are summed
// alongside, so the kernel needs no other input.
// With kc given (the forward of the split GEMM along K: EmbedOperands::kcat),
// it also writes the tile doubled along its channels, [X | X] (rows, 2 D),
// in x's dtype, pixel p's channel d at kc[p * kp + d * kd] and kc[p * kp +
// (d + D) * kd], from each staged chunk, along kc's unit stride
// (unstage_chunk): no launch and no read of the map of its own.
// Launch: kEmbedThreads threads, grid ceil(rows / 32); lane = pixel i of the
// block, warp g = the channel chunks staged through xs (see kStageW); warp 0
// writes the stats, lanes on consecutive pixels along each row. Bounds:
// i < rows and d < D checked at every access of x and kc, i < rows at every
// write of stats; each lane reads only tile entries its warp wrote (its own
// pixel, j < D - d0; for kc, the warp's chunk). Sync: __syncwarp
// between a chunk's stores to xs and the loads of other lanes, and between
// those loads and the next chunk's stores; per-thread sums go to shared memory, one barrier,
// then warp 0 adds the 8 groups of its pixel in group order (deterministic);
// no thread returns before the barrier.
// float64 asks for one block per SM: its 9 double sums need more than 128 registers.
// Hot kernel: must not spill.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kEmbedThreads, kEmbedStatsBlocks<acc_t>)
    embed_stats_kernel(const scalar_t* __restrict__ x, int64_t sp, int64_t sd, int64_t rows, int64_t D,
                       const acc_t* __restrict__ w, const acc_t* __restrict__ b, double eps,
                       acc_t* __restrict__ stats, int64_t ld, scalar_t* __restrict__ kc, int64_t kp,
                       int64_t kd) {
  constexpr int W = kStageW<acc_t>;
  __shared__ acc_t xs[kEmbedGroups][kWarp][W + 1];
  __shared__ acc_t part[kStatSums][kEmbedGroups][kWarp];
  __shared__ acc_t kshift[kWarp];
  __shared__ acc_t wb[2][kEmbedGroups][W];  // the chunk's w and b (one load per chunk, not one per pixel)
  const int lane = threadIdx.x & (kWarp - 1), g = threadIdx.x / kWarp;
  const int64_t p0 = int64_t(blockIdx.x) * kWarp, i = p0 + lane;
  const bool valid = i < rows, ln = w != nullptr, xpf = sp == 1;
  acc_t s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, W2 = 0, WB = 0, B2 = 0, bad = 0;
  const scalar_t* xi = x + (valid ? i : 0) * sp;
  if (g == 0) kshift[lane] = pixel_shift<W, acc_t>(xs[0], x, xi, sp, sd, p0, rows, D, lane, ln);
  __syncthreads();  // kshift published; warp 0's reads of xs precede its first chunk below
  const acc_t k = kshift[lane];
  for (int64_t d0 = int64_t(g) * W; d0 < D; d0 += int64_t(kEmbedGroups) * W) {  // warp-uniform
    stage_chunk<W, acc_t>(xs[g], x, sp, sd, xpf, p0, rows, d0, D, lane);
    if (ln && lane < W && d0 + lane < D) {
      wb[0][g][lane] = w[d0 + lane];
      wb[1][g][lane] = b[d0 + lane];
    }
    __syncwarp();
    if (kc != nullptr) {  // [X | X]: the chunk's two copies, exact (x's values in acc_t)
      unstage_chunk<W>(xs[g], kc, kp, kd, kp == 1, p0, rows, d0, D, lane);
      unstage_chunk<W>(xs[g], kc + D * kd, kp, kd, kp == 1, p0, rows, d0, D, lane);
    }
    const int nj = chunk_width<W>(D, d0);
    for (int j = 0; valid && j < nj; ++j) {
      const acc_t v = xs[g][lane][j];
      if (!is_finite(v)) bad += acc_t(1);
      const acc_t t = v - k;
      s1 += t;
      s2 += t * t;
      if (ln) {
        const acc_t wd = wb[0][g][j], bd = wb[1][g][j], ww = wd * wd;
        s3 += ww * t * t;
        s4 += ww * t;
        s5 += wd * bd * t;
        W2 += ww;
        WB += wd * bd;
        B2 += bd * bd;
      }
    }
    __syncwarp();  // the tile is read before the next chunk overwrites it
  }
  part[0][g][lane] = s1;
  part[1][g][lane] = s2;
  part[2][g][lane] = s3;
  part[3][g][lane] = s4;
  part[4][g][lane] = s5;
  part[5][g][lane] = W2;
  part[6][g][lane] = WB;
  part[7][g][lane] = B2;
  part[8][g][lane] = bad;
  __syncthreads();
  if (g != 0 || !valid) return;
  acc_t tot[kStatSums];
#pragma unroll
  for (int j = 0; j < kStatSums; ++j) {
    acc_t v = 0;
    for (int h = 0; h < kEmbedGroups; ++h) v += part[j][h][lane];
    tot[j] = v;
  }
  pixel_stats(tot, k, D, ln, eps, stats + i, ld);  // row c of the stats at stats[c * ld + i]
}

// The backward's tile of S (recomputed: no softmax cache) from the folded
// GEMM's (rows, C*K) output, in place (row stride ld; split: the GEMM's
// output is (rows, 2 C*K), the hi and lo halves of EmbedOperands, added
// here): S = inv (r (S - mu rho_j) + beta_j) (rho == nullptr: no LayerNorm,
// S = inv S), with the stats (mu, r, inv) of pixel i at stats[c * sld + i]
// (load_stats); a row with fold_direct is recomputed as z . p_j from the
// tile of x and the unfolded prototypes P (C*K, D): cuda::fixed_scores_row.
// (The forward's epilogue applies the map as it reads the GEMM's output and
// runs fixed_scores_row itself on the rows the map cannot give.)
// Launch: kRowThreads threads, one warp per row, grid ceil(rows / 8).
// Bounds: i < rows (warp-uniform return), j < C*K (CK + j < ld when split), d < D. Sync: each warp
// owns its row; lane 0 writes the recomputed entries after the warp sum
// (all lanes present: the branch is per row, so per warp).
// Hot kernel: must not spill.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kRowThreads, 4) embed_scores_kernel(
    acc_t* __restrict__ S, int64_t ld, bool split, int64_t rows, int64_t CK, const acc_t* __restrict__ stats,
    int64_t sld, const acc_t* __restrict__ rho, const acc_t* __restrict__ beta, const scalar_t* __restrict__ x,
    int64_t sp, int64_t sd, int64_t D, const acc_t* __restrict__ P, const acc_t* __restrict__ w,
    const acc_t* __restrict__ b, double eps) {
  const int64_t i = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x & (kWarp - 1);
  if (i >= rows) return;
  cuda::fixed_scores_row(S + i * ld, split ? CK : 0, CK, stats + i, sld, rho, beta, x + i * sp, sd, D, P, w, b, eps,
                         lane);
}

// z (rows, D) contiguous: the embedding of the tile's pixels (NaN rows for
// non-finite pixels), for the prototype sums; or, with slot given (the
// prototype sums' atomic path, fused), no z at all: row i of the embedding is
// added into row slot[i] of z = sums (num_slots, D) with atomics and counted
// in counts[slot[i]], if slot[i] >= 0 and the pixel is finite (finite
// statistics: a pixel with a NaN or inf entry has NaN ones), as
// prototype_sums_atomic_kernel does for a row of z.
// Launch: kEmbedThreads threads, grid ceil(rows / 32); lane = pixel, warp g =
// the channel chunks staged through xs (kStageW): x loaded along its unit
// stride, z stored along the channels. Bounds: pixel < rows and d < D checked
// at every access of x and z; a lane computes only its own pixel's row of
// the tile, entries j < D - d0 (written by its warp). Sync: __syncwarp
// between the tile's stores and other lanes' loads, both ways, per chunk;
// writes to z are disjoint (with slot: concurrent pixels of one slot meet
// only in atomicAdd; the slot of pixel p reaches the lanes that add its
// entries by a shuffle, every lane present; slot[i] asserted < num_slots).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kEmbedThreads, 2)
    embed_rows_kernel(const scalar_t* __restrict__ x, int64_t sp, int64_t sd, int64_t rows, int64_t D,
                      const acc_t* __restrict__ stats, int64_t sld, const acc_t* __restrict__ w,
                      const acc_t* __restrict__ b, double eps, acc_t* __restrict__ z,
                      const int64_t* __restrict__ slot, int64_t num_slots, unsigned long long* __restrict__ counts) {
  constexpr int W = kStageW<acc_t>;
  __shared__ acc_t xs[kEmbedGroups][kWarp][W + 1];
  __shared__ acc_t wb[2][kEmbedGroups][W];  // the chunk's w and b
  const int lane = threadIdx.x & (kWarp - 1), g = threadIdx.x / kWarp;
  const int64_t p0 = int64_t(blockIdx.x) * kWarp, i = p0 + lane;
  const bool valid = i < rows, xpf = sp == 1;
  acc_t mu = 0, r = 1, inv = 0;
  if (valid) load_stats(stats + i, sld, x + i * sp, sd, D, w, b, eps, mu, r, inv);  // lanes on consecutive pixels
  int my_slot = -1;  // slot of this lane's pixel, -1: it takes no part (with slot)
  if (slot != nullptr && valid) {
    const int64_t sl = slot[i];
    CUDA_KERNEL_ASSERT_MSG(sl < num_slots, "slot: an entry is >= num_slots");
    if (sl >= 0 && is_finite(mu) && is_finite(r) && is_finite(inv)) my_slot = int(sl);
    if (g == 0 && my_slot >= 0) atomicAdd(counts + my_slot, 1ull);
  }
  for (int64_t d0 = int64_t(g) * W; d0 < D; d0 += int64_t(kEmbedGroups) * W) {  // warp-uniform
    stage_chunk<W, acc_t>(xs[g], x, sp, sd, xpf, p0, rows, d0, D, lane);
    if (w != nullptr && lane < W && d0 + lane < D) {
      wb[0][g][lane] = w[d0 + lane];
      wb[1][g][lane] = b[d0 + lane];
    }
    __syncwarp();
    const int nj = chunk_width<W>(D, d0);
    for (int j = 0; valid && j < nj; ++j) {
      const acc_t v = xs[g][lane][j];
      const acc_t y = w != nullptr ? (v - mu) * r * wb[0][g][j] + wb[1][g][j] : v;
      xs[g][lane][j] = y * inv;
    }
    __syncwarp();
    if (slot == nullptr) {  // z along its rows
      unstage_chunk<W>(xs[g], z, D, 1, false, p0, rows, d0, D, lane);
    } else {  // the sums, along their rows: entry (p, j) added into row my_slot of pixel p
      for (int e = lane; e < kWarp * W; e += kWarp) {
        int p, j;
        stage_index(e, false, W, p, j);
        const int s = __shfl_sync(cuda::kFullMask, my_slot, p);  // every lane (e's loop is warp-uniform)
        if (s >= 0 && d0 + j < D) atomicAdd(z + int64_t(s) * D + d0 + j, xs[g][p][j]);
      }
    }
    __syncwarp();
  }
}

// The warp's chunk [d0, d0 + W) of x and of G into its tiles xs_g and gs_g,
// and with the LayerNorm (w given) the chunk's w and b into the tiles'
// padding column (xs_g[j][W] = w[d0 + j], gs_g[j][W] = b[d0 + j]):
// embed_backward_kernel's two passes. x and G go in one loop, an entry of
// each per step (two stage_chunk calls give the float kernel 8 more
// registers on sm_90).
template <int W, typename scalar_t, typename acc_t, typename Tile>
__device__ __forceinline__ void stage_grad_chunk(Tile xs_g, Tile gs_g, const scalar_t* x, int64_t sp, int64_t sd,
                                                 const acc_t* G, int64_t gp, int64_t gd, const acc_t* w,
                                                 const acc_t* b, int64_t p0, int64_t rows, int64_t d0, int64_t D,
                                                 int lane) {
  for (int e = lane; e < kWarp * W; e += kWarp) {  // stage_chunk of x and of G, entry by entry
    int p, j;
    stage_index(e, sp == 1, W, p, j);
    if (p0 + p < rows && d0 + j < D) xs_g[p][j] = static_cast<acc_t>(x[(p0 + p) * sp + (d0 + j) * sd]);
    stage_index(e, gp == 1, W, p, j);
    if (p0 + p < rows && d0 + j < D) gs_g[p][j] = G[(p0 + p) * gp + (d0 + j) * gd];
  }
  if (w != nullptr && lane < W && d0 + lane < D) {
    xs_g[lane][W] = w[d0 + lane];
    gs_g[lane][W] = b[d0 + lane];
  }
}

// Pass 1 of embed_backward_kernel on one staged chunk of nj channels: adds
// the lane's pixel's entries to its sums a0 .. a4 (z.G, w.G, (w xhat).G,
// w.z, (w xhat).z; a0 alone without the LayerNorm).
template <int W, typename acc_t, typename Tile>
__device__ __forceinline__ void grad_chunk_sums(Tile xs_g, Tile gs_g, int nj, int lane, bool ln, acc_t mu, acc_t r,
                                                acc_t inv, acc_t& a0, acc_t& a1, acc_t& a2, acc_t& a3, acc_t& a4) {
  for (int j = 0; j < nj; ++j) {
    const acc_t gv = gs_g[lane][j], v = xs_g[lane][j];
    if (ln) {
      const acc_t wd = xs_g[j][W], bd = gs_g[j][W];
      const acc_t xh = (v - mu) * r, z = (xh * wd + bd) * inv;
      a0 += gv * z;
      a1 += wd * gv;
      a2 += wd * gv * xh;
      a3 += wd * z;
      a4 += wd * z * xh;
    } else {
      a0 += gv * v * inv;
    }
  }
}

// Pass 2 of embed_backward_kernel on one staged chunk (channels d0 ...): d x
// of the lane's pixel in place of G's entries in gs_g, and (part_w given)
// the warp's partial d w, d b of each channel added into row blockIdx.x of
// part_w, part_b. Every lane runs the same j loop (the warp sums; a lane past
// the tile adds 0).
template <int W, typename acc_t, typename Tile>
__device__ __forceinline__ void grad_chunk_dx(Tile xs_g, Tile gs_g, int64_t d0, int64_t D, int lane, bool valid,
                                              bool ln, acc_t mu, acc_t r, acc_t inv, acc_t fg, acc_t m1, acc_t m2,
                                              acc_t* part_w, acc_t* part_b) {
  const int nj = chunk_width<W>(D, d0);
  for (int j = 0; j < nj; ++j) {
    const int64_t d = d0 + j;
    acc_t dy = 0, xh = 0;
    if (valid) {
      const acc_t gv = gs_g[lane][j], v = xs_g[lane][j];
      const acc_t wd = ln ? xs_g[j][W] : acc_t(0), bd = ln ? gs_g[j][W] : acc_t(0);
      xh = ln ? (v - mu) * r : v;
      const acc_t z = (ln ? xh * wd + bd : v) * inv;
      dy = inv * (gv - z * fg);
      gs_g[lane][j] = ln ? r * (wd * dy - m1 - xh * m2) : dy;  // d x, in place of G's entry
    }
    if (part_w != nullptr) {
      const acc_t pw = cuda::warp_sum(dy * xh), pb = cuda::warp_sum(dy);
      if (lane == 0) {  // the block's row: summed over the tiles in stream order
        part_w[int64_t(blockIdx.x) * D + d] += pw;
        part_b[int64_t(blockIdx.x) * D + d] += pb;
      }
    }
  }
}

// d feats of a tile from G = d loss / d z (rows, D; strides gp, gd), written
// to out (strides op, od; out may be G itself: a chunk of G is read into the
// tile before the same warp writes that chunk of out, and no other warp
// touches those channels). The pixel's sums over D (z.G, w.G, (w xhat).G,
// w.z, (w xhat).z) come from pass 1 over x and G, or, where zs is given (the
// grad epilogue's cuda::RowSums of the tile: zparts blocks per row, row
// length zld) and the stats have their rows 3 and 4 (stat_sums, or no
// LayerNorm) and every pixel of the block has them all finite, from those:
// z.G, w.G and b.G summed over the parts in order, (w xhat).G = z.G / inv -
// b.G, and the stats' rows. Then the map and G are read once, by pass 2.
// With the LayerNorm (w != nullptr), the block's partial sums of d w and d b
// are added into row blockIdx.x of part_w, part_b (at least gridDim.x rows of
// D; the caller zeroes them once and sums them once, after its last tile: no
// launch per tile). See the file comment for the maths.
// Launch: kEmbedThreads threads, grid ceil(rows / 32); lane = pixel i, warp g
// = the channel chunks staged through xs and gs (kStageW): x, G and out each
// accessed along its own unit stride. Bounds: pixel < rows and d < D checked
// at every access of x, G, out; a lane reads only its own pixel's row of the
// tiles, entries j < D - d0 (written by its warp). Sync: __syncwarp between
// a tile's stores and other lanes' loads, both ways, per chunk; pass-1 sums
// go through shared memory (one barrier), warp 0 adds the 8 groups in order
// and publishes the pixel's totals (second barrier: every pass-1 read of G
// precedes every write of out); in pass 2 every lane runs the same j loop
// (bounds depend on the warp only), so the warp sums of the partials have
// all 32 lanes (out-of-range pixels add 0); lane 0 adds its warp's partials
// (each (block, channel) entry has one writer per launch). With zs, warp 0
// reads the given sums first, votes (__all_sync over its 32 pixels, the
// block's) and publishes the sums and the vote (one barrier): the block
// then skips pass 1 as a whole or runs it as a whole.
// Hot kernel: must not spill.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kEmbedThreads, 2) embed_backward_kernel(
    const scalar_t* __restrict__ x, int64_t sp, int64_t sd, int64_t rows, int64_t D, const acc_t* __restrict__ stats,
    int64_t sld, const acc_t* __restrict__ w, const acc_t* __restrict__ b, double eps, const acc_t* G, int64_t gp,
    int64_t gd, scalar_t* out, int64_t op, int64_t od, acc_t* __restrict__ part_w, acc_t* __restrict__ part_b,
    const acc_t* __restrict__ zs, int64_t zparts, int64_t zld, bool stat_sums) {
  constexpr int kSums = 5;
  constexpr int W = kStageW<acc_t>;
  __shared__ acc_t xs[kEmbedGroups][kWarp][W + 1];
  __shared__ acc_t gs[kEmbedGroups][kWarp][W + 1];
  __shared__ acc_t red[kSums][kEmbedGroups][kWarp];
  __shared__ acc_t tot[kSums][kWarp];
  __shared__ int given_ok;
  const int lane = threadIdx.x & (kWarp - 1), g = threadIdx.x / kWarp;
  const int64_t p0 = int64_t(blockIdx.x) * kWarp, i = p0 + lane;
  const bool valid = i < rows, ln = w != nullptr;
  acc_t mu = 0, r = 1, inv = 0;
  if (valid) load_stats(stats + i, sld, x + i * sp, sd, D, w, b, eps, mu, r, inv);  // lanes on consecutive pixels
  const bool radial = norm_radial(inv);
  bool given = false;
  if (zs != nullptr && (stat_sums || !ln)) {  // kernel-uniform
    if (g == 0) {
      acc_t t0 = 0, t1 = 0, t2 = 0, wz = 0, wxz = 0;
      if (valid) {
        for (int64_t q = 0; q < zparts; ++q) {  // the epilogue's blocks of the row, in order
          t0 += zs[q * zld + i];
          t1 += zs[(zparts + q) * zld + i];
          t2 += zs[(2 * zparts + q) * zld + i];
        }
        if (ln) {
          wz = stats[3 * sld + i];
          wxz = stats[4 * sld + i];
          t2 = t0 / inv - t2;  // (w xhat) . G = (y . G) - b . G, y = z / inv
        }
      }
      const bool ok = is_finite(t0) && is_finite(t1) && is_finite(t2) && is_finite(wz) && is_finite(wxz);
      const bool all = __all_sync(cuda::kFullMask, ok);
      if (all) {
        tot[0][lane] = t0;
        tot[1][lane] = t1;
        tot[2][lane] = t2;
        tot[3][lane] = wz;
        tot[4][lane] = wxz;
      }
      if (lane == 0) given_ok = all ? 1 : 0;
    }
    __syncthreads();
    given = given_ok != 0;
  }
  if (!given) {  // block-uniform
    // pass 1: the pixel's sums over its channels, per group
    acc_t a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0;  // z.G, w.G, (w xhat).G, w.z, (w xhat).z
    for (int64_t d0 = int64_t(g) * W; d0 < D; d0 += int64_t(kEmbedGroups) * W) {  // warp-uniform
      stage_grad_chunk<W>(xs[g], gs[g], x, sp, sd, G, gp, gd, w, b, p0, rows, d0, D, lane);
      __syncwarp();
      if (valid) grad_chunk_sums<W>(xs[g], gs[g], chunk_width<W>(D, d0), lane, ln, mu, r, inv, a0, a1, a2, a3, a4);
      __syncwarp();  // the tiles are read before the next chunk overwrites them
    }
    red[0][g][lane] = a0;
    red[1][g][lane] = a1;
    red[2][g][lane] = a2;
    red[3][g][lane] = a3;
    red[4][g][lane] = a4;
    __syncthreads();
    if (g == 0) {
#pragma unroll
      for (int j = 0; j < kSums; ++j) {
        acc_t v = 0;
        for (int h = 0; h < kEmbedGroups; ++h) v += red[j][h][lane];
        tot[j][lane] = v;
      }
    }
    __syncthreads();
  }
  // pass 2: d x of each chunk, in place of G's entries in the tile, then out
  const acc_t fg = radial ? tot[0][lane] : acc_t(0);
  const acc_t m1 = inv * (tot[1][lane] - fg * tot[3][lane]) / acc_t(D);
  const acc_t m2 = inv * (tot[2][lane] - fg * tot[4][lane]) / acc_t(D);
  for (int64_t d0 = int64_t(g) * W; d0 < D; d0 += int64_t(kEmbedGroups) * W) {  // warp-uniform
    stage_grad_chunk<W>(xs[g], gs[g], x, sp, sd, G, gp, gd, w, b, p0, rows, d0, D, lane);
    __syncwarp();
    grad_chunk_dx<W>(xs[g], gs[g], d0, D, lane, valid, ln, mu, r, inv, fg, m1, m2, part_w, part_b);
    __syncwarp();
    unstage_chunk<W>(gs[g], out, op, od, op == 1, p0, rows, d0, D, lane);  // d x along out's unit stride
    __syncwarp();
  }
}

// A tile of the embedding ops' pixels (embed_rows): `count` pixels from
// `first` of image `image` (planes) or of the rows, pixel indices n0 ...
struct PixelTile {
  int64_t n0, image, first, count;
  // the tile of t (laid out as the rows): a (count, D) view
  at::Tensor of(const at::Tensor& t) const {
    return t.dim() == 3 ? t.select(0, image).narrow(1, first, count).t() : t.narrow(0, first, count);
  }
};

// Tiles of at most T pixels, none across two images.
std::vector<PixelTile> pixel_tiles(const at::Tensor& rows, int64_t T) {
  std::vector<PixelTile> tiles;
  const int64_t images = rows.dim() == 3 ? rows.size(0) : 1;
  const int64_t per = rows.dim() == 3 ? rows.size(2) : rows.size(0);
  for (int64_t b = 0; b < images; ++b)
    for (int64_t f = 0; f < per; f += T) tiles.push_back({b * per + f, b, f, std::min(T, per - f)});
  return tiles;
}

// The embedding's constants in the working dtype: the LayerNorm's w, b (D,),
// the prototypes P (C*K, D), the GEMM operand P * w, rho = (P * w) 1 and
// beta = P b (C*K,); w undefined without LayerNorm (Pw is then P).
//
// 16-bit maps: the folded GEMM runs on tensor cores, the raw tile against
// Pw16 = [hi; lo] (2 C*K, D) in the map's dtype, hi = Pw rounded to it and
// lo = Pw - hi rounded again: one GEMM of N = 2 C*K whose two column halves
// the epilogue adds (X hi^T + X lo^T). Pw itself is not rounded to 16
// bits (2^-9 relative per entry in bf16, magnified up to kMaxFoldOffset
// times by the fold's cancellation of mu rho): hi + lo carries 16 (bf16) or
// 22 (fp16) significant bits, and is exact when w and P are bf16 (the
// product of two 8-bit significands has 16 bits). Pw and rho are then those
// of hi + lo, so that the fold's mu rho cancels what the GEMM computed.
// embed_operands_kernel computes all of these in one launch where it
// applies (embed_operands_fused), else ATen ops do.
// fp16 has a narrow range: an fp16 map takes the split only when every
// |Pw| < 2^15 (else Pw16 stays undefined and the tile goes to fp32).
// With C*K > D the parts go side by side along K instead (kcat): Pw16 =
// [hi | lo] (C*K, 2 D) against the tile doubled along its channels, [X | X]
// (written by embed_stats_kernel as it stages the tile in the forward, by
// embed_kcat_kernel in the backward), so that the GEMM adds the two products itself and
// writes (rows, C*K), not (rows, 2 C*K). Per pixel that writes and reads
// 8 D bytes more of the 16-bit tile and 8 C*K bytes less of the fp32
// output (written by the GEMM, read by the epilogue): ADE20K's C*K = 1,500
// against D = 720 or 256 gains, Cityscapes' 190 against 720 would lose.
struct EmbedOperands {
  at::Tensor w, b, P, Pw, rho, beta;
  at::Tensor Pw16;  // (2 C*K, D), or with kcat (C*K, 2 D), in the map's 16-bit dtype; or undefined
  bool kcat = false;
  double eps = 0;
  // The backward's: dS @ P's split operand (cuda::split_protos) and P w (cuda::RowSums::pw), when
  // embed_operands computed them (for_backward, fused); else undefined.
  cuda::SplitProtos sp;
  at::Tensor pw;
  // Columns of the folded GEMM's output: the two halves of the split, or C*K.
  int64_t gemm_cols() const { return Pw16.defined() && !kcat ? 2 * P.size(0) : P.size(0); }
};

// EmbedOperands in one launch, for prototypes and LayerNorm parameters of
// one dtype in_t (what the ATen ops of embed_operands compute, one launch
// each): one warp per prototype row j: P[j] = protos[j] in acc_t (P ==
// nullptr: protos are in acc_t already, and are P), Pw[j] =
// P[j] * w (without the LayerNorm, w == nullptr, Pw is P: not written unless
// split); with split (bf16 maps), hi = bf16(P[j] * w), lo = bf16(P[j] * w -
// hi), Pw[j] = hi + lo, and Pw16 = [hi; lo] (rows j and CK + j) or, kcat,
// [hi | lo] (columns d and D + d of row j); rho[j] = sum_d Pw[j][d] and
// beta[j] = sum_d P[j][d] b[d] (LayerNorm; the warp's sums, in a fixed
// order); block 0 also writes w and b in acc_t (w32, b32). For the backward
// (B given: cuda::split_protos' operand, terms 2 or 3), with h = bf16(P[j]),
// B rows j and CK + j = h and, with 3 terms, row 2 CK + j = bf16(P[j] - h);
// pw[j] = sum_d P[j][d] w[d] where pw is given.
// Launch: kRowThreads threads, grid ceil(CK / 8). Bounds: j < CK (warp-
// uniform return), d < D; w32, b32 by block 0's threads, d < D. Sync: each
// warp owns its rows of P, Pw, Pw16, rho, beta; w32 and b32 are written by
// block 0 only and read by no thread of this launch; shuffles with all lanes present.
template <typename in_t, typename acc_t, typename out_t>
__global__ void __launch_bounds__(kRowThreads, 4) embed_operands_kernel(
    const in_t* __restrict__ protos, const in_t* __restrict__ w, const in_t* __restrict__ b, int64_t CK, int64_t D,
    acc_t* __restrict__ P, acc_t* __restrict__ Pw, out_t* __restrict__ Pw16, bool kcat, acc_t* __restrict__ rho,
    acc_t* __restrict__ beta, acc_t* __restrict__ w32, acc_t* __restrict__ b32, out_t* __restrict__ B, int terms,
    acc_t* __restrict__ pw_out) {
  if (blockIdx.x == 0 && w != nullptr)
    for (int64_t d = threadIdx.x; d < D; d += kRowThreads) {
      w32[d] = static_cast<acc_t>(w[d]);
      b32[d] = static_cast<acc_t>(b[d]);
    }
  const int64_t j = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x & (kWarp - 1);
  if (j >= CK) return;
  acc_t r = 0, be = 0, pws = 0;
  for (int64_t d = lane; d < D; d += kWarp) {
    const acc_t p = static_cast<acc_t>(protos[j * D + d]);
    if (P != nullptr) P[j * D + d] = p;
    if (B != nullptr) {
      const out_t h = static_cast<out_t>(p);
      B[j * D + d] = h;
      B[(CK + j) * D + d] = h;
      if (terms == 3) B[(2 * CK + j) * D + d] = static_cast<out_t>(p - static_cast<acc_t>(h));
    }
    acc_t pw = w != nullptr ? p * static_cast<acc_t>(w[d]) : p;
    if (w != nullptr) pws += pw;  // P w, before the split rounds it
    if (Pw16 != nullptr) {
      const out_t hi = static_cast<out_t>(pw);
      const out_t lo = static_cast<out_t>(pw - static_cast<acc_t>(hi));
      Pw16[kcat ? j * 2 * D + d : j * D + d] = hi;
      Pw16[kcat ? j * 2 * D + D + d : (CK + j) * D + d] = lo;
      pw = static_cast<acc_t>(hi) + static_cast<acc_t>(lo);
    }
    if (Pw != nullptr) Pw[j * D + d] = pw;
    if (w != nullptr) {
      r += pw;
      be += p * static_cast<acc_t>(b[d]);
    }
  }
  if (w == nullptr) return;  // warp-uniform: no LayerNorm, no rho or beta
  r = cuda::warp_sum(r);
  be = cuda::warp_sum(be);
  pws = cuda::warp_sum(pws);
  if (lane == 0) {
    rho[j] = r;
    beta[j] = be;
    if (pw_out != nullptr) pw_out[j] = pws;
  }
}

// embed_operands_kernel for protos pin (C*K, D) of dtype in_t (and the
// LayerNorm's win, bin with ln) into e's tensors, allocated by the caller
// (e.P is pin itself where that has the working dtype: no copy):
// acc_t = double for double (an fp64 map), else float, with the bf16 parts
// when split.
template <typename in_t, typename acc_t, typename out_t>
void embed_operands_launch_as(EmbedOperands& e, const at::Tensor& pin, const at::Tensor& win, const at::Tensor& bin,
                              bool ln, bool split, cudaStream_t stream) {
  const int64_t CK = pin.size(0), D = pin.size(1);
  const bool copy_p = !e.P.is_same(pin);
  embed_operands_kernel<in_t, acc_t, out_t><<<ceil_div(CK, kRowsPerBlock), kRowThreads, 0, stream>>>(
      pin.data_ptr<in_t>(), ln ? win.data_ptr<in_t>() : nullptr, ln ? bin.data_ptr<in_t>() : nullptr, CK, D,
      copy_p ? e.P.data_ptr<acc_t>() : nullptr, ln || split ? e.Pw.data_ptr<acc_t>() : nullptr,
      split ? e.Pw16.data_ptr<out_t>() : nullptr, e.kcat, ln ? e.rho.data_ptr<acc_t>() : nullptr,
      ln ? e.beta.data_ptr<acc_t>() : nullptr, ln ? e.w.data_ptr<acc_t>() : nullptr,
      ln ? e.b.data_ptr<acc_t>() : nullptr, e.sp.B.defined() ? e.sp.B.data_ptr<out_t>() : nullptr, e.sp.terms,
      e.pw.defined() ? e.pw.data_ptr<acc_t>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename in_t>
void embed_operands_launch(EmbedOperands& e, const at::Tensor& pin, const at::Tensor& win, const at::Tensor& bin,
                           bool ln, bool split, cudaStream_t stream) {
  if constexpr (std::is_same<in_t, double>::value) {
    embed_operands_launch_as<double, double, double>(e, pin, win, bin, ln, split, stream);
  } else if (split) {
    embed_operands_launch_as<in_t, float, c10::BFloat16>(e, pin, win, bin, ln, split, stream);
  } else {
    embed_operands_launch_as<in_t, float, float>(e, pin, win, bin, ln, split, stream);
  }
}

// embed_operands in one launch (embed_operands_kernel) where it applies:
// protos (and the LayerNorm's weight and bias) of one dtype, an fp64 map
// only with fp64 ones, a 16-bit map only in bf16 with the 16-bit GEMM
// available (fp16's range check is a host sync: the ATen path). False, with
// e untouched, elsewhere (and for empty prototypes). for_backward: e.sp and
// e.pw as well.
bool embed_operands_fused(EmbedOperands& e, at::ScalarType st, const at::Tensor& protos, bool ln,
                          const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                          bool for_backward) {
  const auto pt = protos.scalar_type(), acc = acc_type(st);
  if (ln && (weight->scalar_type() != pt || bias->scalar_type() != pt)) return false;
  if (st == at::kHalf || (st == at::kBFloat16 && !cuda::lowp_gemm_available())) return false;
  if ((acc == at::kDouble) != (pt == at::kDouble)) return false;
  const bool split = st == at::kBFloat16;
  const int64_t D = protos.size(2), CK = protos.size(0) * protos.size(1);
  if (CK == 0 || D == 0) return false;  // no launch of no blocks
  const at::Tensor pin = protos.reshape({CK, D}).contiguous();
  const at::Tensor win = ln ? weight->contiguous() : at::Tensor(), bin = ln ? bias->contiguous() : at::Tensor();
  auto aopt = protos.options().dtype(acc);
  e.P = pt == acc ? pin : at::empty({CK, D}, aopt);  // fp32 prototypes (or fp64 for an fp64 map) as they are
  e.Pw = ln || split ? at::empty({CK, D}, aopt) : e.P;
  if (split) {
    e.kcat = CK > D;
    const auto o16 = protos.options().dtype(st);
    e.Pw16 = e.kcat ? at::empty({CK, 2 * D}, o16) : at::empty({2 * CK, D}, o16);
  }
  if (ln) {
    e.w = at::empty({D}, aopt);
    e.b = at::empty({D}, aopt);
    e.rho = at::empty({CK}, aopt);
    e.beta = at::empty({CK}, aopt);
    if (for_backward) e.pw = at::empty({CK}, aopt);
  }
  if (for_backward && split) {  // as cuda::split_protos(e.P, st, pt)
    e.sp.terms = pt == at::kBFloat16 ? 2 : 3;
    e.sp.B = at::empty({e.sp.terms * CK, D}, protos.options().dtype(at::kBFloat16));
  }

  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pt, "embed_operands_cuda", [&] {
    embed_operands_launch<scalar_t>(e, pin, win, bin, ln, split, stream);
  });
  return true;
}

EmbedOperands embed_operands(const at::Tensor& rows, const at::Tensor& protos, bool ln,
                             const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                             double eps, bool for_backward = false) {
  const auto acc = acc_type(rows.scalar_type());
  EmbedOperands e;
  e.eps = eps;
  if (protos.defined() && embed_operands_fused(e, rows.scalar_type(), protos, ln, weight, bias, for_backward))
    return e;
  if (ln) {
    e.w = weight->to(acc).contiguous();
    e.b = bias->to(acc).contiguous();
  }
  if (protos.defined()) {
    e.P = protos.reshape({-1, protos.size(2)}).to(acc).contiguous();
    e.Pw = ln ? (e.P * e.w).contiguous() : e.P;
    const auto st = rows.scalar_type();
    if (cuda::is_16bit(st) && cuda::lowp_gemm_available() &&
        (st == at::kBFloat16 || e.Pw.abs().max().item<double>() < 32768.0)) {  // fp16: one check per call
      const at::Tensor hi = e.Pw.to(st), lo = (e.Pw - hi.to(acc)).to(st);
      e.kcat = e.P.size(0) > e.P.size(1);
      e.Pw16 = at::cat({hi, lo}, e.kcat ? 1 : 0).contiguous();
      e.Pw = (hi.to(acc) + lo.to(acc)).contiguous();
    }
    if (ln) {
      e.rho = e.Pw.sum(1);
      e.beta = at::mv(e.P, e.b);
    }
  }
  return e;
}

template <typename acc_t>
const acc_t* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<acc_t>() : nullptr;
}

// A tile's statistics: its first pixel's column of a (kStatRows, M) (or
// given: (3, M)) contiguous tensor (rows mu, r, inv, w . z, (w xhat) . z;
// row stride M), either embed_similarity's stats (kStatRows or 3, N) at the
// tile's first pixel n0 or a (kStatRows, T) buffer of tiles at 0.
struct TileStats {
  at::Tensor t;
  int64_t col = 0;
  template <typename acc_t>
  acc_t* ptr() const {
    return t.data_ptr<acc_t>() + col;
  }
  int64_t ld() const { return t.size(1); }
  bool sums() const { return t.size(0) >= kStatRows; }  // rows 3 and 4 there
};

// Host launchers of the kernels above, each for one tile X (count, D) of the
// pixels (PixelTile::of: any (pixel, channel) strides), one dtype dispatch each.

// The stats (mu, r, inv) of the tile X (count, D) into st's columns; with
// kc (count, 2 D) given, [X | X] into it as well.
void embed_tile_stats(const at::Tensor& X, const EmbedOperands& e, const TileStats& st, cudaStream_t stream,
                      const at::Tensor& kc = at::Tensor()) {
  const int64_t n = X.size(0);
  const bool k2 = kc.defined();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, X.scalar_type(), "embed_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    embed_stats_kernel<scalar_t, acc_t><<<ceil_div(n, kWarp), kEmbedThreads, 0, stream>>>(
        X.data_ptr<scalar_t>(), X.stride(0), X.stride(1), n, X.size(1), ptr_or_null<acc_t>(e.w),
        ptr_or_null<acc_t>(e.b), e.eps, st.ptr<acc_t>(), st.ld(), k2 ? kc.data_ptr<scalar_t>() : nullptr,
        k2 ? kc.stride(0) : 0, k2 ? kc.stride(1) : 0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// The stats of the tile X of the pixels n0..: embed_similarity's, given
// (3, N), at the tile's columns, else computed into the (3, T) buffer.
TileStats tile_stats(const at::Tensor& X, const EmbedOperands& e, const at::Tensor& given, const at::Tensor& buf,
                     int64_t n0, cudaStream_t stream) {
  if (given.defined()) return TileStats{given, n0};
  const TileStats st{buf, 0};
  embed_tile_stats(X, e, st, stream);
  return st;
}

// The tile X doubled along its channels, [X | X] (count, 2 D) in X's dtype,
// for the split GEMM along K where S is recomputed (the backward without the
// softmax cache; the forward's comes from embed_stats_kernel), laid out with
// X's unit stride: out[p * op + d * od] = out[p * op + (d + D) * od] =
// x[p * sp + d * sd].
// Launch: kRowThreads threads, grid ceil(count * D / kRowThreads); thread e
// reads entry e of x once and writes its two copies, consecutive e along the
// pixels when op == 1 (and sp == 1: NCHW planes), else along the channels.
// Bounds: e < count * D, so p < count and d < D. Sync: each thread writes
// its own two entries, reads x only.
template <typename scalar_t>
__global__ void __launch_bounds__(kRowThreads, 4)
    embed_kcat_kernel(const scalar_t* __restrict__ x, int64_t sp, int64_t sd, int64_t count, int64_t D,
                      scalar_t* __restrict__ out, int64_t op, int64_t od) {
  const int64_t e = int64_t(blockIdx.x) * kRowThreads + threadIdx.x;
  if (e >= count * D) return;
  const bool pixel_fast = op == 1;
  const int64_t p = pixel_fast ? e % count : e / D, d = pixel_fast ? e / count : e % D;
  const scalar_t v = x[p * sp + d * sd];
  out[p * op + d * od] = v;
  out[p * op + (d + D) * od] = v;
}

// A buffer for [X | X] of tiles like X, up to T rows: (T, 2 D) in X's
// dtype, with X's unit stride (pixels when X is part of NCHW planes).
at::Tensor embed_kcat_buffer(const at::Tensor& X, int64_t T) {
  const int64_t D = X.size(1);
  return X.stride(0) == 1 ? at::empty({2 * D, T}, X.options()).t() : at::empty({T, 2 * D}, X.options());
}

// [X | X] of the tile X (count, D) for the kcat GEMM, along X's unit stride
// (the backward's recomputed S; the forward's comes from embed_stats_kernel).
at::Tensor embed_kcat(const at::Tensor& X, cudaStream_t stream) {
  const int64_t n = X.size(0), D = X.size(1);
  at::Tensor out = embed_kcat_buffer(X, n);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, X.scalar_type(), "embed_kcat_cuda", [&] {
    embed_kcat_kernel<scalar_t><<<ceil_div(n * D, kRowThreads), kRowThreads, 0, stream>>>(
        X.data_ptr<scalar_t>(), X.stride(0), X.stride(1), n, D, out.data_ptr<scalar_t>(), out.stride(0),
        out.stride(1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// The folded GEMM of the tile X into Sbuf (count, ld) rows of the tile
// buffer (ld = e.gemm_cols(): 2 C*K when the split GEMM's output halves fill
// the whole row, else C*K), then, without affine (the backward), embed_scores_kernel with the
// tile's stats st on all its rows (the scores, returned as the (count, C*K)
// view of row stride ld); with affine (the forward) no kernel: *affine says
// how the epilogue maps the rows and finishes the fixed ones
// (cuda::ScoreAffine). kc: [X | X] when the caller has it (embed_tile_stats),
// for the GEMM along K.
at::Tensor embed_tile_scores(const at::Tensor& Sbuf, int64_t CK, const at::Tensor& X, const EmbedOperands& e,
                             const TileStats& st, cudaStream_t stream, cuda::ScoreAffine* affine = nullptr,
                             const at::Tensor& kc = at::Tensor()) {
  const int64_t n = X.size(0), D = X.size(1);
  at::Tensor S_tile = Sbuf.narrow(1, 0, CK);
  bool split = false, tc = false;  // the output's two halves to add; the GEMM ran on tensor cores
  if (e.Pw16.defined() && e.kcat) {  // tensor cores, (n, C*K): [X | X] [hi | lo]^T
    tc = cuda::lowp_mm_out(S_tile, kc.defined() ? kc : embed_kcat(X, stream), e.Pw16.t());
  } else if (e.Pw16.defined()) {  // tensor cores, (n, 2 C*K): X hi^T | X lo^T
    at::Tensor S2 = Sbuf.narrow(1, 0, 2 * CK);
    split = tc = cuda::lowp_mm_out(S2, X, e.Pw16.t());
  }
  if (!tc)
    at::mm_out(S_tile, X.scalar_type() == S_tile.scalar_type() ? X : X.to(S_tile.scalar_type()), e.Pw.t());
  if (affine != nullptr) {  // the epilogue's launch does the rest
    *affine = cuda::ScoreAffine{st.t, e.rho, e.beta, st.col, split ? CK : 0, X, e.P, e.w, e.b, e.eps};
    return S_tile;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, X.scalar_type(), "embed_similarity_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    embed_scores_kernel<scalar_t, acc_t><<<ceil_div(n, kRowsPerBlock), kRowThreads, 0, stream>>>(
        Sbuf.data_ptr<acc_t>(), Sbuf.stride(0), split, n, CK, st.ptr<acc_t>(), st.ld(), ptr_or_null<acc_t>(e.rho),
        ptr_or_null<acc_t>(e.beta), X.data_ptr<scalar_t>(), X.stride(0), X.stride(1), D, e.P.data_ptr<acc_t>(),
        ptr_or_null<acc_t>(e.w), ptr_or_null<acc_t>(e.b), e.eps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return S_tile;
}

// The embedding of the tile X (embed_rows_kernel): into z (count, D), or,
// with slot_tile (count,) int64 given, added into the rows slot of z =
// sums (num_slots, D) and counted in counts (num_slots,) int64.
void embed_tile_rows(const at::Tensor& X, const EmbedOperands& e, const TileStats& st, at::Tensor& z,
                     const at::Tensor& slot_tile, int64_t num_slots, at::Tensor& counts, cudaStream_t stream) {
  const int64_t n = X.size(0);
  const bool fused = slot_tile.defined();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, X.scalar_type(), "embed_prototype_sums_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    embed_rows_kernel<scalar_t, acc_t><<<ceil_div(n, kWarp), kEmbedThreads, 0, stream>>>(
        X.data_ptr<scalar_t>(), X.stride(0), X.stride(1), n, X.size(1), st.ptr<acc_t>(), st.ld(),
        ptr_or_null<acc_t>(e.w), ptr_or_null<acc_t>(e.b), e.eps, z.data_ptr<acc_t>(),
        fused ? slot_tile.data_ptr<int64_t>() : nullptr, fused ? num_slots : 0,
        fused ? reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>()) : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// d feats of the tile X into grad_tile from G_tile = d loss / d z
// (embed_backward_kernel; G_tile may be grad_tile), and with the LayerNorm
// the per-block partial d w, d b added into the first rows of part_w, part_b;
// zs: the grad epilogue's cuda::RowSums of the tile, or undefined.
void embed_tile_backward(const at::Tensor& X, const EmbedOperands& e, const TileStats& st,
                         const at::Tensor& G_tile, at::Tensor& grad_tile, at::Tensor& part_w, at::Tensor& part_b,
                         const at::Tensor& zs, cudaStream_t stream) {
  const int64_t n = X.size(0);
  const bool ln = e.w.defined();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, X.scalar_type(), "embed_similarity_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    embed_backward_kernel<scalar_t, acc_t><<<ceil_div(n, kWarp), kEmbedThreads, 0, stream>>>(
        X.data_ptr<scalar_t>(), X.stride(0), X.stride(1), n, X.size(1), st.ptr<acc_t>(), st.ld(),
        ptr_or_null<acc_t>(e.w), ptr_or_null<acc_t>(e.b), e.eps, G_tile.data_ptr<acc_t>(), G_tile.stride(0),
        G_tile.stride(1), grad_tile.data_ptr<scalar_t>(), grad_tile.stride(0), grad_tile.stride(1),
        ln ? part_w.data_ptr<acc_t>() : nullptr, ln ? part_b.data_ptr<acc_t>() : nullptr,
        zs.defined() ? zs.data_ptr<acc_t>() : nullptr, zs.defined() ? zs.size(0) / 3 : 0,
        zs.defined() ? zs.size(1) : 0, st.sums());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// The backward's buffers for tiles of T pixels, reused in stream order (the
// op keeps them until it returns): dS (rows of EmbedOperands::gemm_cols()
// for the recomputed S), A (dS's bf16 parts, SplitProtos), the tile's stats
// (unless embed_similarity's are given: `given`, (3, N)), G (when the
// gradient's dtype is not the working one) and the per-block partial d w,
// d b (with the LayerNorm; parts (2, blocks of a tile, D), zeroed here once:
// each tile's block b adds into row b of parts[0] and parts[1]), and the
// grad epilogue's sums (cuda::RowSums: sums.out (3 parts, T); with the
// LayerNorm pw = P w and pb = P b) where the loss has the lse term and the
// stats have their sums rows (own, or given with them).
struct EmbedGradBuffers {
  int64_t T;
  bool recompute, direct;  // S recomputed (no softmax cache); G written straight into the gradient
  cuda::SplitProtos sp;
  at::Tensor dS, A, stats, given, G, parts, part_w, part_b;
  cuda::RowSums sums;

  EmbedGradBuffers(const EmbedOperands& e, int64_t N, at::ScalarType protos_dtype, bool recompute_, bool has_lse,
                   const at::Tensor& grad, const at::Tensor& given_stats)
      : recompute(recompute_), given(given_stats) {
    const int64_t D = e.P.size(1), CK = e.P.size(0);
    const auto acc = e.P.scalar_type();
    auto aopt = grad.options().dtype(acc);
    direct = grad.scalar_type() == acc;
    T = cuda::tile_rows(N, CK, at::elementSize(acc));
    sp = e.sp.B.defined() ? e.sp : cuda::split_protos(e.P, grad.scalar_type(), protos_dtype);
    dS = at::empty({T, recompute ? e.gemm_cols() : CK}, aopt);
    A = sp.B.defined() ? at::empty({T, sp.terms * CK}, grad.options().dtype(at::kBFloat16)) : at::Tensor();
    if (!given.defined()) stats = at::empty({kStatRows, T}, aopt);
    G = direct ? at::Tensor() : at::empty({T, D}, aopt);
    const int64_t max_blocks = ceil_div(T, kWarp);
    if (e.w.defined()) {
      parts = at::zeros({2, max_blocks, D}, aopt);
      part_w = parts[0];
      part_b = parts[1];
    }
    if (has_lse && (!given.defined() || given.size(0) >= kStatRows)) {
      sums.out = at::empty({3 * cuda::grad_epilogue_parts(CK), T}, aopt);
      if (e.w.defined()) {
        sums.pw = e.pw.defined() ? e.pw : at::mv(e.P, e.w);
        sums.pb = e.beta;
      }
    }
  }
};

// The backward's tiles: per tile, the stats unless given, dS as in
// similarity_backward (S recomputed through the folded GEMM when
// buf.recompute), G = dS P into the gradient's
// own tile (or buf.G), then embed_backward_kernel in place, which adds each
// block's partial d w, d b into buf.parts; after the last tile, dw and db
// = those partials summed over the blocks (a reduction each, not one per
// tile: per tile the loop launches the GEMMs and 3 to 5 kernels, nothing else).
void embed_backward_tiles(const at::Tensor& rows, const EmbedOperands& e, const cuda::GradInputs& gin,
                          EmbedGradBuffers& buf, at::Tensor& grad, at::Tensor& dw, at::Tensor& db,
                          cudaStream_t stream) {
  const int64_t CK = e.P.size(0);
  cuda::MeterTiles meter_tiles;
  for (const PixelTile& t : pixel_tiles(rows, buf.T)) {
    meter_tiles.next(cuda::loop_tile_rows(CK, e.P.element_size()), t.count);
    const at::Tensor X = t.of(rows);
    at::Tensor dS_tile = buf.dS.narrow(0, 0, t.count).narrow(1, 0, CK);
    at::Tensor grad_tile = t.of(grad);
    at::Tensor G_tile = buf.direct ? grad_tile : buf.G.narrow(0, 0, t.count);
    const TileStats st = tile_stats(X, e, buf.given, buf.stats, t.n0, stream);
    if (buf.recompute) embed_tile_scores(buf.dS.narrow(0, 0, t.count), CK, X, e, st, stream);  // S
    const bool sums = buf.sums.out.defined();
    cuda::dS_times_protos(G_tile, dS_tile, buf.A, buf.sp, e.P, gin, at::Tensor(), t.n0, stream,
                          sums ? &buf.sums : nullptr);  // d loss / d z
    embed_tile_backward(X, e, st, G_tile, grad_tile, buf.part_w, buf.part_b, sums ? buf.sums.out : at::Tensor(),
                        stream);
  }
  if (e.w.defined()) {  // over the blocks, in a fixed order: deterministic
    at::sum_out(dw, buf.part_w, 0);
    at::sum_out(db, buf.part_b, 0);
  }
}

// The backward's results as the op returns them: d feats laid out as feats,
// d ln_weight and d ln_bias in their parameters' dtypes.
std::tuple<at::Tensor, at::Tensor, at::Tensor> embed_grads(const at::Tensor& grad, const at::Tensor& dw,
                                                           const at::Tensor& db, const at::Tensor& rows,
                                                           const at::Tensor& feats,
                                                           const c10::optional<at::Tensor>& ln_weight,
                                                           const c10::optional<at::Tensor>& ln_bias) {
  at::Tensor g = embed_grad_as_feats(grad, rows, feats);
  if (!(ln_weight.has_value() && ln_weight->defined())) return {g, dw, db};
  return {g, dw.to(ln_weight->scalar_type()), db.to(ln_bias->scalar_type())};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> prototype_sums_cuda(const at::Tensor& feats, const at::Tensor& slot,
                                                       int64_t num_slots, bool normalize);  // prototype_update_cuda.cu

namespace {

// embed_prototype_sums' atomic path, fused: per image, the statistics
// (unless embed_similarity's, given (3, N), are defined), then each pixel's
// embedding added straight into the sums (embed_rows_kernel with slot): two
// launches per image (one with given stats), no z buffer, nothing zeroed but
// the outputs.
void embed_prototype_sums_atomic(const at::Tensor& rows, const EmbedOperands& e, const at::Tensor& slot,
                                 int64_t num_slots, const at::Tensor& given, at::Tensor& sums, at::Tensor& counts,
                                 cudaStream_t stream) {
  const int64_t T = rows.dim() == 3 ? rows.size(2) : rows.size(0);  // one tile per image
  at::Tensor stats = given.defined() ? at::Tensor() : at::empty({kStatRows, T}, sums.options());
  at::Tensor sl = slot.to(at::kLong).contiguous();
  at::Tensor icounts = at::zeros({num_slots}, sums.options().dtype(at::kLong));
  cuda::MeterTiles meter_tiles;
  for (const PixelTile& t : pixel_tiles(rows, T)) {
    meter_tiles.next(0, t.count);  // a tile per image
    const at::Tensor X = t.of(rows);
    const at::Tensor sl_tile = sl.narrow(0, t.n0, t.count);
    const TileStats st = tile_stats(X, e, given, stats, t.n0, stream);
    embed_tile_rows(X, e, st, sums, sl_tile, num_slots, icounts, stream);
  }
  counts.copy_(icounts);
}

// embed_prototype_sums' deterministic path: per tile, the statistics (unless
// given, as above), the tile's embedding z (count, D) in a reused buffer,
// and prototype_sums_cuda's sorted segments on it, tiles added in order.
void embed_prototype_sums_sorted(const at::Tensor& rows, int64_t N, const EmbedOperands& e, const at::Tensor& slot,
                                 int64_t num_slots, const at::Tensor& given, at::Tensor& sums, at::Tensor& counts,
                                 cudaStream_t stream) {
  const int64_t D = sums.size(1);
  const int64_t loop_rows =
      std::max<int64_t>(128, cuda::kTileBytes / std::max<int64_t>(1, D * int64_t(sums.element_size())));
  const int64_t T = std::min<int64_t>(N, loop_rows);
  at::Tensor Z = at::empty({T, D}, sums.options());
  at::Tensor stats = given.defined() ? at::Tensor() : at::empty({kStatRows, T}, sums.options());
  at::Tensor no_slot;
  cuda::MeterTiles meter_tiles;
  for (const PixelTile& t : pixel_tiles(rows, T)) {
    meter_tiles.next(loop_rows, t.count);
    const at::Tensor X = t.of(rows);
    at::Tensor Z_tile = Z.narrow(0, 0, t.count);
    const TileStats st = tile_stats(X, e, given, stats, t.n0, stream);
    embed_tile_rows(X, e, st, Z_tile, at::Tensor(), 0, no_slot, stream);
    auto part = prototype_sums_cuda(Z_tile, slot.narrow(0, t.n0, t.count), num_slots, false);
    sums.add_(std::get<0>(part));
    counts.add_(std::get<1>(part));
  }
}

}  // namespace

// `similarity` of the head's embedding (see the file comment): per tile, the
// statistics (straight into the returned stats (3, N), at the tile's
// columns), one GEMM on the raw tile, the per-row affine map, then the
// epilogue of `similarity`.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> embed_similarity_cuda(
    const at::Tensor& feats, const c10::optional<at::Tensor>& ln_weight, const c10::optional<at::Tensor>& ln_bias,
    double ln_eps, const at::Tensor& protos, const at::Tensor& labels, int64_t ignore_index, double temperature,
    bool compute_seg, bool compute_lse, bool compute_own, int64_t cache_bytes) {
  at::NoGradGuard no_grad;  // the GEMMs write into buffers
  const at::Tensor rows = embed_rows(feats);
  const at::Tensor shape = embed_checked_shape(rows);
  check_similarity_args(shape, protos, labels, compute_own, temperature);
  const bool ln = check_embed_layer_norm(rows, ln_weight, ln_bias, ln_eps);
  c10::cuda::CUDAGuard guard(feats.device());
  const int64_t N = shape.size(0), C = protos.size(0), K = protos.size(1), CK = C * K;
  const auto acc = acc_type(feats.scalar_type());
  auto aopt = feats.options().dtype(acc);
  cuda::SimilarityOutputs out(feats.options(), N, C, K, compute_seg, compute_lse, compute_own, cache_bytes);
  at::Tensor stats = out.any() ? at::empty({kStatRows, N}, aopt) : at::empty({0}, aopt);
  if (N == 0 || !out.any()) return std::tuple_cat(out.tuple(), std::make_tuple(stats));
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor lab = compute_own ? labels.to(at::kLong).contiguous() : at::Tensor();
  const EmbedOperands e = embed_operands(rows, protos, ln, ln_weight, ln_bias, ln_eps);
  const int64_t T = cuda::tile_rows(N, CK, at::elementSize(acc));
  at::Tensor S = at::empty({T, e.gemm_cols()}, aopt);  // one tile buffer, reused in stream order
  const bool kcat = e.Pw16.defined() && e.kcat && cuda::lowp_gemm_available();
  at::Tensor KC;  // [X | X] for the GEMM along K, written by the stats kernel: a buffer reused in stream order,
  cuda::MeterTiles meter_tiles;
  for (const PixelTile& t : pixel_tiles(rows, T)) {  // of the first tile's rows (the most: min(T, pixels per image))
    meter_tiles.next(cuda::loop_tile_rows(CK, at::elementSize(acc)), t.count);
    const at::Tensor X = t.of(rows);
    const TileStats st{stats, t.n0};  // the returned stats, at the tile's columns
    if (kcat && !KC.defined()) KC = embed_kcat_buffer(X, t.count);
    const at::Tensor kc = kcat ? KC.narrow(0, 0, t.count) : at::Tensor();
    embed_tile_stats(X, e, st, stream, kc);
    const at::Tensor S_rows = S.narrow(0, 0, t.count);  // whole rows: the epilogue adds the split output's halves
    cuda::ScoreAffine affine;
    embed_tile_scores(S_rows, CK, X, e, st, stream, &affine, kc);
    cuda::similarity_epilogue(S_rows, at::Tensor(), t.n0, C, K, temperature, lab, ignore_index, out, stream, &affine);
  }
  return std::tuple_cat(out.tuple(), std::make_tuple(stats));
}

// d feats, d ln_weight, d ln_bias of embed_similarity (embed_backward_tiles);
// with embed_similarity's stats given (stats_opt), no pass of its own for
// them.
std::tuple<at::Tensor, at::Tensor, at::Tensor> embed_similarity_backward_cuda(
    const c10::optional<at::Tensor>& grad_seg, const c10::optional<at::Tensor>& grad_lse,
    const c10::optional<at::Tensor>& grad_own, const at::Tensor& feats, const c10::optional<at::Tensor>& ln_weight,
    const c10::optional<at::Tensor>& ln_bias, double ln_eps, const at::Tensor& protos, const at::Tensor& labels,
    const at::Tensor& argk, const at::Tensor& lse, int64_t ignore_index, double temperature,
    const c10::optional<at::Tensor>& probs_opt, const c10::optional<at::Tensor>& stats_opt) {
  at::NoGradGuard no_grad;  // the GEMMs write into buffers
  const bool has_seg = grad_seg.has_value() && grad_seg->defined();
  const bool has_lse = grad_lse.has_value() && grad_lse->defined();
  const bool has_own = grad_own.has_value() && grad_own->defined();
  const at::Tensor rows = embed_rows(feats);
  const at::Tensor shape = embed_checked_shape(rows);
  check_similarity_args(shape, protos, labels, has_own, temperature);
  const bool cached = check_similarity_backward_args(shape, protos, grad_seg, grad_lse, grad_own, argk, lse, probs_opt);
  const bool ln = check_embed_layer_norm(rows, ln_weight, ln_bias, ln_eps);
  const at::Tensor given = check_embed_stats(rows, stats_opt, kStatRows) ? *stats_opt : at::Tensor();
  c10::cuda::CUDAGuard guard(feats.device());
  const int64_t N = shape.size(0), D = shape.size(1), C = protos.size(0), K = protos.size(1);
  const auto acc = acc_type(feats.scalar_type());
  auto aopt = feats.options().dtype(acc);
  at::Tensor grad = at::empty(rows.sizes(), feats.options());  // laid out as the rows
  const bool none = N == 0 || (!has_seg && !has_lse && !has_own);
  // d ln_weight, d ln_bias: written by a reduction each after the tiles
  at::Tensor dw = ln ? (none ? at::zeros({D}, aopt) : at::empty({D}, aopt)) : at::empty({0}, feats.options());
  at::Tensor db = ln ? (none ? at::zeros({D}, aopt) : at::empty({D}, aopt)) : at::empty({0}, feats.options());
  if (none) {
    grad.zero_();
    return embed_grads(grad, dw, db, rows, feats, ln_weight, ln_bias);
  }
  const cuda::GradInputs gin(grad_seg, grad_lse, grad_own, labels, argk, lse, probs_opt, cached, N, C, K, acc,
                             ignore_index, temperature);
  const EmbedOperands e = embed_operands(rows, protos, ln, ln_weight, ln_bias, ln_eps, /*for_backward=*/true);
  EmbedGradBuffers buf(e, N, protos.scalar_type(), has_lse && !cached, has_lse, grad, given);
  embed_backward_tiles(rows, e, gin, buf, grad, dw, db, c10::cuda::getCurrentCUDAStream());
  return embed_grads(grad, dw, db, rows, feats, ln_weight, ln_bias);
}

// prototype_sums of the head's embedding, never a copy of the whole map:
// the atomic path by default, the sorted one under
// torch.use_deterministic_algorithms (see the two functions above); with
// embed_similarity's stats given (stats_opt), no pass of its own for them.
std::tuple<at::Tensor, at::Tensor> embed_prototype_sums_cuda(const at::Tensor& feats,
                                                             const c10::optional<at::Tensor>& ln_weight,
                                                             const c10::optional<at::Tensor>& ln_bias, double ln_eps,
                                                             const at::Tensor& slot, int64_t num_slots,
                                                             const c10::optional<at::Tensor>& stats_opt) {
  at::NoGradGuard no_grad;
  const at::Tensor rows = check_embed_prototype_sums_args(feats, slot, num_slots);
  const at::Tensor shape = embed_checked_shape(rows);
  const bool ln = check_embed_layer_norm(rows, ln_weight, ln_bias, ln_eps);
  const at::Tensor given = check_embed_stats(rows, stats_opt, kStatRows) ? *stats_opt : at::Tensor();
  c10::cuda::CUDAGuard guard(feats.device());
  const int64_t N = shape.size(0), D = shape.size(1);
  auto aopt = feats.options().dtype(acc_type(feats.scalar_type()));
  at::Tensor sums = at::zeros({num_slots, D}, aopt);
  at::Tensor counts = at::zeros({num_slots}, aopt);
  if (N == 0 || num_slots == 0) return {sums, counts};
  auto stream = c10::cuda::getCurrentCUDAStream();
  const EmbedOperands e = embed_operands(rows, at::Tensor(), ln, ln_weight, ln_bias, ln_eps);
  if (at::globalContext().deterministicAlgorithms()) {
    embed_prototype_sums_sorted(rows, N, e, slot, num_slots, given, sums, counts, stream);
  } else {
    embed_prototype_sums_atomic(rows, e, slot, num_slots, given, sums, counts, stream);
  }
  return {sums, counts};
}

TORCH_LIBRARY_IMPL(protoseg_ext, CUDA, m) {
  m.impl("embed_similarity", &embed_similarity_cuda);
  m.impl("embed_similarity_backward", &embed_similarity_backward_cuda);
  m.impl("embed_prototype_sums", &embed_prototype_sums_cuda);
}

}  // namespace protoseg

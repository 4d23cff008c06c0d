// CUDA kernels of `similarity` and `similarity_backward` (mirrors
// csrc/cpu/similarity_cpu.cpp). The head's embedding fused into them
// (`embed_similarity`, its backward, `embed_prototype_sums`) is in
// embed_cuda.cu; the pieces both files run are declared in
// similarity_common.cuh and defined here.
//
// S = feats @ protos.view(C*K, D).T is never materialised whole. Rows go in
// tiles of at most ~16 MiB of S (so a tile stays in the H100's 50 MB L2 between
// the GEMM that writes it and the epilogue that reads it); each tile is one
// cuBLAS GEMM through ATen (at::mm_out, on the current stream) followed by one
// fused epilogue kernel that keeps only what the contract asks for.
//
// Why cuBLAS per tile rather than a custom tiled kernel (H100 SXM: 989 TFLOPS
// bf16 dense, ~67 TFLOPS fp32 without tensor cores, 3.35 TB/s HBM). Example:
// N = 65,536 pixels, D = 720, C*K = 190 (Cityscapes) -> 2*N*D*CK = 17.9 GFLOP.
//   - bf16 in, fp32 out (mm.dtype_out): reads feats 94 MB (28 us at HBM speed)
//     for 17.9 GFLOP (18 us at tensor-core peak); 190 FLOP/B is below the
//     bf16 ridge (295 FLOP/B), so the tile GEMM is memory-bound and cuBLAS
//     reaches that bound; the fp32 tile of S (50 MB in all) round-trips through
//     L2, adding at most ~30 us of HBM write-back.
//   - fp32: 95 FLOP/B against a CUDA-core ridge of 20 FLOP/B: compute-bound,
//     0.27 ms at 67 TFLOPS (TF32 tensor cores, if the user allows them via
//     torch.backends.cuda.matmul.allow_tf32, take it to the memory bound).
//   - C*K = 1,710 (COCO-Stuff): 161 GFLOP, 0.16 ms at bf16 peak, 2.4 ms fp32.
// A hand-written tiled kernel without tensor cores is capped at the fp32 rate
// (~15x slower than bf16 cuBLAS here), and a wgmma/TMA kernel that matches
// cuBLAS is a large, per-architecture piece of code to keep correct. The
// cost of not fusing is the fp32 tile of S that the GEMM writes and the
// epilogue reads back: 8*C*K bytes per pixel (1,520 B at C*K = 190, next to
// the 1,440 B of a bf16 feature row). The read mostly hits L2, the write-back
// reaches HBM, so the bf16 forward moves ~1.5x the bytes of a fully fused
// kernel (~45 us instead of ~28 us) and the compute-bound fp32 one does not
// notice. At C*K = 1,710 in bf16, writing S back (448 MB, ~0.13 ms) costs
// about as much as the GEMM (0.16 ms at peak): that is where a fused tensor-
// core kernel would pay off. The one case where the GEMM itself is wasteful
// has its own kernel: own-class scores alone (prototype learning) are K dot
// products per pixel, 1/C of the GEMM, done by `similarity_own_kernel`
// straight from feats (memory-bound: one read of feats).
//
// Backward: d feats = dS @ P per tile, dS formed in place by one epilogue
// kernel. Its softmax term reads the softmax rows cached by the forward when
// they fit the caller's cache_bytes (N*C*K*4 bytes: 50 MB for the example,
// 15 us of reads against a 17.9 GFLOP GEMM), else recomputes the tile of S
// with a GEMM. Without grad_lse, dS has only C + K nonzeros per row, but a
// gather of C + K prototype rows per pixel streams (C+K)*D*4 bytes per pixel
// from L2 (5.4 GB for the example, ~1 ms) where the dense GEMM takes
// ~0.3 ms in fp32, so the GPU keeps the GEMM (the CPU gathers).
//
// Precision: 16-bit feats with protos of the same dtype use the tensor-core
// GEMM with fp32 accumulation and output (exact products, no rounding of any
// input). Otherwise both operands are converted to the working dtype (fp32,
// or fp64 for fp64 feats) first, so fp32 prototypes are never rounded to 16
// bits. The backward's second GEMM (dS @ P) runs in the working dtype for
// fp32/fp64 maps; for 16-bit maps on tensor cores from bf16 high and low parts
// of dS and P (SplitProtos), as does the embedding path's folded forward GEMM
// (EmbedOperands::Pw16 in embed_cuda.cu): no fp32 CUDA-core GEMM on a 16-bit map there.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>

#include "../checks.h"
#include "../protoseg_math.h"
#include "cuda_common.cuh"
#include "similarity_common.cuh"

namespace protoseg {
namespace cuda {

// Set once if this torch has no 16-bit GEMM with fp32 output for the device
// (the dispatcher has no mm.dtype_out kernel for it): such GEMMs then convert
// feats to the working dtype. (The cuda_sim emulator provides one.)
namespace {
std::atomic<bool> g_lowp_gemm_unsupported{false};
}  // namespace

bool lowp_gemm_available() { return !g_lowp_gemm_unsupported.load(std::memory_order_relaxed); }

bool lowp_mm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (!lowp_gemm_available()) return false;
  try {
    at::mm_out(out, a, b, at::kFloat);
    return true;
  } catch (const c10::NotImplementedError&) {
    // only "no kernel for this backend" (raised before any launch); an
    // out-of-memory or any other error propagates and changes nothing
    g_lowp_gemm_unsupported.store(true);
    return false;
  }
}

// The backward's d feats = dS @ P on tensor cores for 16-bit maps. dS is
// fp32 and must not be rounded to 16 bits (a 2^-9 relative error per entry
// would be a 2^-9 error in every gradient), so the grad epilogue splits each
// entry v into bf16 parts hi = bf16(v), lo = bf16(v - hi) (v - hi is exact in
// fp32; hi + lo carries 16 significant bits, relative error <= 2^-17) and the
// GEMM takes them side by side along K against P stacked twice:
// [hi | lo] @ [P; P] = hi P + lo P, one GEMM of K = 2 C*K with fp32
// accumulation. bf16 and not fp16 because dS spans fp32's range (a mean loss
// over 65,536 pixels gives entries near 1e-7, below fp16's normal range).
// Prototypes that are not bf16 (fp32, fp16) are split the same way, P =
// Phi + Plo, and the product keeps three of the four terms:
// [hi | lo | hi] @ [Phi; Phi; Plo] (the dropped lo Plo is below 2^-17 of
// |dS| |P|). bf16 prototypes are exact in Phi: two terms.
SplitProtos split_protos(const at::Tensor& P_acc, at::ScalarType map_dtype, at::ScalarType protos_dtype) {
  SplitProtos s;
  if (!is_16bit(map_dtype) || !lowp_gemm_available()) return s;
  const at::Tensor hi = P_acc.to(at::kBFloat16);
  if (protos_dtype == at::kBFloat16) {
    s.terms = 2;
    s.B = at::cat({hi, hi}).contiguous();
  } else {
    s.terms = 3;
    s.B = at::cat({hi, hi, (P_acc - hi.to(P_acc.scalar_type())).to(at::kBFloat16)}).contiguous();
  }
  return s;
}

}  // namespace cuda

namespace {

using cuda::ceil_div;
using cuda::kEpilogueStage;
using cuda::kRowsPerBlock;
using cuda::kRowThreads;
using cuda::kWarp;

using cuda::kGradThreads;  // backward epilogue: at most this many threads per block

// The prototypes as GEMM operands: (C*K, D) in the working dtype, plus the
// 16-bit copy when the tensor-core path applies (see the file comment).
struct ProtoOperands {
  at::Tensor acc;  // (C*K, D), working dtype
  at::Tensor low;  // (C*K, D), feats' 16-bit dtype, or undefined
};

ProtoOperands proto_operands(const at::Tensor& feats, const at::Tensor& protos) {
  const int64_t CK = protos.size(0) * protos.size(1), D = protos.size(2);
  const auto st = feats.scalar_type();
  ProtoOperands p;
  p.acc = protos.reshape({CK, D}).to(acc_type(st)).contiguous();
  if (cuda::is_16bit(st) && protos.scalar_type() == st) p.low = protos.reshape({CK, D}).contiguous();
  return p;
}

// S_tile (rows, C*K) = feats_tile (rows, D) @ P.T, in the working dtype.
void similarity_tile_gemm(at::Tensor& S_tile, const at::Tensor& feats_tile, const ProtoOperands& P) {
  // tensor cores, fp32 accumulate + output, where this torch has that GEMM
  if (P.low.defined() && cuda::lowp_mm_out(S_tile, feats_tile, P.low.t())) return;
  at::mm_out(S_tile, feats_tile.to(S_tile.scalar_type()), P.acc.t());
}

// pixel with its own class's prototypes (no GEMM over all C*K columns); with
// normalize, the first pass over the row also sums its squares and every dot
// product is scaled by 1 / max(||x_n||, eps).
// Launch: kRowThreads threads (8 warps), one warp per row, grid ceil(N / 8).
// Bounds: n < N checked (warp-uniform early return); lanes read d < D of row
// n and of prototype rows labels[n]*K + k with k < K (the clamped index of an
// unused accumulator is still < K); the label is asserted in [0, C) or
// ignore_index before it indexes P. Sync: each warp owns its row of own;
// only warp shuffles with all 32 lanes present (the return is per warp).
// Hot kernel: must not spill.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kRowThreads, 4) similarity_own_kernel(
    const scalar_t* __restrict__ feats, const acc_t* __restrict__ P, const int64_t* __restrict__ labels, int64_t N,
    int64_t D, int64_t C, int64_t K, int64_t ignore_index, bool normalize, acc_t* __restrict__ own) {
  const int64_t n = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x & (kWarp - 1);
  if (n >= N) return;
  const int64_t c = labels[n];
  CUDA_KERNEL_ASSERT_MSG(label_in_range(c, C) || c == ignore_index,
                         "labels: a label is outside [0, C) and is not ignore_index");
  acc_t* o = own + n * K;
  if (!label_in_range(c, C)) {  // ignored pixel: its row of own is zero
    for (int64_t k = lane; k < K; k += kWarp) o[k] = acc_t(0);
    return;
  }
  const scalar_t* f = feats + n * D;
  const acc_t* p = P + c * K * D;
  acc_t inv = acc_t(1);                    // row scale (normalize)
  for (int64_t k0 = 0; k0 < K; k0 += 4) {  // four prototypes per pass over the feature row
    const acc_t* p0 = p + k0 * D;
    const acc_t* p1 = p + (k0 + 1 < K ? k0 + 1 : K - 1) * D;
    const acc_t* p2 = p + (k0 + 2 < K ? k0 + 2 : K - 1) * D;
    const acc_t* p3 = p + (k0 + 3 < K ? k0 + 3 : K - 1) * D;
    const bool norm_pass = normalize && k0 == 0;  // warp-uniform
    acc_t a0 = 0, a1 = 0, a2 = 0, a3 = 0, sq = 0;
    for (int64_t d = lane; d < D; d += kWarp) {
      const acc_t x = static_cast<acc_t>(f[d]);
      a0 += x * p0[d];
      a1 += x * p1[d];
      a2 += x * p2[d];
      a3 += x * p3[d];
      if (norm_pass) sq += x * x;
    }
    if (norm_pass) inv = inv_norm(cuda::warp_sum(sq));
    a0 = cuda::warp_sum(a0) * inv;
    a1 = cuda::warp_sum(a1) * inv;
    a2 = cuda::warp_sum(a2) * inv;
    a3 = cuda::warp_sum(a3) * inv;
    if (lane == 0) {
      o[k0] = a0;
      if (k0 + 1 < K) o[k0 + 1] = a1;
      if (k0 + 2 < K) o[k0 + 2] = a2;
      if (k0 + 3 < K) o[k0 + 3] = a3;
    }
  }
}

// inv[i] = 1 / max(||feats[row0 + i]||, eps) for the rows of a tile (normalize:
// the rows of S scale like the rows of feats).
// Launch: kRowThreads threads, one warp per row, grid ceil(rows / 8).
// Bounds: i < rows (warp-uniform return), d < D, row0 + i < N (host passes
// rows <= N - row0). Sync: lane 0 of the row's warp is the one writer.
// Hot kernel: must not spill.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kRowThreads, 4)
    row_inv_norm_kernel(const scalar_t* __restrict__ feats, int64_t row0, int64_t rows, int64_t D,
                        acc_t* __restrict__ inv) {
  const int64_t i = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x & (kWarp - 1);
  if (i >= rows) return;
  const scalar_t* x = feats + (row0 + i) * D;
  acc_t sq = 0;
  for (int64_t d = lane; d < D; d += kWarp) {
    const acc_t v = static_cast<acc_t>(x[d]);
    sq += v * v;
  }
  sq = cuda::warp_sum(sq);
  if (lane == 0) inv[i] = inv_norm(sq);
}

// d loss / d raw feats from g = d loss / d normalised feats, for the rows of
// a tile (normalize_grad): out[i] = (g[i] - f (f . g[i])) / max(||x||, eps).
// g (rows, D) is the working-dtype tile; out may alias g (same dtype): each
// lane reads g[i, d] and then writes out[i, d] for the same d, after the warp
// reductions that read the whole row, so no entry is written before it is read.
// Launch: kRowThreads threads, one warp per row, grid ceil(rows / 8).
// Bounds: i < rows (warp-uniform return), d < D; feats row row0 + i < N.
// Sync: each warp owns row i; shuffles with all 32 lanes present.
// Hot kernel: must not spill.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kRowThreads, 4)
    normalize_backward_kernel(const scalar_t* __restrict__ feats, int64_t row0, int64_t rows, int64_t D,
                              const acc_t* g, scalar_t* out) {
  const int64_t i = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x & (kWarp - 1);
  if (i >= rows) return;
  const scalar_t* x = feats + (row0 + i) * D;
  const acc_t* gi = g + i * D;
  scalar_t* o = out + i * D;
  acc_t sq = 0, xg = 0;
  for (int64_t d = lane; d < D; d += kWarp) {
    const acc_t v = static_cast<acc_t>(x[d]);
    sq += v * v;
    xg += v * gi[d];
  }
  sq = cuda::warp_sum(sq);
  xg = cuda::warp_sum(xg);
  const acc_t inv = inv_norm(sq);
  const acc_t f_dot_g = fsqrt(sq) > acc_t(kNormEps) ? xg * inv : acc_t(0);
  for (int64_t d = lane; d < D; d += kWarp)
    o[d] = static_cast<scalar_t>(normalize_grad(gi[d], static_cast<acc_t>(x[d]), inv, f_dot_g));
}

// Forward epilogue of one tile of S (rows, C*K; row stride ld >= C*K), rows row0 .. row0 + rows - 1:
// seg/argk (max over K per class), lse (online log-sum-exp of S / temperature
// over all C*K columns), own (the K scores of the pixel's class) and, when
// probs is given, the softmax row of S / temperature (a second pass over the
// row). With row_scale given (normalize), row i of S is first scaled by
// row_scale[i]. With stats given (the head's embedding, cuda::ScoreAffine),
// the tile holds the folded GEMM's output G (two halves, `half` columns
// apart, when split) and the scores are S = inv (r (G - mu rho_j) + beta_j)
// (rho == nullptr: S = inv G), with pixel i's (mu, r, inv) at stats[c * sld
// + i]; a row with scores_fixed_row gets its scores first, in place, from
// the pixel's entries (cuda::fixed_scores_row: x (rows, D) of strides (sp,
// sd), the unfolded prototypes P, the LayerNorm's lw, lb, eps), by the warp
// that owns the row: no launch of its own.
// Launch: kRowThreads threads, one warp per tile row, grid ceil(rows / 8),
// 8 * stage_cols acc_t of dynamic shared memory (epilogue_stage_cols): the
// warp's stage. The row goes through it a group of G = min(32,
// kEpilogueStage / K) classes at a time: the warp copies the group's G*K
// scores there with consecutive lanes on consecutive columns (whole sectors;
// a lane per class reading its K scores from global memory would put the
// lanes K*4 bytes apart: 2.9x the ideal sectors at K = 10), pushes them into
// its lanes' log-sum-exp states (lane l: columns l, l + 32, ...), then lane
// c < G takes the max over its class's K scores there; the 32 lane states
// merge by an xor butterfly (fixed order, deterministic). With the
// LayerNorm's map, the block first copies the group's rho and beta to
// shared memory (one load per block, not one per row). When the stage holds
// the whole row (stage_cols == C*K: each group at its own columns), probs
// and own read the scores from there: the tile is read once and never
// written. Otherwise (stage_cols == G*K, rows too long for the stage: each
// group overwrites the last) a mapped row that probs or own reads again is
// written back mapped, in place, as it is staged.
// Bounds: i < rows checked (warp-uniform: the warps past the tile's rows
// stay for the block's barriers and touch no row); columns c*K + k and j are
// < C*K; staged entries < G*K <= stage_cols, or < C*K == stage_cols when
// whole (the host gives stage_cols >= G*K; K <= 256 < kEpilogueStage);
// output rows n = row0 + i < N because the host passes rows <= N - row0;
// a fixed row reads x at row i < rows, channels d < D, and P's rows j < C*K;
// labels asserted before indexing. Sync: each warp owns row i of the tile,
// its slice of the stage and row n of every output; __syncwarp after a fixed
// row's recomputed entries (lane 0's) and before the warp stages it, between
// staging a group and reading it, and between reading it and staging the
// next; rho and beta of a group between two __syncthreads that every thread
// reaches (the group loop is uniform over the block); shuffles with all
// lanes present.
// Hot kernel: must not spill.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kRowThreads, 4) similarity_epilogue_kernel(
    acc_t* __restrict__ S, int64_t ld, const acc_t* __restrict__ row_scale, const acc_t* __restrict__ stats,
    int64_t sld, const acc_t* __restrict__ rho, const acc_t* __restrict__ beta, int64_t half, int64_t rows,
    int64_t row0, int64_t C, int64_t K, acc_t temperature, const int64_t* __restrict__ labels, int64_t ignore_index,
    bool compute_seg, bool compute_lse, bool compute_own, scalar_t* __restrict__ seg, uint8_t* __restrict__ argk,
    acc_t* __restrict__ lse, acc_t* __restrict__ own, acc_t* __restrict__ probs, int64_t stage_cols,
    const scalar_t* __restrict__ x, int64_t sp, int64_t sd, int64_t D, const acc_t* __restrict__ P,
    const acc_t* __restrict__ lw, const acc_t* __restrict__ lb, double eps) {
  const int64_t i = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x & (kWarp - 1);
  const bool valid = i < rows;  // warp-uniform
  const int64_t n = row0 + i, CK = C * K;
  acc_t* s = S + (valid ? i : 0) * ld;
  acc_t r = row_scale != nullptr && valid ? row_scale[i] : acc_t(1);  // x * 1 == x exactly
  acc_t mu = 0, inv = 0;
  bool mapped = false;  // the embedding's affine map applies to this row
  if (stats != nullptr && valid) {
    mu = stats[i];
    r = stats[sld + i];
    inv = stats[2 * sld + i];
    mapped = !cuda::scores_fixed_row(rho != nullptr, mu, r, inv);
    if (!mapped) r = acc_t(1);  // the fixed row holds its scores, from here:
  }
  if (!mapped && stats != nullptr && valid) {  // warp-uniform (the row's)
    cuda::fixed_scores_row(s, half, CK, stats + i, sld, rho, beta, x + i * sp, sd, D, P, lw, lb, eps, lane);
    __syncwarp();  // lane 0's entries are read by every lane below
  }
  __shared__ acc_t rb[2][kEpilogueStage];  // the group's rho and beta (epilogue_static_smem)
  acc_t* sh = nullptr;  // the warp's stage in the block's dynamic shared memory (one extern array per type:
  if constexpr (std::is_same<acc_t, float>::value) {  // `extern __shared__ acc_t a[]` would give one name two)
    extern __shared__ float stage_f[];
    sh = stage_f + (threadIdx.x / kWarp) * stage_cols;
  } else {
    extern __shared__ double stage_d[];
    sh = stage_d + (threadIdx.x / kWarp) * stage_cols;
  }
  const int G = cuda::epilogue_group(K);  // classes per group
  const bool staged = compute_seg || compute_lse, whole = staged && stage_cols >= CK;
  if (staged) {
    const bool ln_map = stats != nullptr && rho != nullptr;  // block-uniform
    const bool keep = mapped && !whole && (probs != nullptr || compute_own);
    LseState<acc_t> st = lse_init<acc_t>();
    for (int c0 = 0; c0 < C; c0 += G) {
      const int nc = C - c0 < G ? int(C) - c0 : G, cols = nc * int(K);
      acc_t* gs = whole ? sh + c0 * K : sh;  // the group's stage
      if (ln_map) {
        __syncthreads();  // the previous group's rho, beta are read
        for (int j = threadIdx.x; j < cols; j += kRowThreads) {
          rb[0][j] = rho[c0 * K + j];
          rb[1][j] = beta[c0 * K + j];
        }
        __syncthreads();
      }
      for (int j = lane; valid && j < cols; j += kWarp) {
        acc_t* e = s + c0 * K + j;
        acc_t v;
        if (mapped) {
          v = cuda::folded_score(e, half, mu, r, inv, ln_map ? rb[0] : nullptr, rb[1], j);
          if (keep) e[0] = v;  // read again below
        } else {
          v = e[0] * r;
        }
        gs[j] = v;  // the per-class max below reads it, and probs and own when whole
        if (compute_lse) lse_push(st, v / temperature);
      }
      __syncwarp();
      if (valid && compute_seg && lane < nc) {
        acc_t best = -INFINITY;
        int64_t arg = 0;
        for (int k = 0; k < K; ++k) max_push(best, arg, gs[lane * K + k], int64_t(k));
        seg[n * C + c0 + lane] = static_cast<scalar_t>(best);
        argk[n * C + c0 + lane] = static_cast<uint8_t>(arg);  // K <= 256
      }
      __syncwarp();  // the group is read before the next one overwrites it (and written back)
    }
    // From here the row holds its scores (s[j] * r) unless whole (the stage has them) or it was mapped and
    // not kept: then neither probs nor own reads it.
    if (keep) r = acc_t(1);
    if (valid && compute_lse) {
      st = cuda::warp_lse_merge(st);  // every lane holds the same merged state
      const acc_t l = lse_value(st);
      if (lane == 0) lse[n] = l;
      if (probs != nullptr)
        for (int j = lane; j < CK; j += kWarp)
          probs[n * CK + j] = softmax_prob(whole ? sh[j] : s[j] * r, l, temperature);
    }
  }
  if (valid && compute_own) {
    const int64_t c = labels[n];
    CUDA_KERNEL_ASSERT_MSG(label_in_range(c, C) || c == ignore_index,
                           "labels: a label is outside [0, C) and is not ignore_index");
    const bool in = label_in_range(c, C);
    for (int k = lane; k < K; k += kWarp) {
      const int j = int(c * K) + k;
      acc_t v = 0;
      if (in && whole) {
        v = sh[j];
      } else if (in && (staged || !mapped)) {
        v = s[j] * r;
      } else if (in) {  // own alone, mapped: the scores from the GEMM's output here
        v = cuda::folded_score(s + j, half, mu, r, inv, rho, beta, j);
      }
      own[n * K + k] = v;
    }
  }
}

// Backward epilogue: overwrite the tile dS (rows, C*K; row stride ld) by
// d loss / d S (similarity_grad_entry), or, with split given, write its bf16
// parts there instead (rows, split_terms * C*K; see SplitProtos) and leave
// dS as it was. The softmax term comes from the cached softmax
// rows `probs` (N, C*K) when given, else from S, which the tile then holds
// (recomputed by the GEMM; its row i scaled by row_scale[i] when given);
// without has_lse the tile holds nothing yet. With zsums given (has_lse
// only), also the block's share of the row sums of cuda::RowSums, at
// zsums[(t * gridDim.x + blockIdx.x) * zld + i], t = 0..2 (pw, pb: P w and
// P b, or null without the LayerNorm: rows 1, 2 get 0).
// Launch: grid (ceil(C*K / threads), ceil(rows / kGradRows)), threads =
// min(kGradThreads, C*K rounded up to 32); thread j of a block takes entry j
// of its kGradRows rows i = blockIdx.y * kGradRows + r < rows (pw[j], pb[j]
// loaded once for them). Bounds: j < C*K checked before every access of an
// entry (threads past it add 0 to the sums); i < rows (block-uniform); c =
// j / K < C, k < K; n = row0 + i < N (host passes rows <= N - row0), so
// probs[n*CK + j] is in bounds; labels asserted before use; split[i *
// split_terms * CK + j + t * CK], t < split_terms, is within row i; zsums'
// rows hold gridDim.x parts of zld >= rows. Sync: threads t < kGradRows
// stage row t's lse, grad_lse and label in shared memory (one load per row
// and block, not one per warp), one barrier; each thread then reads and
// writes only its own entries; the sums go through shared memory (warp
// sums per row, one barrier after the rows, thread t < 3 kGradRows adds
// the warps of one row and sum in order: deterministic), every thread
// reaching both barriers (no early return before them).
// Hot kernel: must not spill.
template <typename acc_t>
__global__ void __launch_bounds__(kGradThreads, 4) similarity_grad_epilogue_kernel(
    acc_t* __restrict__ dS, int64_t ld, at::BFloat16* __restrict__ split, int split_terms,
    const acc_t* __restrict__ row_scale, int64_t row0, int64_t rows, int64_t C, int64_t K,
    acc_t temperature, bool has_lse, const acc_t* __restrict__ probs, const acc_t* __restrict__ lse,
    const acc_t* __restrict__ grad_lse, bool has_seg, const uint8_t* __restrict__ argk,
    const acc_t* __restrict__ grad_seg, bool has_own, const int64_t* __restrict__ labels, int64_t ignore_index,
    const acc_t* __restrict__ grad_own, acc_t* __restrict__ zsums, int64_t zld, const acc_t* __restrict__ pw,
    const acc_t* __restrict__ pb) {
  __shared__ acc_t red[cuda::kGradRows][3][kGradThreads / kWarp];
  __shared__ acc_t row_lse[cuda::kGradRows];
  __shared__ acc_t row_glse[cuda::kGradRows];
  __shared__ int64_t row_lab[cuda::kGradRows];
  const int64_t CK = C * K;
  const int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t c = j / K, k = j - c * K;
  const int lane = threadIdx.x & (kWarp - 1), warp = threadIdx.x / kWarp;
  const bool in = j < CK, sums = zsums != nullptr;
  const acc_t pwj = sums && in && pw != nullptr ? pw[j] : acc_t(0);
  const acc_t pbj = sums && in && pw != nullptr ? pb[j] : acc_t(0);
  const int64_t i0 = int64_t(blockIdx.y) * cuda::kGradRows;
  if (threadIdx.x < cuda::kGradRows && i0 + threadIdx.x < rows) {  // the rows' scalars, once per block
    const int64_t n = row0 + i0 + threadIdx.x;
    row_lse[threadIdx.x] = has_lse ? lse[n] : acc_t(0);
    row_glse[threadIdx.x] = has_lse ? grad_lse[n] : acc_t(0);
    if (has_own) {
      const int64_t lab = labels[n];
      CUDA_KERNEL_ASSERT_MSG(label_in_range(lab, C) || lab == ignore_index,
                             "labels: a label is outside [0, C) and is not ignore_index");
      row_lab[threadIdx.x] = lab;
    }
  }
  __syncthreads();
  for (int r = 0; r < cuda::kGradRows && i0 + r < rows; ++r) {  // block-uniform
    const int64_t i = i0 + r, n = row0 + i;
    acc_t t0 = 0, t1 = 0, t2 = 0;  // this entry's dS_j S_j, dS_j pw_j, dS_j pb_j (zsums)
    if (in) {
      acc_t* e = dS + i * ld + j;
      acc_t soft = acc_t(0), s = acc_t(0);  // s: S_j, where zsums needs it
      bool s_known = true;
      if (has_lse && probs != nullptr) {
        const acc_t p = probs[n * CK + j];
        soft = softmax_grad(p, temperature, row_glse[r]);
        if (sums) {
          s_known = p >= acc_t(cuda::kMinCachedProb);
          s = s_known ? temperature * (flog(p) + row_lse[r]) : acc_t(0);
        }
      } else if (has_lse) {
        s = row_scale != nullptr ? *e * row_scale[i] : *e;
        soft = lse_grad(s, row_lse[r], temperature, row_glse[r]);
      }
      const bool is_arg = has_seg && int64_t(argk[n * C + c]) == k;
      const acc_t gs = is_arg ? grad_seg[n * C + c] : acc_t(0);
      const bool is_own = has_own && row_lab[r] == c;
      const acc_t go = is_own ? grad_own[n * K + k] : acc_t(0);
      const acc_t v = similarity_grad_entry(soft, is_arg, gs, is_own, go);
      if (sums) {
        // an underflowed cached entry: its softmax term is below 1e-30 of grad_lse / tau and dropped; a seg
        // or own term there needs the score, which the cache no longer has
        t0 = s_known ? v * s : (gs != acc_t(0) || go != acc_t(0) ? acc_t(NAN) : acc_t(0));
        t1 = v * pwj;
        t2 = v * pbj;
      }
      if (split == nullptr) {
        *e = v;
      } else {
        // bf16 parts for the tensor-core GEMM (SplitProtos): row i of split is
        // [hi | lo] or [hi | lo | hi], each C*K wide
        const float fv = static_cast<float>(v);
        const at::BFloat16 hi(fv);
        const at::BFloat16 lo(fv - static_cast<float>(hi));
        at::BFloat16* a = split + i * split_terms * CK + j;
        a[0] = hi;
        a[CK] = lo;
        if (split_terms == 3) a[2 * CK] = hi;
      }
    }
    if (sums) {  // kernel-uniform
      t0 = cuda::warp_sum(t0);
      t1 = cuda::warp_sum(t1);
      t2 = cuda::warp_sum(t2);
      if (lane == 0) {
        red[r][0][warp] = t0;
        red[r][1][warp] = t1;
        red[r][2][warp] = t2;
      }
    }
  }
  if (!sums) return;  // kernel-uniform
  __syncthreads();
  const int r = int(threadIdx.x) / 3, t = int(threadIdx.x) - 3 * r;
  if (r < cuda::kGradRows && i0 + r < rows) {
    const int warps = int(blockDim.x / kWarp);
    acc_t v = 0;
    for (int w = 0; w < warps; ++w) v += red[r][t][w];
    zsums[(int64_t(t) * gridDim.x + blockIdx.x) * zld + i0 + r] = v;
  }
}

// Host launchers of the per-row kernels above (one dtype dispatch each).

// own (N, K) of every pixel (prototype learning: own without seg or lse).
void similarity_own(const at::Tensor& f, const ProtoOperands& P, const at::Tensor& lab, int64_t C, int64_t K,
                    int64_t ignore_index, bool normalize, at::Tensor& own, cudaStream_t stream) {
  const int64_t N = f.size(0), D = f.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "similarity_own_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    similarity_own_kernel<scalar_t, acc_t><<<ceil_div(N, kRowsPerBlock), kRowThreads, 0, stream>>>(
        f.data_ptr<scalar_t>(), P.acc.data_ptr<acc_t>(), lab.data_ptr<int64_t>(), N, D, C, K, ignore_index,
        normalize, own.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// scale[i] = 1 / max(||f[row0 + i]||, eps) for the tile's rows.
void row_inv_norm(const at::Tensor& f, int64_t row0, int64_t rows, at::Tensor& scale, cudaStream_t stream) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "similarity_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    row_inv_norm_kernel<scalar_t, acc_t><<<ceil_div(rows, kRowsPerBlock), kRowThreads, 0, stream>>>(
        f.data_ptr<scalar_t>(), row0, rows, f.size(1), scale.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// grad_tile (rows, D) = d loss / d raw feats of the tile from G_tile = d loss
// / d normalised feats (normalize_backward_kernel; G_tile may be grad_tile).
void normalize_backward(const at::Tensor& f, int64_t row0, const at::Tensor& G_tile, at::Tensor& grad_tile,
                        cudaStream_t stream) {
  const int64_t rows = G_tile.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "similarity_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    normalize_backward_kernel<scalar_t, acc_t><<<ceil_div(rows, kRowsPerBlock), kRowThreads, 0, stream>>>(
        f.data_ptr<scalar_t>(), row0, rows, f.size(1), G_tile.data_ptr<acc_t>(), grad_tile.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

// ------------------------------------------------------------------ shared with embed_cuda.cu (similarity_common.cuh)

namespace cuda {

SimilarityOutputs::SimilarityOutputs(const at::TensorOptions& fopt, int64_t N, int64_t C, int64_t K, bool seg_,
                                     bool lse_, bool own_, int64_t cache_bytes)
    : compute_seg(seg_), compute_lse(lse_), compute_own(own_) {
  const auto acc = acc_type(c10::typeMetaToScalarType(fopt.dtype()));
  auto aopt = fopt.dtype(acc);
  const bool cache = compute_lse && cache_bytes > 0 && N * C * K * int64_t(at::elementSize(acc)) <= cache_bytes;
  seg = compute_seg ? at::empty({N, C}, fopt) : at::empty({0}, fopt);
  argk = compute_seg ? at::empty({N, C}, fopt.dtype(at::kByte)) : at::empty({0}, fopt.dtype(at::kByte));
  lse = compute_lse ? at::empty({N}, aopt) : at::empty({0}, aopt);
  own = compute_own ? at::zeros({N, K}, aopt) : at::empty({0}, aopt);
  probs = cache ? at::empty({N, C * K}, aopt) : at::empty({0}, aopt);
}

namespace {

constexpr size_t kWholeRowStageBytes = size_t(64) << 10;  // the most a block of whole-row stages takes

// Static shared memory of similarity_epilogue_kernel: rb.
constexpr size_t epilogue_static_smem(size_t acc_bytes) { return 2 * kEpilogueStage * acc_bytes; }

// Entries of each warp's stage in the forward epilogue (similarity_epilogue_kernel): the whole row,
// C*K, when the block's 8 rows take at most kWholeRowStageBytes (C*K <= 2,048 in fp32: ADE20K's
// 1,500 and COCO-Stuff's 1,710 at K = 10; 3 blocks of 8 warps per SM on an H100, 2 on an A100) and
// fit the device's shared memory per block; else one group of classes. 0 when nothing is staged.
int64_t epilogue_stage_cols(int64_t C, int64_t K, size_t acc_bytes, bool staged) {
  if (!staged) return 0;
  const size_t whole = size_t(kRowsPerBlock * C * K) * acc_bytes;
  if (whole <= kWholeRowStageBytes && smem_fits(epilogue_static_smem(acc_bytes), whole)) return C * K;
  return epilogue_group(K) * K;
}

}  // namespace

void similarity_epilogue(const at::Tensor& S_tile, const at::Tensor& row_scale, int64_t row0, int64_t C, int64_t K,
                         double temperature, const at::Tensor& labels, int64_t ignore_index, SimilarityOutputs& out,
                         cudaStream_t stream, const ScoreAffine* affine) {
  const int64_t rows = S_tile.size(0);
  const bool cache = out.probs.numel() > 0;
  TORCH_INTERNAL_ASSERT(affine == nullptr || !row_scale.defined(),
                        "similarity_epilogue: row_scale or affine, not both");
  const ScoreAffine a = affine != nullptr ? *affine : ScoreAffine{};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.seg.scalar_type(), "similarity_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto opt = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<acc_t>() : nullptr; };
    const bool fx = a.x.defined();  // the rows the affine map cannot give (the embedding's), from x
    TORCH_INTERNAL_ASSERT(fx || !a.stats.defined(), "similarity_epilogue: the affine map's fixed rows need x");
    const int64_t stage_cols = epilogue_stage_cols(C, K, sizeof(acc_t), out.compute_seg || out.compute_lse);
    const size_t smem = size_t(kRowsPerBlock * stage_cols) * sizeof(acc_t);
    allow_dynamic_smem(similarity_epilogue_kernel<scalar_t, acc_t>, epilogue_static_smem(sizeof(acc_t)), smem);
    similarity_epilogue_kernel<scalar_t, acc_t><<<ceil_div(rows, kRowsPerBlock), kRowThreads, smem, stream>>>(
        S_tile.data_ptr<acc_t>(), S_tile.stride(0), opt(row_scale),
        a.stats.defined() ? a.stats.data_ptr<acc_t>() + a.col : nullptr, a.stats.defined() ? a.stats.size(1) : 0,
        opt(a.rho), opt(a.beta), a.half, rows, row0, C, K, acc_t(temperature),
        out.compute_own ? labels.data_ptr<int64_t>() : nullptr, ignore_index,
        out.compute_seg, out.compute_lse, out.compute_own, out.compute_seg ? out.seg.data_ptr<scalar_t>() : nullptr,
        out.compute_seg ? out.argk.data_ptr<uint8_t>() : nullptr,
        out.compute_lse ? out.lse.data_ptr<acc_t>() : nullptr, out.compute_own ? out.own.data_ptr<acc_t>() : nullptr,
        cache ? out.probs.data_ptr<acc_t>() : nullptr, stage_cols, fx ? a.x.data_ptr<scalar_t>() : nullptr,
        fx ? a.x.stride(0) : 0, fx ? a.x.stride(1) : 0, fx ? a.x.size(1) : 0, opt(a.P), opt(a.w), opt(a.b), a.eps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

GradInputs::GradInputs(const c10::optional<at::Tensor>& grad_seg, const c10::optional<at::Tensor>& grad_lse,
                       const c10::optional<at::Tensor>& grad_own, const at::Tensor& labels, const at::Tensor& argk,
                       const at::Tensor& lse, const c10::optional<at::Tensor>& probs, bool cached_, int64_t N,
                       int64_t C_, int64_t K_, at::ScalarType acc, int64_t ignore_index_, double temperature_)
    : has_seg(grad_seg.has_value() && grad_seg->defined()),
      has_lse(grad_lse.has_value() && grad_lse->defined()),
      has_own(grad_own.has_value() && grad_own->defined()),
      cached(cached_),
      C(C_),
      K(K_),
      ignore_index(ignore_index_),
      temperature(temperature_) {
  if (has_seg) {
    gseg = grad_seg->to(acc).contiguous();
    ak = argk.to(at::kByte).contiguous();
  }
  if (has_lse) {
    glse = grad_lse->reshape({N}).to(acc).contiguous();
    l = lse.reshape({N}).to(acc).contiguous();
  }
  if (has_own) {
    gown = grad_own->to(acc).contiguous();
    lab = labels.to(at::kLong).contiguous();
  }
  if (cached) pr = probs->to(acc).contiguous();
}

template <typename acc_t>
void GradInputs::launch(at::Tensor& dS_tile, const acc_t* row_scale, int64_t row0, cudaStream_t stream,
                        at::Tensor* split, int terms, const RowSums* sums) const {
  const int64_t CK = C * K;
  const int threads = grad_epilogue_threads(CK);
  const int64_t rows = dS_tile.size(0);
  const dim3 grid(static_cast<unsigned>(grad_epilogue_parts(CK)),
                  static_cast<unsigned>(ceil_div(rows, int64_t(kGradRows))));
  const bool with_sums = sums != nullptr && has_lse;
  const at::Tensor zout = with_sums ? sums->out : at::Tensor();
  const at::Tensor pw = with_sums ? sums->pw : at::Tensor(), pb = with_sums ? sums->pb : at::Tensor();
  if (with_sums)
    TORCH_CHECK(zout.size(0) == 3 * int64_t(grid.x) && zout.size(1) >= rows,
                "grad epilogue: RowSums of the wrong shape");
  similarity_grad_epilogue_kernel<acc_t><<<grid, threads, 0, stream>>>(
      dS_tile.data_ptr<acc_t>(), dS_tile.stride(0), split != nullptr ? split->data_ptr<at::BFloat16>() : nullptr,
      terms, row_scale, row0, rows, C, K, acc_t(temperature), has_lse,
      cached ? pr.data_ptr<acc_t>() : nullptr, has_lse ? l.data_ptr<acc_t>() : nullptr,
      has_lse ? glse.data_ptr<acc_t>() : nullptr, has_seg, has_seg ? ak.data_ptr<uint8_t>() : nullptr,
      has_seg ? gseg.data_ptr<acc_t>() : nullptr, has_own, has_own ? lab.data_ptr<int64_t>() : nullptr,
      ignore_index, has_own ? gown.data_ptr<acc_t>() : nullptr, with_sums ? zout.data_ptr<acc_t>() : nullptr,
      with_sums ? zout.size(1) : 0, pw.defined() ? pw.data_ptr<acc_t>() : nullptr,
      pb.defined() ? pb.data_ptr<acc_t>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void dS_times_protos(at::Tensor& G_tile, at::Tensor& dS_tile, at::Tensor& A, const SplitProtos& sp,
                     const at::Tensor& P_acc, const GradInputs& gin, const at::Tensor& row_scale, int64_t row0,
                     cudaStream_t stream, const RowSums* sums) {
  AT_DISPATCH_FLOATING_TYPES(dS_tile.scalar_type(), "similarity_backward_cuda", [&] {
    using acc_t = scalar_t;
    const acc_t* rs = row_scale.defined() ? row_scale.data_ptr<acc_t>() : nullptr;
    if (!sp.B.defined()) {
      gin.launch<acc_t>(dS_tile, rs, row0, stream, nullptr, 0, sums);
      at::mm_out(G_tile, dS_tile, P_acc);
      return;
    }
    const int64_t CK = P_acc.size(0);
    at::Tensor A_tile = A.narrow(0, 0, dS_tile.size(0));
    gin.launch<acc_t>(dS_tile, rs, row0, stream, &A_tile, sp.terms, sums);
    if (lowp_mm_out(G_tile, A_tile, sp.B)) return;
    // no 16-bit GEMM here: dS = hi + lo back in the working dtype
    at::mm_out(G_tile,
               A_tile.narrow(1, 0, CK).to(G_tile.scalar_type()) + A_tile.narrow(1, CK, CK).to(G_tile.scalar_type()),
               P_acc);
  });
}

}  // namespace cuda

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> similarity_cuda(
    const at::Tensor& feats, const at::Tensor& protos, const at::Tensor& labels, int64_t ignore_index,
    double temperature, bool compute_seg, bool compute_lse, bool compute_own, int64_t cache_bytes, bool normalize) {
  check_similarity_args(feats, protos, labels, compute_own, temperature);
  c10::cuda::CUDAGuard guard(feats.device());
  const int64_t N = feats.size(0), C = protos.size(0), K = protos.size(1), CK = C * K;
  const auto acc = acc_type(feats.scalar_type());
  auto aopt = feats.options().dtype(acc);
  cuda::SimilarityOutputs out(feats.options(), N, C, K, compute_seg, compute_lse, compute_own, cache_bytes);
  if (N == 0 || !out.any()) return out.tuple();
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor f = feats.contiguous();
  at::Tensor lab = compute_own ? labels.to(at::kLong).contiguous() : at::Tensor();
  const ProtoOperands P = proto_operands(f, protos);

  if (compute_own && !compute_seg && !compute_lse) {  // prototype learning: K dot products per pixel
    similarity_own(f, P, lab, C, K, ignore_index, normalize, out.own, stream);
    return out.tuple();
  }

  // Per tile: S (rows, C*K) = the GEMM -> (normalize) 1 / ||x|| of its rows -> the epilogue.
  const int64_t T = cuda::tile_rows(N, CK, at::elementSize(acc));
  at::Tensor S = at::empty({T, CK}, aopt);  // one tile buffer, reused in stream order
  at::Tensor scale = normalize ? at::empty({T}, aopt) : at::Tensor();  // 1 / ||x|| of the tile's rows
  cuda::MeterTiles meter_tiles;
  for (int64_t r0 = 0; r0 < N; r0 += T) {
    const int64_t rows = std::min(T, N - r0);
    meter_tiles.next(cuda::loop_tile_rows(CK, at::elementSize(acc)), rows);
    at::Tensor S_tile = S.narrow(0, 0, rows);
    similarity_tile_gemm(S_tile, f.narrow(0, r0, rows), P);
    if (normalize) row_inv_norm(f, r0, rows, scale, stream);
    cuda::similarity_epilogue(S_tile, scale, r0, C, K, temperature, lab, ignore_index, out, stream);
  }
  return out.tuple();
}

at::Tensor similarity_backward_cuda(const c10::optional<at::Tensor>& grad_seg,
                                    const c10::optional<at::Tensor>& grad_lse,
                                    const c10::optional<at::Tensor>& grad_own, const at::Tensor& feats,
                                    const at::Tensor& protos, const at::Tensor& labels, const at::Tensor& argk,
                                    const at::Tensor& lse, int64_t ignore_index, double temperature,
                                    const c10::optional<at::Tensor>& probs_opt, bool normalize) {
  const bool has_seg = grad_seg.has_value() && grad_seg->defined();
  const bool has_lse = grad_lse.has_value() && grad_lse->defined();
  const bool has_own = grad_own.has_value() && grad_own->defined();
  check_similarity_args(feats, protos, labels, has_own, temperature);
  const bool cached = check_similarity_backward_args(feats, protos, grad_seg, grad_lse, grad_own, argk, lse, probs_opt);
  c10::cuda::CUDAGuard guard(feats.device());
  const int64_t N = feats.size(0), D = feats.size(1), C = protos.size(0), K = protos.size(1), CK = C * K;
  const auto acc = acc_type(feats.scalar_type());
  if (N == 0 || (!has_seg && !has_lse && !has_own)) return at::zeros({N, D}, feats.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto aopt = feats.options().dtype(acc);
  at::Tensor f = feats.contiguous();
  const cuda::GradInputs gin(grad_seg, grad_lse, grad_own, labels, argk, lse, probs_opt, cached, N, C, K, acc,
                             ignore_index, temperature);
  const ProtoOperands P = proto_operands(f, protos);
  const cuda::SplitProtos sp = cuda::split_protos(P.acc, f.scalar_type(), protos.scalar_type());

  // Per tile: dS (rows, C*K) -> d feats = dS @ P (rows, D) -> (normalize) d raw feats.
  at::Tensor grad = at::empty({N, D}, feats.options());
  const bool direct = grad.scalar_type() == acc;  // else the tile GEMM goes through a working-dtype buffer
  const bool recompute = has_lse && !cached;
  const int64_t T = cuda::tile_rows(N, CK, at::elementSize(acc));
  at::Tensor dS = at::empty({T, CK}, aopt);
  at::Tensor G = direct ? at::Tensor() : at::empty({T, D}, aopt);
  at::Tensor scale = normalize && recompute ? at::empty({T}, aopt) : at::Tensor();
  at::Tensor A = sp.B.defined() ? at::empty({T, sp.terms * CK}, feats.options().dtype(at::kBFloat16)) : at::Tensor();
  cuda::MeterTiles meter_tiles;
  for (int64_t r0 = 0; r0 < N; r0 += T) {
    const int64_t rows = std::min(T, N - r0);
    meter_tiles.next(cuda::loop_tile_rows(CK, at::elementSize(acc)), rows);
    at::Tensor dS_tile = dS.narrow(0, 0, rows);
    if (recompute) similarity_tile_gemm(dS_tile, f.narrow(0, r0, rows), P);  // S again (flash-attention style)
    if (scale.defined()) row_inv_norm(f, r0, rows, scale, stream);
    at::Tensor grad_tile = grad.narrow(0, r0, rows);
    at::Tensor G_tile = direct ? grad_tile : G.narrow(0, 0, rows);
    cuda::dS_times_protos(G_tile, dS_tile, A, sp, P.acc, gin, scale, r0, stream);  // d loss / d (normalised) feats
    if (normalize) {
      normalize_backward(f, r0, G_tile, grad_tile, stream);
    } else if (!direct) {
      grad_tile.copy_(G_tile);
    }
  }
  return grad;
}

TORCH_LIBRARY_IMPL(protoseg_ext, CUDA, m) {
  m.impl("similarity", &similarity_cuda);
  m.impl("similarity_backward", &similarity_backward_cuda);
}

}  // namespace protoseg

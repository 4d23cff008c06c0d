// CUDA kernels of `similarity` and `similarity_backward` (mirrors
// csrc/cpu/similarity_cpu.cpp), and of the head's embedding fused into them
// (`embed_similarity`, its backward, `embed_prototype_sums`; the section
// before the host code).
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
// (EmbedOperands::Pw16): no fp32 CUDA-core GEMM on a 16-bit map there.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "../checks.h"
#include "../protoseg_math.h"
#include "cuda_common.cuh"

namespace protoseg {
namespace {

using cuda::ceil_div;
using cuda::kWarp;

constexpr int kRowThreads = 256;                   // warp-per-row kernels: 8 rows per block
constexpr int kRowsPerBlock = kRowThreads / kWarp;
constexpr int kGradThreads = 256;                  // backward epilogue: at most this many threads per block
constexpr int64_t kTileBytes = int64_t(16) << 20;  // bytes of S per tile
constexpr int64_t kMaxTileRows = 32768;            // <= 65535: rows are gridDim.y of the backward epilogue

// Rows per tile: ~kTileBytes of S, a multiple of 128, in [128, kMaxTileRows], at most N.
int64_t tile_rows(int64_t N, int64_t CK, int64_t elem_size) {
  int64_t rows = kTileBytes / std::max<int64_t>(1, CK * elem_size);
  rows = std::min<int64_t>(kMaxTileRows, std::max<int64_t>(128, rows / 128 * 128));
  return std::min<int64_t>(rows, N);
}

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
  if ((st == at::kHalf || st == at::kBFloat16) && protos.scalar_type() == st)
    p.low = protos.reshape({CK, D}).contiguous();
  return p;
}

// Set once if this torch has no 16-bit GEMM with fp32 output for the device
// (the dispatcher has no mm.dtype_out kernel for it): such GEMMs then convert
// feats to the working dtype. (The cuda_sim emulator provides one.)
std::atomic<bool> g_lowp_gemm_unsupported{false};

// S_tile (rows, C*K) = feats_tile (rows, D) @ P.T, in the working dtype.
void similarity_tile_gemm(at::Tensor& S_tile, const at::Tensor& feats_tile, const ProtoOperands& P) {
  if (P.low.defined() && !g_lowp_gemm_unsupported.load(std::memory_order_relaxed)) {
    try {
      at::mm_out(S_tile, feats_tile, P.low.t(), at::kFloat);  // tensor cores, fp32 accumulate + output
      return;
    } catch (const c10::NotImplementedError&) {
      // only "no kernel for this backend" (raised before any launch); an
      // out-of-memory or any other error propagates and changes nothing
      g_lowp_gemm_unsupported.store(true);
    }
  }
  at::mm_out(S_tile, feats_tile.to(S_tile.scalar_type()), P.acc.t());
}

// out (fp32) = a @ b for 16-bit a, b of one dtype on tensor cores (mm.dtype_out);
// false (and nothing written) when this torch has no such GEMM for the device.
bool lowp_mm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (g_lowp_gemm_unsupported.load(std::memory_order_relaxed)) return false;
  try {
    at::mm_out(out, a, b, at::kFloat);
    return true;
  } catch (const c10::NotImplementedError&) {  // raised before any launch, as in similarity_tile_gemm
    g_lowp_gemm_unsupported.store(true);
    return false;
  }
}

bool is_16bit(at::ScalarType st) { return st == at::kHalf || st == at::kBFloat16; }

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
struct SplitProtos {
  at::Tensor B;   // (terms * C*K, D) bf16, or undefined: dS @ P stays in the working dtype
  int terms = 0;  // 2 or 3
};

SplitProtos split_protos(const at::Tensor& P_acc, at::ScalarType map_dtype, at::ScalarType protos_dtype) {
  SplitProtos s;
  if (!is_16bit(map_dtype) || g_lowp_gemm_unsupported.load(std::memory_order_relaxed)) return s;
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

// own (N, K) = S[n, labels[n]*K + k] straight from feats: K dot products per
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
// probs is given, the softmax row of S / temperature (second, coalesced pass
// over the row, which is in L1/L2 by then). With row_scale given (normalize),
// row i of S is first scaled by row_scale[i].
// Launch: kRowThreads threads, one warp per tile row, grid ceil(rows / 8);
// lane l takes classes c = l, l + 32, ..., reads their K contiguous scores
// once for both the max and the log-sum-exp; the 32 lane states merge by an
// xor butterfly (fixed order, deterministic).
// Bounds: i < rows checked (warp-uniform return); columns c*K + k and j are
// < C*K; output rows n = row0 + i < N because the host passes rows <= N - row0;
// labels asserted before indexing. Sync: each warp owns row i of the tile and
// row n of every output; shuffles only, all lanes present.
// Hot kernel: must not spill.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kRowThreads, 4) similarity_epilogue_kernel(
    const acc_t* __restrict__ S, int64_t ld, const acc_t* __restrict__ row_scale, int64_t rows, int64_t row0, int64_t C,
    int64_t K, acc_t temperature, const int64_t* __restrict__ labels, int64_t ignore_index, bool compute_seg,
    bool compute_lse, bool compute_own, scalar_t* __restrict__ seg, uint8_t* __restrict__ argk,
    acc_t* __restrict__ lse, acc_t* __restrict__ own, acc_t* __restrict__ probs) {
  const int64_t i = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x & (kWarp - 1);
  if (i >= rows) return;
  const int64_t n = row0 + i, CK = C * K;
  const acc_t* s = S + i * ld;
  const acc_t r = row_scale != nullptr ? row_scale[i] : acc_t(1);  // x * 1 == x exactly
  if (compute_seg || compute_lse) {
    LseState<acc_t> st = lse_init<acc_t>();
    for (int64_t c = lane; c < C; c += kWarp) {
      acc_t best = -INFINITY;
      int64_t arg = 0;
      for (int64_t k = 0; k < K; ++k) {
        const acc_t v = s[c * K + k] * r;
        max_push(best, arg, v, k);
        if (compute_lse) lse_push(st, v / temperature);
      }
      if (compute_seg) {
        seg[n * C + c] = static_cast<scalar_t>(best);
        argk[n * C + c] = static_cast<uint8_t>(arg);  // K <= 256
      }
    }
    if (compute_lse) {
      st = cuda::warp_lse_merge(st);  // every lane holds the same merged state
      const acc_t l = lse_value(st);
      if (lane == 0) lse[n] = l;
      if (probs != nullptr)
        for (int64_t j = lane; j < CK; j += kWarp) probs[n * CK + j] = softmax_prob(s[j] * r, l, temperature);
    }
  }
  if (compute_own) {
    const int64_t c = labels[n];
    CUDA_KERNEL_ASSERT_MSG(label_in_range(c, C) || c == ignore_index,
                           "labels: a label is outside [0, C) and is not ignore_index");
    const bool in = label_in_range(c, C);
    for (int64_t k = lane; k < K; k += kWarp) own[n * K + k] = in ? s[c * K + k] * r : acc_t(0);
  }
}

// Backward epilogue: overwrite the tile dS (rows, C*K; row stride ld) by
// d loss / d S (similarity_grad_entry), or, with split given, write its bf16
// parts there instead (rows, split_terms * C*K; see SplitProtos) and leave
// dS as it was. The softmax term comes from the cached softmax
// rows `probs` (N, C*K) when given, else from S, which the tile then holds
// (recomputed by the GEMM; its row i scaled by row_scale[i] when given);
// without has_lse the tile holds nothing yet.
// Launch: grid (ceil(C*K / threads), rows), threads = min(kGradThreads, C*K
// rounded up to 32); one thread per entry j of row i = blockIdx.y (rows <=
// 32768 < 65536). Bounds: j < C*K checked; c = j / K < C, k < K; n = row0 +
// i < N (host passes rows <= N - row0), so probs[n*CK + j] is in bounds;
// labels asserted before use; split[i * split_terms * CK + j + t * CK], t <
// split_terms, is within row i. Sync: each thread reads and writes only its own entry;
// per-row inputs are read-only.
// Hot kernel: must not spill.
template <typename acc_t>
__global__ void __launch_bounds__(kGradThreads, 4) similarity_grad_epilogue_kernel(
    acc_t* __restrict__ dS, int64_t ld, at::BFloat16* __restrict__ split, int split_terms,
    const acc_t* __restrict__ row_scale, int64_t row0, int64_t C, int64_t K,
    acc_t temperature, bool has_lse, const acc_t* __restrict__ probs, const acc_t* __restrict__ lse,
    const acc_t* __restrict__ grad_lse, bool has_seg, const uint8_t* __restrict__ argk,
    const acc_t* __restrict__ grad_seg, bool has_own, const int64_t* __restrict__ labels, int64_t ignore_index,
    const acc_t* __restrict__ grad_own) {
  const int64_t CK = C * K;
  const int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= CK) return;
  const int64_t i = blockIdx.y, n = row0 + i;
  const int64_t c = j / K, k = j - c * K;
  acc_t* e = dS + i * ld + j;
  acc_t soft = acc_t(0);
  if (has_lse && probs != nullptr) {
    soft = softmax_grad(probs[n * CK + j], temperature, grad_lse[n]);
  } else if (has_lse) {
    const acc_t s = row_scale != nullptr ? *e * row_scale[i] : *e;
    soft = lse_grad(s, lse[n], temperature, grad_lse[n]);
  }
  const bool is_arg = has_seg && int64_t(argk[n * C + c]) == k;
  const acc_t gs = is_arg ? grad_seg[n * C + c] : acc_t(0);
  bool is_own = false;
  if (has_own) {
    const int64_t lab = labels[n];
    CUDA_KERNEL_ASSERT_MSG(label_in_range(lab, C) || lab == ignore_index,
                           "labels: a label is outside [0, C) and is not ignore_index");
    is_own = lab == c;
  }
  const acc_t go = is_own ? grad_own[n * K + k] : acc_t(0);
  const acc_t v = similarity_grad_entry(soft, is_arg, gs, is_own, go);
  if (split == nullptr) {
    *e = v;
    return;
  }
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

// ------------------------------------------------------------------ the head's embedding (embed_similarity)
//
// The embedding ops read feats as checks.h's embed_rows gives them: one
// image's NCHW planes (a tile is a (pixels, D) view of stride (1, H*W): the
// map as it lies, no transposed copy) or (N, D) rows; every kernel below takes
// a tile through its (pixel, channel) strides. The algebra is that of
// csrc/cpu/plane_embed.h: with y = (x - mu) r w + b the LayerNorm's output
// (r = 1 / sqrt(var + eps)), z = y inv (inv = 1 / max(||y||, eps)) and p a
// prototype, z . p = inv (r (x . (w * p) - mu rho) + beta) where
// rho = sum_d w_d p_d and beta = sum_d b_d p_d. So one GEMM on the raw tile
// against the prototypes times w gives S, after a per-row affine map
// (embed_scores_kernel), and no normalised copy of the tile is ever written.
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
// partial sums, added in block order (deterministic).

constexpr int kEmbedThreads = 256;                     // 32 pixels (lanes) x 8 channel groups (warps)
constexpr int kEmbedGroups = kEmbedThreads / kWarp;
constexpr double kMaxFoldOffset = 16.0;                 // as plane_embed.h's kMaxOffset
constexpr int kStatCols = 4;  // stats: mu, r, inv, flags, each a column of the tile's pixels (stride rows)
constexpr int kFlagDirect = 1;                          // the row is recomputed from z (offset or overflow)
constexpr int kFlagRadial = 2;                          // ||y|| > eps: the L2 backward has its radial term
constexpr int kStatSums = 9;                            // per-thread sums of embed_stats_kernel
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

template <typename T>
__device__ __forceinline__ T clamp_nonneg(T v) {
  return v > T(0) ? v : T(0);
}

// Statistics of one pixel in double, two passes over its D entries (stride
// sd): for a finite pixel whose float sums overflowed.
template <typename scalar_t, typename acc_t>
__device__ void embed_stats_exact(const scalar_t* x, int64_t sd, int64_t D, const acc_t* w, const acc_t* b, double eps,
                                  acc_t* out, int64_t so) {
  double mu = 0, r = 1;
  if (w != nullptr) {
    for (int64_t d = 0; d < D; ++d) mu += double(static_cast<acc_t>(x[d * sd]));
    mu /= double(D);
    double var = 0;
    for (int64_t d = 0; d < D; ++d) {
      const double t = double(static_cast<acc_t>(x[d * sd])) - mu;
      var += t * t;
    }
    r = 1.0 / sqrt(var / double(D) + eps);
  }
  double sq = 0;
  for (int64_t d = 0; d < D; ++d) {
    const double v = double(static_cast<acc_t>(x[d * sd]));
    const double y = w != nullptr ? (v - mu) * r * double(w[d]) + double(b[d]) : v;
    sq += y * y;
  }
  out[0] = acc_t(mu);
  out[so] = acc_t(r);
  out[2 * so] = acc_t(inv_norm(sq));
  int flags = sqrt(sq) > kNormEps ? kFlagRadial : 0;
  if (w != nullptr && (mu < 0 ? -mu : mu) * r > kMaxFoldOffset) flags |= kFlagDirect;
  out[3 * so] = acc_t(flags);
}

// stats[c * rows + i], c = 0..3: (mu, r, inv, flags) of pixel i of a tile (w == nullptr: no
// LayerNorm, mu = 0, r = 1, inv = 1 / max(||x||, eps)); a pixel with a NaN or
// inf entry gets NaN statistics (its scores and gradient are NaN, as the
// reference's). Sums are shifted by the pixel's first entry (LayerNorm), so
// that the variance does not cancel; W2, WB, B2 (sums of w^2, w b, b^2) are
// summed alongside, so the kernel needs no other input.
// Launch: kEmbedThreads threads, grid ceil(rows / 32); lane = pixel i of the
// block, warp g = the channel chunks staged through xs (see kStageW). Bounds:
// i < rows and d < D checked at every access of x; each lane reads only
// tile entries its warp wrote (its own pixel, j < D - d0). Sync: __syncwarp
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
                       acc_t* __restrict__ stats) {
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
  if (g == 0) {  // the pixels' first entries (the shift), through warp 0's tile when the channels are contiguous
    acc_t first = 0;
    if (xpf) {
      if (valid) first = static_cast<acc_t>(xi[0]);
    } else {
      for (int e = lane; e < kWarp * W; e += kWarp) {
        int p, j;
        stage_index(e, false, W, p, j);
        if (p0 + p < rows && j < D) xs[0][p][j] = static_cast<acc_t>(x[(p0 + p) * sp + j * sd]);
      }
      __syncwarp();
      if (valid && D > 0) first = xs[0][lane][0];
    }
    kshift[lane] = ln ? first : acc_t(0);
  }
  __syncthreads();  // kshift published; warp 0's reads of xs precede its first chunk below
  const acc_t k = kshift[lane];
  for (int64_t d0 = int64_t(g) * W; d0 < D; d0 += int64_t(kEmbedGroups) * W) {  // warp-uniform
    for (int e = lane; e < kWarp * W; e += kWarp) {
      int p, j;
      stage_index(e, xpf, W, p, j);
      if (p0 + p < rows && d0 + j < D) xs[g][p][j] = static_cast<acc_t>(x[(p0 + p) * sp + (d0 + j) * sd]);
    }
    if (ln && lane < W && d0 + lane < D) {
      wb[0][g][lane] = w[d0 + lane];
      wb[1][g][lane] = b[d0 + lane];
    }
    __syncwarp();
    const int nj = int(D - d0 < W ? D - d0 : W);
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
  acc_t* out = stats + i;  // column c of the stats at out[c * rows]
  if (tot[8] > acc_t(0)) {  // a NaN or inf entry
    const acc_t nan = acc_t(NAN);
    out[0] = out[rows] = out[2 * rows] = nan;
    out[3 * rows] = acc_t(0);
    return;
  }
  acc_t mu = 0, r = 1, sq = tot[1];
  if (ln) {
    const acc_t Dt = acc_t(D);
    const acc_t dl = tot[0] / Dt;
    const acc_t var = clamp_nonneg(tot[1] / Dt - dl * dl);
    r = acc_t(1) / fsqrt(var + acc_t(eps));
    const acc_t Q = clamp_nonneg(tot[2] - acc_t(2) * dl * tot[3] + dl * dl * tot[5]);
    const acc_t L = tot[4] - dl * tot[6];
    sq = clamp_nonneg(r * r * Q + acc_t(2) * r * L + tot[7]);
    mu = k + dl;
  }
  if (!is_finite(tot[0]) || !is_finite(tot[1]) || !is_finite(sq)) {  // finite entries, overflowed sums
    embed_stats_exact(xi, sd, D, w, b, eps, out, rows);
    return;
  }
  out[0] = mu;
  out[rows] = r;
  out[2 * rows] = inv_norm(sq);
  int flags = fsqrt(sq) > acc_t(kNormEps) ? kFlagRadial : 0;
  if (ln && (mu < 0 ? -mu : mu) * r > acc_t(kMaxFoldOffset)) flags |= kFlagDirect;
  out[3 * rows] = acc_t(flags);
}

// The tile of S from the folded GEMM's (rows, C*K) output, in place (row
// stride ld; split: the GEMM's output is (rows, 2 C*K), the hi and lo halves
// of EmbedOperands, added here): S = inv (r (S - mu rho_j) + beta_j)
// (rho == nullptr: no LayerNorm, S = inv S); a row flagged kFlagDirect is
// recomputed as z . p_j from the tile of x and the unfolded prototypes P (C*K, D).
// Launch: kRowThreads threads, one warp per row, grid ceil(rows / 8).
// Bounds: i < rows (warp-uniform return), j < C*K (CK + j < ld when split), d < D. Sync: each warp
// owns its row; lane 0 writes the recomputed entries after the warp sum
// (all lanes present: the branch is per row, so per warp).
// Hot kernel: must not spill.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kRowThreads, 4) embed_scores_kernel(
    acc_t* __restrict__ S, int64_t ld, bool split, int64_t rows, int64_t CK, const acc_t* __restrict__ stats,
    const acc_t* __restrict__ rho,
    const acc_t* __restrict__ beta, const scalar_t* __restrict__ x, int64_t sp, int64_t sd, int64_t D,
    const acc_t* __restrict__ P, const acc_t* __restrict__ w, const acc_t* __restrict__ b) {
  const int64_t i = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x & (kWarp - 1);
  if (i >= rows) return;
  const acc_t* st = stats + i;  // column c at st[c * rows]
  const acc_t mu = st[0], r = st[rows], inv = st[2 * rows];
  acc_t* s = S + i * ld;
  if (!(int(st[3 * rows]) & kFlagDirect)) {
    for (int64_t j = lane; j < CK; j += kWarp) {
      const acc_t v = split ? s[j] + s[CK + j] : s[j];
      s[j] = rho != nullptr ? inv * (r * (v - mu * rho[j]) + beta[j]) : v * inv;
    }
    return;
  }
  const scalar_t* xi = x + i * sp;
  for (int64_t j = 0; j < CK; ++j) {
    acc_t a = 0;
    for (int64_t d = lane; d < D; d += kWarp) {
      const acc_t y = (static_cast<acc_t>(xi[d * sd]) - mu) * r * w[d] + b[d];
      a += y * P[j * D + d];
    }
    a = cuda::warp_sum(a);
    if (lane == 0) s[j] = a * inv;
  }
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
                      const acc_t* __restrict__ stats, const acc_t* __restrict__ w, const acc_t* __restrict__ b,
                      acc_t* __restrict__ z, const int64_t* __restrict__ slot, int64_t num_slots,
                      unsigned long long* __restrict__ counts) {
  constexpr int W = kStageW<acc_t>;
  __shared__ acc_t xs[kEmbedGroups][kWarp][W + 1];
  __shared__ acc_t wb[2][kEmbedGroups][W];  // the chunk's w and b
  const int lane = threadIdx.x & (kWarp - 1), g = threadIdx.x / kWarp;
  const int64_t p0 = int64_t(blockIdx.x) * kWarp, i = p0 + lane;
  const bool valid = i < rows, xpf = sp == 1;
  acc_t mu = 0, r = 1, inv = 0;
  if (valid) {
    const acc_t* st = stats + i;  // column c at st[c * rows]: lanes on consecutive pixels
    mu = st[0];
    r = st[rows];
    inv = st[2 * rows];
  }
  int my_slot = -1;  // slot of this lane's pixel, -1: it takes no part (with slot)
  if (slot != nullptr && valid) {
    const int64_t sl = slot[i];
    CUDA_KERNEL_ASSERT_MSG(sl < num_slots, "slot: an entry is >= num_slots");
    if (sl >= 0 && is_finite(mu) && is_finite(r) && is_finite(inv)) my_slot = int(sl);
    if (g == 0 && my_slot >= 0) atomicAdd(counts + my_slot, 1ull);
  }
  for (int64_t d0 = int64_t(g) * W; d0 < D; d0 += int64_t(kEmbedGroups) * W) {  // warp-uniform
    for (int e = lane; e < kWarp * W; e += kWarp) {
      int p, j;
      stage_index(e, xpf, W, p, j);
      if (p0 + p < rows && d0 + j < D) xs[g][p][j] = static_cast<acc_t>(x[(p0 + p) * sp + (d0 + j) * sd]);
    }
    if (w != nullptr && lane < W && d0 + lane < D) {
      wb[0][g][lane] = w[d0 + lane];
      wb[1][g][lane] = b[d0 + lane];
    }
    __syncwarp();
    const int nj = int(D - d0 < W ? D - d0 : W);
    for (int j = 0; valid && j < nj; ++j) {
      const acc_t v = xs[g][lane][j];
      const acc_t y = w != nullptr ? (v - mu) * r * wb[0][g][j] + wb[1][g][j] : v;
      xs[g][lane][j] = y * inv;
    }
    __syncwarp();
    for (int e = lane; e < kWarp * W; e += kWarp) {  // z (or the sums) along its rows
      int p, j;
      stage_index(e, false, W, p, j);
      if (slot == nullptr) {
        if (p0 + p < rows && d0 + j < D) z[(p0 + p) * D + d0 + j] = xs[g][p][j];
      } else {
        const int s = __shfl_sync(cuda::kFullMask, my_slot, p);  // every lane (e's loop is warp-uniform)
        if (s >= 0 && d0 + j < D) atomicAdd(z + int64_t(s) * D + d0 + j, xs[g][p][j]);
      }
    }
    __syncwarp();
  }
}

// d feats of a tile from G = d loss / d z (rows, D; strides gp, gd), written
// to out (strides op, od; out may be G itself: a chunk of G is read into the
// tile before the same warp writes that chunk of out, and no other warp
// touches those channels), and (w != nullptr) the block's partial sums of
// d w and d b into row blockIdx.x of part_w, part_b (gridDim.x, D). See the
// section comment for the maths.
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
// all 32 lanes (out-of-range pixels add 0); lane 0 writes its warp's partials.
// Hot kernel: must not spill.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kEmbedThreads, 2) embed_backward_kernel(
    const scalar_t* __restrict__ x, int64_t sp, int64_t sd, int64_t rows, int64_t D, const acc_t* __restrict__ stats,
    const acc_t* __restrict__ w, const acc_t* __restrict__ b, const acc_t* G, int64_t gp, int64_t gd, scalar_t* out,
    int64_t op, int64_t od, acc_t* __restrict__ part_w, acc_t* __restrict__ part_b) {
  constexpr int kSums = 5;
  constexpr int W = kStageW<acc_t>;
  __shared__ acc_t xs[kEmbedGroups][kWarp][W + 1];
  __shared__ acc_t gs[kEmbedGroups][kWarp][W + 1];
  __shared__ acc_t red[kSums][kEmbedGroups][kWarp];
  __shared__ acc_t tot[kSums][kWarp];
  const int lane = threadIdx.x & (kWarp - 1), g = threadIdx.x / kWarp;
  const int64_t p0 = int64_t(blockIdx.x) * kWarp, i = p0 + lane;
  const bool valid = i < rows, ln = w != nullptr, xpf = sp == 1, gpf = gp == 1, opf = op == 1;
  acc_t mu = 0, r = 1, inv = 0;
  bool radial = false;
  if (valid) {
    const acc_t* st = stats + i;  // column c at st[c * rows]: lanes on consecutive pixels
    mu = st[0];
    r = st[rows];
    inv = st[2 * rows];
    radial = (int(st[3 * rows]) & kFlagRadial) != 0;
  }
  acc_t a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0;  // z.G, w.G, (w xhat).G, w.z, (w xhat).z
  for (int64_t d0 = int64_t(g) * W; d0 < D; d0 += int64_t(kEmbedGroups) * W) {  // warp-uniform
    for (int e = lane; e < kWarp * W; e += kWarp) {
      int p, j;
      stage_index(e, xpf, W, p, j);
      if (p0 + p < rows && d0 + j < D) xs[g][p][j] = static_cast<acc_t>(x[(p0 + p) * sp + (d0 + j) * sd]);
      stage_index(e, gpf, W, p, j);
      if (p0 + p < rows && d0 + j < D) gs[g][p][j] = G[(p0 + p) * gp + (d0 + j) * gd];
    }
    if (ln && lane < W && d0 + lane < D) {  // the chunk's w and b, in the tiles' padding column
      xs[g][lane][W] = w[d0 + lane];
      gs[g][lane][W] = b[d0 + lane];
    }
    __syncwarp();
    const int nj = int(D - d0 < W ? D - d0 : W);
    for (int j = 0; valid && j < nj; ++j) {
      const acc_t gv = gs[g][lane][j], v = xs[g][lane][j];
      if (ln) {
        const acc_t wd = xs[g][j][W], bd = gs[g][j][W];
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
  const acc_t fg = radial ? tot[0][lane] : acc_t(0);
  const acc_t m1 = inv * (tot[1][lane] - fg * tot[3][lane]) / acc_t(D);
  const acc_t m2 = inv * (tot[2][lane] - fg * tot[4][lane]) / acc_t(D);
  for (int64_t d0 = int64_t(g) * W; d0 < D; d0 += int64_t(kEmbedGroups) * W) {  // warp-uniform
    for (int e = lane; e < kWarp * W; e += kWarp) {
      int p, j;
      stage_index(e, xpf, W, p, j);
      if (p0 + p < rows && d0 + j < D) xs[g][p][j] = static_cast<acc_t>(x[(p0 + p) * sp + (d0 + j) * sd]);
      stage_index(e, gpf, W, p, j);
      if (p0 + p < rows && d0 + j < D) gs[g][p][j] = G[(p0 + p) * gp + (d0 + j) * gd];
    }
    if (ln && lane < W && d0 + lane < D) {
      xs[g][lane][W] = w[d0 + lane];
      gs[g][lane][W] = b[d0 + lane];
    }
    __syncwarp();
    const int nj = int(D - d0 < W ? D - d0 : W);
    for (int j = 0; j < nj; ++j) {  // every lane: the warp sums below
      const int64_t d = d0 + j;
      acc_t dy = 0, xh = 0;
      if (valid) {
        const acc_t gv = gs[g][lane][j], v = xs[g][lane][j];
        const acc_t wd = ln ? xs[g][j][W] : acc_t(0), bd = ln ? gs[g][j][W] : acc_t(0);
        xh = ln ? (v - mu) * r : v;
        const acc_t z = (ln ? xh * wd + bd : v) * inv;
        dy = inv * (gv - z * fg);
        gs[g][lane][j] = ln ? r * (wd * dy - m1 - xh * m2) : dy;  // d x, in place of G's entry
      }
      if (part_w != nullptr) {
        const acc_t pw = cuda::warp_sum(dy * xh), pb = cuda::warp_sum(dy);
        if (lane == 0) {
          part_w[int64_t(blockIdx.x) * D + d] = pw;
          part_b[int64_t(blockIdx.x) * D + d] = pb;
        }
      }
    }
    __syncwarp();
    for (int e = lane; e < kWarp * W; e += kWarp) {  // d x along out's unit stride
      int p, j;
      stage_index(e, opf, W, p, j);
      if (p0 + p < rows && d0 + j < D) out[(p0 + p) * op + (d0 + j) * od] = static_cast<scalar_t>(gs[g][p][j]);
    }
    __syncwarp();
  }
}

// The outputs of `similarity` (and `embed_similarity`) for N pixels, as the
// schema has them; probs (N, C*K), the softmax rows kept for the backward
// (one GEMM saved there), only when they fit the budget.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> similarity_outputs(
    const at::TensorOptions& fopt, int64_t N, int64_t C, int64_t K, bool compute_seg, bool compute_lse,
    bool compute_own, int64_t cache_bytes) {
  const auto acc = acc_type(c10::typeMetaToScalarType(fopt.dtype()));
  auto aopt = fopt.dtype(acc);
  const bool cache = compute_lse && cache_bytes > 0 && N * C * K * int64_t(at::elementSize(acc)) <= cache_bytes;
  return {compute_seg ? at::empty({N, C}, fopt) : at::empty({0}, fopt),
          compute_seg ? at::empty({N, C}, fopt.dtype(at::kByte)) : at::empty({0}, fopt.dtype(at::kByte)),
          compute_lse ? at::empty({N}, aopt) : at::empty({0}, aopt),
          compute_own ? at::zeros({N, K}, aopt) : at::empty({0}, aopt),
          cache ? at::empty({N, C * K}, aopt) : at::empty({0}, aopt)};
}

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
             int64_t K_, at::ScalarType acc, int64_t ignore_index_, double temperature_)
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

  // dS_tile (rows, C*K; any row stride) <- d loss / d S of pixels row0 ...
  // (similarity_grad_epilogue_kernel); with split (rows, terms * C*K) bf16
  // given, its bf16 parts go there instead (SplitProtos).
  template <typename acc_t>
  void launch(at::Tensor& dS_tile, const acc_t* row_scale, int64_t row0, cudaStream_t stream,
              at::Tensor* split = nullptr, int terms = 0) const {
    const int64_t CK = C * K;
    const int threads = int(std::min<int64_t>(kGradThreads, ceil_div(CK, kWarp) * kWarp));
    const dim3 grid(static_cast<unsigned>(ceil_div(CK, threads)), static_cast<unsigned>(dS_tile.size(0)));
    similarity_grad_epilogue_kernel<acc_t><<<grid, threads, 0, stream>>>(
        dS_tile.data_ptr<acc_t>(), dS_tile.stride(0), split != nullptr ? split->data_ptr<at::BFloat16>() : nullptr,
        terms, row_scale, row0, C, K, acc_t(temperature), has_lse,
        cached ? pr.data_ptr<acc_t>() : nullptr, has_lse ? l.data_ptr<acc_t>() : nullptr,
        has_lse ? glse.data_ptr<acc_t>() : nullptr, has_seg, has_seg ? ak.data_ptr<uint8_t>() : nullptr,
        has_seg ? gseg.data_ptr<acc_t>() : nullptr, has_own, has_own ? lab.data_ptr<int64_t>() : nullptr,
        ignore_index, has_own ? gown.data_ptr<acc_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

// G_tile (rows, D) = dS @ P for the tile: the grad epilogue forms dS, and
// the GEMM runs on tensor cores from its bf16 parts when sp has them (then
// A holds the parts; dS_tile is only read, for the recomputed S), else in
// the working dtype on dS_tile itself.
template <typename acc_t>
void dS_times_protos(at::Tensor& G_tile, at::Tensor& dS_tile, at::Tensor& A, const SplitProtos& sp,
                     const at::Tensor& P_acc, const GradInputs& gin, const acc_t* row_scale, int64_t row0,
                     cudaStream_t stream) {
  if (!sp.B.defined()) {
    gin.launch<acc_t>(dS_tile, row_scale, row0, stream);
    at::mm_out(G_tile, dS_tile, P_acc);
    return;
  }
  const int64_t CK = P_acc.size(0);
  at::Tensor A_tile = A.narrow(0, 0, dS_tile.size(0));
  gin.launch<acc_t>(dS_tile, row_scale, row0, stream, &A_tile, sp.terms);
  if (lowp_mm_out(G_tile, A_tile, sp.B)) return;
  // no 16-bit GEMM here: dS = hi + lo back in the working dtype
  at::mm_out(G_tile, A_tile.narrow(1, 0, CK).to(G_tile.scalar_type()) + A_tile.narrow(1, CK, CK).to(G_tile.scalar_type()),
             P_acc);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> similarity_cuda(
    const at::Tensor& feats, const at::Tensor& protos, const at::Tensor& labels, int64_t ignore_index,
    double temperature, bool compute_seg, bool compute_lse, bool compute_own, int64_t cache_bytes, bool normalize) {
  check_similarity_args(feats, protos, labels, compute_own, temperature);
  c10::cuda::CUDAGuard guard(feats.device());
  const int64_t N = feats.size(0), D = feats.size(1), C = protos.size(0), K = protos.size(1), CK = C * K;
  const auto acc = acc_type(feats.scalar_type());
  auto aopt = feats.options().dtype(acc);
  at::Tensor seg, argk, lse, own, probs;
  std::tie(seg, argk, lse, own, probs) =
      similarity_outputs(feats.options(), N, C, K, compute_seg, compute_lse, compute_own, cache_bytes);
  const bool cache = probs.numel() > 0;
  if (N == 0 || (!compute_seg && !compute_lse && !compute_own)) return {seg, argk, lse, own, probs};
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor f = feats.contiguous();
  at::Tensor lab = compute_own ? labels.to(at::kLong).contiguous() : at::Tensor();
  const ProtoOperands P = proto_operands(f, protos);

  if (compute_own && !compute_seg && !compute_lse) {  // prototype learning: K dot products per pixel
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "similarity_own_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      similarity_own_kernel<scalar_t, acc_t><<<ceil_div(N, kRowsPerBlock), kRowThreads, 0, stream>>>(
          f.data_ptr<scalar_t>(), P.acc.data_ptr<acc_t>(), lab.data_ptr<int64_t>(), N, D, C, K, ignore_index,
          normalize, own.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return {seg, argk, lse, own, probs};
  }

  const int64_t T = tile_rows(N, CK, at::elementSize(acc));
  at::Tensor S = at::empty({T, CK}, aopt);  // one tile buffer, reused in stream order
  at::Tensor scale = normalize ? at::empty({T}, aopt) : at::Tensor();  // 1 / ||x|| of the tile's rows
  for (int64_t r0 = 0; r0 < N; r0 += T) {
    const int64_t rows = std::min(T, N - r0);
    at::Tensor S_tile = S.narrow(0, 0, rows);
    similarity_tile_gemm(S_tile, f.narrow(0, r0, rows), P);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "similarity_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const int64_t blocks = ceil_div(rows, kRowsPerBlock);
      if (normalize) {
        row_inv_norm_kernel<scalar_t, acc_t><<<blocks, kRowThreads, 0, stream>>>(f.data_ptr<scalar_t>(), r0, rows, D,
                                                                                 scale.data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      similarity_epilogue_kernel<scalar_t, acc_t><<<blocks, kRowThreads, 0, stream>>>(
          S_tile.data_ptr<acc_t>(), CK, normalize ? scale.data_ptr<acc_t>() : nullptr, rows, r0, C, K, acc_t(temperature),
          compute_own ? lab.data_ptr<int64_t>() : nullptr, ignore_index, compute_seg, compute_lse, compute_own,
          compute_seg ? seg.data_ptr<scalar_t>() : nullptr, compute_seg ? argk.data_ptr<uint8_t>() : nullptr,
          compute_lse ? lse.data_ptr<acc_t>() : nullptr, compute_own ? own.data_ptr<acc_t>() : nullptr,
          cache ? probs.data_ptr<acc_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {seg, argk, lse, own, probs};
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
  const GradInputs gin(grad_seg, grad_lse, grad_own, labels, argk, lse, probs_opt, cached, N, C, K, acc, ignore_index,
                       temperature);
  const ProtoOperands P = proto_operands(f, protos);
  const SplitProtos sp = split_protos(P.acc, f.scalar_type(), protos.scalar_type());

  // Per tile: dS (rows, C*K) -> d feats = dS @ P (rows, D) -> (normalize) d raw feats.
  at::Tensor grad = at::empty({N, D}, feats.options());
  const bool direct = grad.scalar_type() == acc;  // else the tile GEMM goes through a working-dtype buffer
  const bool recompute = has_lse && !cached;
  const int64_t T = tile_rows(N, CK, at::elementSize(acc));
  at::Tensor dS = at::empty({T, CK}, aopt);
  at::Tensor G = direct ? at::Tensor() : at::empty({T, D}, aopt);
  at::Tensor scale = normalize && recompute ? at::empty({T}, aopt) : at::Tensor();
  at::Tensor A = sp.B.defined() ? at::empty({T, sp.terms * CK}, feats.options().dtype(at::kBFloat16)) : at::Tensor();
  for (int64_t r0 = 0; r0 < N; r0 += T) {
    const int64_t rows = std::min(T, N - r0);
    const int64_t row_blocks = ceil_div(rows, kRowsPerBlock);
    at::Tensor dS_tile = dS.narrow(0, 0, rows);
    if (recompute) similarity_tile_gemm(dS_tile, f.narrow(0, r0, rows), P);  // S again (flash-attention style)
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "similarity_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      if (scale.defined()) {
        row_inv_norm_kernel<scalar_t, acc_t><<<row_blocks, kRowThreads, 0, stream>>>(f.data_ptr<scalar_t>(), r0, rows,
                                                                                     D, scale.data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      at::Tensor grad_tile = grad.narrow(0, r0, rows);
      at::Tensor G_tile = direct ? grad_tile : G.narrow(0, 0, rows);
      dS_times_protos<acc_t>(G_tile, dS_tile, A, sp, P.acc, gin, scale.defined() ? scale.data_ptr<acc_t>() : nullptr,
                             r0, stream);  // (rows, D): d loss / d (normalised) feats
      if (normalize) {
        normalize_backward_kernel<scalar_t, acc_t><<<row_blocks, kRowThreads, 0, stream>>>(
            f.data_ptr<scalar_t>(), r0, rows, D, G_tile.data_ptr<acc_t>(), grad_tile.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else if (!direct) {
        grad_tile.copy_(G_tile);
      }
    });
  }
  return grad;
}

namespace {

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
// the scores kernel adds (X hi^T + X lo^T). Pw itself is not rounded to 16
// bits (2^-9 relative per entry in bf16, magnified up to kMaxFoldOffset
// times by the fold's cancellation of mu rho): hi + lo carries 16 (bf16) or
// 22 (fp16) significant bits, and is exact when w and P are bf16 (the
// product of two 8-bit significands has 16 bits). Pw and rho are then those
// of hi + lo, so that the fold's mu rho cancels what the GEMM computed.
// fp16 has a narrow range: an fp16 map takes the split only when every
// |Pw| < 2^15 (else Pw16 stays undefined and the tile goes to fp32).
struct EmbedOperands {
  at::Tensor w, b, P, Pw, rho, beta;
  at::Tensor Pw16;  // (2 C*K, D) in the map's 16-bit dtype, or undefined
  double eps = 0;
};

EmbedOperands embed_operands(const at::Tensor& rows, const at::Tensor& protos, bool ln,
                             const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                             double eps) {
  const auto acc = acc_type(rows.scalar_type());
  EmbedOperands e;
  e.eps = eps;
  if (ln) {
    e.w = weight->to(acc).contiguous();
    e.b = bias->to(acc).contiguous();
  }
  if (protos.defined()) {
    e.P = protos.reshape({-1, protos.size(2)}).to(acc).contiguous();
    e.Pw = ln ? (e.P * e.w).contiguous() : e.P;
    const auto st = rows.scalar_type();
    if (is_16bit(st) && !g_lowp_gemm_unsupported.load(std::memory_order_relaxed) &&
        (st == at::kBFloat16 || e.Pw.abs().max().item<double>() < 32768.0)) {  // fp16: one check per call
      const at::Tensor hi = e.Pw.to(st), lo = (e.Pw - hi.to(acc)).to(st);
      e.Pw16 = at::cat({hi, lo}).contiguous();
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

// stats of the tile X (count, D): column c (mu, r, inv, flags) at stats[c * count ...], in a buffer of at
// least kStatCols * count entries.
template <typename scalar_t, typename acc_t>
void launch_embed_stats(const at::Tensor& X, const EmbedOperands& e, at::Tensor& stats, cudaStream_t stream) {
  const int64_t n = X.size(0);
  embed_stats_kernel<scalar_t, acc_t><<<ceil_div(n, kWarp), kEmbedThreads, 0, stream>>>(
      X.data_ptr<scalar_t>(), X.stride(0), X.stride(1), n, X.size(1), ptr_or_null<acc_t>(e.w),
      ptr_or_null<acc_t>(e.b), e.eps, stats.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The scores of the tile X's embedding, and its stats, into Sbuf (count,
// ld) rows of the tile buffer (ld = 2 C*K when e.Pw16 is defined: the split
// GEMM's output fills the whole row, else C*K); returns S_tile, the (count,
// C*K) view of the scores (row stride ld).
template <typename scalar_t, typename acc_t>
at::Tensor embed_tile_scores(const at::Tensor& Sbuf, int64_t CK, const at::Tensor& X, const EmbedOperands& e,
                             at::Tensor& stats, cudaStream_t stream) {
  const int64_t n = X.size(0), D = X.size(1);
  launch_embed_stats<scalar_t, acc_t>(X, e, stats, stream);
  at::Tensor S_tile = Sbuf.narrow(1, 0, CK);
  bool split = false;
  if (e.Pw16.defined()) {  // tensor cores, (n, 2 C*K): X hi^T | X lo^T
    at::Tensor S2 = Sbuf.narrow(1, 0, 2 * CK);
    split = lowp_mm_out(S2, X, e.Pw16.t());
  }
  if (!split)
    at::mm_out(S_tile, X.scalar_type() == S_tile.scalar_type() ? X : X.to(S_tile.scalar_type()), e.Pw.t());
  embed_scores_kernel<scalar_t, acc_t><<<ceil_div(n, kRowsPerBlock), kRowThreads, 0, stream>>>(
      Sbuf.data_ptr<acc_t>(), Sbuf.stride(0), split, n, CK, stats.data_ptr<acc_t>(), ptr_or_null<acc_t>(e.rho),
      ptr_or_null<acc_t>(e.beta), X.data_ptr<scalar_t>(), X.stride(0), X.stride(1), D, e.P.data_ptr<acc_t>(),
      ptr_or_null<acc_t>(e.w), ptr_or_null<acc_t>(e.b));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return S_tile;
}

}  // namespace

// `similarity` of the head's embedding (see the section comment above the
// embedding kernels): per tile, the statistics, one GEMM on the raw tile, the
// per-row affine map, then the epilogue of `similarity`.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> embed_similarity_cuda(
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
  at::Tensor seg, argk, lse, own, probs;
  std::tie(seg, argk, lse, own, probs) =
      similarity_outputs(feats.options(), N, C, K, compute_seg, compute_lse, compute_own, cache_bytes);
  const bool cache = probs.numel() > 0;
  if (N == 0 || (!compute_seg && !compute_lse && !compute_own)) return {seg, argk, lse, own, probs};
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor lab = compute_own ? labels.to(at::kLong).contiguous() : at::Tensor();
  const EmbedOperands e = embed_operands(rows, protos, ln, ln_weight, ln_bias, ln_eps);
  const int64_t T = tile_rows(N, CK, at::elementSize(acc));
  const int64_t ld = e.Pw16.defined() ? 2 * CK : CK;
  at::Tensor S = at::empty({T, ld}, aopt);  // one tile buffer, reused in stream order
  at::Tensor stats = at::empty({kStatCols, T}, aopt);
  for (const PixelTile& t : pixel_tiles(rows, T)) {
    const at::Tensor X = t.of(rows);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "embed_similarity_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const at::Tensor S_tile = embed_tile_scores<scalar_t, acc_t>(S.narrow(0, 0, t.count), CK, X, e, stats, stream);
      similarity_epilogue_kernel<scalar_t, acc_t><<<ceil_div(t.count, kRowsPerBlock), kRowThreads, 0, stream>>>(
          S_tile.data_ptr<acc_t>(), ld, nullptr, t.count, t.n0, C, K, acc_t(temperature),
          compute_own ? lab.data_ptr<int64_t>() : nullptr, ignore_index, compute_seg, compute_lse, compute_own,
          compute_seg ? seg.data_ptr<scalar_t>() : nullptr, compute_seg ? argk.data_ptr<uint8_t>() : nullptr,
          compute_lse ? lse.data_ptr<acc_t>() : nullptr, compute_own ? own.data_ptr<acc_t>() : nullptr,
          cache ? probs.data_ptr<acc_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {seg, argk, lse, own, probs};
}

// d feats, d ln_weight, d ln_bias of embed_similarity: per tile, dS as in
// similarity_backward (S recomputed through the folded GEMM unless cached),
// G = dS P into the gradient's own tile, then embed_backward_kernel in place.
std::tuple<at::Tensor, at::Tensor, at::Tensor> embed_similarity_backward_cuda(
    const c10::optional<at::Tensor>& grad_seg, const c10::optional<at::Tensor>& grad_lse,
    const c10::optional<at::Tensor>& grad_own, const at::Tensor& feats, const c10::optional<at::Tensor>& ln_weight,
    const c10::optional<at::Tensor>& ln_bias, double ln_eps, const at::Tensor& protos, const at::Tensor& labels,
    const at::Tensor& argk, const at::Tensor& lse, int64_t ignore_index, double temperature,
    const c10::optional<at::Tensor>& probs_opt) {
  at::NoGradGuard no_grad;  // the GEMMs write into buffers
  const bool has_seg = grad_seg.has_value() && grad_seg->defined();
  const bool has_lse = grad_lse.has_value() && grad_lse->defined();
  const bool has_own = grad_own.has_value() && grad_own->defined();
  const at::Tensor rows = embed_rows(feats);
  const at::Tensor shape = embed_checked_shape(rows);
  check_similarity_args(shape, protos, labels, has_own, temperature);
  const bool cached = check_similarity_backward_args(shape, protos, grad_seg, grad_lse, grad_own, argk, lse, probs_opt);
  const bool ln = check_embed_layer_norm(rows, ln_weight, ln_bias, ln_eps);
  c10::cuda::CUDAGuard guard(feats.device());
  const int64_t N = shape.size(0), D = shape.size(1), C = protos.size(0), K = protos.size(1), CK = C * K;
  const auto acc = acc_type(feats.scalar_type());
  auto aopt = feats.options().dtype(acc);
  at::Tensor grad = at::empty(rows.sizes(), feats.options());  // laid out as the rows
  at::Tensor dw = ln ? at::zeros({D}, aopt) : at::empty({0}, feats.options());
  at::Tensor db = ln ? at::zeros({D}, aopt) : at::empty({0}, feats.options());
  auto finish = [&]() -> std::tuple<at::Tensor, at::Tensor, at::Tensor> {
    at::Tensor g = embed_grad_as_feats(grad, rows, feats);
    if (!ln) return {g, dw, db};
    return {g, dw.to(ln_weight->scalar_type()), db.to(ln_bias->scalar_type())};
  };
  if (N == 0 || (!has_seg && !has_lse && !has_own)) {
    grad.zero_();
    return finish();
  }
  auto stream = c10::cuda::getCurrentCUDAStream();
  const GradInputs gin(grad_seg, grad_lse, grad_own, labels, argk, lse, probs_opt, cached, N, C, K, acc, ignore_index,
                       temperature);
  const EmbedOperands e = embed_operands(rows, protos, ln, ln_weight, ln_bias, ln_eps);
  const bool direct = grad.scalar_type() == acc;  // else G goes through a working-dtype buffer
  const bool recompute = has_lse && !cached;
  const int64_t T = tile_rows(N, CK, at::elementSize(acc));
  const SplitProtos sp = split_protos(e.P, rows.scalar_type(), protos.scalar_type());
  at::Tensor dS = at::empty({T, recompute && e.Pw16.defined() ? 2 * CK : CK}, aopt);
  at::Tensor A = sp.B.defined() ? at::empty({T, sp.terms * CK}, feats.options().dtype(at::kBFloat16)) : at::Tensor();
  at::Tensor stats = at::empty({kStatCols, T}, aopt);
  at::Tensor G = direct ? at::Tensor() : at::empty({T, D}, aopt);
  const int64_t max_blocks = ceil_div(T, kWarp);
  at::Tensor part_w = ln ? at::empty({max_blocks, D}, aopt) : at::Tensor();  // per-block partial d w, d b
  at::Tensor part_b = ln ? at::empty({max_blocks, D}, aopt) : at::Tensor();
  for (const PixelTile& t : pixel_tiles(rows, T)) {
    const at::Tensor X = t.of(rows);
    at::Tensor dS_tile = dS.narrow(0, 0, t.count).narrow(1, 0, CK);
    at::Tensor grad_tile = t.of(grad);
    at::Tensor G_tile = direct ? grad_tile : G.narrow(0, 0, t.count);
    const int64_t blocks = ceil_div(t.count, kWarp);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "embed_similarity_backward_cuda",
                                    [&] {
      using acc_t = at::opmath_type<scalar_t>;
      if (recompute) {
        embed_tile_scores<scalar_t, acc_t>(dS.narrow(0, 0, t.count), CK, X, e, stats, stream);  // S, the stats
      } else {
        launch_embed_stats<scalar_t, acc_t>(X, e, stats, stream);
      }
      dS_times_protos<acc_t>(G_tile, dS_tile, A, sp, e.P, gin, nullptr, t.n0, stream);  // (count, D): d loss / d z
      embed_backward_kernel<scalar_t, acc_t><<<blocks, kEmbedThreads, 0, stream>>>(
          X.data_ptr<scalar_t>(), X.stride(0), X.stride(1), t.count, D, stats.data_ptr<acc_t>(),
          ptr_or_null<acc_t>(e.w), ptr_or_null<acc_t>(e.b), G_tile.data_ptr<acc_t>(), G_tile.stride(0),
          G_tile.stride(1), grad_tile.data_ptr<scalar_t>(), grad_tile.stride(0), grad_tile.stride(1),
          ln ? part_w.data_ptr<acc_t>() : nullptr, ln ? part_b.data_ptr<acc_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    if (ln) {  // the tile's partials, in block order
      dw.add_(part_w.narrow(0, 0, blocks).sum(0));
      db.add_(part_b.narrow(0, 0, blocks).sum(0));
    }
  }
  return finish();
}

// prototype_sums of the head's embedding, never a copy of the whole map.
// Atomic path (the default): per image, the statistics and one fused kernel
// that adds each pixel's embedding into the sums (embed_rows_kernel with
// slot). Deterministic (torch.use_deterministic_algorithms): per tile, the
// statistics, the tile's embedding z (count, D) in a reused buffer, and
// prototype_sums_cuda's sorted segments on it, tiles added in order.
std::tuple<at::Tensor, at::Tensor> prototype_sums_cuda(const at::Tensor& feats, const at::Tensor& slot,
                                                       int64_t num_slots, bool normalize);  // prototype_update_cuda.cu

std::tuple<at::Tensor, at::Tensor> embed_prototype_sums_cuda(const at::Tensor& feats,
                                                             const c10::optional<at::Tensor>& ln_weight,
                                                             const c10::optional<at::Tensor>& ln_bias, double ln_eps,
                                                             const at::Tensor& slot, int64_t num_slots) {
  at::NoGradGuard no_grad;
  const at::Tensor rows = check_embed_prototype_sums_args(feats, slot, num_slots);
  const at::Tensor shape = embed_checked_shape(rows);
  const bool ln = check_embed_layer_norm(rows, ln_weight, ln_bias, ln_eps);
  c10::cuda::CUDAGuard guard(feats.device());
  const int64_t N = shape.size(0), D = shape.size(1);
  const auto acc = acc_type(feats.scalar_type());
  auto aopt = feats.options().dtype(acc);
  at::Tensor sums = at::zeros({num_slots, D}, aopt);
  at::Tensor counts = at::zeros({num_slots}, aopt);
  if (N == 0 || num_slots == 0) return {sums, counts};
  auto stream = c10::cuda::getCurrentCUDAStream();
  const EmbedOperands e = embed_operands(rows, at::Tensor(), ln, ln_weight, ln_bias, ln_eps);
  if (!at::globalContext().deterministicAlgorithms()) {
    // atomic path, fused: the statistics, then each pixel's embedding added
    // straight into the sums (embed_rows_kernel with slot): two launches per
    // image, no z buffer, nothing zeroed but the outputs
    const int64_t T = rows.dim() == 3 ? rows.size(2) : N;  // one tile per image
    at::Tensor stats = at::empty({kStatCols, T}, aopt);
    at::Tensor sl = slot.to(at::kLong).contiguous();
    at::Tensor icounts = at::zeros({num_slots}, feats.options().dtype(at::kLong));
    for (const PixelTile& t : pixel_tiles(rows, T)) {
      const at::Tensor X = t.of(rows);
      const at::Tensor sl_tile = sl.narrow(0, t.n0, t.count);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "embed_prototype_sums_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        launch_embed_stats<scalar_t, acc_t>(X, e, stats, stream);
        embed_rows_kernel<scalar_t, acc_t><<<ceil_div(t.count, kWarp), kEmbedThreads, 0, stream>>>(
            X.data_ptr<scalar_t>(), X.stride(0), X.stride(1), t.count, D, stats.data_ptr<acc_t>(),
            ptr_or_null<acc_t>(e.w), ptr_or_null<acc_t>(e.b), sums.data_ptr<acc_t>(),
            sl_tile.data_ptr<int64_t>(), num_slots, reinterpret_cast<unsigned long long*>(icounts.data_ptr<int64_t>()));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    counts.copy_(icounts);
    return {sums, counts};
  }
  const int64_t T = std::min<int64_t>(N, std::max<int64_t>(128, kTileBytes / std::max<int64_t>(1, D * int64_t(at::elementSize(acc)))));
  at::Tensor Z = at::empty({T, D}, aopt);
  at::Tensor stats = at::empty({kStatCols, T}, aopt);
  for (const PixelTile& t : pixel_tiles(rows, T)) {
    const at::Tensor X = t.of(rows);
    at::Tensor Z_tile = Z.narrow(0, 0, t.count);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "embed_prototype_sums_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      launch_embed_stats<scalar_t, acc_t>(X, e, stats, stream);
      embed_rows_kernel<scalar_t, acc_t><<<ceil_div(t.count, kWarp), kEmbedThreads, 0, stream>>>(
          X.data_ptr<scalar_t>(), X.stride(0), X.stride(1), t.count, D, stats.data_ptr<acc_t>(),
          ptr_or_null<acc_t>(e.w), ptr_or_null<acc_t>(e.b), Z_tile.data_ptr<acc_t>(), nullptr, 0, nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    auto part = prototype_sums_cuda(Z_tile, slot.narrow(0, t.n0, t.count), num_slots, false);
    sums.add_(std::get<0>(part));
    counts.add_(std::get<1>(part));
  }
  return {sums, counts};
}

TORCH_LIBRARY_IMPL(protoseg_ext, CUDA, m) {
  m.impl("similarity", &similarity_cuda);
  m.impl("similarity_backward", &similarity_backward_cuda);
  m.impl("embed_similarity", &embed_similarity_cuda);
  m.impl("embed_similarity_backward", &embed_similarity_backward_cuda);
  m.impl("embed_prototype_sums", &embed_prototype_sums_cuda);
}

}  // namespace protoseg

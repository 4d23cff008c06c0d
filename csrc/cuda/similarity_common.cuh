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

#include "cuda_common.cuh"

namespace protoseg {
namespace cuda {

constexpr int kRowThreads = 256;                   // warp-per-row kernels: 8 rows per block
constexpr int kRowsPerBlock = kRowThreads / kWarp;
constexpr int kEpilogueStage = 512;                // scores a warp of the forward epilogue stages (K <= 256)
constexpr int64_t kTileBytes = int64_t(16) << 20;  // bytes of S per tile
constexpr int64_t kMaxTileRows = 32768;            // <= 65535: rows are gridDim.y of the backward epilogue

// Rows per tile: ~kTileBytes of S, a multiple of 128, in [128, kMaxTileRows], at most N.
inline int64_t tile_rows(int64_t N, int64_t CK, int64_t elem_size) {
  int64_t rows = kTileBytes / std::max<int64_t>(1, CK * elem_size);
  rows = std::min<int64_t>(kMaxTileRows, std::max<int64_t>(128, rows / 128 * 128));
  return std::min<int64_t>(rows, N);
}

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

// The forward epilogue of the tile S_tile (rows, C*K; any row stride) of
// pixels row0 ...: their rows of out (row i of S scaled by row_scale[i] when
// row_scale is defined); labels (N,) int64 when out computes own.
void similarity_epilogue(const at::Tensor& S_tile, const at::Tensor& row_scale, int64_t row0, int64_t C, int64_t K,
                         double temperature, const at::Tensor& labels, int64_t ignore_index, SimilarityOutputs& out,
                         cudaStream_t stream);

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
  // given, its bf16 parts go there instead (SplitProtos).
  template <typename acc_t>
  void launch(at::Tensor& dS_tile, const acc_t* row_scale, int64_t row0, cudaStream_t stream,
              at::Tensor* split = nullptr, int terms = 0) const;
};

// G_tile (rows, D) = dS @ P for the tile of pixels row0 ...: the grad
// epilogue forms dS, and the GEMM runs on tensor cores from its bf16 parts
// when sp has them (then A holds the parts; dS_tile is only read, for the
// recomputed S), else in the working dtype on dS_tile itself. row_scale as
// for similarity_epilogue (the recomputed S's rows), or undefined.
void dS_times_protos(at::Tensor& G_tile, at::Tensor& dS_tile, at::Tensor& A, const SplitProtos& sp,
                     const at::Tensor& P_acc, const GradInputs& gin, const at::Tensor& row_scale, int64_t row0,
                     cudaStream_t stream);

}  // namespace cuda
}  // namespace protoseg

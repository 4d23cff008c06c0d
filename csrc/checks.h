// Argument checks shared by the CPU and CUDA front ends. TORCH_CHECK_VALUE
// raises a Python ValueError; every message names the argument.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <limits>
#include <utility>

namespace protoseg {

inline void check_floating(const at::Tensor& t, const char* name) {
  auto st = t.scalar_type();
  TORCH_CHECK_VALUE(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
                    name, " must be float32, float64, float16 or bfloat16, got ", st);
}

inline void check_integer(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(at::isIntegralType(t.scalar_type(), /*includeBool=*/false), name,
                    " must be an integer tensor, got ", t.scalar_type());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name, const char* shape) {
  TORCH_CHECK_VALUE(t.dim() == dim, name, " must be ", shape, ", got shape ", t.sizes());
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* name_a, const char* name_b) {
  TORCH_CHECK_VALUE(a.device() == b.device(), name_a, " is on ", a.device(), " but ", name_b, " is on ",
                    b.device(), "; all inputs must be on one device");
}

// Working (accumulation) dtype: float64 for float64 inputs, else float32.
inline at::ScalarType acc_type(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

// ---- One function per op: what every backend requires of its arguments.
// Limits of one backend's kernels (launch dimensions, block sizes) stay with it.

// similarity, similarity_backward: feats (N, D), protos (C, K, D), labels (N,)
// when the own-class scores are involved.
inline void check_similarity_args(const at::Tensor& feats, const at::Tensor& protos, const at::Tensor& labels,
                                  bool need_labels, double temperature) {
  check_dim(feats, 2, "feats", "(N, D)");
  check_dim(protos, 3, "protos", "(C, K, D)");
  check_floating(feats, "feats");
  check_floating(protos, "protos");
  TORCH_CHECK_VALUE(protos.size(2) == feats.size(1), "protos must be (C, K, D) with D = feats.shape[1] = ",
                    feats.size(1), ", got shape ", protos.sizes());
  TORCH_CHECK_VALUE(protos.size(0) >= 1, "protos: C (classes) must be >= 1, got ", protos.size(0));
  TORCH_CHECK_VALUE(protos.size(1) >= 1 && protos.size(1) <= 256,
                    "protos: K (prototypes per class) must be in [1, 256], got ", protos.size(1));
  TORCH_CHECK_VALUE(protos.size(0) * protos.size(1) <= std::numeric_limits<int32_t>::max(),
                    "protos: C*K must fit in int32, got ", protos.size(0) * protos.size(1));
  check_same_device(feats, protos, "feats", "protos");
  if (need_labels) {
    check_dim(labels, 1, "labels", "(N,)");
    check_integer(labels, "labels");
    TORCH_CHECK_VALUE(labels.size(0) == feats.size(0), "labels must have N = ", feats.size(0), " entries, got ",
                      labels.size(0));
    check_same_device(feats, labels, "feats", "labels");
  }
  TORCH_CHECK_VALUE(temperature > 0, "temperature must be > 0, got ", temperature);
}

// similarity_backward: the upstream gradients that are given, and the saved
// tensors they need. Returns whether the softmax cache `probs` is used.
inline bool check_similarity_backward_args(const at::Tensor& feats, const at::Tensor& protos,
                                           const c10::optional<at::Tensor>& grad_seg,
                                           const c10::optional<at::Tensor>& grad_lse,
                                           const c10::optional<at::Tensor>& grad_own, const at::Tensor& argk,
                                           const at::Tensor& lse, const c10::optional<at::Tensor>& probs) {
  const int64_t N = feats.size(0), C = protos.size(0), K = protos.size(1);
  const bool has_lse = grad_lse.has_value() && grad_lse->defined();
  if (grad_seg.has_value() && grad_seg->defined()) {
    TORCH_CHECK_VALUE(grad_seg->sizes() == at::IntArrayRef({N, C}), "grad_seg must be (N, C), got shape ",
                      grad_seg->sizes());
    TORCH_CHECK_VALUE(argk.sizes() == at::IntArrayRef({N, C}), "argk must be (N, C), got shape ", argk.sizes());
    check_same_device(feats, *grad_seg, "feats", "grad_seg");
    check_same_device(feats, argk, "feats", "argk");
  }
  if (has_lse) {
    TORCH_CHECK_VALUE(grad_lse->numel() == N && lse.numel() == N, "grad_lse and lse must be (N,)");
    check_same_device(feats, *grad_lse, "feats", "grad_lse");
    check_same_device(feats, lse, "feats", "lse");
  }
  if (grad_own.has_value() && grad_own->defined()) {
    TORCH_CHECK_VALUE(grad_own->sizes() == at::IntArrayRef({N, K}), "grad_own must be (N, K), got shape ",
                      grad_own->sizes());
    check_same_device(feats, *grad_own, "feats", "grad_own");
  }
  const bool cached = has_lse && probs.has_value() && probs->defined() && probs->numel() > 0;
  if (cached) {
    TORCH_CHECK_VALUE(probs->sizes() == at::IntArrayRef({N, C * K}), "probs must be (N, C*K) or (0,), got shape ",
                      probs->sizes());
    check_same_device(feats, *probs, "feats", "probs");
  }
  return cached;
}

// sinkhorn: own (N, K), labels (N,)
inline void check_sinkhorn_args(const at::Tensor& own, const at::Tensor& labels, int64_t num_classes, int64_t iters,
                                double eps) {
  check_dim(own, 2, "own", "(N, K)");
  check_floating(own, "own");
  check_dim(labels, 1, "labels", "(N,)");
  check_integer(labels, "labels");
  TORCH_CHECK_VALUE(labels.size(0) == own.size(0), "labels must have N = ", own.size(0), " entries, got ",
                    labels.size(0));
  TORCH_CHECK_VALUE(num_classes >= 1, "num_classes must be >= 1, got ", num_classes);
  TORCH_CHECK_VALUE(num_classes < std::numeric_limits<int32_t>::max(), "num_classes must fit in int32, got ",
                    num_classes);
  TORCH_CHECK_VALUE(iters >= 1, "sinkhorn_iters must be >= 1, got ", iters);
  TORCH_CHECK_VALUE(eps > 0, "sinkhorn_eps must be > 0, got ", eps);
  check_same_device(own, labels, "own", "labels");
}

// prototype_sums: feats (N, D), slot (N,) in [-1, num_slots)
inline void check_prototype_sums_args(const at::Tensor& feats, const at::Tensor& slot, int64_t num_slots) {
  check_dim(feats, 2, "feats", "(N, D)");
  check_floating(feats, "feats");
  check_dim(slot, 1, "slot", "(N,)");
  check_integer(slot, "slot");
  TORCH_CHECK_VALUE(slot.size(0) == feats.size(0), "slot must have N = ", feats.size(0), " entries, got ",
                    slot.size(0));
  TORCH_CHECK_VALUE(num_slots >= 0, "num_slots must be >= 0, got ", num_slots);
  TORCH_CHECK_VALUE(num_slots < std::numeric_limits<int32_t>::max(), "num_slots must fit in int32, got ", num_slots);
  check_same_device(feats, slot, "feats", "slot");
}

// prototype_ema: protos (C, K, D), sums (C*K, D), counts (C*K,)
inline void check_prototype_ema_args(const at::Tensor& protos, const at::Tensor& sums, const at::Tensor& counts,
                                     double gamma) {
  check_dim(protos, 3, "protos", "(C, K, D)");
  check_floating(protos, "protos");
  const int64_t CK = protos.size(0) * protos.size(1), D = protos.size(2);
  TORCH_CHECK_VALUE(sums.numel() == CK * D, "sums must have C*K*D = ", CK * D, " elements, got shape ", sums.sizes());
  TORCH_CHECK_VALUE(counts.numel() == CK, "counts must have C*K = ", CK, " elements, got shape ", counts.sizes());
  TORCH_CHECK_VALUE(gamma >= 0 && gamma <= 1, "gamma must be in [0, 1], got ", gamma);
  check_same_device(protos, sums, "protos", "sums");
  check_same_device(protos, counts, "protos", "counts");
}

// The embedding ops (embed_similarity, embed_prototype_sums) read feats (N, D)
// or (B, D, H, W) as these rows: the NCHW planes (B, D, HW) when each (H, W)
// plane is contiguous, else the (N, D) rows of the map (a view for
// channels-last; a copy otherwise).
inline at::Tensor embed_rows(const at::Tensor& feats) {
  TORCH_CHECK_VALUE(feats.dim() == 2 || feats.dim() == 4, "feats must be (N, D) or (B, D, H, W), got shape ",
                    feats.sizes());
  if (feats.dim() == 2) return feats;
  at::Tensor planes = feats.flatten(2);
  if (planes.stride(2) == 1 || planes.size(2) <= 1) return planes;
  return feats.permute({0, 2, 3, 1}).reshape({-1, feats.size(1)});
}

// An (N, D) stand-in (no storage) of embed_rows' result, for the shared argument checks.
inline at::Tensor embed_checked_shape(const at::Tensor& rows) {
  const int64_t N = rows.dim() == 3 ? rows.size(0) * rows.size(2) : rows.size(0);
  return at::empty_strided({N, rows.size(1)}, {0, 0}, rows.options());
}

// embed_prototype_sums: the rows of feats (embed_rows), after the rules of prototype_sums.
inline at::Tensor check_embed_prototype_sums_args(const at::Tensor& feats, const at::Tensor& slot,
                                                  int64_t num_slots) {
  const at::Tensor rows = embed_rows(feats);
  check_floating(rows, "feats");
  check_prototype_sums_args(embed_checked_shape(rows), slot, num_slots);
  return rows;
}

// The LayerNorm's weight and bias (D,) of the embedding ops: both given or
// both absent; true when given.
inline bool check_embed_layer_norm(const at::Tensor& rows, const c10::optional<at::Tensor>& weight,
                                   const c10::optional<at::Tensor>& bias, double eps) {
  const bool ln = weight.has_value() && weight->defined();
  TORCH_CHECK_VALUE(ln == (bias.has_value() && bias->defined()), "ln_weight and ln_bias must be given together");
  if (!ln) return false;
  const int64_t D = rows.size(1);
  TORCH_CHECK_VALUE(weight->dim() == 1 && weight->size(0) == D, "ln_weight must be (D,) = (", D, ",), got shape ",
                    weight->sizes());
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == D, "ln_bias must be (D,) = (", D, ",), got shape ",
                    bias->sizes());
  TORCH_CHECK_VALUE(eps > 0, "ln_eps must be > 0, got ", eps);
  check_same_device(rows, *weight, "feats", "ln_weight");
  check_same_device(rows, *bias, "feats", "ln_bias");
  return true;
}

// The stats of embed_similarity given to its backward or embed_prototype_sums:
// None, (0,) (the same: none kept), or (rows_kept, N) contiguous in the
// accumulation dtype of rows, on rows' device; true when given. rows_kept: 3
// (mean, 1 / std, 1 / ||y||) on CUDA; the CPU forward keeps 6 (similarity_cpu.h,
// kStatsRows) and its ops also take the first 3 alone (rows_kept > 3).
inline bool check_embed_stats(const at::Tensor& rows, const c10::optional<at::Tensor>& stats, int64_t rows_kept = 3) {
  if (!stats.has_value() || !stats->defined() || (stats->dim() == 1 && stats->numel() == 0)) return false;
  const int64_t N = rows.dim() == 3 ? rows.size(0) * rows.size(2) : rows.size(0);
  const bool rows_ok = stats->dim() == 2 && (stats->size(0) == 3 || stats->size(0) == rows_kept);
  TORCH_CHECK_VALUE(rows_ok && stats->size(1) == N, "stats must be embed_similarity's (", rows_kept, ", N) = (",
                    rows_kept, ", ", N, ")", rows_kept > 3 ? " or its first 3 rows" : "", ", got shape ",
                    stats->sizes());
  TORCH_CHECK_VALUE(stats->scalar_type() == acc_type(rows.scalar_type()), "stats must be ",
                    acc_type(rows.scalar_type()), " (the accumulation dtype of feats), got ", stats->scalar_type());
  TORCH_CHECK_VALUE(stats->is_contiguous(), "stats must be contiguous");
  check_same_device(rows, *stats, "feats", "stats");
  return true;
}

// The gradient of embed_similarity's feats, from g laid out as embed_rows(feats) lies.
inline at::Tensor embed_grad_as_feats(const at::Tensor& g, const at::Tensor& rows, const at::Tensor& feats) {
  if (feats.dim() != 4) return g;
  return rows.dim() == 3 ? g.view(feats.sizes())
                         : g.view({feats.size(0), feats.size(2), feats.size(3), feats.size(1)}).permute({0, 3, 1, 2});
}

// ppc_ppd and its backward: own (N, K) float32/float64 with K >= 1 (N = n,
// lse's, where n >= 0), target (N,) integer on own's device.
inline void check_own_and_target(const at::Tensor& own, const at::Tensor& target, int64_t n = -1) {
  check_dim(own, 2, "own", "(N, K)");
  TORCH_CHECK_VALUE(own.scalar_type() == at::kFloat || own.scalar_type() == at::kDouble,
                    "own must be float32 or float64, got ", own.scalar_type());
  TORCH_CHECK_VALUE((n < 0 || own.size(0) == n) && own.size(1) >= 1, "own must be (N, K) with N = ",
                    n < 0 ? own.size(0) : n, " and K >= 1, got shape ", own.sizes());
  check_dim(target, 1, "target", "(N,)");
  check_integer(target, "target");
  TORCH_CHECK_VALUE(target.size(0) == own.size(0), "target must have N = ", own.size(0), " entries, got ",
                    target.size(0));
  check_same_device(own, target, "own", "target");
}

// ppc_ppd: lse (N,) of own's dtype; temperature > 0.
inline void check_ppc_ppd_args(const at::Tensor& lse, const at::Tensor& own, const at::Tensor& target,
                               double temperature) {
  check_dim(lse, 1, "lse", "(N,)");
  TORCH_CHECK_VALUE(lse.scalar_type() == at::kFloat || lse.scalar_type() == at::kDouble,
                    "lse must be float32 or float64, got ", lse.scalar_type());
  check_own_and_target(own, target, lse.size(0));
  TORCH_CHECK_VALUE(own.scalar_type() == lse.scalar_type(), "own must have lse's dtype ", lse.scalar_type(),
                    ", got ", own.scalar_type());
  check_same_device(lse, own, "lse", "own");
  TORCH_CHECK_VALUE(temperature > 0, "temperature must be > 0, got ", temperature);
}

// ppc_ppd_backward: grad_ppc, grad_ppd and count hold one value each, on own's device.
inline void check_ppc_ppd_backward_args(const at::Tensor& grad_ppc, const at::Tensor& grad_ppd, const at::Tensor& own,
                                        const at::Tensor& target, const at::Tensor& count, double temperature) {
  check_own_and_target(own, target);
  const std::pair<const at::Tensor*, const char*> scalars[] = {{&grad_ppc, "grad_ppc"}, {&grad_ppd, "grad_ppd"},
                                                               {&count, "count"}};
  for (const auto& t : scalars) {
    TORCH_CHECK_VALUE(t.first->numel() == 1, t.second, " must hold one value, got shape ", t.first->sizes());
    check_floating(*t.first, t.second);
    check_same_device(own, *t.first, "own", t.second);
  }
  TORCH_CHECK_VALUE(temperature > 0, "temperature must be > 0, got ", temperature);
}

}  // namespace protoseg

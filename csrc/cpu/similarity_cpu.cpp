// CPU kernels of `similarity` and `similarity_backward`.
//
// S = feats @ protos.view(C*K, D).T is never materialised: rows are processed
// in tiles of a fixed size (independent of the thread count, so results are
// the same for any number of threads). Each tile's GEMM is a single-threaded
// BLAS call inside at::parallel_for, and its epilogue (per-class max and
// arg-max, row log-sum-exp, own-class scores) runs while the tile is in cache.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../checks.h"
#include "../protoseg_math.h"

namespace protoseg {
namespace {

// Rows per tile: about 1 MiB of S per tile, between 16 and 1024 rows.
int64_t tile_rows(int64_t CK, int64_t elem_size) {
  int64_t rows = (int64_t(1) << 20) / std::max<int64_t>(1, CK * elem_size);
  return std::min<int64_t>(1024, std::max<int64_t>(16, rows));
}

void check_similarity_args(const at::Tensor& feats, const at::Tensor& protos, const at::Tensor& labels,
                           bool need_labels) {
  check_dim(feats, 2, "feats", "(N, D)");
  check_dim(protos, 3, "protos", "(C, K, D)");
  check_floating(feats, "feats");
  check_floating(protos, "protos");
  TORCH_CHECK_VALUE(protos.size(2) == feats.size(1), "protos must be (C, K, D) with D = feats.shape[1] = ",
                    feats.size(1), ", got shape ", protos.sizes());
  TORCH_CHECK_VALUE(protos.size(1) >= 1 && protos.size(1) <= 256, "protos: K (prototypes per class) must be in [1, 256], got ",
                    protos.size(1));
  check_same_device(feats, protos, "feats", "protos");
  if (need_labels) {
    check_dim(labels, 1, "labels", "(N,)");
    check_integer(labels, "labels");
    TORCH_CHECK_VALUE(labels.size(0) == feats.size(0), "labels must have N = ", feats.size(0),
                      " entries, got ", labels.size(0));
    check_same_device(feats, labels, "feats", "labels");
  }
}

// Labels as int64, checked: each in [0, C) or equal to ignore_index.
at::Tensor checked_labels(const at::Tensor& labels, int64_t C, int64_t ignore_index) {
  at::Tensor lab = labels.to(at::kLong).contiguous();
  const int64_t* p = lab.data_ptr<int64_t>();
  const int64_t n = lab.numel();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(label_in_range(p[i], C) || p[i] == ignore_index, "labels[", i, "] = ", p[i],
                      " is outside [0, ", C, ") and is not ignore_index (", ignore_index, ")");
  }
  return lab;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> similarity_cpu(
    const at::Tensor& feats, const at::Tensor& protos, const at::Tensor& labels, int64_t ignore_index,
    double temperature, bool compute_seg, bool compute_lse, bool compute_own) {
  check_similarity_args(feats, protos, labels, compute_own);
  TORCH_CHECK_VALUE(temperature > 0, "temperature must be > 0, got ", temperature);
  const int64_t N = feats.size(0), D = feats.size(1), C = protos.size(0), K = protos.size(1), CK = C * K;
  const auto acc = acc_type(feats.scalar_type());
  auto fopt = feats.options();
  at::Tensor seg = compute_seg ? at::empty({N, C}, fopt) : at::empty({0}, fopt);
  at::Tensor argk = compute_seg ? at::empty({N, C}, fopt.dtype(at::kByte)) : at::empty({0}, fopt.dtype(at::kByte));
  at::Tensor lse = compute_lse ? at::empty({N}, fopt.dtype(acc)) : at::empty({0}, fopt.dtype(acc));
  at::Tensor own = compute_own ? at::zeros({N, K}, fopt.dtype(acc)) : at::empty({0}, fopt.dtype(acc));
  if (N == 0 || (!compute_seg && !compute_lse && !compute_own)) return {seg, argk, lse, own};
  at::Tensor lab = compute_own ? checked_labels(labels, C, ignore_index) : at::Tensor();
  at::Tensor P = protos.reshape({CK, D}).to(acc).contiguous();  // (C*K, D)
  at::Tensor Pt = P.t();
  const int64_t T = tile_rows(CK, at::elementSize(acc));
  const int64_t ntiles = (N + T - 1) / T;

  at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * T, rows = std::min(T, N - r0);
      at::Tensor S = at::mm(feats.narrow(0, r0, rows).to(acc), Pt);  // (rows, C*K)
      if (compute_seg) {
        auto mx = S.view({rows, C, K}).max(2);  // per-class nearest prototype
        seg.narrow(0, r0, rows).copy_(std::get<0>(mx));
        argk.narrow(0, r0, rows).copy_(std::get<1>(mx));
      }
      if (compute_lse) {
        at::Tensor St = temperature == 1.0 ? S : S / temperature;
        lse.narrow(0, r0, rows).copy_(at::logsumexp(St, {1}));
      }
      if (compute_own) {
        AT_DISPATCH_FLOATING_TYPES(S.scalar_type(), "similarity_own", [&] {
          const scalar_t* s = S.data_ptr<scalar_t>();
          scalar_t* o = own.data_ptr<scalar_t>() + r0 * K;
          const int64_t* l = lab.data_ptr<int64_t>() + r0;
          for (int64_t i = 0; i < rows; ++i) {
            if (!label_in_range(l[i], C)) continue;  // ignored pixel: row stays 0
            std::copy(s + i * CK + l[i] * K, s + i * CK + (l[i] + 1) * K, o + i * K);
          }
        });
      }
    }
  });
  return {seg, argk, lse, own};
}

at::Tensor similarity_backward_cpu(const c10::optional<at::Tensor>& grad_seg,
                                   const c10::optional<at::Tensor>& grad_lse,
                                   const c10::optional<at::Tensor>& grad_own, const at::Tensor& feats,
                                   const at::Tensor& protos, const at::Tensor& labels, const at::Tensor& argk,
                                   const at::Tensor& lse, int64_t ignore_index, double temperature) {
  const bool has_seg = grad_seg.has_value() && grad_seg->defined();
  const bool has_lse = grad_lse.has_value() && grad_lse->defined();
  const bool has_own = grad_own.has_value() && grad_own->defined();
  check_similarity_args(feats, protos, labels, has_own);
  const int64_t N = feats.size(0), D = feats.size(1), C = protos.size(0), K = protos.size(1), CK = C * K;
  const auto acc = acc_type(feats.scalar_type());
  at::Tensor grad = at::zeros({N, D}, feats.options());
  if (N == 0 || (!has_seg && !has_lse && !has_own)) return grad;
  if (has_seg) {
    TORCH_CHECK_VALUE(grad_seg->sizes() == at::IntArrayRef({N, C}), "grad_seg must be (N, C)");
    TORCH_CHECK_VALUE(argk.sizes() == at::IntArrayRef({N, C}), "argk must be (N, C)");
  }
  if (has_lse) TORCH_CHECK_VALUE(grad_lse->numel() == N && lse.numel() == N, "grad_lse and lse must be (N,)");
  if (has_own) TORCH_CHECK_VALUE(grad_own->sizes() == at::IntArrayRef({N, K}), "grad_own must be (N, K)");
  at::Tensor gseg = has_seg ? grad_seg->to(acc).contiguous() : at::Tensor();
  at::Tensor ak = has_seg ? argk.to(at::kLong).contiguous() : at::Tensor();
  at::Tensor glse = has_lse ? grad_lse->to(acc).contiguous() : at::Tensor();
  at::Tensor l = has_lse ? lse.to(acc).contiguous() : at::Tensor();
  at::Tensor gown = has_own ? grad_own->to(acc).contiguous() : at::Tensor();
  at::Tensor lab = has_own ? checked_labels(labels, C, ignore_index) : at::Tensor();
  at::Tensor P = protos.reshape({CK, D}).to(acc).contiguous();  // (C*K, D)
  const int64_t T = tile_rows(CK, at::elementSize(acc));
  const int64_t ntiles = (N + T - 1) / T;

  at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * T, rows = std::min(T, N - r0);
      at::Tensor dS;  // (rows, C*K): d loss / d S for this tile
      if (has_lse) {
        // softmax(S / tau) / tau * grad_lse, S recomputed (flash-attention style)
        at::Tensor S = at::mm(feats.narrow(0, r0, rows).to(acc), P.t());
        at::Tensor St = temperature == 1.0 ? S : S / temperature;
        dS = at::exp(St - l.narrow(0, r0, rows).unsqueeze(1)).mul_((glse.narrow(0, r0, rows) / temperature).unsqueeze(1));
      } else {
        dS = at::zeros({rows, CK}, P.options());
      }
      if (has_seg) {
        // the max over K routes each seg gradient to its arg-max prototype
        dS.view({rows, C, K}).scatter_add_(2, ak.narrow(0, r0, rows).unsqueeze(2),
                                           gseg.narrow(0, r0, rows).unsqueeze(2));
      }
      if (has_own) {
        AT_DISPATCH_FLOATING_TYPES(dS.scalar_type(), "similarity_backward_own", [&] {
          scalar_t* d = dS.data_ptr<scalar_t>();
          const scalar_t* g = gown.data_ptr<scalar_t>() + r0 * K;
          const int64_t* lb = lab.data_ptr<int64_t>() + r0;
          for (int64_t i = 0; i < rows; ++i) {
            if (!label_in_range(lb[i], C)) continue;
            scalar_t* row = d + i * CK + lb[i] * K;
            for (int64_t k = 0; k < K; ++k) row[k] += g[i * K + k];
          }
        });
      }
      grad.narrow(0, r0, rows).copy_(at::mm(dS, P));  // (rows, D)
    }
  });
  return grad;
}

TORCH_LIBRARY_IMPL(protoseg_ext, CPU, m) {
  m.impl("similarity", &similarity_cpu);
  m.impl("similarity_backward", &similarity_backward_cpu);
}

}  // namespace protoseg

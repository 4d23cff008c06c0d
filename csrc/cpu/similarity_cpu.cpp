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
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../checks.h"
#include "../protoseg_math.h"
#include "buffer_pool.h"
#include "cpu_isa.h"
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

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> similarity_cpu(
    const at::Tensor& feats, const at::Tensor& protos, const at::Tensor& labels, int64_t ignore_index,
    double temperature, bool compute_seg, bool compute_lse, bool compute_own, int64_t cache_bytes, bool normalize) {
  check_similarity_args(feats, protos, labels, compute_own, temperature);
  at::NoGradGuard no_grad;  // autograd is handled in Python; inner ATen calls record nothing
  const int64_t N = feats.size(0), D = feats.size(1), C = protos.size(0), K = protos.size(1), CK = C * K;
  const auto acc = acc_type(feats.scalar_type());
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
  const int64_t T = tile_rows(CK, at::elementSize(acc));
  const int64_t ntiles = (N + T - 1) / T;

  AT_DISPATCH_FLOATING_TYPES(acc, "similarity_cpu", [&] {
    using acc_t = scalar_t;
    at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
      at::NoGradGuard no_grad_worker;  // grad mode is per thread: OpenMP workers start with it on
      at::Tensor S_buf = at::empty({T, CK}, aopt);  // this task's tile, reused
      std::vector<int32_t> abuf(compute_seg ? C : 0);     // one row's arg-max k per class
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t r0 = t * T, rows = std::min(T, N - r0);
        at::Tensor xt = feats.narrow(0, r0, rows).to(acc).contiguous();
        at::Tensor S = S_buf.narrow(0, 0, rows);
        at::mm_out(S, xt, Pt);  // (rows, K*C), in cache
        acc_t* s = S.data_ptr<acc_t>();
        const acc_t* x = xt.data_ptr<acc_t>();
        at::Tensor seg_t;  // this tile's seg rows, in acc_t
        if (compute_seg) seg_t = feats.scalar_type() == acc ? seg.narrow(0, r0, rows) : at::empty({rows, C}, aopt);
        acc_t* sv = compute_seg ? seg_t.data_ptr<acc_t>() : nullptr;
        if (compute_seg) {
          // nearest prototype of each class: max and arg-max over K, on the
          // rows scaled as the rows of feats (in the same pass)
          uint8_t* ak = argk.data_ptr<uint8_t>() + r0 * C;
          for (int64_t i = 0; i < rows; ++i) {
            const acc_t a = normalize ? inv_norm(rows::sumsq<acc_t>(x + i * D, D)) : acc_t(1);
            rows::class_max(s + i * CK, C, K, a, sv + i * C, abuf.data());
            std::copy(abuf.begin(), abuf.end(), ak + i * C);  // int32 -> uint8
          }
        } else if (normalize) {  // rows of S scale like the rows of feats
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

at::Tensor similarity_backward_cpu(const c10::optional<at::Tensor>& grad_seg,
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
  at::NoGradGuard no_grad;
  const int64_t N = feats.size(0), D = feats.size(1), C = protos.size(0), K = protos.size(1), CK = C * K;
  const auto acc = acc_type(feats.scalar_type());
  // the dense path writes every row of grad with a GEMM; the sparse one adds into it
  at::Tensor grad = BufferPool::get().empty({N, D}, feats.options().dtype(acc));
  if (!has_lse) grad.zero_();
  if (N == 0 || (!has_seg && !has_lse && !has_own)) return grad.to(feats.scalar_type());
  at::Tensor probs = cached ? probs_opt->contiguous() : at::Tensor();
  at::Tensor gseg = has_seg ? grad_seg->to(acc).contiguous() : at::Tensor();
  at::Tensor ak = has_seg ? argk.contiguous() : at::Tensor();
  at::Tensor glse = has_lse ? (*grad_lse / temperature).to(acc).contiguous() : at::Tensor();
  at::Tensor l = has_lse ? lse.to(acc).contiguous() : at::Tensor();
  at::Tensor gown = has_own ? grad_own->to(acc).contiguous() : at::Tensor();
  at::Tensor lab = has_own ? checked_labels(labels, C, ignore_index) : at::Tensor();
  // the dense path works on S in k-major column order, the sparse one on rows of protos
  at::Tensor P = has_lse ? kmajor_protos(protos, acc) : protos.reshape({CK, D}).to(acc).contiguous();
  const int64_t T = tile_rows(CK, at::elementSize(acc));
  const int64_t ntiles = (N + T - 1) / T;

  AT_DISPATCH_FLOATING_TYPES(acc, "similarity_backward_cpu", [&] {
    using acc_t = scalar_t;
    const acc_t* pp = P.data_ptr<acc_t>();
    at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
      at::NoGradGuard no_grad_worker;  // grad mode is per thread: OpenMP workers start with it on
      at::Tensor dS_buf = has_lse ? at::empty({T, CK}, P.options()) : at::Tensor();  // reused across tiles
      at::Tensor out_buf = has_lse ? at::empty({T, D}, P.options()) : at::Tensor();
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t r0 = t * T, rows = std::min(T, N - r0);
        acc_t* g = grad.data_ptr<acc_t>() + r0 * D;
        acc_t* o = g;  // this tile's rows of the gradient: the tile buffer on the dense path
        at::Tensor xt = normalize || (has_lse && !cached) ? feats.narrow(0, r0, rows).to(acc).contiguous() : at::Tensor();
        if (has_lse) {
          // dS = softmax(S / tau) * grad_lse / tau + the sparse terms; d feats = dS @ P
          at::Tensor dS = dS_buf.narrow(0, 0, rows);
          if (!cached) {  // S recomputed from the saved lse (flash-attention style)
            at::mm_out(dS, xt, P.t());
            if (normalize) scale_rows_by_inv_norm(dS.data_ptr<acc_t>(), xt.data_ptr<acc_t>(), rows, CK, D);
            if (temperature != 1.0) dS.div_(temperature);
            dS.sub_(l.narrow(0, r0, rows).unsqueeze(1)).exp_().mul_(glse.narrow(0, r0, rows).unsqueeze(1));
          }
          acc_t* d = dS.data_ptr<acc_t>();
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
          // (rows, D), P k-major as dS, into the tile buffer: the rows go to
          // grad once final, with streaming stores
          at::Tensor out = out_buf.narrow(0, 0, rows);
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
        if (o != g) rows::stream_copy(g, o, rows * D);
      }
      rows::stream_fence();
    });
  });
  return grad.to(feats.scalar_type());
}

}  // namespace PROTOSEG_CPU_CAPABILITY

#if PROTOSEG_CPU_BASELINE  // registered once, with a dispatcher over the variants
PROTOSEG_CPU_VARIANTS(similarity_cpu)
PROTOSEG_CPU_VARIANTS(similarity_backward_cpu)
TORCH_LIBRARY_IMPL(protoseg_ext, CPU, m) {
  m.impl("similarity", PROTOSEG_CPU_DISPATCH(similarity_cpu));
  m.impl("similarity_backward", PROTOSEG_CPU_DISPATCH(similarity_backward_cpu));
}
#endif

}  // namespace protoseg

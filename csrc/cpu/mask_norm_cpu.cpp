// CPU kernels of `mask_norm` and `mask_norm_backward`: the head's LayerNorm
// over the C classes of each pixel's seg logits, read as rows (N, C) and
// written as the (B, C, H*W) image the model returns.
//
// C is small (19 to a few hundred), so a row is too short for vector lanes;
// instead a block of kBlock pixels of one image is transposed into a (C, kBlock)
// buffer and every step runs across pixels. The (B, C, H*W) side is then read
// or written with unit stride, and neither the forward output nor the incoming
// gradient needs a layout copy. grad_weight and grad_bias are sums over pixels:
// each fixed chunk of blocks accumulates its own float64 partials, merged in
// chunk order, so the result does not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../checks.h"
#include "../protoseg_math.h"
#include "cpu_isa.h"

namespace protoseg {
namespace PROTOSEG_CPU_CAPABILITY {  // one copy per instruction-set variant (cpu_isa.h)
namespace {

constexpr int64_t kBlock = 64;           // pixels per block
constexpr int64_t kChunkBlocks = 64;     // blocks per partial-sum chunk (backward)

// t is (n,), with seg's dtype and device
void check_vector(const at::Tensor& t, int64_t n, const at::Tensor& seg, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, name, " must be (", n, ",), got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == seg.scalar_type(), name, " must have seg's dtype ", seg.scalar_type(),
                    ", got ", t.scalar_type());
  check_same_device(seg, t, "seg", name);
}

// seg (N, C) float32/float64 with C >= 1, weight (C,) like it: both ops
void check_seg_and_weight(const at::Tensor& seg, const at::Tensor& weight) {
  check_dim(seg, 2, "seg", "(N, C)");
  TORCH_CHECK_VALUE(seg.scalar_type() == at::kFloat || seg.scalar_type() == at::kDouble,
                    "seg must be float32 or float64, got ", seg.scalar_type());
  TORCH_CHECK_VALUE(seg.size(1) >= 1, "seg must have C >= 1 columns, got shape ", seg.sizes());
  check_vector(weight, seg.size(1), seg, "weight");
}

// A block: pixels [p0, p0 + P) of image b, rows n0 = b * HW + p0 of seg.
struct Block {
  int64_t b, p0, P, n0;
};

Block block_at(int64_t j, int64_t HW, int64_t per_image) {
  const int64_t b = j / per_image, p0 = (j % per_image) * kBlock;
  return {b, p0, std::min(kBlock, HW - p0), b * HW + p0};
}

// xt (C, P) = the rows n0 .. n0+P-1 of x (N, C), transposed
template <typename T>
void load_block(const T* x, int64_t C, const Block& k, T* xt) {
  for (int64_t i = 0; i < k.P; ++i)
    for (int64_t c = 0; c < C; ++c) xt[c * k.P + i] = x[(k.n0 + i) * C + c];
}

template <typename T>
void mask_norm_forward(const T* xp, const T* wp, const T* bp, int64_t batch, int64_t HW, int64_t C, T eps, T* op,
                       T* mp, T* rp, int64_t* pp) {
  const int64_t per_image = (HW + kBlock - 1) / kBlock;
  const T inv_c = T(1) / T(C);
  at::parallel_for(0, batch * per_image, 16, [&](int64_t j0, int64_t j1) {
    std::vector<T> xt(C * kBlock);
    T m[kBlock], r[kBlock], best[kBlock];
    int32_t arg[kBlock];
    for (int64_t j = j0; j < j1; ++j) {
      const Block k = block_at(j, HW, per_image);
      const int64_t P = k.P;
      load_block(xp, C, k, xt.data());
      std::fill(m, m + P, T(0));
      std::fill(r, r + P, T(0));
      for (int64_t c = 0; c < C; ++c) {
        const T* v = xt.data() + c * P;
#pragma omp simd
        for (int64_t i = 0; i < P; ++i) m[i] += v[i];
      }
      for (int64_t i = 0; i < P; ++i) m[i] *= inv_c;
      for (int64_t c = 0; c < C; ++c) {  // biased variance, two passes (no cancellation)
        const T* v = xt.data() + c * P;
#pragma omp simd
        for (int64_t i = 0; i < P; ++i) r[i] += (v[i] - m[i]) * (v[i] - m[i]);
      }
      for (int64_t i = 0; i < P; ++i) r[i] = T(1) / std::sqrt(r[i] * inv_c + eps);
      for (int32_t c = 0; c < C; ++c) {  // the output, and its arg-max over c (torch.argmax semantics)
        const T* v = xt.data() + c * P;
        T* o = op + (k.b * C + c) * HW + k.p0;
        const T wc = wp[c], bc = bp[c];
#pragma omp simd
        for (int64_t i = 0; i < P; ++i) {
          o[i] = (v[i] - m[i]) * r[i] * wc + bc;
          const bool take = c == 0 || max_takes(o[i], best[i]);
          best[i] = take ? o[i] : best[i];
          arg[i] = take ? c : arg[i];
        }
      }
      std::copy(m, m + P, mp + k.n0);
      std::copy(r, r + P, rp + k.n0);
      std::copy(arg, arg + P, pp + k.n0);
    }
  });
}

template <typename T>
void mask_norm_backward_impl(const T* gp, const T* xp, const T* wp, const T* mp, const T* rp, int64_t batch,
                             int64_t HW, int64_t C, T* dxp, T* gw, T* gb) {
  const int64_t per_image = (HW + kBlock - 1) / kBlock, nblocks = batch * per_image;
  const int64_t nchunks = (nblocks + kChunkBlocks - 1) / kChunkBlocks;
  std::vector<double> partial(nchunks * 2 * C, 0.0);  // per chunk: grad_weight (C), grad_bias (C)
  const T inv_c = T(1) / T(C);
  at::parallel_for(0, nchunks, 1, [&](int64_t q0, int64_t q1) {
    std::vector<T> xh(C * kBlock), dy(C * kBlock);  // x-hat and grad_out * weight, (C, P)
    T sg[kBlock], sgx[kBlock];
    for (int64_t q = q0; q < q1; ++q) {
      double* dw = partial.data() + q * 2 * C;
      double* db = dw + C;
      for (int64_t j = q * kChunkBlocks, j1 = std::min(nblocks, j + kChunkBlocks); j < j1; ++j) {
        const Block k = block_at(j, HW, per_image);
        const int64_t P = k.P;
        const T *m = mp + k.n0, *r = rp + k.n0;
        load_block(xp, C, k, xh.data());
        std::fill(sg, sg + P, T(0));
        std::fill(sgx, sgx + P, T(0));
        for (int64_t c = 0; c < C; ++c) {
          T* h = xh.data() + c * P;
          T* d = dy.data() + c * P;
          const T* go = gp + (k.b * C + c) * HW + k.p0;
          const T wc = wp[c];
          T sw = 0, sb = 0;
#pragma omp simd reduction(+ : sw, sb)
          for (int64_t i = 0; i < P; ++i) {
            h[i] = (h[i] - m[i]) * r[i];
            d[i] = go[i] * wc;
            sg[i] += d[i];
            sgx[i] += d[i] * h[i];
            sw += go[i] * h[i];
            sb += go[i];
          }
          dw[c] += sw;
          db[c] += sb;
        }
        // d x = rstd * (dy - mean_c(dy) - x-hat * mean_c(dy * x-hat)), stored as rows
        for (int64_t i = 0; i < P; ++i) {
          sg[i] *= inv_c;
          sgx[i] *= inv_c;
        }
        for (int64_t c = 0; c < C; ++c) {
          T* h = xh.data() + c * P;
          const T* d = dy.data() + c * P;
#pragma omp simd
          for (int64_t i = 0; i < P; ++i) h[i] = r[i] * (d[i] - sg[i] - h[i] * sgx[i]);
        }
        for (int64_t i = 0; i < P; ++i)
          for (int64_t c = 0; c < C; ++c) dxp[(k.n0 + i) * C + c] = xh[c * P + i];
      }
    }
  });
  std::vector<double> sw(2 * C, 0.0);
  for (int64_t q = 0; q < nchunks; ++q)
    for (int64_t c = 0; c < 2 * C; ++c) sw[c] += partial[q * 2 * C + c];
  for (int64_t c = 0; c < C; ++c) {
    gw[c] = static_cast<T>(sw[c]);
    gb[c] = static_cast<T>(sw[C + c]);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mask_norm_cpu(const at::Tensor& seg,
                                                                         const at::Tensor& weight,
                                                                         const at::Tensor& bias, double eps,
                                                                         int64_t batch) {
  check_seg_and_weight(seg, weight);
  const int64_t N = seg.size(0), C = seg.size(1);
  check_vector(bias, C, seg, "bias");
  TORCH_CHECK_VALUE(eps >= 0 && std::isfinite(eps), "eps must be finite and >= 0, got ", eps);
  TORCH_CHECK_VALUE(batch >= 1 && N % batch == 0, "batch must be >= 1 and divide N = ", N, ", got ", batch);
  const int64_t HW = N / batch;
  at::Tensor out = at::empty({batch, C, HW}, seg.options());
  at::Tensor mean = at::empty({N}, seg.options());
  at::Tensor rstd = at::empty({N}, seg.options());
  at::Tensor pred = at::empty({N}, seg.options().dtype(at::kLong));
  if (N == 0) return {out, mean, rstd, pred};
  at::Tensor x = seg.contiguous(), w = weight.contiguous(), bb = bias.contiguous();
  AT_DISPATCH_FLOATING_TYPES(seg.scalar_type(), "mask_norm_cpu", [&] {
    mask_norm_forward<scalar_t>(x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), bb.data_ptr<scalar_t>(), batch, HW, C,
                                static_cast<scalar_t>(eps), out.data_ptr<scalar_t>(), mean.data_ptr<scalar_t>(),
                                rstd.data_ptr<scalar_t>(), pred.data_ptr<int64_t>());
  });
  return {out, mean, rstd, pred};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mask_norm_backward_cpu(const at::Tensor& grad_out,
                                                                      const at::Tensor& seg, const at::Tensor& weight,
                                                                      const at::Tensor& mean, const at::Tensor& rstd) {
  check_seg_and_weight(seg, weight);
  const int64_t N = seg.size(0), C = seg.size(1);
  check_dim(grad_out, 3, "grad_out", "(B, C, N / B)");
  TORCH_CHECK_VALUE(grad_out.size(1) == C && grad_out.size(0) * grad_out.size(2) == N,
                    "grad_out must be (B, C, N / B) with C = ", C, " and N = ", N, ", got shape ", grad_out.sizes());
  check_vector(mean, N, seg, "mean");
  check_vector(rstd, N, seg, "rstd");
  check_floating(grad_out, "grad_out");
  check_same_device(seg, grad_out, "seg", "grad_out");
  const int64_t batch = std::max<int64_t>(1, grad_out.size(0)), HW = grad_out.size(2);
  at::Tensor grad_seg = at::empty({N, C}, seg.options());
  at::Tensor grad_w = at::zeros({C}, seg.options()), grad_b = at::zeros({C}, seg.options());
  if (N == 0) return {grad_seg, grad_w, grad_b};
  at::Tensor g = grad_out.to(seg.scalar_type()).contiguous(), x = seg.contiguous(), w = weight.contiguous();
  at::Tensor mc = mean.contiguous(), rc = rstd.contiguous();
  AT_DISPATCH_FLOATING_TYPES(seg.scalar_type(), "mask_norm_backward_cpu", [&] {
    mask_norm_backward_impl<scalar_t>(g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                                      mc.data_ptr<scalar_t>(), rc.data_ptr<scalar_t>(), batch, HW, C,
                                      grad_seg.data_ptr<scalar_t>(), grad_w.data_ptr<scalar_t>(),
                                      grad_b.data_ptr<scalar_t>());
  });
  return {grad_seg, grad_w, grad_b};
}

}  // namespace PROTOSEG_CPU_CAPABILITY

#if PROTOSEG_CPU_BASELINE  // registered once, with a dispatcher over the variants
PROTOSEG_CPU_VARIANTS(mask_norm_cpu)
PROTOSEG_CPU_VARIANTS(mask_norm_backward_cpu)
TORCH_LIBRARY_IMPL(protoseg_ext, CPU, m) {
  m.impl("mask_norm", PROTOSEG_CPU_DISPATCH(mask_norm_cpu));
  m.impl("mask_norm_backward", PROTOSEG_CPU_DISPATCH(mask_norm_backward_cpu));
}
#endif

}  // namespace protoseg

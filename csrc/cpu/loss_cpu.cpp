// CPU kernels of `ppc_ppd` and `ppc_ppd_backward`: the PPC and PPD losses
// from the row log-sum-exp and the own-class scores, one pass each way.
//
// The forward sums per fixed block of kBlockRows pixels in float64 and adds
// the blocks' sums in block order: the same bits for any thread count. The
// backward writes every entry of its outputs once (no zero fill first).
// Memory-bound and small (N * (K + 2) values): one copy, no per-ISA variants.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../checks.h"
#include "../protoseg_math.h"

namespace protoseg {
namespace {

constexpr int64_t kBlockRows = 16384;  // pixels per partial sum

template <typename T>
void ppc_ppd_impl(const T* lse, const T* own, const int64_t* target, int64_t N, int64_t K, int64_t ignore_index,
                  double inv_temp, T* ppc, T* ppd, T* count) {
  const int64_t blocks = (N + kBlockRows - 1) / kBlockRows;
  std::vector<double> part(3 * blocks, 0.0);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      double sc = 0.0, sd = 0.0, n = 0.0;
      for (int64_t i = b * kBlockRows, e = std::min(N, i + kBlockRows); i < e; ++i) {
        const int64_t t = target[i];
        if (t == ignore_index) continue;
        const double s = double(own[i * K + own_column(t, K)]);
        sc += double(lse[i]) - s * inv_temp;
        sd += (1.0 - s) * (1.0 - s);
        n += 1.0;
      }
      part[3 * b] = sc;
      part[3 * b + 1] = sd;
      part[3 * b + 2] = n;
    }
  });
  double sc = 0.0, sd = 0.0, n = 0.0;
  for (int64_t b = 0; b < blocks; ++b) {
    sc += part[3 * b];
    sd += part[3 * b + 1];
    n += part[3 * b + 2];
  }
  const double denom = std::max(n, 1.0);
  *ppc = T(sc / denom);
  *ppd = T(sd / denom);
  *count = T(n);
}

template <typename T>
void ppc_ppd_backward_impl(double g_ppc, double g_ppd, const T* own, const int64_t* target, double count, int64_t N,
                           int64_t K, int64_t ignore_index, double inv_temp, T* grad_lse, T* grad_own) {
  const double denom = std::max(count, 1.0);
  const double c_lse = g_ppc / denom, c_own = -g_ppc * inv_temp / denom, c_ppd = -2.0 * g_ppd / denom;
  at::parallel_for(0, N, 4096, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      T* row = grad_own + i * K;
      std::fill(row, row + K, T(0));
      const int64_t t = target[i];
      if (t == ignore_index) {
        grad_lse[i] = T(0);
        continue;
      }
      const int64_t k = own_column(t, K);
      grad_lse[i] = T(c_lse);
      row[k] = T(c_own + c_ppd * (1.0 - double(own[i * K + k])));
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> ppc_ppd_cpu(const at::Tensor& lse, const at::Tensor& own,
                                                           const at::Tensor& target, int64_t ignore_index,
                                                           double temperature) {
  check_ppc_ppd_args(lse, own, target, temperature);
  const int64_t N = own.size(0), K = own.size(1);
  at::Tensor ppc = at::empty({}, lse.options()), ppd = at::empty({}, lse.options());
  at::Tensor count = at::empty({}, lse.options());
  at::Tensor l = lse.contiguous(), o = own.contiguous(), t = target.to(at::kLong).contiguous();
  AT_DISPATCH_FLOATING_TYPES(lse.scalar_type(), "ppc_ppd_cpu", [&] {
    ppc_ppd_impl<scalar_t>(l.data_ptr<scalar_t>(), o.data_ptr<scalar_t>(), t.data_ptr<int64_t>(), N, K, ignore_index,
                           1.0 / temperature, ppc.data_ptr<scalar_t>(), ppd.data_ptr<scalar_t>(),
                           count.data_ptr<scalar_t>());
  });
  return {ppc, ppd, count};
}

std::tuple<at::Tensor, at::Tensor> ppc_ppd_backward_cpu(const at::Tensor& grad_ppc, const at::Tensor& grad_ppd,
                                                        const at::Tensor& own, const at::Tensor& target,
                                                        const at::Tensor& count, int64_t ignore_index,
                                                        double temperature) {
  check_ppc_ppd_backward_args(grad_ppc, grad_ppd, own, target, count, temperature);
  const int64_t N = own.size(0), K = own.size(1);
  at::Tensor grad_lse = at::empty({N}, own.options()), grad_own = at::empty({N, K}, own.options());
  if (N == 0) return {grad_lse, grad_own};
  const double g_ppc = grad_ppc.item<double>(), g_ppd = grad_ppd.item<double>(), n = count.item<double>();
  at::Tensor o = own.contiguous(), t = target.to(at::kLong).contiguous();
  AT_DISPATCH_FLOATING_TYPES(own.scalar_type(), "ppc_ppd_backward_cpu", [&] {
    ppc_ppd_backward_impl<scalar_t>(g_ppc, g_ppd, o.data_ptr<scalar_t>(), t.data_ptr<int64_t>(), n, N, K,
                                    ignore_index, 1.0 / temperature, grad_lse.data_ptr<scalar_t>(),
                                    grad_own.data_ptr<scalar_t>());
  });
  return {grad_lse, grad_own};
}

TORCH_LIBRARY_IMPL(protoseg_ext, CPU, m) {
  m.impl("ppc_ppd", &ppc_ppd_cpu);
  m.impl("ppc_ppd_backward", &ppc_ppd_backward_cpu);
}

}  // namespace protoseg

// CPU kernel of `sinkhorn`: Sinkhorn-Knopp for every class in one call.
//
// The per-class problems are segments of the (N, K) own-class score matrix,
// keyed by label; there is no loop over classes and no copy of a class's rows.
// Each pass runs over fixed blocks of rows (independent of the thread count);
// per-block partial column sums (C, K) are accumulated in float64 and merged
// in block order, so the result is the same for any number of threads.
// Passes: column max, then exp + column sums, then one pass per iteration
// (column scale, row scale, next iteration's column sums).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../checks.h"
#include "../protoseg_math.h"
#include "cpu_isa.h"

namespace protoseg {
namespace PROTOSEG_CPU_CAPABILITY {  // one copy per instruction-set variant (cpu_isa.h)

namespace {
constexpr int64_t kBlockRows = 4096;

// One call's passes over the (N, K) rows, in fixed blocks of kBlockRows.
template <typename T>
struct SinkhornPass {
  int64_t N, K, C, nblocks;
  const T* s;         // the own-class scores (N, K), acc dtype
  T* q;               // Q (N, K), written
  at::Tensor Q;
  const int64_t* lp;  // labels (N,)
  std::vector<uint8_t> ok;      // the row takes part: its label is a class and its scores are finite
  std::vector<int64_t> count;   // rows taking part, per class
  std::vector<double> part_sum; // per-block column sums (nblocks, C * K), float64

  // Checks the labels; marks the rows that take part and counts them per class.
  void count_rows(int64_t ignore_index) {
    ok.assign(N, 0);
    count.assign(C, 0);
    for (int64_t n = 0; n < N; ++n) {
      const int64_t c = lp[n];
      TORCH_CHECK_VALUE(label_in_range(c, C) || c == ignore_index, "labels[", n, "] = ", c, " is outside [0, ", C,
                        ") and is not ignore_index (", ignore_index, ")");
      if (!label_in_range(c, C)) continue;
      bool finite = true;
      for (int64_t k = 0; k < K; ++k) finite = finite && is_finite(s[n * K + k]);
      if (!finite) continue;
      ok[n] = 1;
      count[c] += 1;
    }
  }

  // Column max per (class, prototype): the shift that keeps exp() in range.
  std::vector<T> column_max() const {
    std::vector<T> part_max(nblocks * C * K, -INFINITY);
    at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        T* pm = part_max.data() + b * C * K;
        for (int64_t n = b * kBlockRows, e = std::min(N, n + kBlockRows); n < e; ++n) {
          if (!ok[n]) continue;
          for (int64_t k = 0; k < K; ++k) pm[lp[n] * K + k] = std::max(pm[lp[n] * K + k], s[n * K + k]);
        }
      }
    });
    std::vector<T> colmax(C * K, -INFINITY);
    for (int64_t b = 0; b < nblocks; ++b)
      for (int64_t j = 0; j < C * K; ++j) colmax[j] = std::max(colmax[j], part_max[b * C * K + j]);
    return colmax;
  }

  // Q = exp((S - colmax) / eps) and its column sums into part_sum. The
  // official global normalisation L /= sum(L) is a no-op for the result
  // (column scaling). The exponent goes to Q first (-inf on rows that take no
  // part, so they stay 0), then ATen's vectorised exp runs on the block's
  // rows in place.
  void exp_and_column_sums(const std::vector<T>& colmax, T teps) {
    part_sum.assign(nblocks * C * K, 0.0);
    at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
      at::NoGradGuard no_grad;  // grad mode is per thread
      for (int64_t b = b0; b < b1; ++b) {
        double* ps = part_sum.data() + b * C * K;
        const int64_t n0 = b * kBlockRows, n1 = std::min(N, n0 + kBlockRows);
        for (int64_t n = n0; n < n1; ++n) {
          if (!ok[n]) {
            std::fill(q + n * K, q + (n + 1) * K, T(-INFINITY));
            continue;
          }
          const T* cm = colmax.data() + lp[n] * K;
          for (int64_t k = 0; k < K; ++k) q[n * K + k] = sinkhorn_exponent(s[n * K + k], cm[k], teps);
        }
        Q.narrow(0, n0, n1 - n0).exp_();
        for (int64_t n = n0; n < n1; ++n) {
          if (!ok[n]) continue;
          double* pc = ps + lp[n] * K;
          for (int64_t k = 0; k < K; ++k) pc[k] += double(q[n * K + k]);
        }
      }
    });
  }

  // One iteration: the column scale from the merged column sums (block order:
  // deterministic), then per row the column scale, the row scale and, unless
  // last, the next iteration's column sums.
  void iterate(std::vector<T>& colscale, bool last) {
    for (int64_t j = 0; j < C * K; ++j) {
      double sum = 0.0;
      for (int64_t b = 0; b < nblocks; ++b) sum += part_sum[b * C * K + j];
      colscale[j] = sinkhorn_col_scale<T>(sum, K);
    }
    std::fill(part_sum.begin(), part_sum.end(), 0.0);
    at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        double* ps = part_sum.data() + b * C * K;
        for (int64_t n = b * kBlockRows, e = std::min(N, n + kBlockRows); n < e; ++n) {
          if (!ok[n]) continue;
          const int64_t c = lp[n];
          T* row = q + n * K;
          T rowsum = T(0);
          for (int64_t k = 0; k < K; ++k) {
            row[k] *= colscale[c * K + k];  // each prototype column sums to 1/K
            rowsum += row[k];
          }
          const T rs = sinkhorn_row_scale(rowsum, count[c], last);  // each pixel row to 1/n_c
          for (int64_t k = 0; k < K; ++k) {
            row[k] *= rs;
            if (!last) ps[c * K + k] += double(row[k]);
          }
        }
      }
    });
  }
};

}  // namespace

at::Tensor sinkhorn_cpu(const at::Tensor& own, const at::Tensor& labels, int64_t num_classes, int64_t ignore_index,
                        int64_t iters, double eps) {
  check_sinkhorn_args(own, labels, num_classes, iters, eps);
  const int64_t N = own.size(0), K = own.size(1), C = num_classes;
  const auto acc = acc_type(own.scalar_type());
  at::Tensor Q = at::empty({N, K}, own.options().dtype(acc));  // every row is written below
  if (N == 0 || K == 0) return Q;
  at::Tensor S = own.to(acc).contiguous();
  at::Tensor lab = labels.to(at::kLong).contiguous();
  AT_DISPATCH_FLOATING_TYPES(S.scalar_type(), "sinkhorn_cpu", [&] {
    using T = scalar_t;
    SinkhornPass<T> sp{N, K, C, (N + kBlockRows - 1) / kBlockRows, S.data_ptr<T>(), Q.data_ptr<T>(), Q,
                       lab.data_ptr<int64_t>()};
    sp.count_rows(ignore_index);
    sp.exp_and_column_sums(sp.column_max(), T(eps));
    std::vector<T> colscale(C * K);
    for (int64_t it = 0; it < iters; ++it) sp.iterate(colscale, it + 1 == iters);
  });
  return Q;
}

}  // namespace PROTOSEG_CPU_CAPABILITY

#if PROTOSEG_CPU_BASELINE  // registered once, with a dispatcher over the variants
PROTOSEG_CPU_VARIANTS(sinkhorn_cpu)
TORCH_LIBRARY_IMPL(protoseg_ext, CPU, m) { m.impl("sinkhorn", PROTOSEG_CPU_DISPATCH(sinkhorn_cpu)); }
#endif

}  // namespace protoseg

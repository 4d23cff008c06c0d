// CPU kernels of `prototype_sums` and `prototype_ema`.
//
// prototype_sums: sums[s] = sum of feats[n] over rows with slot[n] == s (and a
// finite feature row), counts[s] = how many. Rows are split into a fixed number
// of blocks (a function of N, slots and D, never of the thread count); each
// block accumulates its rows in order into its own float64 partial sums, in one
// pass over each row (finite check, norm and sum), and the partials are merged
// in block order. The result is bitwise the same for any thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../checks.h"
#include "../protoseg_math.h"
#include "rows.h"

namespace protoseg {

namespace {
constexpr int64_t kMinBlockRows = 8192;            // rows per block, at least
constexpr int64_t kMaxBlocks = 64;                 // blocks, at most
constexpr int64_t kPartialBytes = int64_t(128) << 20;  // float64 partial sums of all blocks, at most

// Number of row blocks: enough for parallelism, within the partials' memory cap.
int64_t sum_blocks(int64_t N, int64_t num_slots, int64_t D) {
  const int64_t per_block = std::max<int64_t>(1, num_slots * D * int64_t(sizeof(double)));
  int64_t nb = std::min<int64_t>({kMaxBlocks, (N + kMinBlockRows - 1) / kMinBlockRows, kPartialBytes / per_block});
  return std::max<int64_t>(1, nb);
}

// Squared norm of a row in float64 (NaN or inf iff an entry is: float,
// half and bfloat16 squares cannot overflow a double sum); float64 rows are
// checked entry by entry.
template <typename T>
bool row_sumsq(const T* x, int64_t D, double& sq) {
  sq = rows::sumsq<double>(x, D);
  return is_finite(sq);
}
template <>
bool row_sumsq<double>(const double* x, int64_t D, double& sq) {
  bool bad = false;
  for (int64_t d = 0; d < D; ++d) bad |= !is_finite(x[d]);
  sq = rows::sumsq<double>(x, D);
  return !bad;
}
}  // namespace

std::tuple<at::Tensor, at::Tensor> prototype_sums_cpu(const at::Tensor& feats, const at::Tensor& slot,
                                                      int64_t num_slots, bool normalize) {
  check_prototype_sums_args(feats, slot, num_slots);
  const int64_t N = feats.size(0), D = feats.size(1);
  const auto acc = acc_type(feats.scalar_type());
  at::Tensor sums = at::zeros({num_slots, D}, feats.options().dtype(acc));
  at::Tensor counts = at::zeros({num_slots}, feats.options().dtype(acc));
  if (N == 0 || num_slots == 0) return {sums, counts};
  at::Tensor f = feats.contiguous();
  at::Tensor sl = slot.to(at::kLong).contiguous();
  const int64_t* sp = sl.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK_VALUE(sp[n] < num_slots, "slot[", n, "] = ", sp[n], " is >= num_slots (", num_slots, ")");
  }
  std::vector<uint8_t> ok(N, 0);
  const int64_t nb = sum_blocks(N, num_slots, D), SD = num_slots * D;
  std::vector<double> partial(nb * SD, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "prototype_sums_cpu", [&] {
    const scalar_t* fp = f.data_ptr<scalar_t>();
    at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        double* acc_b = partial.data() + b * SD;
        for (int64_t n = N * b / nb, n1 = N * (b + 1) / nb; n < n1; ++n) {
          if (sp[n] < 0) continue;
          const scalar_t* x = fp + n * D;
          double sq;
          ok[n] = row_sumsq(x, D, sq);
          if (ok[n]) rows::axpy(acc_b + sp[n] * D, x, normalize ? inv_norm(sq) : 1.0, D);
        }
      }
    });
  });
  // merge the partials in block order, parallel over entries
  std::vector<double> acc_sums(SD, 0.0);
  at::parallel_for(0, SD, 4096, [&](int64_t j0, int64_t j1) {
    for (int64_t b = 0; b < nb; ++b) {
      const double* pb = partial.data() + b * SD;
      for (int64_t j = j0; j < j1; ++j) acc_sums[j] += pb[j];
    }
  });
  std::vector<double> acc_counts(num_slots, 0.0);
  for (int64_t n = 0; n < N; ++n)
    if (ok[n]) acc_counts[sp[n]] += 1.0;
  sums.copy_(at::from_blob(acc_sums.data(), {num_slots, D}, at::kDouble));
  counts.copy_(at::from_blob(acc_counts.data(), {num_slots}, at::kDouble));
  return {sums, counts};
}

at::Tensor prototype_ema_cpu(const at::Tensor& protos, const at::Tensor& sums, const at::Tensor& counts,
                             double gamma) {
  check_prototype_ema_args(protos, sums, counts, gamma);
  const int64_t C = protos.size(0), K = protos.size(1), D = protos.size(2), CK = C * K;
  const auto acc = acc_type(protos.scalar_type());
  at::Tensor p = protos.reshape({CK, D}).to(acc).contiguous();
  at::Tensor s = sums.reshape({CK, D}).to(acc).contiguous();
  at::Tensor cnt = counts.reshape({CK}).to(acc).contiguous();
  at::Tensor out = at::empty({CK, D}, p.options());
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "prototype_ema_cpu", [&] {
    using T = scalar_t;
    const T* pp = p.data_ptr<T>();
    const T* sp = s.data_ptr<T>();
    const T* cp = cnt.data_ptr<T>();
    T* op = out.data_ptr<T>();
    const T g = T(gamma);
    at::parallel_for(0, CK, 16, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        const T* pr = pp + j * D;
        T* o = op + j * D;
        if (cp[j] > 0) {
          // f = sums / ||sums||; p = gamma * p + (1 - gamma) * f
          T sq = 0;
          for (int64_t d = 0; d < D; ++d) sq += sp[j * D + d] * sp[j * D + d];
          const T inv = inv_norm(sq);
          for (int64_t d = 0; d < D; ++d) o[d] = ema(pr[d], sp[j * D + d] * inv, g);
        } else {
          std::copy(pr, pr + D, o);
        }
        T sq = 0;  // every prototype is L2-normalised afterwards
        for (int64_t d = 0; d < D; ++d) sq += o[d] * o[d];
        const T inv = inv_norm(sq);
        for (int64_t d = 0; d < D; ++d) o[d] *= inv;
      }
    });
  });
  return out.view({C, K, D}).to(protos.scalar_type());
}

TORCH_LIBRARY_IMPL(protoseg_ext, CPU, m) {
  m.impl("prototype_sums", &prototype_sums_cpu);
  m.impl("prototype_ema", &prototype_ema_cpu);
}

}  // namespace protoseg

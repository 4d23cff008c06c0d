// CPU kernels of `prototype_sums` and `prototype_ema`.
//
// prototype_sums: sums[s] = sum of feats[n] over rows with slot[n] == s (and a
// finite feature row), counts[s] = how many. Rows are split into a fixed number
// of blocks (a function of N, slots and D, never of the thread count). Within a
// block, rows are added in order, in one pass over each row (norm, finite
// check, sum), into sums in the accumulation type of feats (float32 for
// float32, float16 and bfloat16), which are added into the block's float64
// partial sums every kFlushRows rows; the partials are merged in block order.
// The result is bitwise the same for any thread count, and each float32 sum
// runs over at most kFlushRows rows (the official code sums all pixels in one
// float32 GEMM).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../checks.h"
#include "../protoseg_math.h"
#include "cpu_isa.h"
#include "rows.h"

namespace protoseg {
namespace PROTOSEG_CPU_CAPABILITY {  // one copy per instruction-set variant (cpu_isa.h)

namespace {
constexpr int64_t kMinBlockRows = 8192;            // rows per block, at least
constexpr int64_t kMaxBlocks = 64;                 // blocks, at most
constexpr int64_t kPartialBytes = int64_t(128) << 20;  // float64 partial sums of all blocks, at most
constexpr int64_t kFlushRows = 4096;               // rows summed in the accumulation type between flushes
constexpr int64_t kPrefetchRows = 4;               // rows read ahead of the one being summed

// Asks for the cache lines of a row ahead of its use (a hint, no effect on results).
template <typename T>
inline void prefetch_row(const T* x, int64_t D) {
  const char* p = reinterpret_cast<const char*>(x);
  for (int64_t o = 0, bytes = D * int64_t(sizeof(T)); o < bytes; o += 64) __builtin_prefetch(p + o);
}

// Number of row blocks: enough for parallelism, within the partials' memory cap.
int64_t sum_blocks(int64_t N, int64_t num_slots, int64_t D) {
  const int64_t per_block = std::max<int64_t>(1, num_slots * D * int64_t(sizeof(double)));
  int64_t nb = std::min<int64_t>({kMaxBlocks, (N + kMinBlockRows - 1) / kMinBlockRows, kPartialBytes / per_block});
  return std::max<int64_t>(1, nb);
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
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* fp = f.data_ptr<scalar_t>();
    at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
      rows::SlotSums<acc_t> scratch(num_slots, D);  // this task's running sums, flushed into a block's partial
      for (int64_t b = b0; b < b1; ++b) {
        double* acc_b = partial.data() + b * SD;
        auto flush = [&] { scratch.flush(acc_b); };
        const int64_t n0 = N * b / nb, n1 = N * (b + 1) / nb;
        for (int64_t n = n0; n < n1; ++n) {
          if (n > n0 && (n - n0) % kFlushRows == 0) flush();
          if (n + kPrefetchRows < n1) prefetch_row(fp + (n + kPrefetchRows) * D, D);
          if (sp[n] < 0) continue;
          const scalar_t* x = fp + n * D;
          acc_t w = acc_t(1);  // set by rows::row_scale
          ok[n] = rows::row_scale<acc_t>(x, D, normalize, w);
          if (!ok[n]) continue;
          rows::axpy(scratch.row(sp[n]), x, w, D);
        }
        flush();
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

}  // namespace PROTOSEG_CPU_CAPABILITY

#if PROTOSEG_CPU_BASELINE  // registered once, with a dispatcher over the variants
PROTOSEG_CPU_VARIANTS(prototype_sums_cpu)
PROTOSEG_CPU_VARIANTS(prototype_ema_cpu)
TORCH_LIBRARY_IMPL(protoseg_ext, CPU, m) {
  m.impl("prototype_sums", PROTOSEG_CPU_DISPATCH(prototype_sums_cpu));
  m.impl("prototype_ema", PROTOSEG_CPU_DISPATCH(prototype_ema_cpu));
}
#endif

}  // namespace protoseg

// CUDA kernels of `ppc_ppd` and `ppc_ppd_backward` (mirrors
// csrc/cpu/loss_cpu.cpp): the PPC and PPD losses from the row log-sum-exp and
// the own-class scores, in three launches per training step instead of the
// dozens of elementwise ops and reductions of their composition.
//
// Forward: ppc_ppd_partials_kernel gives each block a fixed slice of pixels
// (grid-stride) and writes the block's three float64 sums; ppc_ppd_finish_kernel
// (one block) adds them in block order and divides. The grid is a function of
// N alone, so the result has the same bits on every run; no atomics.
// Backward: one thread per entry of grad_own (N, K); the thread of column 0
// also writes grad_lse. The upstream gradients and the count are read on the
// device, never copied to the host.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../checks.h"
#include "../protoseg_math.h"
#include "cuda_common.cuh"

namespace protoseg {
namespace {

using cuda::ceil_div;
using cuda::kWarp;

constexpr int kLossThreads = 256;
constexpr int64_t kMaxLossBlocks = 1024;  // partial sums of the forward, at most

// Launch: grid = loss_blocks(N) blocks of kLossThreads threads. Block b sums
// pixels i = b * kLossThreads + threadIdx.x + j * gridDim.x * kLossThreads
// (bounds: i < N) and writes part[3 * b + {0, 1, 2}] = the sums of
// lse - s / tau, (1 - s)^2 and 1 over its pixels that take part. Reads own
// at row i only, column own_column(target[i]) < K. scratch is reused by the
// three block sums (block_sum ends with a barrier). No other shared state.
template <typename T>
__global__ void __launch_bounds__(kLossThreads, 4)
    ppc_ppd_partials_kernel(const T* lse, const T* own, const int64_t* target, int64_t N, int64_t K,
                            int64_t ignore_index, double inv_temp, double* part) {
  __shared__ double scratch[kLossThreads / kWarp];
  double sc = 0.0, sd = 0.0, n = 0.0;
  const int64_t step = int64_t(gridDim.x) * kLossThreads;
  for (int64_t i = int64_t(blockIdx.x) * kLossThreads + threadIdx.x; i < N; i += step) {
    const int64_t t = target[i];
    if (t == ignore_index) continue;
    const double s = double(own[i * K + own_column(t, K)]);
    sc += double(lse[i]) - s * inv_temp;
    sd += (1.0 - s) * (1.0 - s);
    n += 1.0;
  }
  sc = cuda::block_sum<kLossThreads>(sc, scratch);
  sd = cuda::block_sum<kLossThreads>(sd, scratch);
  n = cuda::block_sum<kLossThreads>(n, scratch);
  if (threadIdx.x == 0) {
    part[3 * int64_t(blockIdx.x)] = sc;
    part[3 * int64_t(blockIdx.x) + 1] = sd;
    part[3 * int64_t(blockIdx.x) + 2] = n;
  }
}

// Launch: one block of kLossThreads threads. Thread j adds the partials of
// blocks j, j + kLossThreads, ... (b < blocks, in order), the block sums those
// in a fixed tree, thread 0 writes the three outputs (0-dim). blocks may be 0
// (N = 0): the losses and the count are then 0.
template <typename T>
__global__ void __launch_bounds__(kLossThreads, 4)
    ppc_ppd_finish_kernel(const double* part, int64_t blocks, T* ppc, T* ppd, T* count) {
  __shared__ double scratch[kLossThreads / kWarp];
  double sc = 0.0, sd = 0.0, n = 0.0;
  for (int64_t b = threadIdx.x; b < blocks; b += kLossThreads) {
    sc += part[3 * b];
    sd += part[3 * b + 1];
    n += part[3 * b + 2];
  }
  sc = cuda::block_sum<kLossThreads>(sc, scratch);
  sd = cuda::block_sum<kLossThreads>(sd, scratch);
  n = cuda::block_sum<kLossThreads>(n, scratch);
  if (threadIdx.x == 0) {
    const double denom = n > 1.0 ? n : 1.0;
    *ppc = T(sc / denom);
    *ppd = T(sd / denom);
    *count = T(n);
  }
}

// Launch: 1-D, one thread per entry e < N * K of grad_own (row e / K, column
// e % K). Writes grad_own[e], and grad_lse[e / K] from the thread of column 0:
// each output entry by one thread. Reads own[e] only at the own-class column
// of a pixel that takes part. grad_ppc, grad_ppd and count are one value each.
template <typename T>
__global__ void __launch_bounds__(kLossThreads, 4)
    ppc_ppd_backward_kernel(const T* grad_ppc, const T* grad_ppd, const T* count, const T* own,
                            const int64_t* target, int64_t N, int64_t K, int64_t ignore_index, double inv_temp,
                            T* grad_lse, T* grad_own) {
  const int64_t e = int64_t(blockIdx.x) * kLossThreads + threadIdx.x;
  if (e >= N * K) return;
  const int64_t n = e / K, k = e - n * K;
  const int64_t t = target[n];
  const bool takes_part = t != ignore_index;
  const double c = double(*count);
  const double denom = c > 1.0 ? c : 1.0;
  const double g_ppc = double(*grad_ppc), g_ppd = double(*grad_ppd);
  double v = 0.0;
  if (takes_part && k == own_column(t, K))
    v = -g_ppc * inv_temp / denom - 2.0 * g_ppd * (1.0 - double(own[e])) / denom;
  grad_own[e] = T(v);
  if (k == 0) grad_lse[n] = takes_part ? T(g_ppc / denom) : T(0);
}

int64_t loss_blocks(int64_t N) { return std::min<int64_t>(kMaxLossBlocks, ceil_div(N, kLossThreads)); }

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> ppc_ppd_cuda(const at::Tensor& lse, const at::Tensor& own,
                                                            const at::Tensor& target, int64_t ignore_index,
                                                            double temperature) {
  check_ppc_ppd_args(lse, own, target, temperature);
  c10::cuda::CUDAGuard guard(lse.device());
  const int64_t N = own.size(0), K = own.size(1);
  at::Tensor ppc = at::empty({}, lse.options()), ppd = at::empty({}, lse.options());
  at::Tensor count = at::empty({}, lse.options());
  const int64_t blocks = loss_blocks(N);
  at::Tensor part = at::empty({std::max<int64_t>(1, 3 * blocks)}, lse.options().dtype(at::kDouble));
  at::Tensor l = lse.contiguous();
  at::Tensor o = own.contiguous();
  at::Tensor t = target.to(at::kLong).contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(lse.scalar_type(), "ppc_ppd_cuda", [&] {
    if (blocks > 0) {
      ppc_ppd_partials_kernel<scalar_t><<<blocks, kLossThreads, 0, stream>>>(
          l.data_ptr<scalar_t>(), o.data_ptr<scalar_t>(), t.data_ptr<int64_t>(), N, K, ignore_index,
          1.0 / temperature, part.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    ppc_ppd_finish_kernel<scalar_t><<<1, kLossThreads, 0, stream>>>(
        part.data_ptr<double>(), blocks, ppc.data_ptr<scalar_t>(), ppd.data_ptr<scalar_t>(),
        count.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {ppc, ppd, count};
}

std::tuple<at::Tensor, at::Tensor> ppc_ppd_backward_cuda(const at::Tensor& grad_ppc, const at::Tensor& grad_ppd,
                                                         const at::Tensor& own, const at::Tensor& target,
                                                         const at::Tensor& count, int64_t ignore_index,
                                                         double temperature) {
  check_ppc_ppd_backward_args(grad_ppc, grad_ppd, own, target, count, temperature);
  c10::cuda::CUDAGuard guard(own.device());
  const int64_t N = own.size(0), K = own.size(1);
  at::Tensor grad_lse = at::empty({N}, own.options());
  at::Tensor grad_own = at::empty({N, K}, own.options());
  if (N == 0) return {grad_lse, grad_own};
  TORCH_CHECK_VALUE(ceil_div(N * K, kLossThreads) <= 0x7fffffff, "own: N * K = ", N * K, " is too large");
  // one value each, in own's dtype (no copy when they have it already)
  at::Tensor gc = grad_ppc.reshape({1}).to(own.scalar_type());
  at::Tensor gd = grad_ppd.reshape({1}).to(own.scalar_type());
  at::Tensor cnt = count.reshape({1}).to(own.scalar_type());
  at::Tensor o = own.contiguous();
  at::Tensor t = target.to(at::kLong).contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(own.scalar_type(), "ppc_ppd_backward_cuda", [&] {
    ppc_ppd_backward_kernel<scalar_t><<<ceil_div(N * K, kLossThreads), kLossThreads, 0, stream>>>(
        gc.data_ptr<scalar_t>(), gd.data_ptr<scalar_t>(), cnt.data_ptr<scalar_t>(), o.data_ptr<scalar_t>(),
        t.data_ptr<int64_t>(), N, K, ignore_index, 1.0 / temperature, grad_lse.data_ptr<scalar_t>(),
        grad_own.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_lse, grad_own};
}

TORCH_LIBRARY_IMPL(protoseg_ext, CUDA, m) {
  m.impl("ppc_ppd", &ppc_ppd_cuda);
  m.impl("ppc_ppd_backward", &ppc_ppd_backward_cuda);
}

}  // namespace protoseg

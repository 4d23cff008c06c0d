// Instruction-set variants of the CPU kernels, chosen once at run time.
//
// The hot kernel files (similarity, sinkhorn, prototype update, mask_norm) are
// compiled once per variant: baseline x86-64 (SSE2; on other architectures
// the only one), AVX2 + FMA and AVX-512 (F, BW, VL, DQ). The build passes
// PROTOSEG_CPU_CAPABILITY=avx2 or avx512 to the extra copies, which puts all
// their code in the namespace protoseg::avx2 or protoseg::avx512; the default
// compilation is protoseg::baseline. Only the baseline copy registers the ops,
// each with a dispatcher that calls the variant cpu_isa() selects:
//
//   namespace protoseg {
//   namespace PROTOSEG_CPU_CAPABILITY {
//   at::Tensor my_op_cpu(const at::Tensor& x) { ... }
//   }  // namespace PROTOSEG_CPU_CAPABILITY
//   #if PROTOSEG_CPU_BASELINE
//   PROTOSEG_CPU_VARIANTS(my_op_cpu)
//   TORCH_LIBRARY_IMPL(protoseg_ext, CPU, m) { m.impl("my_op", PROTOSEG_CPU_DISPATCH(my_op_cpu)); }
//   #endif
//   }  // namespace protoseg
//
// Helpers that the compiler may leave out of line (rows.h) must sit in the
// variant namespace too: an inline function compiled in two variants under one
// name is kept once by the linker, which would otherwise call the AVX-512 copy
// from the baseline kernels (or the reverse). The build links the baseline
// objects first, so code outside these namespaces shared by several copies
// (ATen and standard-library inline functions) is always the baseline one.
#pragma once
#include <string>
#include <vector>

// PROTOSEG_CPU_VARIANTS_BUILT=1: the build compiled the AVX2 and AVX-512
// copies (x86-64 only); otherwise the baseline is the only variant.
#ifndef PROTOSEG_CPU_VARIANTS_BUILT
#define PROTOSEG_CPU_VARIANTS_BUILT 0
#endif
#if PROTOSEG_CPU_VARIANTS_BUILT && !(defined(__x86_64__) || defined(_M_X64))
#error "PROTOSEG_CPU_VARIANTS_BUILT=1 needs an x86-64 target (the AVX2 and AVX-512 variants)"
#endif

#ifndef PROTOSEG_CPU_CAPABILITY
#define PROTOSEG_CPU_CAPABILITY baseline
#define PROTOSEG_CPU_BASELINE 1
#else
#define PROTOSEG_CPU_BASELINE 0
#endif

namespace protoseg {

// In order: each variant's instructions include the previous one's.
enum class CpuIsa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// The environment variable that forces a variant.
constexpr const char* kCpuIsaEnv = "PROTOSEG_CPU_ISA";

// "baseline", "avx2" or "avx512"
const char* cpu_isa_name(CpuIsa isa);

// The variants this build contains that this CPU (and OS) can run, in order.
std::vector<CpuIsa> cpu_isa_supported();

// The variant the kernels run: PROTOSEG_CPU_ISA when set (and not "auto"),
// else the best supported one; decided on the first call. Throws a
// c10::Error naming the variable when its value is unknown, names a variant
// this build lacks, or one this CPU cannot run.
CpuIsa cpu_isa();

// Calls the variant of a kernel that cpu_isa() selects; one instantiation per
// kernel, registered as the op's CPU implementation.
template <auto Baseline, auto Avx2, auto Avx512>
struct CpuIsaDispatch;
template <typename R, typename... A, R (*Baseline)(A...), R (*Avx2)(A...), R (*Avx512)(A...)>
struct CpuIsaDispatch<Baseline, Avx2, Avx512> {
  static R call(A... args) {
    switch (cpu_isa()) {
      case CpuIsa::kAvx512:
        return Avx512(args...);
      case CpuIsa::kAvx2:
        return Avx2(args...);
      default:
        return Baseline(args...);
    }
  }
};

}  // namespace protoseg

#if PROTOSEG_CPU_VARIANTS_BUILT
// Declares the AVX2 and AVX-512 copies of baseline::fn (defined in the other
// compilations of the same file), at namespace protoseg scope.
#define PROTOSEG_CPU_VARIANTS(fn)     \
  namespace avx2 {                    \
  decltype(baseline::fn) fn;          \
  }                                   \
  namespace avx512 {                  \
  decltype(baseline::fn) fn;          \
  }
// The function to register for kernel fn: picks its variant on every call.
#define PROTOSEG_CPU_DISPATCH(fn) (&::protoseg::CpuIsaDispatch<&baseline::fn, &avx2::fn, &avx512::fn>::call)
#else  // one variant; the dispatcher still checks PROTOSEG_CPU_ISA
#define PROTOSEG_CPU_VARIANTS(fn)
#define PROTOSEG_CPU_DISPATCH(fn) (&::protoseg::CpuIsaDispatch<&baseline::fn, &baseline::fn, &baseline::fn>::call)
#endif

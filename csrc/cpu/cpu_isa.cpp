// Which instruction-set variant of the CPU kernels runs (see cpu_isa.h).
// Compiled once, for the baseline ISA.
#include "cpu_isa.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

namespace protoseg {
namespace {

constexpr CpuIsa kAllIsas[] = {CpuIsa::kBaseline, CpuIsa::kAvx2, CpuIsa::kAvx512};

bool built(CpuIsa isa) { return isa == CpuIsa::kBaseline || PROTOSEG_CPU_VARIANTS_BUILT; }

// Whether this CPU, and the OS (which must save the wider registers), run the
// variant's instructions: the same extensions the build enables for it.
bool cpu_runs(CpuIsa isa) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();  // may run before libgcc's own constructor
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  switch (isa) {
    case CpuIsa::kBaseline:
      return true;
    case CpuIsa::kAvx2:
      return avx2;
    case CpuIsa::kAvx512:
      return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }
  return false;
#else
  return isa == CpuIsa::kBaseline;
#endif
}

std::string names(const std::vector<CpuIsa>& isas) {
  std::string s;
  for (CpuIsa isa : isas) s += (s.empty() ? "" : ", ") + std::string(cpu_isa_name(isa));
  return s;
}

CpuIsa choose_cpu_isa() {
  const std::vector<CpuIsa> supported = cpu_isa_supported();
  const char* env = std::getenv(kCpuIsaEnv);
  if (env == nullptr || env[0] == '\0' || std::strcmp(env, "auto") == 0) return supported.back();
  for (CpuIsa isa : kAllIsas) {
    if (std::strcmp(env, cpu_isa_name(isa)) != 0) continue;
    TORCH_CHECK(built(isa), kCpuIsaEnv, "=", env, " asks for CPU kernels this build of protoseg_ext does not contain",
                " (it has: ", names(supported), "; the AVX2 and AVX-512 variants are built on x86-64 only)");
    TORCH_CHECK(cpu_runs(isa), kCpuIsaEnv, "=", env, " asks for CPU kernels this CPU cannot run (it runs: ",
                names(supported), "); unset ", kCpuIsaEnv, " to use the best of them");
    return isa;
  }
  TORCH_CHECK_VALUE(false, kCpuIsaEnv, "='", env, "' is not a CPU kernel variant: use baseline, avx2, avx512 or auto",
                    " (or leave it unset for the best this CPU runs: ", cpu_isa_name(supported.back()), ")");
  return CpuIsa::kBaseline;  // not reached
}

}  // namespace

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx2:
      return "avx2";
    case CpuIsa::kAvx512:
      return "avx512";
    default:
      return "baseline";
  }
}

std::vector<CpuIsa> cpu_isa_supported() {
  std::vector<CpuIsa> out;
  for (CpuIsa isa : kAllIsas)
    if (built(isa) && cpu_runs(isa)) out.push_back(isa);
  return out;
}

CpuIsa cpu_isa() {
  static const CpuIsa isa = choose_cpu_isa();  // an exception leaves it unset: the next call throws again
  return isa;
}

}  // namespace protoseg

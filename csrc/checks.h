// Argument checks shared by the CPU and CUDA front ends. TORCH_CHECK_VALUE
// raises a Python ValueError; every message names the argument.
#pragma once
#include <ATen/ATen.h>

namespace protoseg {

inline void check_floating(const at::Tensor& t, const char* name) {
  auto st = t.scalar_type();
  TORCH_CHECK_VALUE(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
                    name, " must be float32, float64, float16 or bfloat16, got ", st);
}

inline void check_integer(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(at::isIntegralType(t.scalar_type(), /*includeBool=*/false), name,
                    " must be an integer tensor, got ", t.scalar_type());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name, const char* shape) {
  TORCH_CHECK_VALUE(t.dim() == dim, name, " must be ", shape, ", got shape ", t.sizes());
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* name_a, const char* name_b) {
  TORCH_CHECK_VALUE(a.device() == b.device(), name_a, " is on ", a.device(), " but ", name_b, " is on ",
                    b.device(), "; all inputs must be on one device");
}

// Working (accumulation) dtype: float64 for float64 inputs, else float32.
inline at::ScalarType acc_type(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace protoseg

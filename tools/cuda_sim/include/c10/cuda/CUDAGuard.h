// cuda_sim stand-in for c10/cuda/CUDAGuard.h: one (CPU) device, nothing to guard.
#pragma once
#include <c10/core/Device.h>
#include <c10/util/Optional.h>
namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
  explicit CUDAGuard(c10::DeviceIndex) {}
};
struct OptionalCUDAGuard {
  OptionalCUDAGuard() = default;
  explicit OptionalCUDAGuard(c10::optional<c10::Device>) {}
};
}  // namespace cuda
}  // namespace c10

// cuda_sim: the SIMT execution model of CUDA on a CPU, for testing the
// project's CUDA kernels (csrc/cuda/*.cu) where no GPU is present.
//
// tools/cuda_sim/build.py rewrites the .cu sources (launches, pointers in
// device code, __shared__ declarations) and compiles them as C++ with this
// header force-included. What a kernel sees:
//   - every CUDA thread of a block is a cooperative fiber; a fiber runs until
//     it waits (__syncthreads, a warp shuffle or vote, __syncwarp) or exits;
//   - __syncthreads releases once every live (not exited) thread of the block
//     waits at it; threads waiting at different __syncthreads lines are an
//     error, as is a barrier or warp collective no thread can complete;
//   - a warp collective releases once every lane of its mask waits at one;
//     a mask naming an exited lane is an error;
//   - blocks run one after another, and between two waits the threads (and
//     the blocks of a grid) run in the order PROTOSEG_SIM_ORDER says:
//     forward (0, 1, ...), reverse, or random (seeded by PROTOSEG_SIM_SEED);
//   - shared memory (static and dynamic) is filled with 0xFF bytes before
//     each block: NaN for every floating-point type, -1 for integers, so a
//     read before the write that should precede it shows in the results;
//   - pointers in device code are bounds-checked against the tensor storage
//     they point into: an out-of-bounds (or misaligned) read or write, a
//     device-side assert, an invalid launch configuration or a block size
//     above __launch_bounds__ stops the launch with an error naming the kernel.
// Blocks and threads run on the calling OS thread, so atomics are plain
// read-modify-writes (their order follows the schedule).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};
using uint3 = dim3;
typedef struct cudasim_stream* cudaStream_t;

namespace cudasim {

constexpr int kWarpSize = 32;

// ---- the running kernel (defined in runtime.cpp) --------------------------

[[noreturn]] void fail(const std::string& what);  // stops the launch with an error
const dim3& thread_index();
const dim3& block_index();
const dim3& block_dim();
const dim3& grid_dim();
void syncthreads(const char* file, int line);

// Warp collectives: every lane of `mask` passes `in` (up to 16 bytes) and
// gets back what the operation gives it.
enum class WarpOp : int { Shfl, ShflXor, ShflUp, ShflDown, All, Any, Ballot, Sync };
void warp_collective(WarpOp op, unsigned mask, const void* in, size_t size, int arg, int width, void* out,
                     const char* file, int line);

// Shared memory of the running block: a static __shared__ declaration (one
// per `tag`, i.e. per declaration and template instance) and the dynamic one.
void* static_shared(const void* tag, size_t size, size_t align);
void* dynamic_shared(size_t* bytes);
void check_launch_bounds(int max_threads, const char* kernel);

// Global memory: the storage extents of the tensors whose data pointers the
// host code took (build.py wraps each `t.data_ptr<T>()` in track()).
struct Extent {
  uintptr_t lo = 0, hi = 0;
  const char* name = nullptr;  // the host expression, for messages
};
void register_extent(const void* data, size_t bytes, const char* name);
Extent find_extent(const void* p);  // global registry or the block's shared memory; empty if none
[[noreturn]] void fail_access(const Extent& e, uintptr_t addr, size_t size, size_t align, bool write,
                              const char* type);

inline const at::Tensor& track(const at::Tensor& t, const char* name) {
  if (t.defined() && t.has_storage() && t.storage().data() != nullptr)
    register_extent(t.storage().data(), t.storage().nbytes(), name);
  return t;
}

// ---- bounds-checked pointers -----------------------------------------------

template <class T>
class gptr {
 public:
  using element_type = T;
  gptr() = default;
  gptr(std::nullptr_t) {}
  gptr(T* p) : p_(p), e_(p ? find_extent(p) : Extent{}) {}
  template <class U, class = std::enable_if_t<std::is_convertible_v<U*, T*>>>
  gptr(const gptr<U>& o) : p_(o.raw()), e_(o.extent()) {}

  T* raw() const { return p_; }
  const Extent& extent() const { return e_; }
  T& operator*() const { return *check(p_); }
  T* operator->() const { return check(p_); }
  T& operator[](int64_t i) const { return *check(offset(i)); }

  gptr operator+(int64_t i) const { return gptr(offset(i), e_); }
  gptr operator-(int64_t i) const { return gptr(offset(-i), e_); }
  friend gptr operator+(int64_t i, const gptr& g) { return g + i; }
  std::ptrdiff_t operator-(const gptr& o) const { return p_ - o.p_; }
  gptr& operator+=(int64_t i) { p_ = offset(i); return *this; }
  gptr& operator-=(int64_t i) { p_ = offset(-i); return *this; }
  gptr& operator++() { return *this += 1; }
  gptr& operator--() { return *this -= 1; }
  gptr operator++(int) { gptr o = *this; *this += 1; return o; }
  gptr operator--(int) { gptr o = *this; *this -= 1; return o; }
  explicit operator bool() const { return p_ != nullptr; }
  friend bool operator==(const gptr& a, std::nullptr_t) { return a.p_ == nullptr; }
  friend bool operator!=(const gptr& a, std::nullptr_t) { return a.p_ != nullptr; }
  template <class U> bool operator==(const gptr<U>& o) const { return p_ == o.raw(); }
  template <class U> bool operator!=(const gptr<U>& o) const { return p_ != o.raw(); }
  template <class U> bool operator<(const gptr<U>& o) const { return p_ < o.raw(); }

 private:
  gptr(T* p, const Extent& e) : p_(p), e_(e) {}
  // pointer arithmetic in integers: an address outside the buffer may be
  // formed (CUDA code does), only an access to it is an error
  T* offset(int64_t i) const {
    return reinterpret_cast<T*>(reinterpret_cast<uintptr_t>(p_) + uintptr_t(i) * sizeof(T));
  }
  T* check(T* q) const {
    const uintptr_t a = reinterpret_cast<uintptr_t>(q);
    if (a < e_.lo || a + sizeof(T) > e_.hi || a % alignof(T) != 0 || e_.lo == e_.hi)
      fail_access(e_, a, sizeof(T), alignof(T), !std::is_const_v<T>, typeid(T).name());
    return q;
  }
  T* p_ = nullptr;
  Extent e_;
};

// ---- launches -----------------------------------------------------------------

struct LaunchConfig {
  dim3 grid, block;
  size_t dynamic_smem;
  LaunchConfig(dim3 g, dim3 b, size_t smem = 0, cudaStream_t = nullptr) : grid(g), block(b), dynamic_smem(smem) {}
};

// Runs body() once per thread of every block of the grid; throws a c10::Error
// (Python RuntimeError) naming the kernel if the launch fails.
void run_grid(const char* kernel, const char* file, int line, const LaunchConfig& cfg,
              const std::function<void()>& body);

template <class... P, class... A>
void launch(const char* kernel, const char* file, int line, const LaunchConfig& cfg, void (*fn)(P...), A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel launched with the wrong number of arguments");
  // the arguments as the kernel's parameter types, once per launch (raw
  // pointers become bounds-checked pointers here)
  std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
  run_grid(kernel, file, line, cfg, [&] { std::apply(fn, params); });
}

// at::empty in the host code of the .cu files (build.py rewrites the calls):
// the memory comes back filled with 0xFF bytes, as fresh device memory holds
// garbage, so a kernel that reads what no kernel wrote sees NaN or -1.
inline at::Tensor empty(at::IntArrayRef size, const at::TensorOptions& options) {
  at::Tensor t = at::empty(size, options);
  if (t.numel() > 0) std::memset(t.data_ptr(), 0xFF, t.nbytes());
  return t;
}

[[noreturn]] void device_assert(const char* cond, const char* msg, const char* file, int line);

// ---- warp-level intrinsics ------------------------------------------------------

template <class T>
T warp_exchange(WarpOp op, unsigned mask, T v, int arg, int width, const char* file, int line) {
  static_assert(sizeof(T) <= 16 && std::is_trivially_copyable_v<T>, "warp shuffle of an unsupported type");
  T out;
  warp_collective(op, mask, &v, sizeof(T), arg, width, &out, file, line);
  return out;
}
inline unsigned warp_vote(WarpOp op, unsigned mask, int pred, const char* file, int line) {
  unsigned out = 0;
  const unsigned in = pred ? 1u : 0u;
  warp_collective(op, mask, &in, sizeof(in), 0, kWarpSize, &out, file, line);
  return out;
}

// ---- atomics (threads are cooperative: a read-modify-write is atomic) ------------

template <class T> T& atomic_ref(gptr<T> p) { return *p; }
template <class T> T& atomic_ref(T* p) { return *gptr<T>(p); }

}  // namespace cudasim

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __restrict__
#define warpSize 32
#define threadIdx (::cudasim::thread_index())
#define blockIdx (::cudasim::block_index())
#define blockDim (::cudasim::block_dim())
#define gridDim (::cudasim::grid_dim())
#define __syncthreads() ::cudasim::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) ::cudasim::warp_vote(::cudasim::WarpOp::Sync, ::cudasim::sim_mask(__VA_ARGS__), 1, __FILE__, __LINE__)
#define __threadfence() ((void)0)
#define __threadfence_block() ((void)0)
#define __shfl_sync(mask, v, src, ...) \
  ::cudasim::warp_exchange(::cudasim::WarpOp::Shfl, mask, v, src, ::cudasim::sim_width(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_xor_sync(mask, v, lm, ...) \
  ::cudasim::warp_exchange(::cudasim::WarpOp::ShflXor, mask, v, lm, ::cudasim::sim_width(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_up_sync(mask, v, d, ...) \
  ::cudasim::warp_exchange(::cudasim::WarpOp::ShflUp, mask, v, d, ::cudasim::sim_width(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_down_sync(mask, v, d, ...) \
  ::cudasim::warp_exchange(::cudasim::WarpOp::ShflDown, mask, v, d, ::cudasim::sim_width(__VA_ARGS__), __FILE__, __LINE__)
#define __all_sync(mask, p) (::cudasim::warp_vote(::cudasim::WarpOp::All, mask, p, __FILE__, __LINE__) != 0u)
#define __any_sync(mask, p) (::cudasim::warp_vote(::cudasim::WarpOp::Any, mask, p, __FILE__, __LINE__) != 0u)
#define __ballot_sync(mask, p) ::cudasim::warp_vote(::cudasim::WarpOp::Ballot, mask, p, __FILE__, __LINE__)

namespace cudasim {
inline int sim_width(int w = kWarpSize) { return w; }
inline unsigned sim_mask(unsigned m = 0xffffffffu) { return m; }
}  // namespace cudasim

template <class P, class V> auto atomicAdd(P p, V v) {
  auto& r = ::cudasim::atomic_ref(p);
  auto old = r;
  r = static_cast<std::remove_reference_t<decltype(r)>>(old + v);
  return old;
}
template <class P, class V> auto atomicSub(P p, V v) {
  auto& r = ::cudasim::atomic_ref(p);
  auto old = r;
  r = old - v;
  return old;
}
template <class P, class V> auto atomicMax(P p, V v) {
  auto& r = ::cudasim::atomic_ref(p);
  auto old = r;
  if (old < v) r = v;
  return old;
}
template <class P, class V> auto atomicMin(P p, V v) {
  auto& r = ::cudasim::atomic_ref(p);
  auto old = r;
  if (v < old) r = v;
  return old;
}
template <class P, class V> auto atomicExch(P p, V v) {
  auto& r = ::cudasim::atomic_ref(p);
  auto old = r;
  r = v;
  return old;
}
template <class P, class V> auto atomicCAS(P p, V compare, V v) {
  auto& r = ::cudasim::atomic_ref(p);
  auto old = r;
  if (old == compare) r = v;
  return old;
}
template <class T> T __ldg(::cudasim::gptr<const T> p) { return *p; }
template <class T> T __ldg(const T* p) { return *::cudasim::gptr<const T>(p); }

#undef CUDA_KERNEL_ASSERT
#undef CUDA_KERNEL_ASSERT_MSG
#define CUDA_KERNEL_ASSERT(cond) \
  do { if (!(cond)) ::cudasim::device_assert(#cond, "", __FILE__, __LINE__); } while (0)
#define CUDA_KERNEL_ASSERT_MSG(cond, msg) \
  do { if (!(cond)) ::cudasim::device_assert(#cond, msg, __FILE__, __LINE__); } while (0)

// build.py writes `gptr<T> name = ::cudasim::shared_array<T>(CUDASIM_TAG, n);`
// in place of `__shared__ T name[n];` (shared_var for a scalar), and `::cudasim::gptr<T> name =
// ::cudasim::shared_dynamic<T>();` for `extern __shared__ T name[];`. The
// tag is one static per declaration and template instance.
#define CUDASIM_TAG ([] { static const char tag = 0; return &tag; }())
namespace cudasim {
template <class T> T& shared_var(const void* tag) {
  return *static_cast<T*>(static_shared(tag, sizeof(T), alignof(T)));
}
template <class T> gptr<T> shared_array(const void* tag, int64_t n) {
  return gptr<T>(static_cast<T*>(static_shared(tag, sizeof(T) * size_t(n), alignof(T))));
}
template <class T> gptr<T> shared_dynamic() { return gptr<T>(static_cast<T*>(dynamic_shared(nullptr))); }
}  // namespace cudasim

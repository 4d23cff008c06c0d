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
//   - shared memory (static and dynamic) is poisoned before each block, as is
//     fresh memory of the host code (see fill_poison below), so a read before
//     the write that should precede it shows in the results;
//   - pointers in device code are bounds-checked against the tensor storage
//     they point into (a row of a multi-dimensional __shared__ array: that
//     row): an out-of-bounds (or misaligned) read or write, a device-side
//     assert, an invalid launch configuration or a block size above
//     __launch_bounds__ stops the launch with an error naming the kernel;
//   - the race checker (runtime.cpp) sees every access through a checked
//     pointer and stops the launch at the first race, whatever the order.
// Blocks and threads run on the calling OS thread, so atomics are plain
// read-modify-writes (their order follows the schedule); the race checker
// knows them as atomics.
#pragma once

#include <ATen/ATen.h>
#include <ATen/record_function.h>
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
void* static_shared(const void* tag, size_t size, size_t align, const char* name);
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

// The race checker (runtime.cpp): every checked access of device code, with
// the address of the code that made it (its source line, on a report).
//   note_read:   a load through a pointer to const (a read, for sure);
//   note_access: a load or store through a pointer to non-const: what it was
//                is decided when the thread's next access (or wait, or exit)
//                comes: a store if the bytes changed, else a load;
//   note_atomic: an atomic read-modify-write.
// `type` names the element type for a report. No-ops outside a kernel, or
// with PROTOSEG_SIM_RACECHECK=0.
extern bool g_checking;  // the race checker or the traffic meter is on (device code runs only in launches)
void note_read(const void* p, size_t size, const void* pc, const char* type);
void note_access(const void* p, size_t size, const void* pc, const char* type);
void note_atomic(const void* p, size_t size, const void* pc, const char* type);

// The extent that a pointer taken from `t.data_ptr()` carries into a kernel:
// the bytes of that view (from its lowest to its highest element), not its
// whole storage; keyed by the pointer's value (the latest view wins; a storage
// registered anew drops the views of the freed ones whose bytes it takes).
void register_view(const void* data, uintptr_t lo, uintptr_t hi, const char* name);

inline const at::Tensor& track(const at::Tensor& t, const char* name) {
  if (t.defined() && t.has_storage() && t.storage().data() != nullptr) {
    register_extent(t.storage().data(), t.storage().nbytes(), name);
    const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
    int64_t lo = 0, hi = 0;  // element offsets from p
    bool empty = false;
    for (int64_t d = 0; d < t.dim(); ++d) {
      if (t.size(d) == 0) empty = true;
      const int64_t span = (t.size(d) - 1) * t.stride(d);
      (span < 0 ? lo : hi) += span;
    }
    const int64_t item = int64_t(t.element_size());
    if (empty) register_view(t.data_ptr(), p, p, name);
    else register_view(t.data_ptr(), uintptr_t(int64_t(p) + lo * item), uintptr_t(int64_t(p) + (hi + 1) * item), name);
  }
  return t;
}

// ---- bounds-checked pointers -----------------------------------------------

template <class T>
class gptr;

namespace detail {
template <class T>
struct is_gptr : std::false_type {};
template <class T>
struct is_gptr<gptr<T>> : std::true_type {};
}  // namespace detail

// A pointer of device code: the extent it may access (a tensor view, a
// shared array or one row of it), checked on every access; each access is
// noted for the race checker. For an array type T (a row of a
// multi-dimensional shared array), p[i] is the checked pointer to row i.
template <class T>
class gptr {
 public:
  using element_type = T;
  gptr() = default;
  gptr(std::nullptr_t) {}
  gptr(T* p) : p_(p), e_(p ? find_extent(p) : Extent{}) {}
  gptr(T* p, const Extent& e) : p_(p), e_(e) {}
  template <class U, class = std::enable_if_t<std::is_convertible_v<U*, T*>>>
  gptr(const gptr<U>& o) : p_(o.raw()), e_(o.extent()) {}

  T* raw() const { return p_; }
  const Extent& extent() const { return e_; }
  [[gnu::noinline]] T& operator*() const { return access(p_, __builtin_return_address(0)); }
  [[gnu::noinline]] T* operator->() const { return &access(p_, __builtin_return_address(0)); }
  [[gnu::noinline]] decltype(auto) operator[](int64_t i) const {
    if constexpr (std::is_array_v<T>) {
      using Row = std::remove_extent_t<T>;
      T* q = check(offset(i));
      const uintptr_t a = reinterpret_cast<uintptr_t>(q);
      return gptr<Row>(reinterpret_cast<Row*>(q), Extent{a, a + sizeof(T), e_.name});
    } else {
      return access(offset(i), __builtin_return_address(0));
    }
  }
  // an atomic read-modify-write of *p (atomicAdd and friends)
  [[gnu::noinline]] T& atomic(const void* pc) const {
    check(p_);
    if (g_checking) note_atomic(p_, sizeof(T), pc, typeid(T).name());
    return *p_;
  }

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
  T& access(T* q, const void* pc) const {
    check(q);
    if (g_checking) {
      if constexpr (std::is_const_v<T>) note_read(q, sizeof(T), pc, typeid(T).name());
      else note_access(q, sizeof(T), pc, typeid(T).name());
    }
    return *q;
  }
  T* p_ = nullptr;
  Extent e_;
};

// ---- local arrays -----------------------------------------------------------
// `T name[n];` in device code becomes `local_array<T, n> name("name");`
// (`T name[n][m]` a local_array of local_arrays): every index checked, and
// the entries start poisoned, as uninitialised registers hold garbage.
[[noreturn]] void fail_local_index(const char* name, int64_t i, int64_t n);

template <class T, int64_t N>
struct local_array {
  T v[N];
  const char* name = nullptr;
  local_array() { fill_poison_local(); }
  explicit local_array(const char* n) : name(n) { fill_poison_local(); }
  local_array(const char* n, std::initializer_list<T> init) : name(n) {
    fill_poison_local();
    int64_t i = 0;
    for (const T& x : init) v[i++] = x;
  }
  T& operator[](int64_t i) {
    if (i < 0 || i >= N) fail_local_index(name, i, N);
    return v[i];
  }
  const T& operator[](int64_t i) const {
    if (i < 0 || i >= N) fail_local_index(name, i, N);
    return v[i];
  }
  // decays to a checked pointer to its first entry
  operator gptr<T>() {
    const uintptr_t a = reinterpret_cast<uintptr_t>(&v[0]);
    return gptr<T>(&v[0], Extent{a, a + sizeof(v), name});
  }

 private:
  void fill_poison_local();
};

// ---- launches -----------------------------------------------------------------

struct LaunchConfig {
  dim3 grid, block;
  size_t dynamic_smem;
  LaunchConfig(dim3 g, dim3 b, size_t smem = 0, cudaStream_t = nullptr) : grid(g), block(b), dynamic_smem(smem) {}
};

// Runs body() once per thread of every block of the grid; throws a c10::Error
// (Python RuntimeError) naming the kernel if the launch fails. `fn` is the
// kernel's address, for the limit cudaFuncSetAttribute gave it.
void run_grid(const char* kernel, const void* fn, const char* file, int line, const LaunchConfig& cfg,
              const std::function<void()>& body);

// The opt-in above 48 KiB of shared memory per block: the most dynamic
// shared memory a launch of `fn` may take (cudaFuncSetAttribute below).
// Fails with cudaErrorInvalidValue above the device's opt-in limit; a launch
// then fails if its static and dynamic shared memory together exceed it.
int set_max_dynamic_smem(const void* fn, int bytes);

// Rows per tile of the CUDA code's tile loops (similarity_common.cuh,
// tile_rows) when PROTOSEG_SIM_TILE_ROWS sets them (> 0), else 0: the tool
// that counts a step's launches (tools/gpu_model.py) runs a small map in
// several tiles to tell the launches per tile from the rest.
int64_t tile_rows_override();

// The traffic meter's tile loops (runtime.cpp): meter_tile at the start of
// each tile of a host loop (loop_rows: the loop's rows per tile at any map
// size, before the cap by the image, 0 for a tile per image; rows: this
// tile's), meter_tiles_end after the loop. No-ops with the meter off.
void meter_tile(int64_t loop_rows, int64_t rows);
void meter_tiles_end();

template <class... P, class... A>
void launch(const char* kernel, const char* file, int line, const LaunchConfig& cfg, void (*fn)(P...), A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel launched with the wrong number of arguments");
  // the arguments as the kernel's parameter types, once per launch (raw
  // pointers become bounds-checked pointers here)
  std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
  RECORD_FUNCTION("cudasim::launch", std::vector<c10::IValue>());  // one device launch, for a profiler's count
  run_grid(kernel, reinterpret_cast<const void*>(fn), file, line, cfg, [&] { std::apply(fn, params); });
}

// Fresh memory in the host code of every file the emulator compiles (build.py
// rewrites at::empty, at::empty_like, at::empty_strided and t.new_empty): its
// whole storage comes back poisoned, as fresh device memory holds garbage, so
// a kernel that reads what no kernel wrote sees it. PROTOSEG_SIM_POISON picks
// the poison (runtime.cpp, fill_poison): `nan` (default: 0xFF bytes, NaN in
// every float type, -1 in every integer) or `garbage` (random bytes that are
// finite in every float type, so a kernel's own non-finite fallback cannot
// hide a read of stale data). Shared memory gets the same poison per block.
void fill_poison(void* p, size_t bytes);
inline at::Tensor poisoned(at::Tensor t) {
  if (t.defined() && t.has_storage() && t.storage().data() != nullptr && t.storage().nbytes() > 0)
    fill_poison(const_cast<void*>(t.storage().data()), t.storage().nbytes());
  return t;
}
inline at::Tensor empty(at::IntArrayRef size, const at::TensorOptions& options = {},
                        std::optional<at::MemoryFormat> mf = std::nullopt) {
  return poisoned(at::empty(size, options, mf));
}
inline at::Tensor empty_like(const at::Tensor& t, const at::TensorOptions& options = {},
                             std::optional<at::MemoryFormat> mf = std::nullopt) {
  return poisoned(at::empty_like(t, options, mf));
}
inline at::Tensor empty_strided(at::IntArrayRef size, at::IntArrayRef stride, const at::TensorOptions& options = {}) {
  return poisoned(at::empty_strided(size, stride, options));
}
inline at::Tensor new_empty(const at::Tensor& t, at::IntArrayRef size, const at::TensorOptions& options = {}) {
  return poisoned(t.new_empty(size, options));
}

[[noreturn]] void device_assert(const char* cond, const char* msg, const char* file, int line);

// ---- GEMMs of the host code (build.py rewrites at::mm_out, at::mm, at::mv) ----
// They run as ATen calls on the CPU tensors; the traffic meter (runtime.cpp)
// records each one's shape, dtypes, flops and operand bytes.
void record_gemm(const char* op, int64_t m, int64_t n, int64_t k, const at::Tensor& a, const at::Tensor& b,
                 const at::Tensor& out);
// Each GEMM below runs inside a "cudasim::gemm" profiler scope: one launch on
// a GPU, whatever ATen ops the CPU runs for it (the upcast copies of
// mm.dtype_out among them).
#define CUDASIM_GEMM_SCOPE() RECORD_FUNCTION("cudasim::gemm", std::vector<c10::IValue>())
inline const at::Tensor& mm_out(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  record_gemm("mm", a.size(0), b.size(1), a.size(1), a, b, out);
  CUDASIM_GEMM_SCOPE();
  at::Tensor o = out;
  at::mm_out(o, a, b);
  return out;
}
// mm.dtype_out: a 16-bit GEMM with fp32 accumulation and output (tensor cores
// on a GPU). ATen has no CPU kernel for it; the emulator computes it as an
// fp32 GEMM of the upcast operands (every product of two 16-bit values is
// exact in fp32; only the order of the fp32 sums may differ from cuBLAS).
inline const at::Tensor& mm_out(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                                at::ScalarType out_dtype) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type() && (a.scalar_type() == at::kHalf || a.scalar_type() == at::kBFloat16),
              "cuda_sim: mm_out with out_dtype: the operands must be both float16 or both bfloat16, got ",
              a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(out_dtype == at::kFloat && out.scalar_type() == at::kFloat,
              "cuda_sim: mm_out with out_dtype: only float32 output is emulated, got ", out_dtype, " into ",
              out.scalar_type());
  record_gemm("mm.dtype_out", a.size(0), b.size(1), a.size(1), a, b, out);
  CUDASIM_GEMM_SCOPE();
  at::Tensor o = out;
  at::mm_out(o, a.to(at::kFloat), b.to(at::kFloat));
  return out;
}
inline at::Tensor mm(const at::Tensor& a, const at::Tensor& b) {
  CUDASIM_GEMM_SCOPE();
  at::Tensor out = at::mm(a, b);
  record_gemm("mm", a.size(0), b.size(1), a.size(1), a, b, out);
  return out;
}
inline at::Tensor mv(const at::Tensor& a, const at::Tensor& x) {
  CUDASIM_GEMM_SCOPE();
  at::Tensor out = at::mv(a, x);
  record_gemm("mv", a.size(0), 1, a.size(1), a, x, out);
  return out;
}

template <class T, int64_t N>
void local_array<T, N>::fill_poison_local() {
  if constexpr (std::is_trivially_copyable_v<T>) fill_poison(static_cast<void*>(v), sizeof(v));
}

// Whether mutation `id` is switched on (PROTOSEG_SIM_MUTANT=id): the mutation
// checks of tests/test_cuda_sim.py build one library in which every mutation
// site reads `::cudasim::mutant(id) ? mutated : original`.
bool mutant(int id);

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

// ---- atomics (threads are cooperative: a read-modify-write is atomic; the
// race checker notes it as atomic, at the line of the atomicAdd/... call) ------------

template <class T> [[gnu::always_inline]] inline T& atomic_ref(gptr<T> p, const void* pc) { return p.atomic(pc); }
template <class T> [[gnu::always_inline]] inline T& atomic_ref(T* p, const void* pc) { return gptr<T>(p).atomic(pc); }

}  // namespace cudasim

#define __global__
#define __device__
#define __host__
// inlined here too: the meter counts a warp instruction per code address, and a
// helper called at two places of a kernel is two instructions on a GPU
#define __forceinline__ inline __attribute__((always_inline))
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

template <class P, class V> [[gnu::noinline]] auto atomicAdd(P p, V v) {
  auto& r = ::cudasim::atomic_ref(p, __builtin_return_address(0));
  auto old = r;
  r = static_cast<std::remove_reference_t<decltype(r)>>(old + v);
  return old;
}
template <class P, class V> [[gnu::noinline]] auto atomicSub(P p, V v) {
  auto& r = ::cudasim::atomic_ref(p, __builtin_return_address(0));
  auto old = r;
  r = old - v;
  return old;
}
template <class P, class V> [[gnu::noinline]] auto atomicMax(P p, V v) {
  auto& r = ::cudasim::atomic_ref(p, __builtin_return_address(0));
  auto old = r;
  if (old < v) r = v;
  return old;
}
template <class P, class V> [[gnu::noinline]] auto atomicMin(P p, V v) {
  auto& r = ::cudasim::atomic_ref(p, __builtin_return_address(0));
  auto old = r;
  if (v < old) r = v;
  return old;
}
template <class P, class V> [[gnu::noinline]] auto atomicExch(P p, V v) {
  auto& r = ::cudasim::atomic_ref(p, __builtin_return_address(0));
  auto old = r;
  r = v;
  return old;
}
template <class P, class V> [[gnu::noinline]] auto atomicCAS(P p, V compare, V v) {
  auto& r = ::cudasim::atomic_ref(p, __builtin_return_address(0));
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

// build.py writes `gptr<T> name = ::cudasim::shared_array<T>(CUDASIM_TAG, n, "name");`
// in place of `__shared__ T name[n];` (`__shared__ T name[n][m]` gives a
// gptr<T[m]>, each index checked), shared_var for a scalar, and
// `::cudasim::gptr<T> name = ::cudasim::shared_dynamic<T>();` for
// `extern __shared__ T name[];`. The tag is one static per declaration and
// template instance.
#define CUDASIM_TAG ([] { static const char tag = 0; return &tag; }())
namespace cudasim {
template <class T> T& shared_var(const void* tag, const char* name) {
  return *static_cast<T*>(static_shared(tag, sizeof(T), alignof(T), name));
}
template <class T> gptr<T> shared_array(const void* tag, int64_t n, const char* name) {
  return gptr<T>(static_cast<T*>(static_shared(tag, sizeof(T) * size_t(n), alignof(T), name)));
}
template <class T> gptr<T> shared_dynamic() { return gptr<T>(static_cast<T*>(dynamic_shared(nullptr))); }
}  // namespace cudasim

// ---- the CUDA runtime calls of the host code ------------------------------------
// The device is an sm_90 GPU (an H100): 227 KiB of shared memory per block
// with the opt-in, as CUDA's cudaDevAttrMaxSharedMemoryPerBlockOptin gives it.
using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidValue = 1;
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
namespace cudasim {
constexpr int kSmemOptinLimit = 227 << 10;
}
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (attr != cudaDevAttrMaxSharedMemoryPerBlockOptin || device != 0) return cudaErrorInvalidValue;
  *value = cudasim::kSmemOptinLimit;
  return cudaSuccess;
}
template <class... P>
cudaError_t cudaFuncSetAttribute(void (*fn)(P...), cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  return cudasim::set_max_dynamic_smem(reinterpret_cast<const void*>(fn), value);
}

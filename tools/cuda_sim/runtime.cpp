// cuda_sim runtime: the block scheduler (one ucontext fiber per CUDA thread),
// barriers, warp collectives, shared memory and the global-memory registry.
// See cuda_sim.h for the model.
#include "cuda_sim.h"

#include <c10/util/Exception.h>
#include <c10/util/Type.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>
#include <numeric>
#include <random>
#include <sstream>
#include <vector>

namespace cudasim {
namespace {

constexpr size_t kStackBytes = size_t(256) << 10;  // per fiber, plus one guard page
constexpr size_t kStaticSmemLimit = size_t(48) << 10;  // CUDA's default per-block limit (static + dynamic)
constexpr unsigned char kSmemFill = 0xFF;              // NaN in every float format, -1 in every integer

// Thrown inside a fiber to stop the launch; caught by the fiber's entry.
struct KernelFailure {
  std::string what;
};

enum class State : unsigned char { Ready, AtBarrier, AtWarp, Done };

struct Fiber {
  ucontext_t ctx;
  char* stack = nullptr;
  State state = State::Ready;
  unsigned tid = 0;
  dim3 tidx;
  const char* file = nullptr;  // where it waits
  int line = 0;
  WarpOp op = WarpOp::Sync;  // the warp collective it waits at
  unsigned mask = 0;
  int arg = 0, width = kWarpSize;
  size_t size = 0;
  alignas(16) unsigned char in[16];
  alignas(16) unsigned char out[16];
};

struct StaticAlloc {
  const void* tag;
  size_t offset, size;
};

// The launch being run on this OS thread.
struct Run {
  const char* kernel = nullptr;
  const char* file = nullptr;
  int line = 0;
  LaunchConfig cfg{dim3(), dim3()};
  const std::function<void()>* body = nullptr;
  dim3 bidx;
  std::vector<Fiber> fibers;
  Fiber* cur = nullptr;
  ucontext_t sched;
  std::string error;  // the first failure of the block
  std::vector<unsigned char> smem;
  size_t static_used = 0;
  std::vector<StaticAlloc> statics;
};

thread_local Run* g_run = nullptr;

std::string dim_str(const dim3& d) {
  std::ostringstream os;
  os << "(" << d.x << ", " << d.y << ", " << d.z << ")";
  return os.str();
}

// ---- fiber stacks: reused across launches ------------------------------------

struct StackPool {
  std::vector<char*> stacks;
  char* get(size_t i) {
    while (stacks.size() <= i) {
      const size_t page = size_t(sysconf(_SC_PAGESIZE));
      void* m = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                     -1, 0);
      TORCH_CHECK(m != MAP_FAILED, "cuda_sim: cannot map a fiber stack");
      mprotect(m, page, PROT_NONE);  // overflow faults instead of corrupting a neighbour
      stacks.push_back(static_cast<char*>(m) + page);
    }
    return stacks[i];
  }
};
thread_local StackPool g_stacks;

// ---- global memory registry ----------------------------------------------------

struct Registry {
  std::mutex mu;
  std::map<uintptr_t, Extent> by_lo;  // storage extents, never overlapping
};
Registry& registry() {
  static Registry r;
  return r;
}

void yield_to_scheduler() {
  Run& r = *g_run;
  swapcontext(&r.cur->ctx, &r.sched);
}

void fiber_main() {
  Run& r = *g_run;
  try {
    (*r.body)();
  } catch (const KernelFailure& f) {
    if (r.error.empty()) r.error = f.what;
  } catch (const std::exception& e) {
    if (r.error.empty()) r.error = std::string("exception in device code: ") + e.what();
  } catch (...) {
    if (r.error.empty()) r.error = "unknown exception in device code";
  }
  r.cur->state = State::Done;
  swapcontext(&r.cur->ctx, &r.sched);  // never resumed
}

enum class Order { Forward, Reverse, Random };

Order order_from_env() {
  const char* v = std::getenv("PROTOSEG_SIM_ORDER");
  const std::string s = v ? v : "forward";
  if (s.empty() || s == "forward") return Order::Forward;
  if (s == "reverse") return Order::Reverse;
  if (s == "random") return Order::Random;
  TORCH_CHECK_VALUE(false, "PROTOSEG_SIM_ORDER must be forward, reverse or random, got '", s, "'");
}

uint64_t seed_from_env() {
  const char* v = std::getenv("PROTOSEG_SIM_SEED");
  return v ? std::strtoull(v, nullptr, 10) : 0;
}

template <class V>
void arrange(V& idx, Order order, std::mt19937_64& rng) {
  std::iota(idx.begin(), idx.end(), 0);
  if (order == Order::Reverse) std::reverse(idx.begin(), idx.end());
  if (order == Order::Random) std::shuffle(idx.begin(), idx.end(), rng);
}

const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::Shfl: return "__shfl_sync";
    case WarpOp::ShflXor: return "__shfl_xor_sync";
    case WarpOp::ShflUp: return "__shfl_up_sync";
    case WarpOp::ShflDown: return "__shfl_down_sync";
    case WarpOp::All: return "__all_sync";
    case WarpOp::Any: return "__any_sync";
    case WarpOp::Ballot: return "__ballot_sync";
    case WarpOp::Sync: return "__syncwarp";
  }
  return "?";
}

std::string where(const Fiber& f) {
  std::ostringstream os;
  os << (f.state == State::AtBarrier ? "__syncthreads" : op_name(f.op)) << " at " << f.file << ":" << f.line;
  return os.str();
}

// Source lane of a shuffle, or -1 when the lane keeps its own value.
int shuffle_source(const Fiber& f, int lane) {
  const int w = f.width, seg = lane - lane % w;
  switch (f.op) {
    case WarpOp::Shfl: return seg + (((f.arg % w) + w) % w);
    case WarpOp::ShflXor: {
      const int s = lane ^ f.arg;
      return s >= seg + w ? -1 : s;
    }
    case WarpOp::ShflUp: return lane - f.arg < seg ? -1 : lane - f.arg;
    case WarpOp::ShflDown: return lane + f.arg >= seg + w ? -1 : lane + f.arg;
    default: return -1;
  }
}

// Releases every warp collective whose lanes have all arrived; returns
// whether one was released. Sets r.error on a misuse.
bool release_warps(Run& r) {
  const unsigned n = unsigned(r.fibers.size());
  bool released = false;
  for (unsigned w0 = 0; w0 < n; w0 += kWarpSize) {
    const unsigned lanes = std::min<unsigned>(kWarpSize, n - w0);
    const unsigned exist = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
    for (unsigned l = 0; l < lanes; ++l) {
      Fiber& f = r.fibers[w0 + l];
      if (f.state != State::AtWarp) continue;
      const unsigned mask = f.mask & exist;
      std::ostringstream err;
      if (!(mask >> l & 1u)) {
        err << "thread " << f.tid << " calls " << where(f) << " with a mask (0x" << std::hex << f.mask
            << ") that does not include its own lane";
        r.error = err.str();
        return false;
      }
      bool all = true;
      for (unsigned m = 0; m < lanes; ++m) {
        if (!(mask >> m & 1u)) continue;
        const Fiber& g = r.fibers[w0 + m];
        if (g.state == State::Done) {
          err << "thread " << f.tid << " calls " << where(f) << " whose mask names lane " << m << " (thread "
              << g.tid << "), which has exited";
          r.error = err.str();
          return false;
        }
        if (g.state != State::AtWarp) {
          all = false;
          continue;
        }
        if (g.op != f.op || g.mask != f.mask || g.line != f.line || g.file != f.file || g.width != f.width) {
          err << "divergent warp collectives: thread " << f.tid << " waits at " << where(f) << ", thread " << g.tid
              << " at " << where(g);
          r.error = err.str();
          return false;
        }
      }
      if (!all) continue;
      // every lane of the mask is here: compute each lane's result
      unsigned ballot = 0;
      for (unsigned m = 0; m < lanes; ++m)
        if (mask >> m & 1u) ballot |= (r.fibers[w0 + m].in[0] ? 1u : 0u) << m;
      for (unsigned m = 0; m < lanes; ++m) {
        if (!(mask >> m & 1u)) continue;
        Fiber& g = r.fibers[w0 + m];
        unsigned v = 0;
        switch (g.op) {
          case WarpOp::All: v = ballot == mask ? 1u : 0u; std::memcpy(g.out, &v, sizeof v); break;
          case WarpOp::Any: v = ballot != 0 ? 1u : 0u; std::memcpy(g.out, &v, sizeof v); break;
          case WarpOp::Ballot: std::memcpy(g.out, &ballot, sizeof ballot); break;
          case WarpOp::Sync: break;
          default: {
            const int src = shuffle_source(g, int(m));
            if (src < 0) {
              std::memcpy(g.out, g.in, g.size);
            } else if (unsigned(src) >= lanes || !(mask >> src & 1u)) {
              err << "thread " << g.tid << " reads lane " << src << " in " << where(g)
                  << ", a lane outside the mask or the block";
              r.error = err.str();
              return false;
            } else {
              std::memcpy(g.out, r.fibers[w0 + src].in, g.size);
            }
          }
        }
      }
      for (unsigned m = 0; m < lanes; ++m)
        if (mask >> m & 1u) r.fibers[w0 + m].state = State::Ready;
      released = true;
    }
  }
  return released;
}

void describe_deadlock(Run& r) {
  std::map<std::string, std::vector<unsigned>> at;
  for (const Fiber& f : r.fibers)
    if (f.state == State::AtBarrier || f.state == State::AtWarp) at[where(f)].push_back(f.tid);
  std::ostringstream os;
  os << "deadlock: no barrier or warp collective can complete;";
  for (const auto& kv : at) {
    os << " " << kv.second.size() << " thread(s) (first " << kv.second.front() << ") wait at " << kv.first << ";";
  }
  r.error = os.str();
}

// Runs one block to completion (or to its first failure, in r.error).
void run_block(Run& r, Order order, std::mt19937_64& rng) {
  const unsigned n = unsigned(r.fibers.size());
  std::fill(r.smem.begin(), r.smem.end(), kSmemFill);
  r.static_used = 0;
  r.statics.clear();
  r.error.clear();
  const dim3 bd = r.cfg.block;
  for (unsigned t = 0; t < n; ++t) {
    Fiber& f = r.fibers[t];
    f.state = State::Ready;
    f.tid = t;
    f.tidx = dim3(t % bd.x, (t / bd.x) % bd.y, t / (bd.x * bd.y));
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_main, 0);
  }
  std::vector<unsigned> idx(n);
  arrange(idx, order, rng);
  for (;;) {
    for (unsigned t : idx) {
      Fiber& f = r.fibers[t];
      if (f.state != State::Ready) continue;
      r.cur = &f;
      swapcontext(&r.sched, &f.ctx);
      if (!r.error.empty()) return;
    }
    if (release_warps(r)) {
      if (order == Order::Random) arrange(idx, order, rng);
      continue;
    }
    if (!r.error.empty()) return;
    unsigned live = 0, waiting = 0;
    const Fiber* first = nullptr;
    for (const Fiber& f : r.fibers) {
      if (f.state == State::Done) continue;
      ++live;
      if (f.state == State::AtBarrier) {
        ++waiting;
        if (first == nullptr) first = &f;
      }
    }
    if (live == 0) return;
    if (waiting == live) {
      for (const Fiber& f : r.fibers) {
        if (f.state == State::AtBarrier && (f.line != first->line || f.file != first->file)) {
          r.error = "threads wait at different __syncthreads: thread " + std::to_string(first->tid) + " at " +
                    where(*first) + ", thread " + std::to_string(f.tid) + " at " + where(f);
          return;
        }
      }
      for (Fiber& f : r.fibers)
        if (f.state == State::AtBarrier) f.state = State::Ready;
      if (order == Order::Random) arrange(idx, order, rng);
      continue;
    }
    describe_deadlock(r);
    return;
  }
}

std::string launch_prefix(const Run& r) {
  std::ostringstream os;
  os << "cuda_sim: kernel " << r.kernel << " (launched at " << r.file << ":" << r.line << ", grid "
     << dim_str(r.cfg.grid) << ", block " << dim_str(r.cfg.block) << ")";
  return os.str();
}

uint64_t g_launches = 0;

}  // namespace

// ---- what device code calls -------------------------------------------------

void fail(const std::string& what) {
  Run* r = g_run;
  if (r == nullptr || r->cur == nullptr) TORCH_CHECK(false, "cuda_sim: ", what);
  std::ostringstream os;
  os << "block " << dim_str(r->bidx) << " thread " << dim_str(r->cur->tidx) << ": " << what;
  throw KernelFailure{os.str()};
}

const dim3& thread_index() { return g_run->cur->tidx; }
const dim3& block_index() { return g_run->bidx; }
const dim3& block_dim() { return g_run->cfg.block; }
const dim3& grid_dim() { return g_run->cfg.grid; }

void syncthreads(const char* file, int line) {
  Fiber& f = *g_run->cur;
  f.state = State::AtBarrier;
  f.file = file;
  f.line = line;
  yield_to_scheduler();
}

void warp_collective(WarpOp op, unsigned mask, const void* in, size_t size, int arg, int width, void* out,
                     const char* file, int line) {
  if (width <= 0 || width > kWarpSize || (width & (width - 1)) != 0)
    fail(std::string(op_name(op)) + ": width must be a power of 2 in [1, 32], got " + std::to_string(width));
  Fiber& f = *g_run->cur;
  f.state = State::AtWarp;
  f.op = op;
  f.mask = mask;
  f.arg = arg;
  f.width = width;
  f.size = size;
  f.file = file;
  f.line = line;
  std::memset(f.in, 0, sizeof f.in);
  std::memcpy(f.in, in, size);
  yield_to_scheduler();
  std::memcpy(out, f.out, op == WarpOp::All || op == WarpOp::Any || op == WarpOp::Ballot ? sizeof(unsigned) : size);
}

void* static_shared(const void* tag, size_t size, size_t align) {
  Run& r = *g_run;
  for (const StaticAlloc& a : r.statics)
    if (a.tag == tag) return r.smem.data() + a.offset;
  const size_t off = (r.static_used + std::max<size_t>(align, 16) - 1) / std::max<size_t>(align, 16) *
                     std::max<size_t>(align, 16);
  if (off + size + r.cfg.dynamic_smem > kStaticSmemLimit)
    fail("shared memory above the 48 KiB per block (static " + std::to_string(off + size) + " + dynamic " +
         std::to_string(r.cfg.dynamic_smem) + " bytes)");
  r.statics.push_back({tag, off, size});
  r.static_used = off + size;
  return r.smem.data() + off;
}

void* dynamic_shared(size_t* bytes) {
  Run& r = *g_run;
  if (bytes) *bytes = r.cfg.dynamic_smem;
  return r.smem.data() + kStaticSmemLimit;
}

void check_launch_bounds(int max_threads, const char* kernel) {
  const dim3& b = g_run->cfg.block;
  const long threads = long(b.x) * b.y * b.z;
  if (threads > max_threads)
    fail(std::string("too many resources requested for launch: ") + std::to_string(threads) +
         " threads per block, above __launch_bounds__(" + std::to_string(max_threads) + ") of " + kernel);
}

void device_assert(const char* cond, const char* msg, const char* file, int line) {
  fail(std::string("device-side assert triggered at ") + file + ":" + std::to_string(line) + ": `" + cond +
       "` failed" + (msg && *msg ? std::string(": ") + msg : std::string()));
}

void register_extent(const void* data, size_t bytes, const char* name) {
  if (data == nullptr || bytes == 0) return;
  const uintptr_t lo = reinterpret_cast<uintptr_t>(data), hi = lo + bytes;
  Registry& reg = registry();
  std::lock_guard<std::mutex> lock(reg.mu);
  auto it = reg.by_lo.lower_bound(lo);
  if (it != reg.by_lo.begin() && std::prev(it)->second.hi > lo) --it;
  while (it != reg.by_lo.end() && it->first < hi) it = reg.by_lo.erase(it);  // freed storages it overlaps
  reg.by_lo[lo] = Extent{lo, hi, name};
}

Extent find_extent(const void* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (Run* r = g_run) {
    const uintptr_t s0 = reinterpret_cast<uintptr_t>(r->smem.data());
    if (a >= s0 && a < s0 + r->smem.size()) {
      for (const StaticAlloc& s : r->statics)
        if (a >= s0 + s.offset && a < s0 + s.offset + s.size) return Extent{s0 + s.offset, s0 + s.offset + s.size, "__shared__ array"};
      const uintptr_t d0 = s0 + kStaticSmemLimit;
      if (a >= d0 && a <= d0 + r->cfg.dynamic_smem) return Extent{d0, d0 + r->cfg.dynamic_smem, "extern __shared__ array"};
      return Extent{};
    }
  }
  Registry& reg = registry();
  std::lock_guard<std::mutex> lock(reg.mu);
  auto it = reg.by_lo.upper_bound(a);
  if (it == reg.by_lo.begin()) return Extent{};
  --it;
  // a pointer one past the end is legal to form (an empty view at the end)
  if (a <= it->second.hi) return it->second;
  return Extent{};
}

void fail_access(const Extent& e, uintptr_t addr, size_t size, size_t align, bool write, const char* type) {
  std::ostringstream os;
  const std::string t = c10::demangle(type);
  const char* rw = write ? "access" : "read";
  if (addr == 0 || (e.lo == 0 && e.hi == 0 && addr < 4096)) {
    os << "null pointer " << rw << " (" << t << ")";
  } else if (e.lo == e.hi) {
    os << "out-of-bounds " << rw << " of " << t << " at 0x" << std::hex << addr << std::dec
       << ": the pointer points into no tensor that the host code passed" << (e.name ? std::string(" (") + e.name + ")" : "");
  } else if (addr % align != 0) {
    os << "misaligned " << rw << " of " << t << " in `" << e.name << "` at byte offset " << int64_t(addr - e.lo);
  } else {
    const int64_t off = int64_t(addr) - int64_t(e.lo);
    os << "out-of-bounds " << rw << " of `" << e.name << "`: element " << (off >= 0 ? off / int64_t(size) : -((-off + int64_t(size) - 1) / int64_t(size)))
       << " of " << t << " (byte offset " << off << "), the buffer holds " << (e.hi - e.lo) / size << " elements ("
       << (e.hi - e.lo) << " bytes)";
  }
  fail(os.str());
}

void run_grid(const char* kernel, const char* file, int line, const LaunchConfig& cfg,
              const std::function<void()>& body) {
  TORCH_CHECK(g_run == nullptr, "cuda_sim: a kernel launched from device code (", kernel, ")");
  const dim3 g = cfg.grid, b = cfg.block;
  const uint64_t threads = uint64_t(b.x) * b.y * b.z;
  const bool ok = g.x >= 1 && g.y >= 1 && g.z >= 1 && g.x <= 0x7fffffffu && g.y <= 65535 && g.z <= 65535 &&
                  b.x >= 1 && b.y >= 1 && b.z >= 1 && b.x <= 1024 && b.y <= 1024 && b.z <= 64 && threads <= 1024 &&
                  cfg.dynamic_smem <= kStaticSmemLimit;
  TORCH_CHECK(ok, "cuda_sim: kernel ", kernel, " (launched at ", file, ":", line,
              "): invalid configuration argument: grid ", dim_str(g), ", block ", dim_str(b), ", dynamic shared ",
              cfg.dynamic_smem, " bytes");
  Run r;
  r.kernel = kernel;
  r.file = file;
  r.line = line;
  r.cfg = cfg;
  r.body = &body;
  r.fibers.resize(threads);
  r.smem.assign(kStaticSmemLimit + cfg.dynamic_smem, kSmemFill);
  for (uint64_t t = 0; t < threads; ++t) {
    r.fibers[t].stack = g_stacks.get(t);
    getcontext(&r.fibers[t].ctx);
  }
  const Order order = order_from_env();
  std::mt19937_64 rng(seed_from_env() * 0x9E3779B97F4A7C15ull + (++g_launches));
  const uint64_t blocks = uint64_t(g.x) * g.y * g.z;
  std::vector<uint64_t> bidx(blocks);
  arrange(bidx, order, rng);
  struct Reset {
    ~Reset() { g_run = nullptr; }
  } reset;
  g_run = &r;
  for (uint64_t lin : bidx) {
    r.bidx = dim3(unsigned(lin % g.x), unsigned((lin / g.x) % g.y), unsigned(lin / (uint64_t(g.x) * g.y)));
    run_block(r, order, rng);
    if (!r.error.empty()) {
      const std::string prefix = launch_prefix(r);
      std::string what = r.error;
      if (what.rfind("block ", 0) != 0) what = "block " + dim_str(r.bidx) + ": " + what;
      g_run = nullptr;
      TORCH_CHECK(false, prefix, ": ", what);
    }
  }
}

}  // namespace cudasim

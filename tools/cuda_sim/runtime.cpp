// cuda_sim runtime: the block scheduler (one ucontext fiber per CUDA thread),
// barriers, warp collectives, shared memory and the global-memory registry.
// See cuda_sim.h for the model.
#include "cuda_sim.h"

#include <c10/util/Exception.h>
#include <c10/util/Type.h>
#include <torch/library.h>
#include <dlfcn.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <unordered_set>
#include <mutex>
#include <numeric>
#include <random>
#include <sstream>
#include <unordered_map>
#include <vector>

namespace cudasim {
namespace {

constexpr size_t kStackBytes = size_t(256) << 10;  // per fiber, plus one guard page
constexpr size_t kStaticSmemLimit = size_t(48) << 10;  // CUDA's default per-block limit (static + dynamic)
constexpr unsigned char kSmemFill = 0xFF;              // NaN in every float format, -1 in every integer

// PROTOSEG_SIM_POISON: nan (0xFF bytes) or garbage (finite in every float format).
bool poison_garbage() {
  static const bool g = [] {
    const char* v = std::getenv("PROTOSEG_SIM_POISON");
    const std::string s = v ? v : "nan";
    if (s.empty() || s == "nan") return false;
    if (s == "garbage") return true;
    TORCH_CHECK_VALUE(false, "PROTOSEG_SIM_POISON must be nan or garbage, got '", s, "'");
  }();
  return g;
}

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
  // race checker: the last warp collective this thread took part in (its
  // warp's release count, and the lanes released with it)
  uint32_t wseq = 0;
  unsigned wmask = 0;
  // the access through a non-const pointer whose kind (load or store) is
  // decided at the thread's next access, wait or exit (note_access)
  uintptr_t pend_addr = 0;
  uint32_t pend_size = 0;
  uint32_t pend_pc = 0;
  const char* pend_type = nullptr;
  alignas(16) unsigned char pend_old[16];
};

struct StaticAlloc {
  const void* tag;
  size_t offset, size;
  const char* name;
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
  size_t smem_optin = 0;  // cudaFuncAttributeMaxDynamicSharedMemorySize of the kernel, 0 if not set
  size_t static_used = 0;
  std::vector<StaticAlloc> statics;
  // race checker
  uint64_t block_linear = 0;  // of bidx
  uint32_t threads = 0;       // per block
  uint32_t epoch = 0;         // __syncthreads released so far in this block
  std::vector<uint32_t> warp_seq;  // warp collectives released so far, per warp
  uint32_t block_stamp = 0, launch_stamp = 0;
  std::vector<uint32_t> report_pcs;  // code addresses a race report names (symbolised after the launch)
};

thread_local Run* g_run = nullptr;

std::string dim_str(const dim3& d) {
  std::ostringstream os;
  os << "(" << d.x << ", " << d.y << ", " << d.z << ")";
  return os.str();
}

// ---- race checker ------------------------------------------------------------------
//
// Shadow memory: one Cell per byte of shared memory (per block) and of the
// global memory a launch touches (pages made on first touch, dropped after
// the launch). A cell holds the last store (or atomic) and up to two loads
// since, each as: thread (linear over the grid, + 1), code address, barrier
// epoch of its block, and the count of warp collectives its warp had
// released when the thread last took part in one. Cells of an older block
// (shared) or launch (global) are empty. Two accesses are ordered when they
// are by one thread, or by threads of one block in different barrier epochs,
// or by lanes of one warp with a warp collective of both in between.

struct Rec {
  uint32_t who = 0;  // linear thread of the grid + 1; bit 31: atomic
  uint32_t pc = 0;   // code address - library base (0: none)
  uint16_t epoch = 0, wseq = 0;
};
constexpr uint32_t kAtomicBit = 0x80000000u;
struct Cell {
  uint32_t stamp = 0;
  Rec w, r1, r2;
};

static_assert(sizeof(Cell) == 40, "Cell: five 8-byte words");
inline bool same_cell(const Cell& a, const Cell& b) {
  uint64_t x[5], y[5];
  std::memcpy(x, &a, sizeof x);
  std::memcpy(y, &b, sizeof y);
  return ((x[0] ^ y[0]) | (x[1] ^ y[1]) | (x[2] ^ y[2]) | (x[3] ^ y[3]) | (x[4] ^ y[4])) == 0;
}

enum class Kind { Read, Write, Atomic };
extern bool g_racecheck_on;
void meter_access(Kind kind, uintptr_t addr, size_t size, uint32_t pc, uint32_t tid);
struct Meter;
bool meter_on();

bool racecheck_from_env() {
  const char* v = std::getenv("PROTOSEG_SIM_RACECHECK");
  return !(v && (std::string(v) == "0" || std::string(v) == "off"));
}

uintptr_t lib_base() {
  static const uintptr_t base = [] {
    Dl_info info{};
    dladdr(reinterpret_cast<void*>(&racecheck_from_env), &info);
    return reinterpret_cast<uintptr_t>(info.dli_fbase);
  }();
  return base;
}

uint32_t pc_offset(const void* pc) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(pc), b = lib_base();
  return a > b && a - b < 0xffffffffu ? uint32_t(a - b) : 0u;
}

struct GlobalShadow {
  static constexpr int kPageBits = 12;
  std::unordered_map<uintptr_t, Cell*> pages;
  std::vector<Cell*> pool;
  uintptr_t last_key = ~uintptr_t(0);
  Cell* last = nullptr;
  uint32_t stamp = 0;
  Cell& at(uintptr_t a) {
    const uintptr_t key = a >> kPageBits;
    if (key != last_key) {
      Cell*& page = pages[key];
      if (page == nullptr) {
        if (!pool.empty()) {
          page = pool.back();
          pool.pop_back();
        } else {
          page = static_cast<Cell*>(std::calloc(size_t(1) << kPageBits, sizeof(Cell)));
          TORCH_CHECK(page != nullptr, "cuda_sim: out of memory for the race checker's shadow memory");
        }
      }
      last_key = key;
      last = page;
    }
    return last[a & ((uintptr_t(1) << kPageBits) - 1)];
  }
  // after a launch: keep a few pages for the next (their cells carry an old stamp)
  void release() {
    for (auto& kv : pages) {
      if (pool.size() < 256) pool.push_back(kv.second);
      else std::free(kv.second);
    }
    pages.clear();
    last_key = ~uintptr_t(0);
    last = nullptr;
  }
};
thread_local GlobalShadow g_gshadow;
thread_local std::vector<Cell> g_sshadow;  // shared memory of the running block
thread_local uint32_t g_stamps = 0;        // block and launch stamps, never reused

uint32_t rec_thread(const Rec& r) { return (r.who & ~kAtomicBit) - 1; }
bool rec_atomic(const Rec& r) { return (r.who & kAtomicBit) != 0; }

// Whether the earlier access `a` is ordered before the running thread's access `me`.
bool ordered(const Run& r, const Fiber& f, const Rec& a, const Rec& me) {
  const uint32_t ta = rec_thread(a), tm = rec_thread(me);
  if (ta == tm) return true;
  if (ta / r.threads != tm / r.threads) return false;  // another block of the launch
  if (a.epoch != me.epoch) return true;               // a __syncthreads between them
  const uint32_t la = ta % r.threads, lm = tm % r.threads;
  if (la / kWarpSize != lm / kWarpSize) return false;
  return int16_t(uint16_t(me.wseq - a.wseq)) > 0 && ((f.wmask >> (la % kWarpSize)) & 1u);
}

std::string thread_of(const Run& r, uint32_t linear) {
  const uint64_t blk = linear / r.threads, t = linear % r.threads;
  const dim3 g = r.cfg.grid, b = r.cfg.block;
  const dim3 bi(unsigned(blk % g.x), unsigned((blk / g.x) % g.y), unsigned(blk / (uint64_t(g.x) * g.y)));
  const dim3 ti(unsigned(t % b.x), unsigned((t / b.x) % b.y), unsigned(t / (uint64_t(b.x) * b.y)));
  return "thread " + dim_str(ti) + " of block " + dim_str(bi);
}

std::string pc_token(Run& r, uint32_t pc) {
  r.report_pcs.push_back(pc);
  return "@@pc" + std::to_string(r.report_pcs.size() - 1) + "@@";
}

[[noreturn]] void report_race(Run& r, Kind kind, const Rec& me, const Rec& other, bool other_write, uintptr_t addr,
                              const char* type, bool shared) {
  std::ostringstream os;
  std::string var = "?";
  int64_t off = 0;
  const uintptr_t s0 = reinterpret_cast<uintptr_t>(r.smem.data());
  if (shared) {
    off = int64_t(addr - s0);
    if (off >= int64_t(kStaticSmemLimit)) {
      var = "extern __shared__ array";
      off -= int64_t(kStaticSmemLimit);
    } else {
      for (const StaticAlloc& a : r.statics)
        if (size_t(off) >= a.offset && size_t(off) < a.offset + a.size) {
          var = std::string("__shared__ ") + (a.name ? a.name : "array");
          off -= int64_t(a.offset);
        }
    }
  } else {
    const Extent e = find_extent(reinterpret_cast<const void*>(addr));
    if (e.lo != e.hi) {
      var = std::string("`") + (e.name ? e.name : "?") + "`";
      off = int64_t(addr - e.lo);
    }
  }
  const char* what = kind == Kind::Read ? "reads" : kind == Kind::Write ? "writes" : "atomically updates";
  const char* owhat = rec_atomic(other) ? "atomically updated" : other_write ? "wrote" : "read";
  const uint32_t tm = rec_thread(me), to = rec_thread(other);
  const bool same_block = tm / r.threads == to / r.threads;
  os << "data race on " << (shared ? "shared" : "global") << " memory " << var << " at byte offset " << off
     << " (" << c10::demangle(type) << "): " << thread_of(r, tm) << " " << what << " it at " << pc_token(r, me.pc)
     << ", and " << thread_of(r, to) << " " << owhat << " it at " << pc_token(r, other.pc)
     << (same_block ? " with no __syncthreads or warp collective of both between them"
                    : " (another block of the same launch: nothing orders them)");
  if (rec_atomic(me) != rec_atomic(other)) os << "; an atomic and a plain access of one location race";
  fail(os.str());
}

void add_reader(const Run& r, const Fiber& f, Cell& c, const Rec& me) {
  if (c.r1.who == me.who) { c.r1 = me; return; }
  if (c.r2.who == me.who) { c.r2 = me; return; }
  if (c.r1.who == 0 || ordered(r, f, c.r1, me)) { c.r1 = me; return; }
  if (c.r2.who == 0 || ordered(r, f, c.r2, me)) { c.r2 = me; return; }
  // two unordered readers already: keep readers of two different warps if there are
  const uint32_t w1 = rec_thread(c.r1) / kWarpSize, w2 = rec_thread(c.r2) / kWarpSize, wm = rec_thread(me) / kWarpSize;
  if (w1 == w2 && wm != w1) c.r2 = me;
}

void apply(Kind kind, uintptr_t addr, size_t size, uint32_t pc, const char* type) {
  Run& r = *g_run;
  Fiber& f = *r.cur;
  Rec me;
  me.who = uint32_t(r.block_linear * r.threads + f.tid + 1) | (kind == Kind::Atomic ? kAtomicBit : 0u);
  me.pc = pc;
  me.epoch = uint16_t(r.epoch);
  me.wseq = uint16_t(f.wseq);
  const uintptr_t s0 = reinterpret_cast<uintptr_t>(r.smem.data());
  const bool shared = addr >= s0 && addr < s0 + r.smem.size();
  if (meter_on() && !shared) meter_access(kind, addr, size, pc, f.tid);
  if (!g_racecheck_on) return;
  const uint32_t stamp = shared ? r.block_stamp : r.launch_stamp;
  GlobalShadow& gs = g_gshadow;
  Cell* const scells = shared ? g_sshadow.data() : nullptr;
  Cell before0, after0;  // the first byte's cell before and after: bytes whose cell equals it get the same
  for (size_t i = 0; i < size; ++i) {
    const uintptr_t a = addr + i;
    Cell& c = shared ? scells[a - s0] : gs.at(a);
    if (c.stamp != stamp) {
      c = Cell{};
      c.stamp = stamp;
    }
    if (i > 0 && same_cell(c, before0)) {  // the same history as byte 0: the same verdict
      c = after0;
      continue;
    }
    if (i == 0) before0 = c;
    const bool atomic = kind == Kind::Atomic;
    if (c.w.who != 0 && !ordered(r, f, c.w, me) && !(atomic && rec_atomic(c.w)))
      report_race(r, kind, me, c.w, true, a, type, shared);
    if (kind != Kind::Read) {
      for (const Rec* rd : {&c.r1, &c.r2})
        if (rd->who != 0 && !ordered(r, f, *rd, me) && !(atomic && rec_atomic(*rd)))
          report_race(r, kind, me, *rd, false, a, type, shared);
    } else {
      for (const Rec* rd : {&c.r1, &c.r2})  // atomics are kept as readers too
        if (rd->who != 0 && rec_atomic(*rd) && !ordered(r, f, *rd, me))
          report_race(r, kind, me, *rd, true, a, type, shared);
    }
    if (kind == Kind::Write) {
      c.w = me;
      c.r1 = c.r2 = Rec{};
    } else if (kind == Kind::Atomic) {
      c.w = me;
      add_reader(r, f, c, me);
    } else {
      add_reader(r, f, c, me);
    }
    if (i == 0) after0 = c;
  }
}

// ---- traffic meter ---------------------------------------------------------------
//
// Off unless switched on (cudasim_meter("start")). Per launch: bytes loaded
// and stored through global memory (an atomic counts as both), the 32-byte
// sectors of every warp-wide memory instruction (the lanes' k-th execution
// of one code address, in one warp) against the ideal for the distinct bytes
// it requests, the distinct sectors the launch touches, and of those the
// sectors an earlier launch or GEMM touched while the bytes touched since
// then stay within the 50 MB L2 (assumed L2 hits). Host GEMMs: shape, dtypes,
// flops and operand bytes. A sector's touch is placed where it falls in its
// event: a launch's sectors in the order the emulator first touches them
// (block by block, as a GPU roughly walks its grid), a GEMM's operands at its
// start and its output after them; the bytes touched since then are those of
// every later sector touch, so a reuse distance includes the rest of the
// event that touched the sector last (a 50 MB producer's first outputs are
// out of the L2 by its end). Tile loops of the host code (meter_tile) mark
// their tiles: a reuse whose earlier touch was in the same tile or the one
// before, of the same loop, is reported apart, with the tile's rows, as the
// model scales its distance with the tile rather than with the map.

struct LaunchMeter {
  std::string kernel;
  dim3 grid, block;
  uint64_t bytes_loaded = 0, bytes_stored = 0, sectors = 0, ideal_sectors = 0, instructions = 0;
  uint64_t unique_sectors = 0, l2_hit_sectors = 0;
};
struct GemmMeter {
  std::string op;
  int64_t m, n, k;
  std::string a, b, out;
  uint64_t bytes;
};
struct Meter {
  bool on = false;
  std::vector<std::string> events;  // JSON objects, in order
  struct Touch {
    uint64_t at;    // cumulative bytes touched up to and including this sector's touch
    uint64_t tile;  // the tile epoch of that touch (meter_tile), 0 outside tile loops
  };
  std::unordered_map<uint64_t, Touch> last_touch;  // sector -> its last touch
  uint64_t touched = 0;  // cumulative bytes touched by every event so far
  // tile loops: epoch bumped at each tile and at each loop's end (so two loops' tiles are never adjacent)
  uint64_t epoch = 0;
  bool in_tile = false;
  int64_t tile_nominal = 0, tile_rows = 0;  // the running tile's loop rows at any size (0: an image) and rows
  // the running launch: its sectors in the order of their first touch
  LaunchMeter cur;
  std::unordered_map<uint64_t, uint64_t> launch_sectors;  // sector -> its first touch's rank in the launch
  // per block: the lanes' execution count of each code address, and each warp instruction's accesses
  std::unordered_map<uint64_t, uint32_t> lane_count;  // (tid << 32 | pc) -> executions
  struct InstKey {
    uint64_t warp_pc;  // warp << 32 | pc
    uint32_t n;        // the lanes' n-th execution of pc
    bool operator==(const InstKey& o) const { return warp_pc == o.warp_pc && n == o.n; }
  };
  struct InstHash {
    size_t operator()(const InstKey& k) const { return std::hash<uint64_t>()(k.warp_pc * 0x9E3779B97F4A7C15ull + k.n); }
  };
  std::unordered_map<InstKey, std::vector<std::pair<uintptr_t, uint32_t>>, InstHash> insts;  // accesses
};
thread_local Meter g_meter;
bool meter_on() { return g_meter.on; }
constexpr uint64_t kL2Bytes = uint64_t(50) << 20;

void meter_access(Kind kind, uintptr_t addr, size_t size, uint32_t pc, uint32_t tid) {
  Meter& m = g_meter;
  if (kind != Kind::Write) m.cur.bytes_loaded += size;
  if (kind != Kind::Read) m.cur.bytes_stored += size;
  for (uint64_t s = addr >> 5; s <= (addr + size - 1) >> 5; ++s) {
    const uint64_t rank = m.launch_sectors.size();
    m.launch_sectors.emplace(s, rank);
  }
  const uint32_t n = m.lane_count[(uint64_t(tid) << 32) | pc]++;
  m.insts[Meter::InstKey{(uint64_t(tid / kWarpSize) << 32) | pc, n}].emplace_back(addr, uint32_t(size));
}

// At the end of a block: the sectors of its warp instructions.
void meter_block_end() {
  Meter& m = g_meter;
  for (auto& kv : m.insts) {
    auto& acc = kv.second;
    std::sort(acc.begin(), acc.end());
    uint64_t bytes = 0, sectors = 0;
    uintptr_t covered = 0;  // bytes below this address are counted
    uint64_t last_sector = ~uint64_t(0);
    for (const auto& a : acc) {
      const uintptr_t lo = std::max<uintptr_t>(a.first, covered), hi = a.first + a.second;
      if (hi > lo) bytes += hi - lo;
      covered = std::max<uintptr_t>(covered, hi);
      for (uint64_t s = a.first >> 5; s <= (hi - 1) >> 5; ++s)
        if (s != last_sector) {
          ++sectors;
          last_sector = s;
        }
    }
    m.cur.sectors += sectors;
    m.cur.ideal_sectors += (bytes + 31) / 32;
    ++m.cur.instructions;
  }
  m.insts.clear();
  m.lane_count.clear();
}

// A distance's bucket, named by its upper bound: 2^(b/8) rounded up for the least b with d <= 2^(b/8)
// (eight buckets an octave: a bound at most 9% above the distance).
uint64_t reuse_bucket(uint64_t d) {
  if (d <= 1) return 1;
  const double b = std::ceil(8.0 * std::log2(double(d)) - 1e-9);
  return std::max<uint64_t>(d, uint64_t(std::ceil(std::exp2(b / 8.0))));
}

std::string reuse_json(const std::map<uint64_t, uint64_t>& by_distance) {
  std::ostringstream os;
  os << "{";
  bool first = true;
  for (const auto& kv : by_distance) {
    os << (first ? "" : ", ") << "\"" << kv.first << "\": " << kv.second;
    first = false;
  }
  os << "}";
  return os.str();
}

// Sectors an event touched, each at its rank in the event (sector -> rank,
// 0..size-1): counted against the L2 history, then recorded in it. Also
// fills `reuse`: the bytes an earlier event touched, by the bytes touched in
// between (reuse_bucket: at most 9% above the distance), as JSON, for a model
// at another size (tools/gpu_model.py scales the distances), and `reuse_tile`
// the same for the earlier touches in this tile or the one before (see the
// meter's comment above; "{}" outside tile loops).
uint64_t meter_touch(const std::unordered_map<uint64_t, uint64_t>& sectors, std::string& reuse,
                     std::string& reuse_tile) {
  Meter& m = g_meter;
  uint64_t hits = 0;
  std::map<uint64_t, uint64_t> by_distance, by_tile_distance;
  const uint64_t tag = m.in_tile ? m.epoch : 0;
  for (const auto& kv : sectors) {
    const uint64_t at = m.touched + 32 * kv.second;  // the bytes touched before this sector's touch
    auto it = m.last_touch.find(kv.first);
    if (it != m.last_touch.end()) {
      const uint64_t d = at - it->second.at;
      if (d <= kL2Bytes) ++hits;
      const uint64_t b = reuse_bucket(d);
      const bool near = tag != 0 && it->second.tile != 0 && tag - it->second.tile <= 1;
      (near ? by_tile_distance : by_distance)[b] += 32;
    }
  }
  for (const auto& kv : sectors) m.last_touch[kv.first] = Meter::Touch{m.touched + 32 * (kv.second + 1), tag};
  m.touched += 32 * sectors.size();
  reuse = reuse_json(by_distance);
  reuse_tile = reuse_json(by_tile_distance);
  return hits;
}

// The running tile's loop rows and rows as JSON ("null" outside tile loops).
std::string tile_json() {
  const Meter& m = g_meter;
  if (!m.in_tile) return "null";
  return "[" + std::to_string(m.tile_nominal) + ", " + std::to_string(m.tile_rows) + "]";
}

std::string json_str(const std::string& s) {
  std::string o = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') o += '\\';
    o += c;
  }
  return o + "\"";
}

void meter_launch_end() {
  Meter& m = g_meter;
  m.cur.unique_sectors = m.launch_sectors.size();
  std::string reuse, reuse_tile;
  m.cur.l2_hit_sectors = meter_touch(m.launch_sectors, reuse, reuse_tile);
  m.launch_sectors.clear();
  const LaunchMeter& c = m.cur;
  std::ostringstream os;
  os << "{\"type\": \"kernel\", \"name\": " << json_str(c.kernel) << ", \"grid\": [" << c.grid.x << ", " << c.grid.y
     << ", " << c.grid.z << "], \"block\": [" << c.block.x << ", " << c.block.y << ", " << c.block.z
     << "], \"bytes_loaded\": " << c.bytes_loaded << ", \"bytes_stored\": " << c.bytes_stored
     << ", \"instructions\": " << c.instructions << ", \"sectors\": " << c.sectors << ", \"ideal_sectors\": "
     << c.ideal_sectors << ", \"unique_bytes\": " << 32 * c.unique_sectors << ", \"l2_hit_bytes\": "
     << 32 * c.l2_hit_sectors << ", \"reuse\": " << reuse << ", \"reuse_tile\": " << reuse_tile
     << ", \"tile\": " << tile_json() << "}";
  m.events.push_back(os.str());
}

std::string meter_command(const std::string& cmd) {
  Meter& m = g_meter;
  if (cmd == "start") {
    m.events.clear();
    m.last_touch.clear();
    m.touched = 0;
    m.epoch = 0;
    m.in_tile = false;
    m.on = true;
    return "{}";
  }
  if (cmd == "stop") {
    m.on = false;
    return "{}";
  }
  if (cmd.rfind("tile:", 0) == 0) {  // "tile:<loop rows>:<rows>": meter_tile, for tests of the meter
    long long loop_rows = -1, rows = -1;
    char tail = 0;
    TORCH_CHECK_VALUE(std::sscanf(cmd.c_str() + 5, "%lld:%lld%c", &loop_rows, &rows, &tail) == 2 && loop_rows >= 0 &&
                          rows > 0,
                      "cudasim_meter: tile:<loop rows>:<rows> (loop rows >= 0, rows > 0), got '", cmd, "'");
    meter_tile(loop_rows, rows);
    return "{}";
  }
  if (cmd == "tiles_end") {
    meter_tiles_end();
    return "{}";
  }
  if (cmd == "json") {
    std::string o = "[";
    for (size_t i = 0; i < m.events.size(); ++i) o += (i ? ",\n" : "") + m.events[i];
    return o + "]";
  }
  TORCH_CHECK_VALUE(false, "cudasim_meter: cmd must be start, stop, json, tile:<loop rows>:<rows> or tiles_end, got '",
                    cmd, "'");
}

TORCH_LIBRARY_FRAGMENT(protoseg_cudasim, lib) {
  lib.def("cudasim_meter(str cmd) -> str", [](std::string cmd) { return meter_command(cmd); });
}

// Decides the pending access of f: a store if its bytes changed since, else a load.
void settle(Fiber& f) {
  if (f.pend_size == 0) return;
  const size_t n = f.pend_size;
  f.pend_size = 0;
  const bool wrote = std::memcmp(f.pend_old, reinterpret_cast<const void*>(f.pend_addr), n) != 0;
  apply(wrote ? Kind::Write : Kind::Read, f.pend_addr, n, f.pend_pc, f.pend_type);
}

bool g_racecheck_on = racecheck_from_env();

// file:line of a code address of the library (addr2line on its line table), or "code at lib+0x..".
std::string source_line(uint32_t pc) {
  if (pc == 0) return "an unknown line";
  Dl_info info{};
  dladdr(reinterpret_cast<void*>(&racecheck_from_env), &info);
  std::ostringstream hex;
  hex << "0x" << std::hex << (pc - 1);  // the call's own line, not the next one
  const std::string fallback = std::string("code at ") + (info.dli_fname ? info.dli_fname : "?") + "+" + hex.str();
  if (info.dli_fname == nullptr) return fallback;
  const std::string cmd = std::string("addr2line -e '") + info.dli_fname + "' " + hex.str() + " 2>/dev/null";
  FILE* p = popen(cmd.c_str(), "r");
  if (p == nullptr) return fallback;
  char buf[4096];
  std::string out = fgets(buf, sizeof buf, p) ? std::string(buf) : std::string();
  pclose(p);
  while (!out.empty() && (out.back() == '\n' || out.back() == ' ')) out.pop_back();
  const auto disc = out.find(" (discriminator");
  if (disc != std::string::npos) out.resize(disc);
  if (out.empty() || out[0] == '?') return fallback;
  for (const char* root : {"csrc/", "tools/cuda_sim/"}) {  // relative to the checkout
    const auto at = out.rfind(root);
    if (at != std::string::npos) return out.substr(at);
  }
  return out;
}

std::string symbolize(std::string msg, const std::vector<uint32_t>& pcs) {
  for (size_t i = 0; i < pcs.size(); ++i) {
    const std::string tok = "@@pc" + std::to_string(i) + "@@";
    const auto at = msg.find(tok);
    if (at != std::string::npos) msg.replace(at, tok.size(), source_line(pcs[i]));
  }
  return msg;
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
  std::unordered_map<uintptr_t, Extent> views;  // data pointer -> the extent of the view it was taken from
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
    if (g_checking) settle(*r.cur);
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
      const uint32_t seq = ++r.warp_seq[w0 / kWarpSize];
      for (unsigned m = 0; m < lanes; ++m)
        if (mask >> m & 1u) {
          Fiber& g = r.fibers[w0 + m];
          g.state = State::Ready;
          g.wseq = seq;
          g.wmask = mask;
        }
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
  fill_poison(r.smem.data(), r.smem.size());
  r.static_used = 0;
  r.statics.clear();
  r.error.clear();
  r.epoch = 0;
  std::fill(r.warp_seq.begin(), r.warp_seq.end(), 0u);
  r.block_stamp = ++g_stamps;
  const dim3 bd = r.cfg.block;
  for (unsigned t = 0; t < n; ++t) {
    Fiber& f = r.fibers[t];
    f.state = State::Ready;
    f.tid = t;
    f.wseq = 0;
    f.wmask = 0;
    f.pend_size = 0;
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
      ++r.epoch;
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
  if (g_checking) settle(f);
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
  if (g_checking) settle(f);
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

void* static_shared(const void* tag, size_t size, size_t align, const char* name) {
  Run& r = *g_run;
  for (const StaticAlloc& a : r.statics)
    if (a.tag == tag) return r.smem.data() + a.offset;
  const size_t off = (r.static_used + std::max<size_t>(align, 16) - 1) / std::max<size_t>(align, 16) *
                     std::max<size_t>(align, 16);
  // Without the opt-in, static and dynamic share 48 KiB; with it, the static
  // part stays within 48 KiB and the two within the device's opt-in limit.
  const size_t limit = r.smem_optin > 0 ? size_t(kSmemOptinLimit) : kStaticSmemLimit;
  if (off + size > kStaticSmemLimit || off + size + r.cfg.dynamic_smem > limit)
    fail("shared memory above the " + std::to_string(limit >> 10) + " KiB per block (static " +
         std::to_string(off + size) + " + dynamic " + std::to_string(r.cfg.dynamic_smem) + " bytes" +
         (r.smem_optin > 0 ? ", with the opt-in" : ", without the opt-in of cudaFuncSetAttribute") + ")");
  r.statics.push_back({tag, off, size, name});
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

bool g_checking = false;

bool mutant(int id) {
  const char* v = std::getenv("PROTOSEG_SIM_MUTANT");
  return v != nullptr && std::atoi(v) == id;
}

// Garbage: every byte 0x40..0x4F or 0xC0..0xCF (random), so that the exponent
// field of every float16, bfloat16, float32 and float64 it makes is neither 0
// nor all ones: finite, normal, of either sign, 2^-15 .. 2^32 in magnitude for
// float32; as integers, large positive or negative values.
void fill_poison(void* p, size_t bytes) {
  if (!poison_garbage()) {
    std::memset(p, kSmemFill, bytes);
    return;
  }
  static thread_local uint64_t state = 0x9E3779B97F4A7C15ull;
  unsigned char* b = static_cast<unsigned char*>(p);
  size_t i = 0;
  for (; i + 8 <= bytes; i += 8) {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    const uint64_t w = (state & 0x8F8F8F8F8F8F8F8Full) | 0x4040404040404040ull;
    std::memcpy(b + i, &w, 8);
  }
  for (; i < bytes; ++i) b[i] = static_cast<unsigned char>(((i * 0x9Du) & 0x8Fu) | 0x40u);
}

void note_read(const void* p, size_t size, const void* pc, const char* type) {
  Fiber& f = *g_run->cur;
  settle(f);
  apply(Kind::Read, reinterpret_cast<uintptr_t>(p), size, pc_offset(pc), type);
}

void note_access(const void* p, size_t size, const void* pc, const char* type) {
  Fiber& f = *g_run->cur;
  settle(f);
  if (size > sizeof(f.pend_old)) {  // too large to compare: a store
    apply(Kind::Write, reinterpret_cast<uintptr_t>(p), size, pc_offset(pc), type);
    return;
  }
  std::memcpy(f.pend_old, p, size);
  f.pend_addr = reinterpret_cast<uintptr_t>(p);
  f.pend_size = uint32_t(size);
  f.pend_pc = pc_offset(pc);
  f.pend_type = type;
}

void note_atomic(const void* p, size_t size, const void* pc, const char* type) {
  Fiber& f = *g_run->cur;
  settle(f);
  apply(Kind::Atomic, reinterpret_cast<uintptr_t>(p), size, pc_offset(pc), type);
}

void register_extent(const void* data, size_t bytes, const char* name) {
  if (data == nullptr || bytes == 0) return;
  const uintptr_t lo = reinterpret_cast<uintptr_t>(data), hi = lo + bytes;
  Registry& reg = registry();
  std::lock_guard<std::mutex> lock(reg.mu);
  auto same = reg.by_lo.find(lo);
  if (same == reg.by_lo.end() || same->second.hi != hi) {
    // a new storage where freed ones were: the views of those freed tensors
    // (pointers taken inside them, possibly at an offset) go too, or a
    // pointer into this storage that equals one of theirs would carry their
    // extent (a false out-of-bounds report)
    for (auto v = reg.views.begin(); v != reg.views.end();)
      v = v->first >= lo && v->first < hi ? reg.views.erase(v) : std::next(v);
  }
  auto it = reg.by_lo.lower_bound(lo);
  if (it != reg.by_lo.begin() && std::prev(it)->second.hi > lo) --it;
  while (it != reg.by_lo.end() && it->first < hi) it = reg.by_lo.erase(it);  // freed storages it overlaps
  reg.by_lo[lo] = Extent{lo, hi, name};
}

void register_view(const void* data, uintptr_t lo, uintptr_t hi, const char* name) {
  Registry& reg = registry();
  std::lock_guard<std::mutex> lock(reg.mu);
  if (reg.views.size() > 4096) reg.views.clear();  // pointers of freed tensors; the live ones are registered again
  reg.views[reinterpret_cast<uintptr_t>(data)] = Extent{lo, hi, name};
}

void fail_local_index(const char* name, int64_t i, int64_t n) {
  fail("out-of-bounds index " + std::to_string(i) + " of the local array `" + (name ? name : "(row)") + "` of " +
       std::to_string(n) + " entries");
}

Extent find_extent(const void* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (Run* r = g_run) {
    const uintptr_t s0 = reinterpret_cast<uintptr_t>(r->smem.data());
    if (a >= s0 && a < s0 + r->smem.size()) {
      for (const StaticAlloc& s : r->statics)
        if (a >= s0 + s.offset && a < s0 + s.offset + s.size)
          return Extent{s0 + s.offset, s0 + s.offset + s.size, s.name ? s.name : "__shared__ array"};
      const uintptr_t d0 = s0 + kStaticSmemLimit;
      if (a >= d0 && a <= d0 + r->cfg.dynamic_smem) return Extent{d0, d0 + r->cfg.dynamic_smem, "extern __shared__ array"};
      return Extent{};
    }
  }
  Registry& reg = registry();
  std::lock_guard<std::mutex> lock(reg.mu);
  auto v = reg.views.find(a);  // a pointer the host took from a tensor: that view's extent
  if (v != reg.views.end()) {
    auto s = reg.by_lo.upper_bound(a);
    if (s != reg.by_lo.begin() && v->second.lo >= std::prev(s)->second.lo && v->second.hi <= std::prev(s)->second.hi)
      return v->second;
  }
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

namespace {

std::mutex g_optin_mu;
std::unordered_map<const void*, size_t> g_optin;  // kernel -> its MaxDynamicSharedMemorySize

// The opt-in of the kernel at fn, 0 if none was set.
size_t max_dynamic_smem(const void* fn) {
  std::lock_guard<std::mutex> lock(g_optin_mu);
  const auto it = g_optin.find(fn);
  return it == g_optin.end() ? 0 : it->second;
}

}  // namespace

int set_max_dynamic_smem(const void* fn, int bytes) {
  if (bytes < 0 || bytes > kSmemOptinLimit) return 1;  // cudaErrorInvalidValue (static + dynamic: at the launch)
  std::lock_guard<std::mutex> lock(g_optin_mu);
  g_optin[fn] = size_t(bytes);
  return 0;
}

void meter_tile(int64_t loop_rows, int64_t rows) {
  Meter& m = g_meter;
  if (!m.on) return;
  ++m.epoch;
  m.in_tile = true;
  m.tile_nominal = loop_rows;
  m.tile_rows = rows;
}

void meter_tiles_end() {
  Meter& m = g_meter;
  if (!m.on) return;
  ++m.epoch;
  m.in_tile = false;
}

int64_t tile_rows_override() {  // read at each call: a process may set it between steps
  const char* v = std::getenv("PROTOSEG_SIM_TILE_ROWS");
  if (v == nullptr || *v == '\0') return 0;
  char* end = nullptr;
  const long long rows = std::strtoll(v, &end, 10);
  TORCH_CHECK(end != nullptr && *end == '\0' && rows > 0,
              "cuda_sim: PROTOSEG_SIM_TILE_ROWS must be a positive integer, got '", v, "'");
  return int64_t(rows);
}

void run_grid(const char* kernel, const void* fn, const char* file, int line, const LaunchConfig& cfg,
              const std::function<void()>& body) {
  TORCH_CHECK(g_run == nullptr, "cuda_sim: a kernel launched from device code (", kernel, ")");
  const dim3 g = cfg.grid, b = cfg.block;
  const uint64_t threads = uint64_t(b.x) * b.y * b.z;
  const size_t optin = max_dynamic_smem(fn);
  const bool ok = g.x >= 1 && g.y >= 1 && g.z >= 1 && g.x <= 0x7fffffffu && g.y <= 65535 && g.z <= 65535 &&
                  b.x >= 1 && b.y >= 1 && b.z >= 1 && b.x <= 1024 && b.y <= 1024 && b.z <= 64 && threads <= 1024 &&
                  cfg.dynamic_smem <= (optin > 0 ? optin : kStaticSmemLimit);
  TORCH_CHECK(ok, "cuda_sim: kernel ", kernel, " (launched at ", file, ":", line,
              "): invalid configuration argument: grid ", dim_str(g), ", block ", dim_str(b), ", dynamic shared ",
              cfg.dynamic_smem, " bytes",
              optin > 0 ? " (above the kernel's cudaFuncAttributeMaxDynamicSharedMemorySize, " +
                              std::to_string(optin) + " bytes)"
              : cfg.dynamic_smem > kStaticSmemLimit ? std::string(" (above 48 KiB: cudaFuncSetAttribute(kernel, "
                                                                  "cudaFuncAttributeMaxDynamicSharedMemorySize, "
                                                                  "bytes) first)")
                                                    : std::string());
  Run r;
  r.smem_optin = optin;
  r.kernel = kernel;
  r.file = file;
  r.line = line;
  r.cfg = cfg;
  r.body = &body;
  r.fibers.resize(threads);
  r.smem.assign(kStaticSmemLimit + cfg.dynamic_smem, kSmemFill);
  r.threads = uint32_t(threads);
  r.warp_seq.assign((threads + kWarpSize - 1) / kWarpSize, 0u);
  r.launch_stamp = ++g_stamps;
  if (g_racecheck_on && g_sshadow.size() < r.smem.size()) g_sshadow.resize(r.smem.size());
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
    ~Reset() {
      g_run = nullptr;
      g_gshadow.release();
    }
  } reset;
  g_run = &r;
  g_checking = g_racecheck_on || g_meter.on;  // (a process-wide switch: set, never cleared, while on)
  if (g_meter.on) {
    g_meter.cur = LaunchMeter{};
    g_meter.cur.kernel = kernel;
    g_meter.cur.grid = g;
    g_meter.cur.block = b;
  }
  for (uint64_t lin : bidx) {
    r.bidx = dim3(unsigned(lin % g.x), unsigned((lin / g.x) % g.y), unsigned(lin / (uint64_t(g.x) * g.y)));
    r.block_linear = lin;
    run_block(r, order, rng);
    if (g_meter.on) meter_block_end();
    if (!r.error.empty()) {
      const std::string prefix = launch_prefix(r);
      std::string what = symbolize(r.error, r.report_pcs);
      if (what.rfind("block ", 0) != 0) what = "block " + dim_str(r.bidx) + ": " + what;
      g_run = nullptr;
      TORCH_CHECK(false, prefix, ": ", what);
    }
  }
  if (g_meter.on) meter_launch_end();
}

void record_gemm(const char* op, int64_t m, int64_t n, int64_t k, const at::Tensor& a, const at::Tensor& b,
                 const at::Tensor& out) {
  if (!g_meter.on) return;
  std::unordered_map<uint64_t, uint64_t> sectors;  // the operands' and output's storage bytes (as laid out), in order
  uint64_t bytes = 0;
  for (const at::Tensor* t : {&a, &b, &out}) {
    if (!t->defined() || t->numel() == 0) continue;
    bytes += uint64_t(t->numel()) * t->element_size();
    // the bytes of the view, run by run: a 2-D view with a unit stride (rows, or columns of a
    // transposed or narrowed plane) is its lines' contiguous runs, not the span between them
    const uintptr_t p = reinterpret_cast<uintptr_t>(t->data_ptr());
    const int64_t es = t->element_size();
    auto add_run = [&](uintptr_t lo, int64_t n) {
      for (uint64_t s = lo >> 5; s <= (lo + uint64_t(n) * es - 1) >> 5; ++s) {
        const uint64_t rank = sectors.size();
        sectors.emplace(s, rank);
      }
    };
    if (t->dim() == 2 && (t->stride(1) == 1 || t->stride(0) == 1)) {
      const int inner = t->stride(1) == 1 ? 1 : 0, outer = 1 - inner;
      for (int64_t i = 0; i < t->size(outer); ++i) add_run(p + uintptr_t(i * t->stride(outer) * es), t->size(inner));
    } else {  // anything else: its span
      int64_t span = 1;
      for (int64_t d = 0; d < t->dim(); ++d) span += (t->size(d) - 1) * std::abs(t->stride(d));
      add_run(p, span);
    }
  }
  std::string reuse, reuse_tile;
  const uint64_t hits = meter_touch(sectors, reuse, reuse_tile);
  std::ostringstream os;
  os << "{\"type\": \"gemm\", \"name\": " << json_str(op) << ", \"m\": " << m << ", \"n\": " << n << ", \"k\": " << k
     << ", \"a\": " << json_str(c10::toString(a.scalar_type())) << ", \"b\": " << json_str(c10::toString(b.scalar_type()))
     << ", \"out\": " << json_str(c10::toString(out.scalar_type())) << ", \"flops\": " << 2 * uint64_t(m) * n * k
     << ", \"bytes\": " << bytes << ", \"unique_bytes\": " << 32 * sectors.size() << ", \"l2_hit_bytes\": "
     << 32 * hits << ", \"reuse\": " << reuse << ", \"reuse_tile\": " << reuse_tile << ", \"tile\": "
     << tile_json() << "}";
  g_meter.events.push_back(os.str());
}

}  // namespace cudasim

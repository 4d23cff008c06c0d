// The large CPU buffers of the kernels (the softmax cache N x C*K, the feature
// gradient N x D, the prototype sums' partials): where they come from, and what
// is kept of them between training steps.
//
// A fresh multi-megabyte allocation comes from the OS as untouched pages: the
// first write to each page faults and the kernel zeroes it. In 4 KiB pages
// that is slow (measured here, 2 cores: 200 MB written in 45 ms fresh, 15 ms
// reused; 4 GiB in 7-29 s fresh, 0.8 s reused), in 2 MiB pages much less so
// (4 GiB in 2-3.4 s fresh). So:
//
// - every buffer of kMinBytes (16 MiB) and more is 2 MiB aligned and advised
//   MADV_HUGEPAGE, so that fresh pages fault 2 MiB at a time wherever
//   transparent huge pages are on or "madvise";
// - when freed, a buffer of at most PROTOSEG_POOL_MB (default 1024 MiB, 0
//   disables) is kept idle for the next request of the same byte size: the
//   next training step reuses it with no fault. A larger one (a full-resolution
//   map's gradient) goes back to the OS at once: kept, it would sit idle
//   through the next step's forward and raise that step's peak by its size;
// - a request of a byte size never requested before (whether or not it fits
//   the cap) means the shapes changed: every idle buffer is released then
//   (they would not be reused). A request of a size seen before closes a cycle, e.g. a
//   training step (the sizes requested since the last request of this size,
//   or since the one before it: a size may be requested twice in a step):
//   an idle buffer of a size outside that cycle is released, one inside it is
//   kept for its next request, however the cycle's requests and frees
//   interleave. (Releasing every idle buffer on any miss, as before, made a
//   step whose prototype sums' partial is freed before the backward asks for
//   the feature gradient drop that gradient's buffer, and fault a fresh one
//   in every step.) So the pool never holds more than the buffers of the last
//   step's shapes, and never more idle bytes than PROTOSEG_POOL_MB (the oldest
//   go first).
//
// A buffer is only idle once every tensor viewing it is gone, so nothing is
// shared.
//
// A live buffer that will go back to the OS when freed (larger than the cap)
// may be released early, page by page, by the one reader that needs it no
// more (claim_reading, release_pages): the similarity backward does so with
// the softmax cache as it reads the cache's tiles, so that the cache's pages
// go while the feature gradient's are written (at full resolution the cache
// is 1.5 GiB and the gradient 5.6 GiB: the step's peak no longer holds both).
// A later reader of that buffer is told its contents are gone (a second
// backward through the same graph recomputes what it would have read).
//
// stats() and release() are exposed as protoseg_ext._C.cpu_buffer_pool_stats
// and cpu_buffer_pool_release (protoseg_ext.backends.cpu_buffer_pool_stats).
#pragma once
#include <ATen/ATen.h>
#include <c10/util/accumulate.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace protoseg {

struct BufferPoolStats {
  size_t idle_bytes = 0;     // held, waiting for a request of their size
  size_t idle_buffers = 0;
  size_t live_bytes = 0;     // handed out, not yet freed
  size_t cap_bytes = 0;      // PROTOSEG_POOL_MB
  size_t reused = 0;         // requests served from an idle buffer
  size_t allocated = 0;      // requests served with a fresh allocation
  size_t released = 0;       // idle buffers handed back to the OS (stale sizes, cap, release())
  size_t peak_idle_bytes = 0;
  size_t released_early_bytes = 0;  // pages of live buffers handed back by release_pages
};

class BufferPool {
 public:
  static BufferPool& get() {
    static BufferPool* pool = new BufferPool();  // never destroyed: tensors may outlive static destructors
    return *pool;
  }

  // An uninitialised tensor of `sizes`, from an idle buffer of the same byte
  // size when there is one.
  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    const size_t bytes =
        static_cast<size_t>(c10::multiply_integers(sizes)) * at::elementSize(at::typeMetaToScalarType(options.dtype()));
    if (bytes < kMinBytes) return at::empty(sizes, options);
    void* p = take(bytes);
    if (p == nullptr) {
      p = allocate(bytes);
      if (p == nullptr) return at::empty(sizes, options);  // let the ATen allocator report the failure
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      live_.push_back({p, bytes});
    }
    return at::from_blob(p, sizes, [bytes](void* q) { BufferPool::get().give_back(q, bytes); }, options);
  }

  BufferPoolStats stats() {
    std::lock_guard<std::mutex> lock(mu_);
    BufferPoolStats s = stats_;
    s.idle_bytes = idle_bytes_;
    s.idle_buffers = idle_.size();
    s.cap_bytes = cap_;
    s.released_early_bytes = released_early_bytes_.load();
    return s;
  }

  // How a reader may read the buffer starting at p, of `bytes` bytes, one
  // decision under the lock (so two readers never both think they hold it):
  enum class Reading {
    kKept,     // read it as it is: not a live pool buffer, or one the pool keeps when freed
    kRelease,  // the first reader of a buffer that goes back to the OS when freed: it may
               // hand the pages back with release_pages as it is done with them
    kGone,     // an earlier reader released its pages: its contents are gone
  };
  Reading claim_reading(const void* p, size_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    Live* l = find_live_locked(p);
    if (l == nullptr || l->bytes != bytes) return Reading::kKept;
    if (l->released) return Reading::kGone;
    if (bytes <= cap_) return Reading::kKept;  // kept idle when freed: its pages serve the next step
    l->released = true;
    return Reading::kRelease;
  }

  // Hands back to the OS the whole huge pages (kAlign, the buffers' alignment)
  // inside bytes [begin, end) of the buffer at base, which claim_reading
  // gave as kRelease. Returns the offset up to which the range is released (begin
  // rounded up when nothing is), to call again with the next range: the
  // pages a range shares with its neighbours go with the range that
  // completes them, if that is the same caller's.
  size_t release_pages(void* base, size_t begin, size_t end) {
    const size_t from = round_up(begin), to = end / kAlign * kAlign;
    if (to <= from) return from;
#if defined(__linux__) && defined(MADV_DONTNEED)
    if (madvise(static_cast<char*>(base) + from, to - from, MADV_DONTNEED) != 0) return from;  // kept, still valid
    released_early_bytes_ += to - from;
#else
    (void)base;
#endif
    return to;
  }

  // Hands every idle buffer back to the OS; returns the bytes released.
  size_t release() {
    std::vector<void*> drop;
    size_t bytes = 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      bytes = idle_bytes_;
      drop_all_locked(drop);
    }
    for (void* q : drop) std::free(q);
    return bytes;
  }

  static constexpr size_t kAlign = size_t(2) << 20;  // the buffers' alignment: a huge page

 private:
  static constexpr size_t kMinBytes = size_t(16) << 20;  // smaller buffers are cheap to fault in
  static constexpr size_t kHistory = 64;                 // pooled requests remembered, the newest last

  BufferPool() {
    const char* env = std::getenv("PROTOSEG_POOL_MB");
    const double mb = env ? std::atof(env) : 1024.0;
    cap_ = mb > 0 ? static_cast<size_t>(mb * (1 << 20)) : 0;
  }

  static size_t round_up(size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

  static void* allocate(size_t bytes) {
    const size_t n = round_up(bytes);
    void* p = std::aligned_alloc(kAlign, n);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (p != nullptr) madvise(p, n, MADV_HUGEPAGE);  // advice only: refused where THP is off
#endif
    return p;
  }

  void drop_all_locked(std::vector<void*>& drop) {
    for (const Idle& i : idle_) drop.push_back(i.ptr);
    stats_.released += idle_.size();
    idle_.clear();
    idle_bytes_ = 0;
  }

  void* take(size_t bytes) {
    std::vector<void*> drop;
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      stats_.live_bytes += bytes;
      drop_outside_cycle_locked(bytes, drop);
      for (size_t i = 0; i < idle_.size(); ++i) {
        if (idle_[i].bytes == bytes) {
          p = idle_[i].ptr;
          idle_bytes_ -= bytes;
          idle_.erase(idle_.begin() + i);
          break;
        }
      }
      if (p != nullptr) {
        ++stats_.reused;
      } else {
        ++stats_.allocated;
      }
    }
    for (void* q : drop) std::free(q);
    return p;
  }

  // Before a request of `bytes`: releases the idle buffers of sizes outside
  // the cycle it closes (all of them when the size is new), then records it.
  // The cycle reaches back to the second-latest request of this size when
  // there is one: a size requested twice per step (e.g. the softmax cache
  // and the feature gradient when D == C * K) would otherwise close a
  // half-step cycle and release what the other half requests.
  void drop_outside_cycle_locked(size_t bytes, std::vector<void*>& drop) {
    auto last = std::find(history_.rbegin(), history_.rend(), bytes);
    if (last == history_.rend()) {
      drop_all_locked(drop);
    } else {
      const auto before = std::find(last + 1, history_.rend(), bytes);
      if (before != history_.rend()) last = before;
      const std::vector<size_t> cycle(history_.rbegin(), last + 1);  // this size and those requested since
      std::vector<Idle> keep;
      for (const Idle& i : idle_) {
        if (std::find(cycle.begin(), cycle.end(), i.bytes) != cycle.end()) {
          keep.push_back(i);
        } else {
          drop.push_back(i.ptr);
          idle_bytes_ -= i.bytes;
          ++stats_.released;
        }
      }
      idle_.swap(keep);
    }
    history_.push_back(bytes);
    if (history_.size() > kHistory) history_.erase(history_.begin());
  }

  // Keeps the buffer idle when it fits the cap, dropping the oldest idle ones beyond it.
  void give_back(void* p, size_t bytes) {
    std::vector<void*> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      stats_.live_bytes -= bytes;
      if (Live* l = find_live_locked(p)) live_.erase(live_.begin() + (l - live_.data()));
      if (bytes > cap_) {
        drop.push_back(p);
      } else {
        idle_.push_back({p, bytes});
        idle_bytes_ += bytes;
        while (idle_bytes_ > cap_ && !idle_.empty()) {
          drop.push_back(idle_.front().ptr);
          idle_bytes_ -= idle_.front().bytes;
          idle_.erase(idle_.begin());
          ++stats_.released;
        }
        stats_.peak_idle_bytes = std::max(stats_.peak_idle_bytes, idle_bytes_);
      }
    }
    for (void* q : drop) std::free(q);
  }

  struct Idle {
    void* ptr;
    size_t bytes;
  };
  struct Live {
    void* ptr;
    size_t bytes;
    bool released = false;  // claimed as kRelease: its pages go back as they are read
  };
  Live* find_live_locked(const void* p) {
    for (Live& l : live_)
      if (l.ptr == p) return &l;
    return nullptr;
  }
  std::mutex mu_;
  std::vector<Idle> idle_;
  std::vector<Live> live_;  // handed out, not yet freed (a handful: a step's large buffers)
  std::atomic<size_t> released_early_bytes_{0};
  std::vector<size_t> history_;  // byte sizes of the latest pooled requests, oldest first
  size_t idle_bytes_ = 0;
  size_t cap_ = 0;
  BufferPoolStats stats_;
};

}  // namespace protoseg

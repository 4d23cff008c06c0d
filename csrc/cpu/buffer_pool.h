// Large CPU output buffers kept for reuse by the next training step.
//
// A fresh multi-megabyte allocation comes from the OS as untouched pages:
// the first write to each 4 KiB page faults and the kernel zeroes it. For the
// softmax cache (N x C*K) and the feature gradient (N x D) that is every step
// again, about a third of the time of the pass that writes them (measured:
// 200 MB written in 45 ms fresh, 15 ms reused, 2 cores). The pool hands out a
// freed buffer of the same size instead. It holds at most
// PROTOSEG_POOL_MB (default a quarter of physical memory, 0 disables) of idle buffers; a buffer is
// only idle once every tensor viewing it is gone, so nothing is shared.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/accumulate.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#endif

namespace protoseg {

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
    if (bytes < kMinBytes || bytes > cap_) return at::empty(sizes, options);
    void* p = take(bytes);
    if (p == nullptr) {
      p = std::aligned_alloc(kAlign, round_up(bytes));
      if (p == nullptr) return at::empty(sizes, options);  // let the ATen allocator report the failure
    }
    return at::from_blob(p, sizes, [bytes](void* q) { BufferPool::get().give_back(q, bytes); }, options);
  }

 private:
  static constexpr size_t kMinBytes = size_t(16) << 20;  // smaller buffers are cheap to fault in
  static constexpr size_t kAlign = 64;

  BufferPool() {
    const char* env = std::getenv("PROTOSEG_POOL_MB");
    double mb = env ? std::atof(env) : default_mb();
    cap_ = mb > 0 ? static_cast<size_t>(mb * (1 << 20)) : 0;
  }

  // a quarter of physical memory (room for a full-resolution map's gradient), at least 1 GiB
  static double default_mb() {
    double total_mb = 0.0;
#if defined(_SC_PHYS_PAGES) && defined(_SC_PAGE_SIZE)
    const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
    if (pages > 0 && page > 0) total_mb = double(pages) * double(page) / double(1 << 20);
#endif
    return std::max(1024.0, total_mb / 4);
  }

  static size_t round_up(size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    for (size_t i = 0; i < idle_.size(); ++i) {
      if (idle_[i].bytes == bytes) {
        void* p = idle_[i].ptr;
        idle_bytes_ -= bytes;
        idle_.erase(idle_.begin() + i);
        return p;
      }
    }
    return nullptr;
  }

  // Keeps the buffer idle, dropping the oldest idle ones beyond the cap.
  void give_back(void* p, size_t bytes) {
    std::vector<void*> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      idle_.push_back({p, bytes});
      idle_bytes_ += bytes;
      while (idle_bytes_ > cap_ && !idle_.empty()) {
        drop.push_back(idle_.front().ptr);
        idle_bytes_ -= idle_.front().bytes;
        idle_.erase(idle_.begin());
      }
    }
    for (void* q : drop) std::free(q);
  }

  struct Idle {
    void* ptr;
    size_t bytes;
  };
  std::mutex mu_;
  std::vector<Idle> idle_;
  size_t idle_bytes_ = 0;
  size_t cap_ = 0;
};

}  // namespace protoseg

// Recycled buffers for the large gradient outputs of the CPU logit kernels.
//
// A training loop allocates the same (rows, C) gradient at every step and frees it at the
// next zero_grad(). glibc serves such sizes (> 32 MiB) with a fresh mmap each time, so every
// step would pay a page fault and a page clear per 4 KiB, a large share of a memory-bound
// KD or DIST step. Advising huge pages instead slows a process's first steps (direct
// compaction under THP defrag "madvise") and speeds up only the later ones. So outputs of
// at least kPoolMinBytes come from this pool: a freed buffer of the same size is handed out
// again, already mapped. At most kMaxIdle buffers are kept idle;
// kdfast.empty_cache() releases them. Thread-safe; the pool is never destroyed (tensors may
// outlive static destruction).
#pragma once

#include <ATen/ATen.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <new>
#include <utility>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace kdfast::pool {

constexpr size_t kPoolMinBytes = size_t(16) << 20;
constexpr size_t kMaxIdle = 2;
constexpr size_t kAlign = size_t(2) << 20;  // huge-page aligned

class OutputPool {
 public:
  static OutputPool& instance() {
    static OutputPool* pool = new OutputPool();
    return *pool;
  }

  // A buffer of `bytes` (rounded up to kAlign): an idle one of that size, or a new one.
  void* take(size_t bytes) {
    bytes = rounded(bytes);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (size_t i = 0; i < idle_.size(); ++i) {
        if (idle_[i].first == bytes) {
          void* p = idle_[i].second;
          idle_.erase(idle_.begin() + static_cast<std::ptrdiff_t>(i));
          return p;
        }
      }
    }
    void* p = std::aligned_alloc(kAlign, bytes);
    if (p == nullptr) throw std::bad_alloc();
#ifdef __linux__
    madvise(p, bytes, MADV_HUGEPAGE);  // advice only: errors ignored
#endif
    return p;
  }

  // Back to the pool (the most recent kMaxIdle are kept; older ones are freed).
  void give(void* p, size_t bytes) {
    bytes = rounded(bytes);
    void* evicted = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      idle_.emplace_back(bytes, p);
      if (idle_.size() > kMaxIdle) {
        evicted = idle_.front().second;
        idle_.erase(idle_.begin());
      }
    }
    std::free(evicted);
  }

  // Frees every idle buffer; returns the bytes released.
  int64_t release() {
    std::vector<std::pair<size_t, void*>> idle;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      idle.swap(idle_);
    }
    int64_t released = 0;
    for (auto& [bytes, p] : idle) {
      released += static_cast<int64_t>(bytes);
      std::free(p);
    }
    return released;
  }

  int64_t idle_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    int64_t total = 0;
    for (auto& entry : idle_) total += static_cast<int64_t>(entry.first);
    return total;
  }

 private:
  static size_t rounded(size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

  std::mutex mutex_;
  std::vector<std::pair<size_t, void*>> idle_;
};

// at::empty(sizes, options) for a contiguous CPU output; large ones from the pool.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const int64_t numel = c10::multiply_integers(sizes);
  const size_t bytes = static_cast<size_t>(numel) * options.dtype().itemsize();
  if (bytes < kPoolMinBytes || options.device().type() != c10::DeviceType::CPU) {
    return at::empty(sizes, options);
  }
  void* data = OutputPool::instance().take(bytes);
  return at::from_blob(
      data, sizes, [bytes](void* p) { OutputPool::instance().give(p, bytes); }, options);
}

}  // namespace kdfast::pool

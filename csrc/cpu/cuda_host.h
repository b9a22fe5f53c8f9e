// CPU grid driver for the raw CUDA kernels (test-only): runs a kernel body of
// csrc/cuda/<op>_kernels.h over its whole grid through the same launcher template as the
// CUDA launch, so the CPU tests execute every index, bound and reduction of the CUDA code.
// A kernel without barriers runs block by block, thread by thread. A kernel with
// __syncthreads (BlockKernel) runs every thread of the grid as a std::thread; they meet at
// a real barrier at every Team::sync and run phase by phase (GridSchedule).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "../cuda/grid.h"

namespace kdfast::cuda_host {

using cuda::GridPos;

// Threads per block and the most blocks of the host launches made on this thread while a
// GeometryScope lives; 0 keeps the CUDA launcher's own choice. Partial blocks and repeated
// grid-stride loops need geometries that the CUDA defaults only reach at large sizes.
struct Geometry {
  int64_t threads = 0, max_blocks = 0;
};

class GeometryScope {
 public:
  explicit GeometryScope(Geometry geometry);
  ~GeometryScope();
  GeometryScope(const GeometryScope&) = delete;
  GeometryScope& operator=(const GeometryScope&) = delete;

 private:
  Geometry previous_;
};

// The launches made so far (kernel, blocks, threads per block), for the tests to check the
// grids they ran; taking them clears the record.
struct LaunchRecord {
  std::string kernel;
  int64_t blocks, threads;
};
void record_launch(const char* kernel, int64_t blocks, int64_t threads);
std::vector<LaunchRecord> take_launches();

// The barriers of a host-run grid, which also schedule its threads: one thread runs at a
// time, from one barrier to the next, in a fixed rotation (block 0's threads in rank order,
// then block 1's, ...), so every block advances one phase per rotation. A fixed order
// makes a missing __syncthreads a deterministic failure (rank 0 runs ahead and reads what
// the higher ranks have not written yet) and so does memory shared by blocks that should
// not share it (their phases interleave), instead of rare races. A phase in which some
// threads of a block left the body while others reached a __syncthreads (undefined
// behaviour on a GPU) makes every thread throw.
class GridSchedule {
 public:
  GridSchedule(int64_t blocks, int64_t threads);
  // Blocks until the first turn of `slot` (block * threads + thread).
  void enter(int64_t slot);
  // Arrives at the barrier of the slot's block and blocks until its next turn.
  void sync(int64_t slot);
  // Arrives at the end of the body and leaves the rotation.
  void leave(int64_t slot);

 private:
  enum Point { kSync, kExit };
  struct Block {
    int64_t live, arrived = 0;
    Point point = kSync;
    bool diverged = false;
  };
  void arrive(int64_t slot, Point point);
  void await_turn(std::unique_lock<std::mutex>& lock, int64_t slot);

  std::mutex mutex_;
  const int64_t threads_;
  std::vector<Block> blocks_;
  std::vector<char> live_;
  std::vector<std::condition_variable> turns_;  // one per slot: only the next one is woken
  int64_t turn_ = 0;
  bool broken_ = false;
};

// The Team of csrc/expm_small.h for one thread of a host-run block.
struct HostBlockTeam {
  int64_t thread, threads, slot;
  GridSchedule* schedule;

  int64_t rank() const { return thread; }
  int64_t size() const { return threads; }
  void sync() const { schedule->sync(slot); }
};

// A kernel body and the name of its __global__ wrapper (for the launch record).
template <class... Params>
struct Kernel {
  const char* name;
  void (*body)(const GridPos&, Params...);
};

template <class... Params>
struct BlockKernel {
  const char* name;
  void (*body)(const GridPos&, const HostBlockTeam&, Params...);
};

template <class... Params>
constexpr Kernel<Params...> kernel(const char* name, void (*body)(const GridPos&, Params...)) {
  return {name, body};
}

template <class... Params>
constexpr BlockKernel<Params...> block_kernel(const char* name,
                                              void (*body)(const GridPos&,
                                                           const HostBlockTeam&, Params...)) {
  return {name, body};
}

// One OS thread per CUDA thread: more than this is a geometry to override in the test.
constexpr int64_t kMaxHostGridThreads = 4096;
void check_host_grid(const char* kernel, int64_t blocks, int64_t threads);

// The Grid of the launchers in csrc/cuda/*_kernels.h on the CPU. A derived struct names
// the op's kernels, as the .cu's Grid names its __global__ wrappers.
struct HostGrid {
  static int threads(int default_threads);
  static int64_t max_blocks(int64_t default_blocks);

  template <class... Params, class... Args>
  static void launch(const Kernel<Params...>& k, int64_t blocks, int threads, Args... args) {
    record_launch(k.name, blocks, threads);
    for (int64_t block = 0; block < blocks; ++block) {
      for (int64_t thread = 0; thread < threads; ++thread) {
        k.body(GridPos{block, thread, threads, blocks}, args...);
      }
    }
  }

  // Every thread of the grid at once, each keeping its registers (such as the pivots of
  // the LU) across barriers.
  template <class... Params, class... Args>
  static void launch(const BlockKernel<Params...>& k, int64_t blocks, int threads,
                     Args... args) {
    check_host_grid(k.name, blocks, threads);
    record_launch(k.name, blocks, threads);
    GridSchedule schedule(blocks, threads);
    std::vector<std::exception_ptr> errors(blocks * threads);
    std::vector<std::thread> workers;
    workers.reserve(blocks * threads);
    for (int64_t slot = 0; slot < blocks * threads; ++slot) {
      workers.emplace_back([&, slot] {
        const int64_t block = slot / threads, thread = slot % threads;
        try {
          schedule.enter(slot);
          k.body(GridPos{block, thread, threads, blocks},
                 HostBlockTeam{thread, threads, slot, &schedule}, args...);
          schedule.leave(slot);
        } catch (...) {
          errors[slot] = std::current_exception();
        }
      });
    }
    for (std::thread& worker : workers) worker.join();
    for (const std::exception_ptr& error : errors) {
      if (error) std::rethrow_exception(error);
    }
  }
};

}  // namespace kdfast::cuda_host

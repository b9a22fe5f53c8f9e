// The state of the CPU grid driver (csrc/cpu/cuda_host.h): the geometry override, the
// launch record and the grid schedule.
#include "cuda_host.h"

#include <c10/util/Exception.h>

#include <stdexcept>
#include <utility>

namespace kdfast::cuda_host {
namespace {

thread_local Geometry geometry;

std::mutex launches_mutex;
std::vector<LaunchRecord> launches;

[[noreturn]] void throw_diverged() {
  throw std::runtime_error(
      "cuda_host: the threads of a block diverged at a barrier: some reached a "
      "__syncthreads (Team::sync) while others had left the kernel body");
}

}  // namespace

GeometryScope::GeometryScope(Geometry g) : previous_(geometry) { geometry = g; }
GeometryScope::~GeometryScope() { geometry = previous_; }

int HostGrid::threads(int default_threads) {
  return geometry.threads > 0 ? static_cast<int>(geometry.threads) : default_threads;
}

int64_t HostGrid::max_blocks(int64_t default_blocks) {
  return geometry.max_blocks > 0 ? geometry.max_blocks : default_blocks;
}

void record_launch(const char* kernel, int64_t blocks, int64_t threads) {
  const std::lock_guard<std::mutex> lock(launches_mutex);
  launches.push_back({kernel, blocks, threads});
}

std::vector<LaunchRecord> take_launches() {
  const std::lock_guard<std::mutex> lock(launches_mutex);
  return std::exchange(launches, {});
}

void check_host_grid(const char* kernel, int64_t blocks, int64_t threads) {
  TORCH_CHECK_VALUE(blocks * threads <= kMaxHostGridThreads, "cuda_host: ", kernel, " with ",
                    blocks, " blocks of ", threads, " threads needs more than ",
                    kMaxHostGridThreads, " OS threads; pass smaller threads / max_blocks");
}

GridSchedule::GridSchedule(int64_t blocks, int64_t threads)
    : threads_(threads),
      blocks_(blocks, Block{threads}),
      live_(blocks * threads, 1),
      turns_(blocks * threads) {}

void GridSchedule::await_turn(std::unique_lock<std::mutex>& lock, int64_t slot) {
  turns_[slot].wait(lock, [&] { return turn_ == slot || broken_; });
  if (broken_) throw_diverged();
}

// A block's phase ends at the arrival of its last live thread (the rotation visits them in
// rank order); all of them must have arrived at the same kind of point.
void GridSchedule::arrive(int64_t slot, Point point) {
  Block& block = blocks_[slot / threads_];
  if (block.arrived == 0) {
    block.point = point;
  } else if (point != block.point) {
    block.diverged = true;
  }
  if (++block.arrived == block.live) {
    if (block.diverged) {
      broken_ = true;
      for (std::condition_variable& turn : turns_) turn.notify_all();
      throw_diverged();
    }
    block.arrived = 0;
    if (point == kExit) block.live = 0;
  }
  if (point == kExit) live_[slot] = 0;
  const int64_t slots = static_cast<int64_t>(live_.size());
  for (int64_t step = 1; step <= slots; ++step) {  // the next live slot, maybe this one
    const int64_t next = (slot + step) % slots;
    if (live_[next]) {
      turn_ = next;
      turns_[next].notify_one();
      return;
    }
  }
}

void GridSchedule::enter(int64_t slot) {
  std::unique_lock<std::mutex> lock(mutex_);
  await_turn(lock, slot);
}

void GridSchedule::sync(int64_t slot) {
  std::unique_lock<std::mutex> lock(mutex_);
  arrive(slot, kSync);
  await_turn(lock, slot);
}

void GridSchedule::leave(int64_t slot) {
  std::unique_lock<std::mutex> lock(mutex_);
  arrive(slot, kExit);
}

}  // namespace kdfast::cuda_host

// Dynamic work distribution for the CPU kernels: one parallel region per pass, tiles claimed
// one at a time from a shared counter.
//
// at::parallel_for (OpenMP backend) splits its range into one fixed chunk per thread, so on a
// busy machine a descheduled thread holds its whole chunk while the others wait for it at
// the region's end. Here each thread claims the next unclaimed tile until none is left: a
// thread that starts late, or is descheduled between tiles, leaves the remaining tiles to
// the others, and the region's end waits at most for the tile a thread is running. A tile
// must write only what it owns (its rows, its partial sums), so the results do not depend
// on which thread ran which tile: they are bitwise the same for any thread count, timing or
// load. The OpenMP settings (thread count, wait policy) are the user's and are left as they
// are; the threads are torch's (at::get_num_threads()).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace kdfast::tiles {

// Entries of an N x N pair pass per tile: a pair costs a few nanoseconds, so a smaller tile
// would cost less than handing it to another thread (microseconds on an idle machine, up to
// a scheduler tick on a busy one). Up to N = 128 a pair pass is one tile: it runs on the
// calling thread, with no parallel region at all.
constexpr int64_t kPairsPerTile = 32768;

// Rows of `columns` entries per tile for about `elements` entries per tile (at least 1).
inline int64_t rows_per_tile(int64_t columns, int64_t elements) {
  return std::max<int64_t>(1, elements / std::max<int64_t>(columns, 1));
}

// Tiles per thread of a pass over many rows: enough that the others can take over a late
// thread's share, few enough that each tile streams a long run of consecutive rows.
constexpr int64_t kTilesPerThread = 8;

// Rows per tile for `count` rows: at least `min_grain`, and about kTilesPerThread tiles per
// thread when there are more rows than that.
inline int64_t row_tile(int64_t count, int64_t min_grain) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  return std::max<int64_t>({1, min_grain, count / (kTilesPerThread * threads)});
}

// The tiles of one pass, handed out in order to whichever thread asks next.
class TileQueue {
 public:
  explicit TileQueue(int64_t tiles) : tiles_(tiles) {}
  // Claims the next tile into `tile`; false when every tile has been claimed.
  bool next(int64_t& tile) {
    tile = next_.fetch_add(1, std::memory_order_relaxed);
    return tile < tiles_;
  }

 private:
  const int64_t tiles_;
  std::atomic<int64_t> next_{0};
};

// Runs worker(queue) on up to min(tiles, at::get_num_threads()) threads in one parallel
// region (inline when one thread suffices or when already inside a parallel region); each
// worker claims tiles with queue.next() until it returns false. Per-thread scratch (row
// buffers) is set up once per worker, not once per tile.
template <typename Worker>
void run_workers(int64_t tiles, const Worker& worker) {
  if (tiles <= 0) return;
  TileQueue queue(tiles);
  const int64_t threads = std::min<int64_t>(tiles, at::get_num_threads());
  if (threads <= 1 || at::in_parallel_region()) {
    worker(queue);
    return;
  }
  // One index per thread: at::parallel_for hands each thread one (begin, end) chunk.
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) { worker(queue); });
}

// Calls f(tile) once for every tile in [0, tiles), tiles claimed dynamically (run_workers).
template <typename F>
void for_each_tile(int64_t tiles, const F& f) {
  run_workers(tiles, [&](TileQueue& queue) {
    for (int64_t tile; queue.next(tile);) f(tile);
  });
}

// Tiles of `grain` indices (the last may be shorter) covering `count` indices.
inline int64_t tile_count(int64_t count, int64_t grain) {
  grain = std::max<int64_t>(grain, 1);
  return count > 0 ? (count + grain - 1) / grain : 0;
}

// Calls f(begin, end) for consecutive ranges of `grain` indices (the last may be shorter)
// covering [begin, end), ranges claimed dynamically (run_workers): at::parallel_for's
// signature with a dynamic schedule.
template <typename F>
void for_each_range(int64_t begin, int64_t end, int64_t grain, const F& f) {
  grain = std::max<int64_t>(grain, 1);
  for_each_tile(tile_count(end - begin, grain), [&](int64_t tile) {
    const int64_t b = begin + tile * grain;
    f(b, std::min(end, b + grain));
  });
}

// for_each_range with per-thread scratch: f(scratch, begin, end), where scratch = make() is
// built once per thread that takes part (row buffers), not once per range.
template <typename Make, typename F>
void for_each_range_with(int64_t begin, int64_t end, int64_t grain, const Make& make,
                         const F& f) {
  grain = std::max<int64_t>(grain, 1);
  run_workers(tile_count(end - begin, grain), [&](TileQueue& queue) {
    int64_t tile;
    if (!queue.next(tile)) return;  // nothing left: no scratch to build
    auto scratch = make();
    do {
      const int64_t b = begin + tile * grain;
      f(scratch, b, std::min(end, b + grain));
    } while (queue.next(tile));
  });
}

}  // namespace kdfast::tiles

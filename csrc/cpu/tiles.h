// Dynamic work distribution for the CPU kernels: tiles claimed one at a time from a shared
// counter by the calling thread and helpers that join when the scheduler runs them.
//
// at::parallel_for (OpenMP backend) splits its range into one fixed chunk per thread, so on a
// busy machine a descheduled thread holds its whole chunk while the others wait for it at
// the region's end. Here each thread claims the next unclaimed tile until none is left: a
// thread that starts late, or is descheduled between tiles, leaves the remaining tiles to
// the others, and the region's end waits at most for the tile a thread is running. A tile
// must write only what it owns (its rows, its partial sums), so the results do not depend
// on which thread ran which tile: they are bitwise the same for any thread count, timing or
// load. Inside a serial-glue op (OpScope) no OpenMP region is opened: its closing barrier
// waits for every thread of the team, and on a busy machine a thread the scheduler has not
// run yet holds it while the others spin (measured: 68x slower with one competing process on
// 2 cores). The thread count is the user's (at::get_num_threads()); the global OpenMP
// settings are left as they are.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__unix__) || defined(__APPLE__)
#include <dlfcn.h>
#define KDFAST_HAS_DLSYM 1
#endif

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>

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

// The tiles of one pass, claimed from a shared counter by whichever thread asks next, and
// the bookkeeping that lets the calling thread wait only for tiles being run.
struct TileState {
  explicit TileState(int64_t tiles) : tiles(tiles) {}
  const int64_t tiles;
  std::atomic<int64_t> next{0};
  // Helpers inside the pass (registered before their first claim): the caller waits for
  // these, never for a helper that has not started.
  std::atomic<int64_t> running{0};
  std::mutex mutex;
  std::condition_variable idle;
  std::exception_ptr error;  // the first exception a participant threw (under mutex)

  bool claim(int64_t& tile) {
    tile = next.fetch_add(1, std::memory_order_acq_rel);
    return tile < tiles;
  }
  // No tile is handed out after this (an exception ends the pass early).
  void stop() { next.store(tiles, std::memory_order_relaxed); }
  void fail(std::exception_ptr e) {
    std::lock_guard<std::mutex> lock(mutex);
    if (!error) error = std::move(e);
    stop();
  }
  void leave() {
    if (running.fetch_sub(1, std::memory_order_acq_rel) == 1) {
      std::lock_guard<std::mutex> lock(mutex);
      idle.notify_all();
    }
  }
  void wait_for_helpers() {
    std::unique_lock<std::mutex> lock(mutex);
    idle.wait(lock, [&] { return running.load(std::memory_order_acquire) == 0; });
  }
};

// One participant's view of a pass: next() hands out the tile claimed before the worker was
// entered (a helper's first), then claims more from the shared counter.
class TileQueue {
 public:
  explicit TileQueue(TileState& state, int64_t first = -1) : state_(state), first_(first) {}
  // Claims the next tile into `tile`; false when every tile has been claimed.
  bool next(int64_t& tile) {
    if (first_ >= 0) {
      tile = first_;
      first_ = -1;
      return true;
    }
    return state_.claim(tile);
  }

 private:
  TileState& state_;
  int64_t first_;
};

// The helper threads of the CPU passes: each runs one queued task at a time and, idle,
// watches for the next one for kWatch (an op's passes come in quick succession), then blocks
// on a condition variable; a thread is added when a task finds none idle. A watching helper
// holds up no one: the caller waits only for helpers that hold a tile. kdfast's own threads
// rather than torch's inter-op pool: at::launch hands each task the caller's
// ThreadLocalState, whose Python objects the helper then releases under the GIL (during
// interpreter shutdown that aborted the process, and a helper waiting for the GIL is a
// helper lost to the next pass). A task runs below autograd, as the op that queued it.
// The pool is never destroyed (its idle threads end with the process); a forked child
// starts a pool of its own.
class HelperPool {
 public:
  static HelperPool& get() {
    static std::atomic<HelperPool*> pool{nullptr};
    HelperPool* p = pool.load(std::memory_order_acquire);
    if (p == nullptr || p->pid_ != process_id()) {
      static std::mutex create;
      std::lock_guard<std::mutex> lock(create);
      p = pool.load(std::memory_order_acquire);
      if (p == nullptr || p->pid_ != process_id()) {
        p = new HelperPool();  // leaked on purpose, like the parent's pool in a forked child
        pool.store(p, std::memory_order_release);
      }
    }
    return *p;
  }

  void run(std::function<void()> task) {
    bool spawn = false;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      tasks_.push_back(std::move(task));
      queued_.fetch_add(1, std::memory_order_release);
      if (idle_ < static_cast<int64_t>(tasks_.size())) {
        ++idle_;  // the new thread counts as idle until it takes a task
        spawn = true;
      }
    }
    if (spawn) {
      std::thread([this] { loop(); }).detach();
    } else {
      ready_.notify_one();
    }
  }

 private:
  HelperPool() : pid_(process_id()) {}

  static int64_t process_id() {
#if defined(__unix__) || defined(__APPLE__)
    return static_cast<int64_t>(getpid());
#else
    return 0;
#endif
  }

  void loop() {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      if (tasks_.empty()) {
        // An op's passes come in quick succession: watch for the next task for a short
        // while before blocking, without the lock (a blocked thread takes a wake-up to start).
        lock.unlock();
        const auto until = std::chrono::steady_clock::now() + kWatch;
        while (queued_.load(std::memory_order_acquire) == 0 &&
               std::chrono::steady_clock::now() < until) {
          pause();
        }
        lock.lock();
      }
      ready_.wait(lock, [&] { return !tasks_.empty(); });
      std::function<void()> task = std::move(tasks_.front());
      tasks_.pop_front();
      queued_.fetch_sub(1, std::memory_order_relaxed);
      --idle_;
      lock.unlock();
      {
        at::AutoDispatchBelowADInplaceOrView below_autograd;
        task();
      }
      task = nullptr;  // its captures go before this thread counts as idle again
      lock.lock();
      ++idle_;
    }
  }

  static void pause() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
  }

  // How long an idle helper watches for the next task before it blocks.
  static constexpr std::chrono::microseconds kWatch{1000};

  const int64_t pid_;
  std::atomic<int64_t> queued_{0};  // tasks_.size(), read without the lock
  std::mutex mutex_;
  std::condition_variable ready_;
  std::deque<std::function<void()>> tasks_;
  int64_t idle_ = 0;  // threads waiting for a task (or starting)
};

// MKL_Set_Num_Threads_Local(n): sets this thread's MKL thread count (0: back to the global
// one) and returns the previous setting; -1 where the process has no MKL (OpenBLAS builds).
inline int set_mkl_local_threads(int n) {
#ifdef KDFAST_HAS_DLSYM
  using Setter = int (*)(int);
  static const Setter setter = [] {
    // torch's MKL is linked into libtorch_cpu, which Python loads with local symbols.
    void* found = dlsym(RTLD_DEFAULT, "MKL_Set_Num_Threads_Local");
    if (!found) {
      if (void* lib = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD)) {
        found = dlsym(lib, "MKL_Set_Num_Threads_Local");
        dlclose(lib);  // NOLOAD took a reference to the loaded library: hand it back
      }
    }
    return reinterpret_cast<Setter>(found);
  }();
  return setter ? setter(n) : -1;
#else
  return -1;
#endif
}

// Whether MKL's thread-local thread count can be set here (python -m kdfast.info).
inline bool mkl_local_threads_available() {
  const int previous = set_mkl_local_threads(0);
  if (previous > 0) set_mkl_local_threads(previous);
  return previous >= 0;
}

namespace detail {
// This thread runs a tile (nested passes run inline) / an op's serial glue (OpScope).
inline thread_local int tile_depth = 0;
inline thread_local int op_depth = 0;
// The thread count of the caller of the outermost OpScope (inside it, ATen's is 1).
inline thread_local int64_t op_threads = 0;

// Nothing in the scope opens a parallel region of its own: this thread's OpenMP team size
// (a per-thread setting, so ATen's parallel_for runs inline) and its MKL thread count (MKL's
// thread-local setting, where the BLAS is MKL) are 1 inside, and restored on exit. The
// global settings, and every other thread's, are untouched.
class Serial {
 public:
  Serial() : threads_(at::get_num_threads()), mkl_previous_(set_mkl_local_threads(1)) {
    // at::get_num_threads() above comes first: the first time a thread asks, ATen sizes its
    // OpenMP team from MKL's thread count, which must not be the serial one.
#ifdef _OPENMP
    omp_set_num_threads(1);
#endif
  }
  ~Serial() {
#ifdef _OPENMP
    omp_set_num_threads(static_cast<int>(threads_));
#endif
    if (mkl_previous_ >= 0) set_mkl_local_threads(mkl_previous_);
  }
  Serial(const Serial&) = delete;
  Serial& operator=(const Serial&) = delete;

  // The thread count outside the scope.
  int64_t threads() const { return threads_; }

 private:
  const int64_t threads_;
  const int mkl_previous_;
};
}  // namespace detail

// A tile's scope, on the calling thread and on each helper: serial (detail::Serial), and a
// pass started inside it runs inline.
class TileScope {
 public:
  TileScope() { ++detail::tile_depth; }
  ~TileScope() { --detail::tile_depth; }
  TileScope(const TileScope&) = delete;
  TileScope& operator=(const TileScope&) = delete;

 private:
  detail::Serial serial_;
};

// Elements of the largest glue tensor up to which an op's glue runs serially (OpScope):
// N = 512 for the RKD ops' N x N float64 matrices (2 MB; a pass over it is ~0.1 ms), the
// logit kernels up to 512^2 logits, expm up to 512^2 matrix entries. Above it the ops keep
// ATen's (and MKL's) parallel regions and run their passes in one OpenMP region.
constexpr int64_t kSerialGlueElements = int64_t(512) * 512;

// Above that, the glue still runs serially when the op's own passes do at least this many
// times as much work (entries visited) as it has glue elements: the angle ops' triplet pass
// (N^2 entries per vertex) next to their N x N glue. Measured at rkd_angle_vertices
// (768, 128, 128, 4), 192 vertices per window: serial glue costs nothing idle, and on a
// busy machine it removes the ATen regions that stalled.
constexpr int64_t kSerialGlueWorkRatio = 64;

// An op's CPU entry point: its ATen glue (elementwise ops on N x N tensors, reductions, small
// GEMMs) runs serially on the calling thread, each of those calls being too short to be
// worth a parallel region that a busy machine can stall (every OpenMP region ends in a
// barrier), while the op's own passes (run_workers, mm below) still share their tiles with
// the helpers, on the caller's thread count. Inside an enclosing parallel region it does
// nothing: that region's thread runs everything inline.
class OpScope {
 public:
  // `elements`: the largest tensor the glue works on (N * N for the RKD ops); `work`: the
  // entries the op's own passes visit (N^2 per vertex for the angle ops). Above
  // kSerialGlueElements, unless the passes outweigh the glue kSerialGlueWorkRatio times, the
  // glue keeps ATen's parallel regions: serial, it would cost more than a busy machine's
  // stalls (measured: rkd_distance at N = 1024, 135 -> 211 ms idle).
  explicit OpScope(int64_t elements, int64_t work = 0)
      : active_((elements <= kSerialGlueElements ||
                 work / kSerialGlueWorkRatio >= elements) &&
                !at::in_parallel_region() && detail::tile_depth == 0) {
    if (!active_) return;
    serial_.emplace();
    // an enclosing OpScope keeps its caller's count (inside it, ATen's count reads 1)
    if (detail::op_depth++ == 0) detail::op_threads = serial_->threads();
  }
  ~OpScope() {
    if (active_) --detail::op_depth;
  }
  OpScope(const OpScope&) = delete;
  OpScope& operator=(const OpScope&) = delete;

 private:
  const bool active_;
  std::optional<detail::Serial> serial_;
};

// A CPU kernel `Fn` in an OpScope sized by its first argument (its glue serial up to
// kSerialGlueElements), for registering ops whose ATen glue works on tensors of that size:
// m.impl("op", serial_glue<&op_cpu>).
template <auto Fn>
struct SerialGlue;
template <typename R, typename... Args, R (*Fn)(const at::Tensor&, Args...)>
struct SerialGlue<Fn> {
  static R call(const at::Tensor& x, Args... args) {
    OpScope scope(x.numel());
    return Fn(x, args...);
  }
};
template <auto Fn>
constexpr auto serial_glue = &SerialGlue<Fn>::call;

// Whether a pass started here must run inline: inside a tile or a parallel region.
inline bool run_inline() { return detail::tile_depth > 0 || at::in_parallel_region(); }

// Runs worker(queue) on up to min(tiles, the caller's thread count) threads; each worker
// claims tiles with queue.next() until it returns false. Inline when one thread suffices or
// when already inside a tile or a parallel region.
//
// Inside a serial-glue op (OpScope), the workers are the calling thread and helpers from
// HelperPool, which block rather than spin on a barrier. A helper that starts after every
// tile is claimed leaves at once, without entering the worker, and the calling thread waits
// (blocked, not spinning) only for helpers that hold a tile: no barrier waits for a thread
// that the scheduler has not run, the failure mode of an OpenMP region on a busy machine.
// Elsewhere the workers are one OpenMP region's threads (at::parallel_for, one worker per
// thread): the tiles are still claimed dynamically.
//
// Per-thread scratch (row buffers) is set up once per worker, not once per tile; it must own
// its memory (a helper may release it after the caller has returned). The first exception a
// worker throws is rethrown here, after every helper has left.
template <typename Worker>
void run_workers(int64_t tiles, const Worker& worker) {
  if (tiles <= 0) return;
  const int64_t threads = std::min<int64_t>(
      tiles, detail::op_depth > 0 ? detail::op_threads : at::get_num_threads());
  if (threads <= 1 || run_inline()) {
    TileState state(tiles);
    TileQueue queue(state);
    TileScope scope;
    worker(queue);
    return;
  }
  if (detail::op_depth == 0) {
    // Outside a serial-glue op the surrounding ATen calls keep OpenMP's team busy (its idle
    // threads spin for a while after each region): the tiles go to that team, one worker per
    // thread, rather than to helpers that would compete with its spinning threads.
    TileState state(tiles);
    at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
      TileQueue queue(state);  // inside the region: nested passes inline, MKL serial
      worker(queue);
    });
    return;
  }
  auto state = std::make_shared<TileState>(tiles);
  for (int64_t h = 1; h < threads; ++h) {
    HelperPool::get().run([state, &worker] {
      state->running.fetch_add(1, std::memory_order_acq_rel);
      int64_t first;
      if (state->claim(first)) {
        try {
          TileScope scope;
          TileQueue queue(*state, first);
          worker(queue);
        } catch (...) {
          state->fail(std::current_exception());
        }
      }
      state->leave();
    });
  }
  try {
    TileScope scope;
    TileQueue queue(*state);
    worker(queue);
  } catch (...) {
    state->fail(std::current_exception());
  }
  state->wait_for_helpers();
  if (state->error) std::rethrow_exception(state->error);
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

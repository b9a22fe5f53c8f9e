"""The machine's conditions during a measurement: was it busy, and did the measured process
get the CPU it asked for.

Per measurement (:class:`Window`, around the timed runs, inside the measured process):

* ``load_before`` / ``load_after``: the 1-minute load average (``os.getloadavg``);
* ``cpu_per_wall``: the measured process's CPU time over its wall time (about the number of
  threads that ran; lower than the thread count when the threads waited for cores);
* ``others_cores``: the cores that other processes kept busy meanwhile, on average, from
  ``/proc/stat`` (all CPUs' busy time minus the measured process's own CPU time).

A measurement is *busy* when other processes used more than :data:`BUSY_OTHERS_CORES` cores,
or the load average exceeded the cores: its timings are then unreliable. ``--background-load
N`` (:func:`background_load`) makes a busy machine on purpose, reproducibly: N processes
that spin for the duration of the run.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator

#: other processes using more than this many cores on average make a measurement "busy"
BUSY_OTHERS_CORES = 0.5
#: a spread (max - min) / median above this marks the timing "noisy"
NOISY_SPREAD = 1.0


def _busy_seconds() -> float | None:
    """Seconds of CPU time all CPUs spent busy since boot (/proc/stat), or None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # without guest (in user)


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


class Window:
    """Conditions over a stretch of the measured process: ``with Window() as w: ...``, then
    ``w.result()``."""

    def __enter__(self) -> Window:
        self.load_before = load_average()
        self.busy_before = _busy_seconds()
        self.cpu_before = time.process_time()
        self.wall_before = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.wall_before
        self.cpu = time.process_time() - self.cpu_before
        busy_after = _busy_seconds()
        self.others = None
        if busy_after is not None and self.busy_before is not None and self.wall > 0:
            # the tick counters are coarse (10 ms): clamp the rounding below 0
            self.others = max(0.0, (busy_after - self.busy_before - self.cpu) / self.wall)
        self.load_after = load_average()

    def result(self) -> dict:
        return {
            "load_before": self.load_before,
            "load_after": self.load_after,
            "cpu_s": round(self.cpu, 6),
            "wall_s": round(self.wall, 6),
            "cpu_per_wall": round(self.cpu / self.wall, 3) if self.wall > 0 else None,
            "others_cores": None if self.others is None else round(self.others, 3),
        }


def is_busy(result: dict, cores: int | None = None) -> bool:
    """Whether a measurement's conditions make its timing unreliable."""
    cores = cores or os.cpu_count() or 1
    others = result.get("others_cores")
    loads = [result.get("load_before"), result.get("load_after")]
    return (others is not None and others > BUSY_OTHERS_CORES) or any(
        load is not None and load > cores for load in loads
    )


def is_noisy(result: dict) -> bool:
    low, high, mid = (result.get(k) for k in ("min_s", "max_s", "median_s"))
    return bool(mid) and low is not None and high is not None and (high - low) / mid > NOISY_SPREAD


@contextlib.contextmanager
def background_load(processes: int) -> Iterator[list[subprocess.Popen]]:
    """``processes`` Python processes spinning on a core each until the block ends."""
    spinners = [
        subprocess.Popen(
            [sys.executable, "-c", "while True: pass"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        for _ in range(processes)
    ]
    try:
        yield spinners
    finally:
        for p in spinners:
            p.kill()
        for p in spinners:
            p.wait()

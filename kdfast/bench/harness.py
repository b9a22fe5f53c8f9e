"""Measures one (case, size, implementation) in a fresh process.

Time: median and spread of ``repeats`` timed runs after warm-up, for "forward",
"backward" (forward untimed) and "forward+backward". Memory: the process's peak
resident-set increase during the timed runs, measured after import, input creation and
warm-up (Linux: VmHWM reset through /proc/self/clear_refs; CUDA: max_memory_allocated).
Conditions (:mod:`kdfast.bench.conditions`): load average, CPU time over wall time, and the
cores other processes used during the timed runs. Error: relative error (semantics 7) of
the loss and the gradient against the float64 reference on the same inputs (kdfast's own
float64 result where the reference is skipped).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import torch

import kdfast
from kdfast.bench.cases import BY_NAME
from kdfast.bench.conditions import Window
from kdfast.testing import rel_error

IMPLEMENTATIONS = ("kdfast", "reference", "compiled")
#: further implementations a case may declare (:attr:`Case.baselines`)
BASELINES = ("liger", "gemms")
#: runs slower than this get one warm-up and at most SLOW_REPEATS timed repeats
SLOW_RUN_S = 1.0
SLOW_REPEATS = 3
#: runs faster than this get more repeats (up to FAST_REPEATS, about FAST_BUDGET_S of timed
#: runs): a median of 5 sub-millisecond runs swung by 50% between runs of the suite
FAST_RUN_S = 0.01
FAST_REPEATS = 200
FAST_BUDGET_S = 0.5
MODES = ("forward", "backward", "forward+backward")


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _backend(case_name, impl, params) -> str:
    """The backend an implementation's row reports: the dispatcher's choice for the case's
    op (for kdfast), else the implementation's name."""
    if impl != "kdfast":
        return impl
    return kdfast._dispatch.select(BY_NAME[case_name].op, params[0])[0]


def _build(case_name, size, impl, device, dtype):
    case = BY_NAME[case_name]
    if impl in case.baselines:
        forward, params = case.baselines[impl](tuple(size), device, dtype)
        return forward, params, None
    backend = None if impl == "kdfast" else "reference"
    with kdfast.use_backend(backend):
        forward, params = case.setup(tuple(size), device, dtype)
    if impl == "compiled":
        inner = forward

        def forward():
            with kdfast.use_backend("reference"):
                return compiled_inner()

        compiled_inner = torch.compile(inner)
    return forward, params, backend


def _grads(forward, params, backend):
    for p in params:
        p.grad = None
    with kdfast.use_backend(backend):
        loss = forward()
    loss.sum().backward()
    return loss.detach(), params[0].grad.detach().clone()


def measure(case_name, size, impl, mode, repeats, device="cpu", dtype=torch.float32) -> dict:
    """Run in the current process (call through :func:`measure_in_subprocess`)."""
    torch.manual_seed(0)
    try:
        forward, params, backend = _build(case_name, size, impl, device, dtype)
    except ImportError as exc:  # a baseline's library is not installed
        return {"skipped": f"not installed ({exc})"}

    def run_once() -> float:
        for p in params:
            p.grad = None
        with kdfast.use_backend(backend):
            if mode == "forward":
                _sync(device)
                start = time.perf_counter()
                with torch.no_grad():
                    forward()
                _sync(device)
                return time.perf_counter() - start
            loss = forward().sum()
            _sync(device)
            start = time.perf_counter() if mode == "backward" else start_fb
            loss.backward()
            _sync(device)
            return time.perf_counter() - start

    start_fb = 0.0

    def timed() -> float:
        nonlocal start_fb
        _sync(device)
        start_fb = time.perf_counter()
        return run_once()

    first = timed()  # warm-up (compiles under torch.compile)
    if impl == "compiled" or first < SLOW_RUN_S:
        first = timed()
    if first > SLOW_RUN_S:
        repeats = min(repeats, SLOW_REPEATS)  # keeps the default suite within minutes
    elif first < FAST_RUN_S:
        repeats = max(repeats, min(FAST_REPEATS, int(FAST_BUDGET_S / max(first, 1e-6))))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    resettable = _reset_peak()
    rss_base = _rss_bytes("VmRSS")
    with Window() as window:
        times = [timed() for _ in range(repeats)]
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _rss_bytes("VmHWM") - rss_base if resettable else None
    return {
        "repeats": repeats,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "times_s": times,
        "peak_bytes": peak,
        "conditions": window.result(),
        "backend": _backend(case_name, impl, params),
    }


def errors(case_name, size, device="cpu", dtype=torch.float32, truth="reference") -> dict:
    """Relative error of kdfast's loss and gradient against a float64 computation."""
    forward, params, _ = _build(case_name, size, "kdfast", device, dtype)
    loss, grad = _grads(forward, params, None)
    f64, p64, _ = _build(case_name, size, "kdfast", device, torch.float64)
    ref_loss, ref_grad = _grads(f64, p64, "reference" if truth == "reference" else None)
    return {
        "loss_error": rel_error(loss, ref_loss),
        "grad_error": rel_error(grad, ref_grad),
        "truth": f"float64 {truth}",
    }


def measure_in_subprocess(**job) -> dict:
    """:func:`measure` (or :func:`errors` with job["what"] == "errors") in a fresh process."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "kdfast.bench.harness", json.dumps(job)],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail) or f"exit code {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_job(job: dict) -> dict:
    """:func:`measure` (or :func:`errors` with job["what"] == "errors") in this process."""
    job = dict(job)
    dtype = getattr(torch, job.pop("dtype", "float32"))
    if job.pop("what", "time") == "errors":
        return errors(job["case"], job["size"], job.get("device", "cpu"), dtype, job["truth"])
    return measure(
        job["case"],
        job["size"],
        job["impl"],
        job["mode"],
        job["repeats"],
        job.get("device", "cpu"),
        dtype,
    )


def measure_in_process(**job) -> dict:
    """:func:`run_job` here, an error as :func:`measure_in_subprocess` reports it. For CUDA
    (its peak memory comes from the allocator's own counters, per measurement) a fresh
    process per measurement costs a CUDA start and fresh Triton and inductor compiles: about
    75 s per bench row on an H200. On CPU the resident-set peak would carry over from the
    measurements before, so the CPU default stays one process per measurement."""
    try:
        return run_job(job)
    except Exception as exc:  # reported in the row, as a failed subprocess is
        return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        if job.get("device") == "cuda":
            torch.cuda.empty_cache()


def _main() -> None:
    print(json.dumps(run_job(json.loads(sys.argv[1]))))


if __name__ == "__main__":
    _main()

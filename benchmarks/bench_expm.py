"""Benchmark of kdfast expm and OrthogonalProjector against PyTorch, float32 fwd+bwd.

Each (case, implementation) runs in a fresh process (``--one``); the driver prints one
line per cell: median seconds of forward+backward and the torch/kdfast ratio.

    PYTHONPATH=. python benchmarks/bench_expm.py [--reps 3] [--threads 1 --cpu-time]

``--cpu-time`` times with ``time.process_time`` (CPU seconds of the process) instead of the
wall clock: with ``--threads 1`` it counts the work done and not the waits, so ratios stay
stable on a shared, loaded machine (wall-clock medians there varied 5x between runs).

Cases: skew A (n = 768) with ||A||_2 in {0.1, 1, 8} and upstream G = randn (unit) or
randn / n (loss-like), kdfast.linalg.expm(skew=True) vs torch.linalg.matrix_exp; batch 1024
of 32 x 32 (||A||_2 = 1, unit G); OrthogonalProjector(192 -> 768) vs
torch.nn.utils.parametrizations.orthogonal(nn.Linear(192, 768), orthogonal_map="matrix_exp"),
batch 256, SmoothL1-mean loss, at initialisation and after 100 AdamW steps (lr 1e-3,
weight decay 0.05). Timings only; accuracy lives in tests/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

CELLS = [
    *[("expm768", norm, g) for norm in (0.1, 1.0, 8.0) for g in ("unit", "loss")],
    ("expm32x1024", 1.0, "unit"),
    ("projector", 0, "init"),
    ("projector", 100, "trained"),
]


def _skew(batch: int, n: int, norm2: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    B = torch.randn(batch, n, n, generator=g, dtype=torch.float64)
    S = B - B.mT
    S = S / torch.linalg.matrix_norm(S, 2)[:, None, None] * norm2
    return S.float().squeeze(0)


CLOCK = time.perf_counter


def _time(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = CLOCK()
        fn()
        times.append(CLOCK() - start)
    return statistics.median(times)


def _expm_cell(impl: str, batch: int, n: int, norm2: float, grad: str, reps: int) -> float:
    import kdfast

    A = _skew(batch, n, norm2).requires_grad_(True)
    g = torch.Generator().manual_seed(1)
    G = torch.randn(A.shape, generator=g)
    if grad == "loss":
        G = G / n

    def step():
        X = kdfast.linalg.expm(A, skew=True) if impl == "kdfast" else torch.linalg.matrix_exp(A)
        (A.grad,) = torch.autograd.grad(X, A, G)

    return _time(step, reps)


def _projector_cell(impl: str, steps: int, reps: int) -> float:
    import kdfast

    torch.manual_seed(0)
    if impl == "kdfast":
        module = kdfast.nn.OrthogonalProjector(192, 768)
    else:
        module = nn.utils.parametrizations.orthogonal(
            nn.Linear(192, 768, bias=False), orthogonal_map="matrix_exp"
        )
    x, target = torch.randn(256, 192), torch.randn(256, 768)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3, weight_decay=0.05)

    def step():
        optimizer.zero_grad()
        F.smooth_l1_loss(module(x), target).backward()

    for _ in range(steps):
        step()
        optimizer.step()
    return _time(step, reps)


def run_one(case: str, arg: float, grad: str, impl: str, reps: int) -> float:
    if case == "expm768":
        return _expm_cell(impl, 1, 768, arg, grad, reps)
    if case == "expm32x1024":
        return _expm_cell(impl, 1024, 32, arg, grad, reps)
    return _projector_cell(impl, int(arg), reps)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--one", nargs=4, metavar=("CASE", "ARG", "GRAD", "IMPL"))
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--cpu-time", action="store_true", help="time.process_time clock")
    args = parser.parse_args()
    global CLOCK
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time:
        CLOCK = time.process_time
    if args.one:
        case, arg, grad, impl = args.one
        print(json.dumps(run_one(case, float(arg), grad, impl, args.reps)))
        return
    clock = "CPU time" if args.cpu_time else "wall clock"
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {clock}")
    for case, arg, grad in CELLS:
        t = {}
        for impl in ("kdfast", "torch"):
            cmd = [
                sys.executable,
                __file__,
                "--reps",
                str(args.reps),
                *(["--threads", str(args.threads)] if args.threads else []),
                *(["--cpu-time"] if args.cpu_time else []),
                "--one",
                case,
                str(arg),
                grad,
                impl,
            ]
            t[impl] = json.loads(
                subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            )
        print(
            f"{case:12s} {arg:>5} {grad:8s} kdfast {t['kdfast']:.4f} s  torch {t['torch']:.4f} s  "
            f"speedup {t['torch'] / t['kdfast']:.1f}x",
            flush=True,
        )


if __name__ == "__main__":
    main()

"""The CPU kernels hand out their tiles dynamically (csrc/cpu/tiles.h): each thread claims the
next tile, so which thread runs which tile changes from call to call, with the thread count
and with the load of the machine. No result may change with it: every tile writes only what
it owns and partial sums are reduced in a fixed order.

Each cpp op runs on a tiny machine's worth of threads, on more threads than cores
(oversubscribed: threads are descheduled mid-pass, so the claim order varies most), and
while other processes spin on every core; losses and gradients must be bitwise the same.
The RKD ops' float64 Gram GEMMs (MKL) may round differently for another thread count, so
those are compared per thread count; the logit kernels and expm must agree across counts.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import compiled_backends, require_backend

import kdfast
from kdfast import functional, linalg

pytestmark = pytest.mark.skipif(
    "cpp" not in compiled_backends("cpu"), reason="the cpp backend is not built in this run"
)

CORES = os.cpu_count() or 1
#: thread counts: one, the cores, and oversubscribed
THREADS = sorted({1, CORES, 2 * CORES + 1})


def _features(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64)


def _logits(rows, c, seed):
    g = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(rows, c, generator=g)


def _loss_and_grads(fn, *inputs):
    leaves = [x.clone().requires_grad_(True) for x in inputs]
    loss = fn(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    return [loss.detach(), *grads]


# name -> (thread-count invariant, thunk returning tensors); sizes give every kernel several
# tiles: N = 300 pair passes have 3 tiles of rows, the triple loops 38 blocks of j rows, the
# logit kernels 50 tiles of rows.
CASES = {
    "rkd_distance": (
        False,
        lambda: _loss_and_grads(
            functional.rkd_distance, _features(300, 24, 0), _features(300, 16, 1)
        ),
    ),
    "rkd_angle": (
        False,
        lambda: _loss_and_grads(functional.rkd_angle, _features(300, 24, 2), _features(300, 16, 3)),
    ),
    "rkd_angle_vertices": (
        False,
        lambda: _loss_and_grads(
            lambda s, t: functional._call("rkd_angle_vertices", s, t, 37, 251),
            _features(300, 24, 4),
            _features(300, 16, 5),
        ),
    ),
    "kd_loss": (
        True,
        lambda: _loss_and_grads(
            lambda s, t: functional.kd_loss(s, t, temperature=2.0),
            _logits(100, 1500, 6),
            _logits(100, 1500, 7),
        ),
    ),
    "jsd_loss": (
        True,
        lambda: _loss_and_grads(functional.jsd_loss, _logits(100, 1500, 8), _logits(100, 1500, 9)),
    ),
    "dist_loss": (
        False,  # the column moments are merged from a number of blocks set by the threads
        lambda: _loss_and_grads(
            functional.dist_loss, _logits(100, 1500, 10), _logits(100, 1500, 11)
        ),
    ),
    "expm": (
        True,
        lambda: _loss_and_grads(
            lambda a: linalg.expm(a).square().sum(),
            0.3 * torch.randn(200, 6, 6, generator=torch.Generator().manual_seed(12)),
        ),
    ),
}


def _run(name, threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with kdfast.use_backend("cpp"):
            return CASES[name][1]()
    finally:
        torch.set_num_threads(previous)


def _assert_bitwise_equal(a, b, what):
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert (
            torch.equal(x, y)
            or (x.isnan() == y.isnan()).all()
            and torch.equal(x.nan_to_num(), y.nan_to_num())
        ), f"{what}: output {i} differs"


@pytest.mark.parametrize("name", list(CASES))
def test_results_do_not_depend_on_which_thread_runs_a_tile(name):
    require_backend("cpp")
    invariant = CASES[name][0]
    first = {threads: _run(name, threads) for threads in THREADS}
    for threads in THREADS:
        for _ in range(3):
            _assert_bitwise_equal(_run(name, threads), first[threads], f"{name}, {threads} threads")
        if invariant:
            _assert_bitwise_equal(first[threads], first[1], f"{name}, {threads} vs 1 thread")


def test_results_do_not_depend_on_the_load_of_the_machine():
    """Other processes spinning on every core deschedule the kernels' threads mid-pass."""
    require_backend("cpp")
    threads = max(2, CORES)
    idle = {name: _run(name, threads) for name in CASES}
    spinners = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL)
        for _ in range(CORES)
    ]
    try:
        for _ in range(2):
            for name in CASES:
                _assert_bitwise_equal(_run(name, threads), idle[name], f"{name} under load")
    finally:
        for p in spinners:
            p.kill()
        for p in spinners:
            p.wait()

"""The CPU kernels hand out their tiles dynamically (csrc/cpu/tiles.h): each thread claims the
next tile, so which thread runs which tile changes from call to call, with the thread count
and with the load of the machine. No result may change with it: every tile writes only what
it owns and partial sums are reduced in a fixed order.

Each cpp op runs on a tiny machine's worth of threads, on more threads than cores
(oversubscribed: threads are descheduled mid-pass, so the claim order varies most), and
while other processes spin on every core; losses and gradients must be bitwise the same.
They must also agree across thread counts, the RKD ops included: their float64 GEMMs are
tiled in row blocks set by the shapes alone, each on one MKL thread. DIST's column moments
are merged from a number of blocks set by the threads, so it is compared per thread count.
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


def _skew(n, seed):
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(seed)) / n
    return a - a.mT


def _loss_and_grads(fn, *inputs):
    leaves = [x.clone().requires_grad_(True) for x in inputs]
    loss = fn(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    return [loss.detach(), *grads]


def _value_and_vjp(fn, x, seed):
    """fn(x) and its vector-Jacobian product with a fixed random cotangent: no reduction of
    the output (torch's own sum of many entries depends on the thread count)."""
    x = x.clone().requires_grad_(True)
    y = fn(x)
    cotangent = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed))
    (grad,) = torch.autograd.grad(y, x, cotangent)
    return [y.detach(), grad]


# name -> (thread-count invariant, thunk returning tensors); sizes give every kernel several
# tiles: N = 300 pair passes have 3 tiles of rows, the triple loops 38 blocks of j rows, the
# logit kernels 50 tiles of rows, expm's GEMMs several groups of matrices or row blocks.
CASES = {
    "rkd_distance": (
        True,
        lambda: _loss_and_grads(
            functional.rkd_distance, _features(300, 24, 0), _features(300, 16, 1)
        ),
    ),
    "rkd_loss": (
        True,
        lambda: _loss_and_grads(
            functional.rkd_loss, _features(300, 24, 13), _features(300, 16, 14)
        ),
    ),
    "rkd_angle": (
        True,
        lambda: _loss_and_grads(functional.rkd_angle, _features(300, 24, 2), _features(300, 16, 3)),
    ),
    "rkd_angle_vertices": (
        True,
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
    # N = 600 > 512: the glue is serial because the triplet pass outweighs it (OpScope's
    # work ratio); 100 vertices.
    "rkd_angle_vertices_large": (
        True,
        lambda: _loss_and_grads(
            lambda s, t: functional._call("rkd_angle_vertices", s, t, 0, 100),
            _features(600, 12, 15),
            _features(600, 8, 16),
        ),
    ),
    # the batched GEMMs in groups of whole matrices (2000 x 8 x 8: 4 tiles)
    "expm": (
        True,
        lambda: _value_and_vjp(
            linalg.expm,
            0.3 * torch.randn(2000, 8, 8, generator=torch.Generator().manual_seed(12)),
            13,
        ),
    ),
    # one matrix, its GEMMs in row blocks (448 rows: 6 blocks of 84)
    "expm_one_matrix": (
        True,
        lambda: _value_and_vjp(lambda a: linalg.expm(a, skew=True), _skew(448, 17), 18),
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


# Run first thing in a fresh process (and first thing in a new thread): the first time a
# thread asks for its thread count, ATen sizes its OpenMP team from MKL's thread count, so an
# op that set MKL's thread-local count before that would leave the thread serial for good.
_SETTINGS_SCRIPT = """
import ctypes, os, threading, torch, kdfast
from kdfast import functional, linalg
path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
mkl = getattr(ctypes.CDLL(path), "MKL_Set_Num_Threads_Local", None)
g = torch.Generator().manual_seed(0)
s = torch.randn(300, 24, dtype=torch.float64, generator=g).requires_grad_(True)
t = torch.randn(300, 16, dtype=torch.float64, generator=g)
a = (0.1 * torch.randn(20, 6, 6, dtype=torch.float64, generator=g)).requires_grad_(True)
b = (0.002 * torch.randn(448, 448, generator=g)).requires_grad_(True)
u = torch.randn(600, 12, generator=g).requires_grad_(True)
v = torch.randn(600, 8, generator=g)
def run():  # the op first, then the settings: 0 = no thread-local MKL count left behind
    with kdfast.use_backend("cpp"):
        {op}
    return torch.get_num_threads(), mkl(0) if mkl else 0
def control():  # a thread that never calls an op
    return torch.get_num_threads(), mkl(0) if mkl else 0
out = []
for target in (run, control):
    thread = threading.Thread(target=lambda: out.append(target()))
    thread.start(); thread.join()
out.append(run())
print(out)
"""

_OPS = {
    "rkd_loss": "functional.rkd_loss(s, t).backward()",
    "rkd_distance": "functional.rkd_distance(s, t).backward()",
    "rkd_angle": "functional.rkd_angle(s, t).backward()",
    "kd_loss": "functional.kd_loss(s[:, :16], t).backward()",
    "dist_loss": "functional.dist_loss(s[:, :16], t).backward()",
    "expm": "linalg.expm(a).sum().backward()",
    "expm_one_matrix": "linalg.expm(b).sum().backward()",
    "rkd_angle_vertices_large": "functional._call('rkd_angle_vertices', u, v, 0, 100).backward()",
}


@pytest.mark.parametrize("name", list(_OPS))
def test_an_op_leaves_the_callers_thread_settings_as_they_were(name):
    """The ops run their glue with this thread's OpenMP team and MKL count set to 1 (csrc/cpu/
    tiles.h, OpScope and TileScope): both are restored, even on a thread whose first call
    into ATen is the op's."""
    require_backend("cpp")
    done = subprocess.run(
        [sys.executable, "-c", _SETTINGS_SCRIPT.replace("{op}", _OPS[name])],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    in_thread, control, in_main = eval(done.stdout)  # (threads, MKL thread-local count) each
    assert control[1] == 0
    assert in_thread == control and in_main == control

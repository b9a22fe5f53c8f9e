"""The raw CUDA kernels of csrc/cuda/*.cu executed on CPU (the ``cuda_host`` tests).

Each kernel body (csrc/cuda/<op>_kernels.h) runs over its whole grid on the CPU grid driver
(csrc/cpu/cuda_host.h) through the same launcher and op orchestration as the CUDA launch,
via the test-only ops ``kdfast::*_cuda_host`` (``threads`` per block and ``max_blocks``
override the launchers' geometry so that last blocks are partial and grid-stride loops
repeat). expm_small_kernel runs every thread of its grid as a std::thread, phase by phase
between real barriers at every __syncthreads, in a fixed order that makes a missing barrier
or a workspace shared by blocks fail every time. Results are compared in float64 with the
reference; every test checks the grids it ran in the driver's launch record. Deterministic
mode fills the launchers' empty outputs with NaN, so an entry that no thread writes shows.
"""

from __future__ import annotations

import pytest
import torch
from conftest import NO_EXT, require_backend

from kdfast import _dispatch, _extension
from kdfast.reference import expm as ref_expm
from kdfast.reference.rkd_angle import rkd_angle, rkd_angle_vertices
from kdfast.reference.rkd_distance import rkd_distance
from kdfast.testing import EXPM_TARGETS, PARITY_GRAD, PARITY_LOSS, rel_error, tolerance

F64, F32 = torch.float64, torch.float32
RKD_THREADS = 256  # kThreads of csrc/cuda/rkd_*_kernels.h
N = 37  # N^2 = 1369: a partial last block for 256, 64, 32 and 7 threads per block

pytestmark = [
    pytest.mark.cuda_host,
    pytest.mark.skipif(NO_EXT, reason="KDFAST_NO_EXT=1: the extension is not built"),
]


@pytest.fixture(autouse=True)
def host_driver():
    require_backend("cpp")
    launches()  # start from an empty record
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def ops():
    return torch.ops.kdfast


def launches() -> list[tuple[str, int, int]]:
    """(kernel, blocks, threads per block) launched since the last call."""
    return [tuple(x) for x in _extension._C.cuda_host_launches()]


def blocks(count: int, threads: int) -> int:
    return -(-count // threads)


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def rkd_inputs(case: str, n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    s, t = _randn(n, 8, seed=1), _randn(n, 5, seed=2)
    if case == "clustered":  # 10 clusters with 1e-3 of their separation as spread (semantics 1.5)
        s = (_randn(10, 16, seed=3) * 10)[torch.arange(n) % 10] + 1e-2 * _randn(n, 16, seed=4)
    elif case == "near_duplicates":  # recomputed from the rows (kNearFactor)
        s[4] = s[1] + 1e-6
        t[9] = t[30] + 1e-6
    elif case.startswith("exact_pair_"):  # resolved from direct differences (rkd_exact.h)
        # scaled so that a 1-ulp distance exceeds the 1e-6 clamp
        s, t = _near_pair(s * 1e11, 4, 1, case[11:]), _near_pair(t * 1e11, 30, 9, case[11:])
    elif case == "duplicate_rows":  # degenerate pairs, in both sides
        s[2] = s[5]
        s[36] = s[5]
        t[1] = t[4]
    return s, t


def _near_pair(x: torch.Tensor, a: int, b: int, separation: str) -> torch.Tensor:
    """Row a moved next to row b: one ulp in one coordinate, or ``separation * ||x_b||``."""
    x = x.clone()
    if separation == "ulp":
        x[a] = x[b]
        x[a, 0] = torch.nextafter(x[b, 0], torch.tensor(float("inf"), dtype=F64))
    else:
        direction = _randn(x.shape[1], seed=a)
        x[a] = x[b] + float(separation) * x[b].norm() * direction / direction.norm()
    return x


def reference_grads(fn, s, t, *args, grad=1.0):
    s = s.detach().to(F64).requires_grad_(True)
    t = t.detach().to(F64).requires_grad_(True)
    loss = fn(s, t, *args)
    return (loss, *torch.autograd.grad(loss * grad, (s, t)))


def check_grads(case, got, want, tol=PARITY_GRAD):
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        if case == "duplicate_rows":  # the reference's gradient there is ~1/eps (semantics 1.3)
            assert torch.isfinite(g).all()
        else:
            assert rel_error(g, w) <= tol, (case, rel_error(g, w))


RKD_CASES = [
    "random",
    "clustered",
    "near_duplicates",
    "duplicate_rows",
    "exact_pair_ulp",
    "exact_pair_1e-9",
    "exact_pair_1e-7",
]


def test_host_ops_are_not_a_backend():
    """Test drivers only: no backend of the dispatcher runs them."""
    assert "cuda_host" not in _dispatch.BACKENDS
    for op in _dispatch.ops():
        for impl in _dispatch._IMPLS[op].values():
            assert "cuda_host" not in f"{getattr(impl.fn, '__name__', '')} {impl.fn!r}", op


# ---------------------------------------------------------------------------------------
# rkd_distance.cu: pair_forward_kernel, pair_backward_kernel


@pytest.mark.parametrize("threads", [0, 64, 7])
@pytest.mark.parametrize("case", RKD_CASES)
def test_distance_matches_reference(case, threads):
    s, t = rkd_inputs(case)
    per_block = threads or RKD_THREADS
    grid = blocks(N * N, per_block)
    loss = ops().rkd_distance_cuda_host(s, t, threads)
    want, want_s, want_t = reference_grads(rkd_distance, s, t, grad=0.7)
    assert loss.dtype == F64 and rel_error(loss, want) <= PARITY_LOSS
    assert launches() == [("pair_forward_kernel", grid, per_block)] * 2
    got = ops().rkd_distance_cuda_host_backward(
        torch.tensor(0.7, dtype=F64), s, t, True, True, threads
    )
    check_grads(case, got, (want_s, want_t))
    forward = [("pair_forward_kernel", grid, per_block)] * 2
    assert launches() == forward + [("pair_backward_kernel", grid, per_block)] * 2


@pytest.mark.parametrize("side", ["student", "teacher"])
def test_distance_one_side_gradient(side):
    s, t = rkd_inputs("clustered")
    _, want_s, want_t = reference_grads(rkd_distance, s, t)
    student = side == "student"
    gs, gt = ops().rkd_distance_cuda_host_backward(
        torch.tensor(1.0, dtype=F64), s, t, student, not student, 32
    )
    got, want, empty = (gs, want_s, gt) if student else (gt, want_t, gs)
    assert rel_error(got, want) <= PARITY_GRAD and empty.shape == (0,)
    assert [k for k, *_ in launches()].count("pair_backward_kernel") == 1


def test_distance_float32_inputs_and_small_n():
    s, t = rkd_inputs("random")
    loss = ops().rkd_distance_cuda_host(s.float(), t.float(), 7)
    assert loss.dtype == F32
    assert rel_error(loss, rkd_distance(s.float().double(), t.float().double())) <= 1e-6
    for n in (2, 3):  # one block, mostly idle threads
        s, t = rkd_inputs("random", n)
        assert rel_error(ops().rkd_distance_cuda_host(s, t, 0), rkd_distance(s, t)) <= 1e-12
        assert launches()[-1] == ("pair_forward_kernel", 1, RKD_THREADS)


# ---------------------------------------------------------------------------------------
# rkd_angle.cu: pairs_kernel, loss_kernel, row_kernel, column_kernel


def angle_launches(threads: int, start: int, stop: int, n: int = N, backward: bool = False):
    per_block = threads or RKD_THREADS
    pairs = [("pairs_kernel", blocks(n * n, per_block), per_block)] * 2
    rows = blocks((stop - start) * n, per_block)
    if not backward:
        return pairs + [("loss_kernel", rows, per_block)]
    return pairs + [
        ("row_kernel", rows, per_block),
        ("column_kernel", blocks(n * n, per_block), per_block),
    ]


@pytest.mark.parametrize("threads", [0, 64, 7])
@pytest.mark.parametrize("case", RKD_CASES)
def test_angle_matches_reference(case, threads):
    s, t = rkd_inputs(case)
    loss = ops().rkd_angle_cuda_host(s, t, threads)
    want, want_s, want_t = reference_grads(rkd_angle, s, t, grad=1.3)
    assert loss.dtype == F64 and rel_error(loss, want) <= PARITY_LOSS, rel_error(loss, want)
    assert launches() == angle_launches(threads, 0, N)
    got = ops().rkd_angle_cuda_host_backward(
        torch.tensor(1.3, dtype=F64), s, t, True, True, threads
    )
    check_grads(case, got, (want_s, want_t))
    assert launches() == angle_launches(threads, 0, N, backward=True)


RANGES = [(0, 1), (N - 1, N), (2, 7), (5, N - 2), (0, N)]


@pytest.mark.parametrize("threads", [32, 7])
@pytest.mark.parametrize("case", RKD_CASES)
def test_angle_vertex_ranges_match_reference(case, threads):
    s, t = rkd_inputs(case)
    for start, stop in RANGES:
        loss = ops().rkd_angle_vertices_cuda_host(s, t, start, stop, threads)
        want, want_s, want_t = reference_grads(rkd_angle_vertices, s, t, start, stop)
        assert rel_error(loss, want) <= PARITY_LOSS, (case, start, stop, rel_error(loss, want))
        assert launches() == angle_launches(threads, start, stop)
        got = ops().rkd_angle_vertices_cuda_host_backward(
            torch.tensor(1.0, dtype=F64), s, t, start, stop, True, True, threads
        )
        check_grads(case, got, (want_s, want_t))
        assert launches() == angle_launches(threads, start, stop, backward=True)


def test_angle_empty_vertex_range_launches_nothing():
    s, t = rkd_inputs("random")
    assert ops().rkd_angle_vertices_cuda_host(s, t, 3, 3, 7) == 0
    gs, gt = ops().rkd_angle_vertices_cuda_host_backward(
        torch.tensor(1.0, dtype=F64), s, t, 3, 3, True, True, 7
    )
    assert (gs == 0).all() and (gt == 0).all() and launches() == []
    with pytest.raises(ValueError, match="vertex range"):
        ops().rkd_angle_vertices_cuda_host(s, t, 5, N + 1, 7)


@pytest.mark.parametrize("side", ["student", "teacher"])
@pytest.mark.parametrize("start, stop", [(0, N), (4, 11)])
def test_angle_one_side_gradient(side, start, stop):
    """The side without gradient gets null outputs in row_kernel and column_kernel."""
    s, t = rkd_inputs("clustered")
    _, want_s, want_t = reference_grads(rkd_angle_vertices, s, t, start, stop)
    student = side == "student"
    gs, gt = ops().rkd_angle_vertices_cuda_host_backward(
        torch.tensor(1.0, dtype=F64), s, t, start, stop, student, not student, 7
    )
    got, want, empty = (gs, want_s, gt) if student else (gt, want_t, gs)
    assert rel_error(got, want) <= PARITY_GRAD and empty.shape == (0,)
    assert launches() == angle_launches(7, start, stop, backward=True)


def test_angle_float32_inputs():
    s, t = rkd_inputs("clustered")
    s, t = s.float(), t.float()
    loss = ops().rkd_angle_cuda_host(s, t, 32)
    want, want_s, want_t = reference_grads(rkd_angle, s, t)
    assert loss.dtype == F32 and rel_error(loss, want) <= 1e-6
    gs, gt = ops().rkd_angle_cuda_host_backward(torch.tensor(1.0), s, t, True, True, 32)
    tol = tolerance(F32, "grad")
    assert gs.dtype == F32 and rel_error(gs, want_s) <= tol and rel_error(gt, want_t) <= tol


# ---------------------------------------------------------------------------------------
# expm_small.cu: expm_small_kernel (block-wide barriers inside csrc/expm_small.h)


def expm_batch(n: int, dtype, batch: int = 8, skew: bool = False, seed: int = 0):
    """||A||_1 from 1e-8 to 300 (60 in float32): every Pade degree and several scalings."""
    A = _randn(batch, n, n, seed=seed + n)
    if skew:
        A = A - A.mT
    top = 300.0 if dtype == F64 else 60.0
    norms = torch.logspace(-8, torch.log10(torch.tensor(top)).item(), batch, dtype=F64)
    A = A / A.abs().sum(-2).amax(-1).clamp(min=1e-300)[:, None, None] * norms[:, None, None]
    E = _randn(batch, n, n, seed=seed + 100)
    return A.to(dtype), E.to(dtype)


def expm_threads(n: int) -> int:
    return min(256, max(32, n * n))  # threads_for of csrc/cuda/expm_small_kernels.h


def check_expm(A, E, skew, X, L=None):
    tol = EXPM_TARGETS[A.dtype] * 300
    X_ref, L_ref = ref_expm.expm_frechet(A, E, skew)
    for i in range(A.shape[0]):  # per matrix: the batch spans 1e-8 .. 300
        assert rel_error(X[i], X_ref[i]) <= tol, (i, rel_error(X[i], X_ref[i]))
        if L is not None:
            assert rel_error(L[i], L_ref[i]) <= tol, (i, rel_error(L[i], L_ref[i]))


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("skew", [False, True])
@pytest.mark.parametrize("n", [1, 2, 5, 8, 13])
def test_expm_matches_reference(n, skew, dtype):
    """7 threads per block (partial last stride for every n > 2) and 3 blocks for 8
    matrices: each block's grid-stride loop runs 2 or 3 times in its own workspace."""
    A, E = expm_batch(n, dtype, skew=skew)
    X = ops().expm_small_cuda_host(A, skew, 7, 3)
    assert X.dtype == dtype
    assert ref_expm.expm(A, skew).shape == X.shape
    check_expm(A, E, skew, X)
    X2, L = ops().expm_frechet_small_cuda_host(A, E, skew, 7, 3)
    assert torch.equal(X2.isnan(), X.isnan())
    check_expm(A, E, skew, X2, L)
    assert launches() == [("expm_small_kernel", 3, 7)] * 2
    # the fused CPU kernel runs the same math with one thread: only the sums' rounding differs
    assert rel_error(X, ops().expm_small_cpp(A, skew)) <= (1e-14 if dtype == F64 else 1e-6) * 300


@pytest.mark.parametrize("skew", [False, True])
@pytest.mark.parametrize("n", [2, 13])
def test_expm_default_geometry(n, skew):
    """The CUDA launcher's own geometry: a block per matrix, n = 2 with 28 idle threads of
    32, n = 13 with one thread per entry (169)."""
    A, E = expm_batch(n, F64, batch=5, skew=skew)
    X, L = ops().expm_frechet_small_cuda_host(A, E, skew)
    check_expm(A, E, skew, X, L)
    assert launches() == [("expm_small_kernel", 5, expm_threads(n))]
    assert torch.allclose(X[:2], torch.linalg.matrix_exp(A[:2]), rtol=1e-12, atol=0)


@pytest.mark.parametrize("threads, max_blocks", [(32, 1), (5, 4), (64, 9), (1, 2)])
def test_expm_grid_stride_loop(threads, max_blocks):
    """More matrices than blocks (one block doing all 9; 4 blocks doing 3, 2, 2, 2; one
    thread per block, the Team's size-1 path), and more blocks than matrices."""
    A, E = expm_batch(5, F64, batch=9, seed=7)
    A = A.reshape(3, 3, 5, 5)  # batched leading dimensions are flattened by the launcher
    X, L = ops().expm_frechet_small_cuda_host(A, E.reshape(3, 3, 5, 5), False, threads, max_blocks)
    assert X.shape == A.shape
    check_expm(A.reshape(9, 5, 5), E, False, X.reshape(9, 5, 5), L.reshape(9, 5, 5))
    assert launches() == [("expm_small_kernel", min(9, max_blocks), threads)]


def test_expm_nan_and_rejected_inputs():
    A, _ = expm_batch(5, F64, batch=4)
    A[2, 1, 3] = float("nan")
    X = ops().expm_small_cuda_host(A, False, 7, 2)
    assert X[2].isnan().all() and torch.isfinite(X[[0, 1, 3]]).all()
    with pytest.raises(RuntimeError, match="float32 or float64"):  # linalg upcasts half first
        ops().expm_small_cuda_host(A.half(), False, 7, 2)
    with pytest.raises(RuntimeError, match="n must be <= 32"):
        ops().expm_small_cuda_host(torch.zeros(1, 33, 33, dtype=F64), False, 7, 2)
    with pytest.raises(ValueError, match="threads"):
        ops().expm_small_cuda_host(A, False, 2000, 2)

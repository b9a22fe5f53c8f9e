"""Every Triton kernel across its tile, loop and chunk boundaries, under the interpreter.

The interpreter-sized tests elsewhere fit a whole problem in one program's tile, so the
code that moves from one tile, column block or chunk to the next never runs. Here the
block constants (module-level values the launchers read at each call) are reduced to 4-16
and the sizes chosen so that each tiled grid axis has at least 3 programs and each loop
runs at least 3 times, with a ragged last tile or block; results are compared with the
reference in float64 (loss 1e-9, gradients 1e-7, norm-wise). That the kernels really ran
that way is not assumed from the sizes: every launch is recorded (grid, the programs the
interpreter executed) and every loop's trip count per program is counted, through a
``range`` placed in the kernel modules' globals (the interpreter runs the kernels as Python
in those globals).
"""

from __future__ import annotations

import builtins
import dataclasses
import importlib
import itertools
import linecache
import os
import sys

import pytest
import torch
from conftest import require_backend
from worked_examples import teacher_as

import kdfast
from kdfast import functional
from kdfast.testing import PARITY_GRAD, PARITY_LOSS, rel_error

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip(
        "launch and loop counts come from the Triton interpreter (TRITON_INTERPRET=1)",
        allow_module_level=True,
    )

F64 = torch.float64
#: kernel module -> the kernels its launchers start
KERNELS = {
    "rkd_distance": ("pair_forward_kernel", "pair_backward_kernel"),
    "rkd_angle": ("pair_kernel", "row_kernel", "column_kernel"),
    "kd_loss": ("kd_loss_kernel",),
    "jsd_loss": ("jsd_loss_kernel",),
    "dist_loss": ("dist_stats_kernel", "dist_merge_kernel", "dist_grad_kernel"),
}
#: modules holding @triton.jit code with loops (kernels and their device helpers)
JIT_MODULES = (*KERNELS, "_layout", "_dist_math")


@dataclasses.dataclass
class Launch:
    """One kernel launch as the interpreter ran it."""

    kernel: str
    grid: tuple[int, ...]
    constexprs: dict
    programs: set = dataclasses.field(default_factory=set, repr=False)
    #: (function, file, line) -> trip count of each time the loop there was entered
    loops: dict = dataclasses.field(default_factory=dict, repr=False)

    def trips(self, function: str) -> dict[str, list[int]]:
        """Source of each loop of ``function`` -> its trip counts."""
        out = {}
        for (name, filename, line), counts in self.loops.items():
            if name == function:
                out[f"{line}: {linecache.getline(filename, line).strip()}"] = counts
        return out


class Trace:
    def __init__(self):
        self.launches: list[Launch] = []
        self.current: Launch | None = None

    def of(self, kernel: str) -> list[Launch]:
        return [launch for launch in self.launches if launch.kernel == kernel]


class _TracedKernel:
    """Stands in for a kernel in its module: records each launch, then runs it."""

    def __init__(self, name, kernel, trace):
        self.name, self.kernel, self.trace = name, kernel, trace

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            record = Launch(self.name, tuple(grid), dict(kwargs))
            self.trace.launches.append(record)
            self.trace.current = record
            try:
                return self.kernel[grid](*args, **kwargs)
            finally:
                self.trace.current = None

        return launch


@pytest.fixture
def trace(monkeypatch):
    """The launches of the kdfast kernels until the test ends, with their loop counts."""
    require_backend("triton")
    from triton.runtime import interpreter

    trace = Trace()

    def counting_range(*args):
        trips = builtins.range(*args)
        if trace.current is not None:
            caller = sys._getframe(1)
            code = caller.f_code
            key = (code.co_name, code.co_filename, caller.f_lineno)
            trace.current.loops.setdefault(key, []).append(len(trips))
        return trips

    for module_name in JIT_MODULES:
        module = importlib.import_module(f"kdfast.triton.{module_name}")
        for name in KERNELS.get(module_name, ()):
            monkeypatch.setattr(module, name, _TracedKernel(name, getattr(module, name), trace))
        monkeypatch.setattr(module, "range", counting_range, raising=False)

    set_grid_idx = interpreter.InterpreterBuilder.set_grid_idx

    def watched_set_grid_idx(self, x, y, z):
        if trace.current is not None:
            trace.current.programs.add((x, y, z))
        return set_grid_idx(self, x, y, z)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "set_grid_idx", watched_set_grid_idx)
    return trace


def assert_grid(launch: Launch, grid: tuple[int, ...]) -> None:
    """The launch's grid is ``grid`` and the interpreter ran every one of its programs."""
    assert launch.grid == grid, (launch.kernel, launch.grid, grid)
    padded = grid + (1,) * (3 - len(grid))
    assert launch.programs == set(itertools.product(*map(range, padded))), launch.kernel


def assert_loops(launch: Launch, function: str, sites: int, trips) -> None:
    """``function`` ran ``sites`` distinct loops in this launch, and every entry into one of
    them ran ``trips`` iterations (an int, or a predicate of the count)."""
    seen = launch.trips(function)
    assert len(seen) == sites, (launch.kernel, function, seen)
    ok = trips if callable(trips) else (lambda n: n == trips)
    for source, counts in seen.items():
        assert all(ok(n) for n in counts), (launch.kernel, source, counts)


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _run(fn, backend, s, t, grad_teacher=True):
    """(loss, gradients) of sum(loss * w), w from 0.5 to 1.5 (0.5 for a scalar)."""
    s = s.detach().clone().requires_grad_(True)
    t = t.detach().clone().requires_grad_(grad_teacher)
    with kdfast.use_backend(backend):
        loss = fn(s, t)
    weights = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    grads = torch.autograd.grad((loss * weights).sum(), (s, t) if grad_teacher else (s,))
    return loss.detach(), grads


def assert_matches_reference(fn, s, t, grad_teacher=True) -> None:
    """float64 parity of the triton backend with the reference (semantics 7)."""
    got = _run(fn, "triton", s, t, grad_teacher)
    want = _run(fn, "reference", s, t, grad_teacher)
    assert rel_error(got[0], want[0]) <= PARITY_LOSS, rel_error(got[0], want[0])
    for g, w in zip(got[1], want[1], strict=True):
        assert g.shape == w.shape and rel_error(g, w) <= PARITY_GRAD, rel_error(g, w)


# RKD: N = 19 rows against blocks of 8 (and k-blocks of 4): 3 (5) blocks, the last of 3 rows.
N_RKD = 19


def test_rkd_distance_pair_tiles(trace, monkeypatch):
    """Pair kernels over a 3 x 3 grid of 8 x 8 tiles of the (19, 19) Gram matrix (ragged
    last row and column of tiles); they have no loops (the GEMM is torch's)."""
    import kdfast.triton.rkd_distance as module

    monkeypatch.setattr(module, "BLOCK", 8)
    s, t = _randn(N_RKD, 6, seed=1), _randn(N_RKD, 5, seed=2)
    assert_matches_reference(functional.rkd_distance, s, t)
    # distances: each side in the forward pass, and three times more in the backward
    # (the loss term again, then each side's own pass), which runs dL/dD2 once per side
    for kernel, launches in (("pair_forward_kernel", 6), ("pair_backward_kernel", 2)):
        assert len(trace.of(kernel)) == launches
        for launch in trace.of(kernel):
            assert launch.constexprs["BLOCK"] == 8
            assert_grid(launch, (3, 3))
            assert launch.loops == {}


@pytest.mark.parametrize("vertices", [None, (3, 16)], ids=["all", "vertices_3_16"])
def test_rkd_angle_tiles_and_loops(trace, monkeypatch, vertices):
    """Pair tiles 8 x 8 (3 x 3, the exact-distance loop over the feature dim where near
    pairs sit, one of them in the ragged corner tile), row programs (i, j-block of 8)
    streaming 5 k-blocks of 4 (the last of 3), column tiles 8 x 4 (3 x 5) streaming the
    vertices i; all vertices, and a range [3, 16) that starts and ends inside tiles."""
    import kdfast.triton.rkd_angle as module

    monkeypatch.setattr(module, "BLOCK_PAIR", 8)
    monkeypatch.setattr(module, "BLOCK_J", 8)
    monkeypatch.setattr(module, "BLOCK_K", 4)
    s, t = _randn(N_RKD, 6, seed=3), _randn(N_RKD, 5, seed=4)
    s[17] = s[2] + 1e-6  # near pairs (exact distances from the rows): tiles (2, 0), (0, 2)
    t[9] = t[4] + 1e-6  # tile (1, 0), (0, 1)
    start, stop = vertices or (0, N_RKD)
    if vertices is None:
        fn = functional.rkd_angle
    else:

        def fn(s, t):
            return functional._call("rkd_angle_vertices", s, t, start, stop)

    assert_matches_reference(fn, s, t)
    pairs = trace.of("pair_kernel")
    assert len(pairs) == 4  # each side, forward and backward
    for launch, dim in zip(pairs, (6, 5, 6, 5), strict=True):
        assert_grid(launch, (3, 3))
        (counts,) = launch.trips("pair_kernel").values()
        assert counts == [dim, dim]  # the two tiles holding a near pair, and only those
    rows = trace.of("row_kernel")
    assert [launch.constexprs["GRAD"] for launch in rows] == [False, True]
    for launch in rows:
        assert_grid(launch, (stop - start, 3))
        assert_loops(launch, "row_kernel", 1, 5)
    (column,) = trace.of("column_kernel")
    assert_grid(column, (3, 5))
    assert_loops(column, "column_kernel", 1, stop - start)


# kd_loss and dist_loss: row tiles of 4 over 11 to 50 rows, column blocks of 8 over C = 21
# (8 + 8 + 5).
C = 21


def _logit_layouts(rows: int, seed: int) -> dict:
    """Named (student, teacher, mask) cases of ``rows`` rows of C classes: (rows, C)
    row-major; (rows, C) column-major (class stride rows); contiguous (N, C, S) with S = 5
    (row tiles of 4 cross the n boundaries). Masks drop a whole row tile (rows 4-7), the
    last row, and scattered rows."""
    keep = torch.ones(rows, dtype=torch.bool)
    keep[4:8] = False
    keep[[1, rows - 1]] = False
    n = rows // 5

    def pair(shape, seed):
        return 3 * _randn(*shape, seed=seed), 3 * _randn(*shape, seed=seed + 1)

    s, t = pair((rows, C), seed)
    s_cm, t_cm = pair((C, rows), seed + 2)
    s_ncs, t_ncs = pair((n, C, 5), seed + 4)
    return {
        "rows_masked": (s, t, keep),
        "column_major": (s_cm.T, t_cm.T, None),
        "ncs_masked": (s_ncs, t_ncs, keep[: n * 5]),
    }


KD_CASES = [("logits", "batchmean"), ("probs", "none"), ("log_probs", "sum")]


@pytest.mark.parametrize("grad_teacher", [True, False], ids=["grad_t", "no_grad_t"])
@pytest.mark.parametrize("teacher,reduction", KD_CASES, ids=[k for k, _ in KD_CASES])
@pytest.mark.parametrize("layout", ["rows_masked", "column_major", "ncs_masked"])
def test_kd_loss_tiles_and_column_blocks(
    trace, monkeypatch, layout, teacher, reduction, grad_teacher
):
    """Tiles of 4 rows x 8 columns: 3 row tiles over 11 rows (4 over the 15 of (3, 21, 5)),
    each pass sweeping 3 column blocks, the last of 5 columns; every teacher kind, with and
    without the teacher's gradient (pass 3)."""
    import kdfast.triton.kd_loss as module

    monkeypatch.setattr(module, "blocks", lambda n_cols, elem: (4, 8))
    s, t, mask = _logit_layouts(11 if layout != "ncs_masked" else 15, seed=10)[layout]
    t = teacher_as(t, teacher, 2.0)

    def fn(s, t):
        return functional.kd_loss(s, t, 2.0, reduction, mask, teacher)

    assert_matches_reference(fn, s, t, grad_teacher)
    (launch,) = trace.of("kd_loss_kernel")
    assert (launch.constexprs["BLOCK_R"], launch.constexprs["BLOCK_C"]) == (4, 8)
    assert launch.constexprs["SPATIAL"] == (layout == "ncs_masked")
    assert_grid(launch, (3 if layout != "ncs_masked" else 4,))
    assert_loops(launch, "_row_lse", 1, 3)  # pass 1
    assert_loops(launch, "kd_loss_kernel", 2 if grad_teacher else 1, 3)  # passes 2 and 3


def test_kd_loss_chunked_past_the_tile(trace, monkeypatch):
    """The launcher's own block choice with a tile of 16 elements: C = 37 > 16 is chunked
    into column blocks of 16 (the last of 5), one row per program (7 programs)."""
    import kdfast.triton.kd_loss as module

    monkeypatch.setattr(module, "TILE", {4: 16, 8: 16})
    s, t = 3 * _randn(7, 37, seed=20), 3 * _randn(7, 37, seed=21)
    assert_matches_reference(lambda s, t: functional.kd_loss(s, t, 2.0), s, t)
    (launch,) = trace.of("kd_loss_kernel")
    assert (launch.constexprs["BLOCK_R"], launch.constexprs["BLOCK_C"]) == (1, 16)
    assert_grid(launch, (7,))
    assert_loops(launch, "_row_lse", 1, 3)
    assert_loops(launch, "kd_loss_kernel", 2, 3)


#: jsd_loss: (beta, reduction): both end points (the KLs), near an end (the second log of
#: log m) and the mixture
JSD_CASES = [(0.0, "batchmean"), (0.03, "none"), (0.5, "sum"), (1.0, "mean")]


@pytest.mark.parametrize("grad_teacher", [True, False], ids=["grad_t", "no_grad_t"])
@pytest.mark.parametrize("beta,reduction", JSD_CASES, ids=[f"beta_{b}" for b, _ in JSD_CASES])
@pytest.mark.parametrize("layout", ["rows_masked", "column_major", "ncs_masked"])
def test_jsd_loss_tiles_and_column_blocks(
    trace, monkeypatch, layout, beta, reduction, grad_teacher
):
    """Tiles of 4 rows x 8 columns: 3 row tiles over 11 rows (4 over the 15 of (3, 21, 5)),
    each pass sweeping 3 column blocks, the last of 5 columns (pass 1 once per side, then
    pass 2 and the gradients' pass 3); the mixture, near an end, and both end points."""
    import kdfast.triton.jsd_loss as module

    monkeypatch.setattr(module, "blocks", lambda n_cols, elem: (4, 8))
    s, t, mask = _logit_layouts(11 if layout != "ncs_masked" else 15, seed=50)[layout]

    def fn(s, t):
        return functional.jsd_loss(s, t, beta, 2.0, reduction, mask)

    assert_matches_reference(fn, s, t, grad_teacher)
    (launch,) = trace.of("jsd_loss_kernel")
    assert (launch.constexprs["BLOCK_R"], launch.constexprs["BLOCK_C"]) == (4, 8)
    assert launch.constexprs["SPATIAL"] == (layout == "ncs_masked")
    assert launch.constexprs["MODE"] == {0.0: 1, 1.0: 2}.get(beta, 0)
    assert launch.constexprs["NEAR"] == (beta == 0.03)
    assert_grid(launch, (3 if layout != "ncs_masked" else 4,))
    assert_loops(launch, "_row_lse", 1, 3)  # pass 1, once per side
    assert all(len(counts) == 2 * launch.grid[0] for counts in launch.trips("_row_lse").values())
    assert_loops(launch, "jsd_loss_kernel", 2, 3)  # passes 2 and 3


def test_jsd_loss_chunked_past_the_tile(trace, monkeypatch):
    """The launcher's own block choice with a tile of 16 elements: C = 37 > 16 is chunked
    into column blocks of 16 (the last of 5), one row per program (7 programs); without a
    gradient, pass 3 does not run."""
    import kdfast.triton.jsd_loss as module

    monkeypatch.setattr(module, "TILE", {4: 16, 8: 16})
    s, t = 3 * _randn(7, 37, seed=60), 3 * _randn(7, 37, seed=61)
    assert_matches_reference(lambda s, t: functional.jsd_loss(s, t, 0.3, 2.0), s, t)
    (launch,) = trace.of("jsd_loss_kernel")
    assert (launch.constexprs["BLOCK_R"], launch.constexprs["BLOCK_C"]) == (1, 16)
    assert_grid(launch, (7,))
    assert_loops(launch, "_row_lse", 1, 3)
    assert_loops(launch, "jsd_loss_kernel", 2, 3)
    with torch.no_grad(), kdfast.use_backend("triton"):
        functional.jsd_loss(s, t, 0.3, 2.0)
    (_, no_grad) = trace.of("jsd_loss_kernel")
    assert not no_grad.constexprs["GRAD_S"] and not no_grad.constexprs["GRAD_T"]
    assert_loops(no_grad, "jsd_loss_kernel", 1, 3)  # pass 2 alone


#: DIST: 50 rows in tiles of 4 (13 tiles, the last of 2) over 4 stats programs (4, 3, 3 and
#: 3 tiles each), merged by 3 merge programs of 8 columns (3 merge steps each).
DIST_ROWS = 50
DIST_GROUPS = 4


@pytest.mark.parametrize("resident", [False, True], ids=["chunked", "resident"])
@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
@pytest.mark.parametrize("layout", ["rows_masked", "column_major", "ncs_masked"])
def test_dist_loss_tiles_programs_and_chunks(trace, monkeypatch, layout, activation, resident):
    """Stats and gradient tiles of 4 rows and either 8 columns (chunked: 3 column blocks,
    the last of 5, per sweep) or the whole row in registers (RESIDENT: 32 >= C, one block);
    4 stats programs of 3-4 row tiles each, their column moments merged by 3 programs of 8
    columns; masks that drop a whole tile."""
    import kdfast.triton.dist_loss as module

    block_c = 32 if resident else 8
    monkeypatch.setattr(module, "stats_blocks", lambda *args: (4, block_c, resident))
    monkeypatch.setattr(module, "grad_blocks", lambda *args: (4, block_c, resident))
    monkeypatch.setattr(module, "n_programs", lambda *args: DIST_GROUPS)
    monkeypatch.setattr(module, "MERGE_BLOCK", 8)
    s, t, mask = _logit_layouts(DIST_ROWS, seed=30)[layout]

    def fn(s, t):
        return functional.dist_loss(s, t, 1.0, 2.0, 2.0, True, activation, mask)

    assert_matches_reference(fn, s, t)
    column_blocks = 1 if resident else 3
    sweeps = 1 if activation == "sigmoid" else 2  # sigmoid needs no row max / sum first
    (stats,) = trace.of("dist_stats_kernel")
    assert (stats.constexprs["BLOCK_R"], stats.constexprs["BLOCK_C"]) == (4, block_c)
    assert stats.constexprs["RESIDENT"] == resident
    assert stats.constexprs["SPATIAL"] == (layout == "ncs_masked")
    assert_grid(stats, (DIST_GROUPS,))
    tile_loop, *column_loops = stats.trips("dist_stats_kernel").values()
    assert sorted(tile_loop) == [3, 3, 3, 4]  # 13 row tiles over the 4 programs
    assert len(column_loops) == sweeps
    assert all(counts == [column_blocks] * 13 for counts in column_loops)  # once per tile
    (merge,) = trace.of("dist_merge_kernel")
    assert_grid(merge, (3,))
    assert_loops(merge, "dist_merge_kernel", 1, DIST_GROUPS - 1)
    (grad,) = trace.of("dist_grad_kernel")
    assert (grad.constexprs["BLOCK_R"], grad.constexprs["BLOCK_C"]) == (4, block_c)
    assert_grid(grad, (13,))
    assert_loops(grad, "dist_grad_kernel", sweeps, column_blocks)


def test_dist_loss_chunked_past_the_register_limit(trace, monkeypatch):
    """The launchers' own block choice with a 16-element register limit: C = 37 does not
    fit, so both kernels take the chunked path (stats tiles of 16 rows x 8 columns, 5
    blocks; gradient tiles of 1 x 16, 3 blocks), the teacher's gradient not asked for."""
    import kdfast.triton.dist_loss as module

    monkeypatch.setattr(module, "RESIDENT_TILE", {4: 16, 8: 16})
    monkeypatch.setattr(module, "STATS_TILE", {4: 128, 8: 128})
    monkeypatch.setattr(module, "GRAD_TILE", {4: 16, 8: 16})
    s, t = 3 * _randn(20, 37, seed=40), 3 * _randn(20, 37, seed=41)
    assert_matches_reference(functional.dist_loss, s, t, grad_teacher=False)
    (stats,) = trace.of("dist_stats_kernel")
    assert (stats.constexprs["BLOCK_R"], stats.constexprs["BLOCK_C"]) == (16, 8)
    assert not stats.constexprs["RESIDENT"]
    assert_loops(stats, "dist_stats_kernel", 3, lambda n: n >= 1)
    _, *column_loops = stats.trips("dist_stats_kernel").values()
    assert all(counts == [5, 5] for counts in column_loops)  # 2 row tiles, 5 blocks each
    (grad,) = trace.of("dist_grad_kernel")
    assert (grad.constexprs["BLOCK_R"], grad.constexprs["BLOCK_C"]) == (1, 16)
    assert not grad.constexprs["RESIDENT"] and not grad.constexprs["GRAD_T"]
    assert_grid(grad, (20,))
    assert_loops(grad, "dist_grad_kernel", 2, 3)

"""Kernel-specific tests of the fused logit-loss kernels (kd_loss, per_sample_kl, dist_loss):
(N, C, *) logits read in place (no permuted copy), and of the Triton kernels (under
TRITON_INTERPRET=1; jsd_loss's too): chunking over tiny tiles, a large vocabulary, read counts
and an LRU model of cache reuse taken from the interpreter's loads, input validation of the ops
themselves; the cpp backend's gradient pool. The semantics every backend shares are tested
from tests/ops/test_kd_loss.py and tests/ops/test_dist_loss.py (tests/fused_logits.py), and
jsd_loss's from the contract suite and tests/ops/test_jsd_loss.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import NO_EXT, require_backend
from fused_logits import (
    OPS,
    SMALL,
    call,
    compiled_pairs,
    inputs,
    op_args,
    tiny_tiles,
    triton_only,
)

import kdfast
from kdfast import _dispatch
from kdfast._validation import rows_2d
from kdfast.testing import PARITY_GRAD, PARITY_LOSS, rel_error, tolerance

#: (N, C, *) shapes: rows are N * prod(*). S = 41 and 35: the CPU kernels' runs of 16 rows
#: of one n (csrc/cpu/logit_rows.h) end at kRunRows and at each n's last row; C = 2000:
#: runs capped at 8 rows by kRunElements.
NC_STAR_SHAPES = [
    (4, 37, 3),
    (1, 37, 7),
    (2, 37, 2, 3),
    (3, 37, 1),
    (3, 37, 41),
    (2, 37, 5, 7),
    (2, 2000, 21),
]


#: copies a kernel reading (N, C, *) logits in place must not make
COPY_OPS = {"aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy"}


def _logit_sized(event, logits: torch.Tensor) -> bool:
    """Whether a profiled op had an input as large as ``logits`` (not a mask or a scalar)."""
    return any(math.prod(shape) >= logits.numel() for shape in event.input_shapes if shape)


@pytest.mark.parametrize("op,backend", compiled_pairs(OPS))
def test_nc_star_inputs_read_in_place(op, backend):
    """semantics 0: (N, C, *) logits are N * prod(*) rows, row n * S + s, read without a permuted
    copy; masks and reduction "none" use that row order."""
    require_backend(backend)
    impl = _dispatch._IMPLS[op][backend].fn
    g = torch.Generator().manual_seed(3)
    for shape in NC_STAR_SHAPES:
        s = torch.randn(shape, generator=g, dtype=torch.float64)
        t = torch.randn(shape, generator=g, dtype=torch.float64)
        rows = s.numel() // shape[1]
        mask = torch.arange(rows) % 3 != 1
        options = [{}] if op == "per_sample_kl" else [{}, {"mask": mask}]
        if op == "kd_loss":
            options += [{"reduction": "none", "mask": mask, "temperature": 2.0}]
        if op == "dist_loss":
            options += [{"activation": "sigmoid", "mask": mask}]
        for option in options:
            a, b = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
            profile = torch.profiler.profile(record_shapes=True)
            with kdfast.use_backend(backend), profile as prof:
                got = OPS[op](a, b, **option)
                weights = torch.linspace(0.5, 1.5, got.numel(), dtype=got.dtype)
                (got.reshape(-1) * weights).sum().backward()
            # (the Triton interpreter copies every kernel argument to host buffers itself;
            # test_triton_ops_read_nc_star_in_place checks the Triton kernels' loads)
            interpreted = backend == "triton" and SMALL
            if impl.layout != "rows" and shape[-1] != 1 and not interpreted:
                copies = [
                    e.name for e in prof.events() if e.name in COPY_OPS and _logit_sized(e, s)
                ]
                assert not copies, (shape, option, copies)
            # the same rows as a (rows, C) batch, through the reference
            a2 = rows_2d(s.reshape(shape[0], shape[1], -1)).requires_grad_(True)
            b2 = rows_2d(t.reshape(shape[0], shape[1], -1)).requires_grad_(True)
            with kdfast.use_backend("reference"):
                want = OPS[op](a2, b2, **option)
            (want.reshape(-1) * weights).sum().backward()
            assert got.shape == want.shape and rel_error(got, want) <= PARITY_LOSS, (shape, option)
            for x, x2 in ((a, a2), (b, b2)):
                permuted = rows_2d(x.grad.reshape(shape[0], shape[1], -1))
                assert x.grad.shape == x.shape and rel_error(permuted, x2.grad) <= PARITY_GRAD


@pytest.mark.parametrize("resident", [False, True])
@pytest.mark.parametrize("op", triton_only(["kd_loss", "dist_loss"]))
def test_triton_chunking(op, resident, monkeypatch):
    """Tiny tiles: many column blocks per row (online max / sum across blocks) or DIST's
    RESIDENT rows (column moments kept in registers across tiles), several row tiles per
    stats program and several programs (Chan-Golub-LeVeque merges in the stats and merge
    kernels), masked and uniform rows, float64 parity."""
    require_backend("triton")
    tiny_tiles(monkeypatch, resident)
    s, t, _ = inputs(torch.float64, 23, 37)["uniform_rows"]
    keep = torch.ones(23, dtype=torch.bool)
    keep[[0, 5, 6, 22]] = False
    options = [dict(), dict(activation="sigmoid", temperature=2.0)]
    if op == "kd_loss":  # every teacher kind, with and without the teacher's gradient
        options = [
            dict(temperature=2.0, reduction=r, teacher_kind=k)
            for r, k in (("mean", "logits"), ("none", "probs"), ("sum", "log_probs"))
        ]
    for mask in (None, keep):
        for o in options:
            for grad_teacher in (True, False):
                got = call(op, "triton", s, t, mask, o, grad_teacher)
                want = call(op, "reference", s, t, mask, o, grad_teacher)
                where = (mask is None, o, grad_teacher)
                assert rel_error(got[0], want[0]) <= PARITY_LOSS, where
                for g, w in zip(got[1], want[1], strict=True):
                    assert rel_error(g, w) <= PARITY_GRAD, where


@pytest.mark.parametrize("kind", ["probs", "log_probs"])
def test_triton_kd_unnormalised_teacher(kind, monkeypatch):
    """Teacher probs / log-probs whose rows do not sum to 1 (the student's gradient scales
    ps by sum(pt)): float64 parity with the reference, student gradient alone (sum(pt)
    taken in pass 1) and with the teacher's (taken in pass 2), tiny tiles."""
    if "kd_loss" not in triton_only(["kd_loss"]):
        pytest.skip("triton does not run on CPU tensors here (TRITON_INTERPRET unset)")
    require_backend("triton")
    tiny_tiles(monkeypatch, False)
    s, t, _ = inputs(torch.float64, 23, 37)["random"]
    weights = torch.linspace(0.5, 2.0, 23, dtype=torch.float64)[:, None]
    t = torch.softmax(t, dim=1) * weights
    t = t if kind == "probs" else t.log()
    for grad_teacher in (True, False):
        for reduction in ("batchmean", "none"):
            o = dict(temperature=1.0, reduction=reduction, teacher_kind=kind)
            got = call("kd_loss", "triton", s, t, None, o, grad_teacher, as_given=True)
            want = call("kd_loss", "reference", s, t, None, o, grad_teacher, as_given=True)
            assert rel_error(got[0], want[0]) <= PARITY_LOSS, (grad_teacher, reduction)
            for g, w in zip(got[1], want[1], strict=True):
                assert rel_error(g, w) <= PARITY_GRAD, (grad_teacher, reduction)


@pytest.mark.parametrize("op", triton_only(["kd_loss", "dist_loss"]))
def test_triton_large_vocabulary(op):
    """kd_loss at C = 262144 + 3, DIST at C = 20011 (interpreter time): hundreds and tens
    of column blocks of the real tile sizes."""
    require_backend("triton")
    g = torch.Generator().manual_seed(1)
    rows, cols = (1, 262147) if op == "kd_loss" else (2, 20011)
    s = 4 * torch.randn(rows, cols, generator=g, dtype=torch.float64)
    t = 4 * torch.randn(rows, cols, generator=g, dtype=torch.float64)
    o = (
        dict(temperature=2.0, reduction="batchmean", teacher_kind="logits")
        if op == "kd_loss"
        else {}
    )
    got = call(op, "triton", s, t, None, o)
    want = call(op, "reference", s, t, None, o)
    assert rel_error(got[0], want[0]) <= PARITY_LOSS
    for a, b in zip(got[1], want[1], strict=True):
        assert rel_error(a, b) <= PARITY_GRAD


def _watch_logit_loads(monkeypatch, tensors: dict, seen) -> None:
    """Under the interpreter, until the test ends: ``seen(name, addresses)`` for every
    tl.load of every kernel, with the byte addresses it loads (mask true, in load order)
    from the storage of tensors[name]."""
    np = pytest.importorskip("numpy")
    from triton.runtime import interpreter

    load = interpreter.InterpreterBuilder.create_masked_load

    def watched_load(self, ptrs, mask, *args):
        addr = ptrs.data.astype(np.uint64)
        ok = np.broadcast_to(mask.data, addr.shape)
        for name, x in tensors.items():
            lo = x.data_ptr()
            inside = (addr >= lo) & (addr < lo + x.numel() * x.element_size())
            seen(name, addr[inside & ok].ravel())
        return load(self, ptrs, mask, *args)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_load", watched_load)


def _count_logit_reads(monkeypatch, tensors: dict) -> dict:
    """Under the interpreter: name -> elements loaded (mask true) from each tensor's
    storage, counted in every tl.load of every kernel until the test ends."""
    counts = dict.fromkeys(tensors, 0)

    def count(name, addresses):
        counts[name] += addresses.size

    _watch_logit_loads(monkeypatch, tensors, count)
    return counts


@pytest.mark.parametrize("resident", [False, True])
def test_triton_dist_read_count(resident, monkeypatch):
    """Reads of zs and zt per call (elements loaded / numel), as docs/semantics.md
    section 2 states: RESIDENT rows 1 for the loss, 2 with gradients (semantics
    2's budget: 3 of zs, 2 of zt); chunked softmax rows 2, 4 with gradients (over the
    budget, see there); chunked sigmoid rows 1, 2 with gradients."""
    if "dist_loss" not in triton_only(["dist_loss"]):
        pytest.skip("triton does not run on CPU tensors here (TRITON_INTERPRET unset)")
    require_backend("triton")
    tiny_tiles(monkeypatch, resident)
    s, t, mask = inputs(torch.float64, 23, 37)["masked"]
    counts = _count_logit_reads(monkeypatch, {"zs": s, "zt": t})
    dist = torch.ops.kdfast.dist_loss_triton.default
    want = {
        ("softmax", False): 1 if resident else 2,
        ("softmax", True): 2 if resident else 4,
        ("sigmoid", False): 1,
        ("sigmoid", True): 2,
    }
    for (activation, grads), reads in want.items():
        for name in counts:
            counts[name] = 0
        dist(s, t, 1.0, 1.0, 2.0, True, activation, mask, grads, grads)
        assert counts == {"zs": reads * s.numel(), "zt": reads * t.numel()}, (activation, grads)
        if resident or activation == "sigmoid":
            assert counts["zs"] <= 3 * s.numel() and counts["zt"] <= 2 * t.numel()


@pytest.mark.parametrize("tiny", [False, True])
def test_triton_kd_read_count(tiny, monkeypatch):
    """Reads of the student and teacher per kd_loss call (elements loaded / numel), as the
    module docstring of kdfast/triton/kd_loss.py states: 2 each for the loss alone and with
    the student's gradient alone (written in pass 2), 3 with the teacher's; a teacher given
    as probs or log-probs is read in pass 1 only for the student's gradient alone. tiny:
    many column blocks per row."""
    if "kd_loss" not in triton_only(["kd_loss"]):
        pytest.skip("triton does not run on CPU tensors here (TRITON_INTERPRET unset)")
    require_backend("triton")
    if tiny:
        tiny_tiles(monkeypatch, False)
    s, t, mask = inputs(torch.float64, 23, 37)["masked"]
    kd = torch.ops.kdfast.kd_loss_triton.default
    want = {  # (teacher, grad_s, grad_t): (reads of s, reads of t)
        ("logits", False, False): (2, 2),
        ("logits", True, False): (2, 2),
        ("logits", False, True): (3, 3),
        ("logits", True, True): (3, 3),
        ("probs", False, False): (2, 1),
        ("probs", True, False): (2, 2),
        ("log_probs", True, False): (2, 2),
        ("log_probs", True, True): (3, 2),
    }
    counts = _count_logit_reads(monkeypatch, {"zs": s, "zt": t})
    for (kind, grad_s, grad_t), (reads_s, reads_t) in want.items():
        for name in counts:
            counts[name] = 0
        kd(s, t, 2.0, 4.0, "batchmean", mask, kind, grad_s, grad_t)
        got = (counts["zs"] / s.numel(), counts["zt"] / t.numel())
        assert got == (reads_s, reads_t), (kind, grad_s, grad_t, got)


def _lru_misses(monkeypatch, tensors: dict, capacity: int) -> dict:
    """Under the interpreter: name -> elements of each tensor that an LRU cache of
    ``capacity`` elements (shared by the tensors, filled in load order) would miss: the
    reads that reach memory when a program's share of the GPU's L2 holds that much."""
    from collections import OrderedDict

    misses = dict.fromkeys(tensors, 0)
    cache: OrderedDict = OrderedDict()

    def lru(name, addresses):
        for key in ((name, a) for a in addresses.tolist()):
            if key in cache:
                cache.move_to_end(key)
                continue
            misses[name] += 1
            cache[key] = None
            if len(cache) > capacity:
                cache.popitem(last=False)

    _watch_logit_loads(monkeypatch, tensors, lru)
    return misses


def test_triton_dist_second_sweeps_reuse_cache(monkeypatch):
    """Chunked softmax rows, with gradients: each kernel's second sweep over a tile runs
    from its last column block back to its first, so the blocks its first sweep read last
    (the likeliest still cached) are re-read first. LRU model of a program's cache share,
    reads from memory per element of zs and zt (in brackets: the same model with in-order
    sweeps): half a gradient tile (one row of one input, C elements) 3.83
    (4.0); a whole one (2 C) 2.92 (3.0); half a 16-row stats tile 2.35 (2.70)."""
    if "dist_loss" not in triton_only(["dist_loss"]):
        pytest.skip("triton does not run on CPU tensors here (TRITON_INTERPRET unset)")
    require_backend("triton")
    tiny_tiles(monkeypatch, False)
    s, t, mask = inputs(torch.float64, 23, 37)["masked"]
    dist = torch.ops.kdfast.dist_loss_triton.default
    import kdfast.triton.dist_loss as tdist

    # the tiny tiles: gradient tiles of 1 row, stats tiles of 16 rows
    assert tdist.grad_blocks(23, 37, 8)[0] == 1 and tdist.stats_blocks(23, 37, 8)[0] == 16
    for capacity, most in ((37, 3.9), (2 * 37, 2.95), (16 * 37, 2.5)):
        misses = _lru_misses(monkeypatch, {"zs": s, "zt": t}, capacity)
        dist(s, t, 1.0, 1.0, 2.0, True, "softmax", mask, True, True)
        reads = {name: misses[name] / x.numel() for name, x in (("zs", s), ("zt", t))}
        assert max(reads.values()) <= most, (capacity, reads)


def _nc_star_cases():
    for n in (1, 4):
        for spatial in (1, 3, 7):
            yield n, spatial


def _flat(x: torch.Tensor) -> torch.Tensor:
    """(N, C, S) -> the (N * S, C) rows r = n * S + s (a copy)."""
    return x.movedim(1, -1).reshape(-1, x.shape[1])


@pytest.mark.parametrize("resident", [False, True])
@pytest.mark.parametrize("op", triton_only(["kd_loss", "dist_loss", "jsd_loss"]))
def test_triton_ops_read_nc_star_in_place(op, resident, monkeypatch):
    """The Triton ops on contiguous (N, C, S) inputs (rows r = n * S + s, read in place)
    against the 2-D op on the permuted (N * S, C) copy: loss (per row for "none"),
    gradients of shape (N, C, S), with and without a (N * S,) mask; tiny tiles."""
    require_backend("triton")
    if op == "jsd_loss" and resident:
        pytest.skip("RESIDENT rows are DIST's")
    tiny_tiles(monkeypatch, resident)
    monkeypatch.setattr("kdfast.triton.jsd_loss.TILE", {4: 16, 8: 16})
    custom_op = _dispatch._IMPLS[op]["triton"].fn.op
    g = torch.Generator().manual_seed(3)
    n_cols = 37
    for n, spatial in _nc_star_cases():
        s = 3 * torch.randn(n, n_cols, spatial, generator=g, dtype=torch.float64)
        t = 3 * torch.randn(n, n_cols, spatial, generator=g, dtype=torch.float64)
        keep = torch.rand(n * spatial, generator=g) > 0.3
        if op == "kd_loss":
            calls = [
                (2.0, 4.0, reduction, mask, "logits", True, True)
                for reduction in ("batchmean", "none")
                for mask in (None, keep)
            ]
        elif op == "jsd_loss":
            calls = [
                (0.3, 2.0, "batchmean", None, True, True),
                (0.0, 2.0, "none", keep, True, True),
                (1.0, 2.0, "sum", keep, True, True),
            ]
        else:
            calls = [
                (1.0, 2.0, 2.0, True, activation, mask, True, True)
                for activation in ("softmax", "sigmoid")
                for mask in (None, keep)
            ]
        for rest in calls:
            got = custom_op(s, t, *rest)
            want = custom_op(_flat(s), _flat(t), *rest)
            where = (n, spatial, rest)
            assert got[0].shape == want[0].shape, where
            assert rel_error(got[0], want[0]) <= 1e-12, where
            for a, b in zip(got[1:], want[1:], strict=True):
                assert a.shape == s.shape, where
                b = b.reshape(n, spatial, n_cols).movedim(-1, 1)
                assert rel_error(a, b) <= 1e-12, where


@pytest.mark.parametrize("op", triton_only(["kd_loss", "dist_loss", "jsd_loss"]))
def test_triton_opcheck_nc_star(op):
    """opcheck of the Triton ops on a contiguous (N, C, S) input (fake shapes, including
    kd's (N * S,) "none" loss)."""
    require_backend("triton")
    custom_op = _dispatch._IMPLS[op]["triton"].fn.op
    g = torch.Generator().manual_seed(4)
    s = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    t = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    keep = torch.tensor([True, False, True, True, True, False])
    a = s.clone().requires_grad_(True)
    if op == "jsd_loss":
        b = t.clone().requires_grad_(True)
        torch.library.opcheck(custom_op, (a, b, 0.3, 2.0, "batchmean", keep, True, True))
        torch.library.opcheck(custom_op, (s, t, 1.0, 1.0, "none", keep, False, False))
        return
    torch.library.opcheck(custom_op, op_args(op, a, t, keep, True, False))
    if op == "kd_loss":
        torch.library.opcheck(custom_op, (s, t, 1.0, 1.0, "none", keep, "logits", False, False))


def test_triton_ops_reject_bad_input():
    """The Triton ops check what a direct caller can get wrong: what guards memory (shapes,
    layouts), and the option strings, which would otherwise run as another option."""
    if not triton_only(["kd_loss", "dist_loss"]):
        pytest.skip("triton does not run on CPU tensors here (TRITON_INTERPRET unset)")
    require_backend("triton")
    kd = torch.ops.kdfast.kd_loss_triton.default
    dist = torch.ops.kdfast.dist_loss_triton.default
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    with pytest.raises(ValueError, match="shapes"):
        kd(s, t[:, :4], 1.0, 1.0, "batchmean", None, "logits", False, False)
    with pytest.raises(ValueError, match="shapes"):
        kd(s[0], t[0], 1.0, 1.0, "batchmean", None, "logits", False, False)
    with pytest.raises(ValueError, match="shapes"):
        dist(s, t[:2], 1.0, 1.0, 1.0, True, "softmax", None, False, False)
    s3 = torch.randn(2, 5, 3).transpose(0, 2)
    with pytest.raises(ValueError, match="contiguous"):
        kd(s3, s3, 1.0, 1.0, "sum", None, "logits", False, False)
    with pytest.raises(ValueError, match="contiguous"):
        dist(s3, s3, 1.0, 1.0, 1.0, True, "softmax", None, False, False)
    with pytest.raises(ValueError, match="shapes"):
        dist(s3[..., None], s3[..., None], 1.0, 1.0, 1.0, True, "softmax", None, False, False)
    with pytest.raises(ValueError, match="reduction must be one of"):
        kd(s, t, 1.0, 1.0, "batch_mean", None, "logits", False, False)
    with pytest.raises(ValueError, match="teacher_kind must be one of"):
        kd(s, t, 1.0, 1.0, "sum", None, "prob", False, False)
    with pytest.raises(ValueError, match="activation must be one of"):
        dist(s, t, 1.0, 1.0, 1.0, True, "relu", None, False, False)
    if "jsd_loss" not in triton_only(["jsd_loss"]):
        return
    jsd = torch.ops.kdfast.jsd_loss_triton.default
    with pytest.raises(ValueError, match="shapes"):
        jsd(s, t[:, :4], 0.5, 1.0, "batchmean", None, False, False)
    with pytest.raises(ValueError, match="contiguous"):
        jsd(s3, s3, 0.5, 1.0, "sum", None, False, False)
    with pytest.raises(ValueError, match="reduction must be one of"):
        jsd(s, t, 0.5, 1.0, "avg", None, False, False)
    with pytest.raises(ValueError, match="beta must be in"):
        jsd(s, t, 1.5, 1.0, "sum", None, False, False)
    for temperature in (0.0, float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            jsd(s, t, 0.5, temperature, "sum", None, False, False)
    for mask in (torch.ones(2, dtype=torch.bool), torch.ones(3)):
        with pytest.raises(ValueError, match="mask must be bool with one entry per row"):
            jsd(s, t, 0.5, 1.0, "sum", mask, False, False)


# --- jsd_loss's Triton kernel -------------------------------------------------------------

#: (beta, reduction) of the jsd_loss kernel tests: both end points (the KLs), near either end
#: (log m's second log) and the mixture
JSD_OPTIONS = [(0.0, "batchmean"), (1e-3, "none"), (0.5, "sum"), (0.95, "mean"), (1.0, "none")]


def _jsd(backend, s, t, mask, beta, reduction, grad_teacher=True, temperature=2.0):
    """(loss, gradients) of sum(loss * w) through jsd_loss on ``backend`` (w as ``call``)."""
    s = s.detach().clone().requires_grad_(True)
    t = t.detach().clone().requires_grad_(grad_teacher)
    with kdfast.use_backend(backend):
        loss = kdfast.functional.jsd_loss(s, t, beta, temperature, reduction, mask)
    weights = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    grads = torch.autograd.grad((loss * weights).sum(), (s, t) if grad_teacher else (s,))
    return loss.detach(), grads


def _assert_jsd_parity(got, want, where) -> None:
    assert rel_error(got[0], want[0]) <= PARITY_LOSS, (where, rel_error(got[0], want[0]))
    for g, w in zip(got[1], want[1], strict=True):
        assert g.shape == w.shape and rel_error(g, w) <= PARITY_GRAD, (where, rel_error(g, w))


@pytest.mark.parametrize("op", triton_only(["jsd_loss"]))
def test_triton_jsd_chunking(op, monkeypatch):
    """Tiny tiles (16 elements: 3 column blocks of 16 per row of 37, one row per program):
    the online max / sum across blocks and every pass, on random, extreme (80 * N(0, 1)),
    uniform-row and masked inputs, every mode, with and without the teacher's gradient (in
    turn: interpreter time); float64 parity with the reference."""
    require_backend("triton")
    monkeypatch.setattr("kdfast.triton.jsd_loss.TILE", {4: 16, 8: 16})
    cases = inputs(torch.float64, 23, 37)
    turn = 0
    for name in ("random", "extreme", "uniform_rows", "masked"):
        s, t, mask = cases[name]
        for beta, reduction in JSD_OPTIONS:
            grad_teacher = turn % 2 == 0
            turn += 1
            got = _jsd("triton", s, t, mask, beta, reduction, grad_teacher)
            want = _jsd("reference", s, t, mask, beta, reduction, grad_teacher)
            _assert_jsd_parity(got, want, (name, beta, reduction, grad_teacher))


@pytest.mark.parametrize("op", triton_only(["jsd_loss"]))
def test_triton_jsd_large_vocabulary(op):
    """C = 262144 + 3 in float64 (512 column blocks of the real tile) and C = 20011 in
    float32 against the float64 truth (semantics 7's rule)."""
    require_backend("triton")
    g = torch.Generator().manual_seed(1)
    s = 4 * torch.randn(1, 262147, generator=g, dtype=torch.float64)
    t = 4 * torch.randn(1, 262147, generator=g, dtype=torch.float64)
    _assert_jsd_parity(
        _jsd("triton", s, t, None, 0.5, "batchmean"),
        _jsd("reference", s, t, None, 0.5, "batchmean"),
        "float64",
    )
    s32 = (4 * torch.randn(2, 20011, generator=g)).float()
    t32 = (4 * torch.randn(2, 20011, generator=g)).float()
    for beta in (0.0, 0.3, 1.0):
        got = _jsd("triton", s32, t32, None, beta, "batchmean", grad_teacher=False)
        own = _jsd("reference", s32, t32, None, beta, "batchmean", grad_teacher=False)
        truth = _jsd("reference", s32.double(), t32.double(), None, beta, "batchmean", False)
        loss_tol = tolerance(torch.float32, "loss", rel_error(own[0], truth[0]))
        grad_tol = tolerance(torch.float32, "grad", rel_error(own[1][0], truth[1][0]))
        assert rel_error(got[0], truth[0]) <= loss_tol, beta
        assert rel_error(got[1][0], truth[1][0]) <= grad_tol, beta


@pytest.mark.parametrize("tiny", [False, True])
def test_triton_jsd_read_count(tiny, monkeypatch):
    """Reads of the student and teacher per jsd_loss call (elements loaded / numel), as the
    module docstring of kdfast/triton/jsd_loss.py states: 2 each for the loss alone, 3 with
    either gradient or both, in every mode. tiny: many column blocks per row."""
    if "jsd_loss" not in triton_only(["jsd_loss"]):
        pytest.skip("triton does not run on CPU tensors here (TRITON_INTERPRET unset)")
    require_backend("triton")
    if tiny:
        monkeypatch.setattr("kdfast.triton.jsd_loss.TILE", {4: 16, 8: 16})
    s, t, mask = inputs(torch.float64, 23, 37)["masked"]
    jsd = torch.ops.kdfast.jsd_loss_triton.default
    counts = _count_logit_reads(monkeypatch, {"zs": s, "zt": t})
    for beta in (0.0, 0.01, 0.5, 1.0):
        for grad_s, grad_t in ((False, False), (True, False), (False, True), (True, True)):
            for name in counts:
                counts[name] = 0
            jsd(s, t, beta, 2.0, "batchmean", mask, grad_s, grad_t)
            reads = 3 if grad_s or grad_t else 2
            got = (counts["zs"] / s.numel(), counts["zt"] / t.numel())
            assert got == (reads, reads), (beta, grad_s, grad_t, got)


@pytest.mark.parametrize("op", triton_only(["jsd_loss"]))
@pytest.mark.parametrize("beta", [1e-4, 0.05, 0.5, 1 - 1e-4])
def test_triton_jsd_near_teacher_gradients_keep_relative_accuracy(op, beta):
    """A teacher 0.01 away from the student (the loss second order in the difference, the
    gradients first order): float32 loss and both gradients within 5e-5 of the float64
    truth; float32 log m from log-probabilities would be off by 1e-3 and more (the loss:
    tests/ops/test_jsd_loss.py)."""
    require_backend("triton")
    g = torch.Generator().manual_seed(32)
    s = (3 * torch.randn(16, 300, generator=g, dtype=torch.float64)).float()
    t = (s.double() + 0.01 * torch.randn(16, 300, generator=g, dtype=torch.float64)).float()
    got = _jsd("triton", s, t, None, beta, "batchmean", temperature=1.0)
    truth = _jsd("reference", s.double(), t.double(), None, beta, "batchmean", temperature=1.0)
    assert rel_error(got[0], truth[0]) <= 5e-5, rel_error(got[0], truth[0])
    for a, b in zip(got[1], truth[1], strict=True):
        assert rel_error(a, b) <= 5e-5, rel_error(a, b)


@pytest.mark.parametrize("op", ["kd_loss", "dist_loss"])
def test_large_gradients_are_recycled_and_released(op):
    """Gradients of >= 16 MiB come from a pool: a freed one is handed out again (no fresh
    pages at every training step), and kdfast.empty_cache() releases the idle ones."""
    from kdfast import _extension

    if NO_EXT:  # no compiled kernels, no pool
        assert kdfast.empty_cache() == 0
        return
    require_backend("cpp")
    kdfast.empty_cache()
    s = torch.randn(1024, 4096, requires_grad=True)  # 16 MiB
    t = torch.randn(1024, 4096)
    with kdfast.use_backend("cpp"):
        OPS[op](s, t).backward()
        first = s.grad.data_ptr()
        with kdfast.use_backend("reference"):
            want = torch.autograd.grad(OPS[op](s, t), s)[0]
        grad_tol = tolerance(torch.float32, "grad")
        assert rel_error(s.grad, want) <= grad_tol
        s.grad = None  # back to the pool
        assert _extension._C.cached_output_bytes() >= s.numel() * 4
        OPS[op](s, t).backward()
        assert s.grad.data_ptr() == first and rel_error(s.grad, want) <= grad_tol
        s.grad = None
    assert kdfast.empty_cache() >= s.numel() * 4
    assert _extension._C.cached_output_bytes() == 0 and kdfast.empty_cache() == 0

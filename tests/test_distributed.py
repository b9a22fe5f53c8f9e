"""gather=True across 2 and 3 processes on gloo (kdfast.distributed).

Invariant: every rank returns the loss of one process on the concatenated batch, and each
rank's input gradient is world_size times that process's gradient of its slice, so that
DistributedDataParallel's gradient averaging reproduces single-process training on the
whole batch. Local batch sizes differ (one rank may hold 1 or 0 rows); N limits apply to
the global batch. Each test spawns its processes once and runs several scenarios.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import compiled_backends, require_backend

import kdfast
from kdfast import losses
from kdfast.testing import rel_error

#: local batch sizes per world size: unequal, one rank with a single row
SIZES = {2: [5, 1], 3: [4, 1, 3]}
#: with an empty rank (RKD gathers with padding)
SIZES_WITH_EMPTY = {2: [0, 5], 3: [3, 0, 4]}


def _spawn(worker, world: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        init = os.path.join(tmp, "rendezvous")
        mp.spawn(worker, args=(world, init), nprocs=world, join=True)


def _setup(rank: int, world: int, init: str) -> None:
    torch.set_num_threads(1)
    # a short timeout: a rank that fails must not leave the others waiting for 30 minutes
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )


def _batch(total: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn(total, width, generator=torch.Generator().manual_seed(seed)).double()


def _slice(sizes: list[int], rank: int) -> slice:
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _check_parity(make, sizes, rank, world, ds, dt, teacher_grad=False, seed=0):
    """Gathered loss and gradients vs one process on the concatenated batch."""
    total, rows = sum(sizes), _slice(sizes, rank)
    s_full, t_full = _batch(total, ds, seed), _batch(total, dt, seed + 1)
    s_loc = s_full[rows].clone().requires_grad_(True)
    t_loc = t_full[rows].clone().requires_grad_(teacher_grad)
    loss = make(True)(s_loc, t_loc)
    loss.backward()
    s_ref, t_ref = s_full.clone().requires_grad_(True), t_full.clone().requires_grad_(teacher_grad)
    ref = make(False)(s_ref, t_ref)
    ref.backward()
    assert rel_error(loss, ref) <= 1e-12, (rank, float(loss), float(ref))
    assert rel_error(s_loc.grad, world * s_ref.grad[rows]) <= 1e-10, rank
    if teacher_grad:
        assert rel_error(t_loc.grad, world * t_ref.grad[rows]) <= 1e-10, rank


def _record_vertex_kernel_calls() -> list[tuple[str, int, int]] | None:
    """Make the compiled CPU vertex op (cpp) record its (backend, start, stop) calls, after
    checking that the dispatcher chooses it for float64 CPU features; None when the
    extension is not built (KDFAST_NO_EXT=1)."""
    from kdfast import _dispatch

    if os.environ.get("KDFAST_NO_EXT") == "1":
        return None
    x = torch.zeros(4, 2, dtype=torch.float64)
    assert _dispatch.select("rkd_angle_vertices", x, x, 0, 2)[0] == "cpp", _dispatch.explain(
        "rkd_angle_vertices", "cpu", torch.float64
    )
    calls = []
    impl = _dispatch._IMPLS["rkd_angle_vertices"]["cpp"]

    def recording(s, t, start, stop):
        calls.append(("cpp", start, stop))
        return impl.fn(s, t, start, stop)

    _dispatch._IMPLS["rkd_angle_vertices"]["cpp"] = dataclasses.replace(impl, fn=recording)
    return calls


def _parity_worker(rank: int, world: int, init: str) -> None:
    _setup(rank, world, init)
    calls = _record_vertex_kernel_calls()
    mask_full = torch.tensor([True, False, True, True, True, False, True, True])
    rows = _slice(SIZES[world], rank)
    cases = [
        (lambda g: losses.RKDDistanceLoss(gather=g), 6, 4, False),
        (lambda g: losses.RKDAngleLoss(gather=g), 6, 4, True),
        (lambda g: losses.RKDLoss(25.0, 50.0, gather=g), 6, 4, True),
        (lambda g: losses.RKDLoss(1.0, 0.0, gather=g), 6, 4, False),
        (lambda g: losses.DISTLoss(temperature=4.0, gather=g), 7, 7, True),
        (lambda g: losses.DISTLoss(0.5, 2.0, 2.0, False, "sigmoid", gather=g), 7, 7, False),
    ]
    for make, ds, dt, teacher_grad in cases:
        _check_parity(make, SIZES[world], rank, world, ds, dt, teacher_grad)
    if calls is not None:  # the angle cases ran the compiled kernel on this rank's vertices
        rows = _slice(SIZES[world], rank)
        assert calls and set(calls) == {("cpp", rows.start, rows.stop)}, calls
    # masked DIST: each rank passes its slice of the global mask
    _check_parity(
        lambda g: (
            lambda s, t: kdfast.functional.dist_loss(
                s,
                t,
                temperature=3.0,
                mask=mask_full[rows] if g else mask_full[: s.shape[0]],
                gather=g,
            )
        ),
        SIZES[world],
        rank,
        world,
        5,
        5,
    )
    # an empty rank: RKD pads for the all-gather, DIST sums nothing
    for make, width in (
        (lambda g: losses.RKDLoss(gather=g), 3),
        (lambda g: losses.RKDAngleLoss(gather=g), 3),
        (lambda g: losses.DISTLoss(temperature=2.0, gather=g), 5),
    ):
        _check_parity(make, SIZES_WITH_EMPTY[world], rank, world, 5, width, True, seed=3)
    # gather=False stays local under torch.distributed
    s, t = _batch(4, 3, 10 + rank), _batch(4, 3, 20 + rank)
    assert kdfast.losses.RKDLoss()(s, t) == kdfast.losses.RKDLoss(gather=False)(s, t)
    dist.destroy_process_group()


def _errors_worker(rank: int, world: int, init: str) -> None:
    _setup(rank, world, init)
    one = _batch(1, 4, rank)
    # N limits on the global batch: world = 2 rows of 1 is enough for distances, not angles
    if world == 2:
        loss = losses.RKDDistanceLoss(gather=True)(one, one * 2)
        assert torch.isfinite(loss)
        with pytest.raises(ValueError, match="at least 3 samples in the global batch"):
            losses.RKDAngleLoss(gather=True)(one, one)
        with pytest.raises(ValueError, match="at least 3 samples in the global batch"):
            losses.RKDLoss(gather=True)(one, one)
    else:
        assert torch.isfinite(losses.RKDAngleLoss(gather=True)(one, one * 2))
    # widths must agree across ranks; every rank raises (no hang)
    s = _batch(3, 4 + rank, 0)
    with pytest.raises(ValueError, match="widths must agree across ranks"):
        losses.RKDLoss(gather=True)(s, _batch(3, 2, 1))
    with pytest.raises(ValueError, match="C must agree across ranks"):
        losses.DISTLoss(gather=True)(s, s)
    with pytest.raises(ValueError, match="global batch is empty"):
        losses.DISTLoss(gather=True)(one[:0], one[:0])
    # local validation still names the argument
    with pytest.raises(ValueError, match="same batch size"):
        losses.RKDLoss(gather=True)(_batch(3, 4, 0), _batch(2, 4, 0))
    with pytest.raises(TypeError, match="gather must be a bool"):
        losses.DISTLoss(gather=1)
    dist.barrier()
    dist.destroy_process_group()


class _Student(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh())
        self.head = torch.nn.Linear(8, 5)

    def forward(self, x):
        features = self.body(x)
        return features, self.head(features)


def _train(model, x, feats_t, logits_t, gather: bool, steps: int = 3):
    rkd = losses.RKDLoss(1.0, 2.0, gather=gather)
    dist_kd = losses.DISTLoss(temperature=2.0, gather=gather)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(steps):
        opt.zero_grad()
        features, logits = model(x)
        loss = rkd(features, feats_t) + dist_kd(logits, logits_t)
        loss.backward()
        opt.step()
    return loss


def _ddp_worker(rank: int, world: int, init: str) -> None:
    _setup(rank, world, init)
    sizes, total = SIZES[world], sum(SIZES[world])
    rows = _slice(sizes, rank)
    x, feats_t, logits_t = _batch(total, 6, 1), _batch(total, 3, 2), _batch(total, 5, 3)
    model = torch.nn.parallel.DistributedDataParallel(_Student().double())
    loss = _train(model, x[rows], feats_t[rows], logits_t[rows], gather=True)
    single = _Student().double()
    ref = _train(single, x, feats_t, logits_t, gather=False)
    assert rel_error(loss, ref) <= 1e-10
    for (name, p), q in zip(model.module.named_parameters(), single.parameters(), strict=True):
        assert rel_error(p, q) <= 1e-10, (name, rel_error(p, q))
    moved = sum(
        float((p - q).abs().sum())
        for p, q in zip(_Student().double().parameters(), single.parameters(), strict=True)
    )
    assert moved > 1e-3  # the steps did train
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_gathered_losses_match_one_process(world):
    _spawn(_parity_worker, world)


@pytest.mark.parametrize("world", [2, 3])
def test_global_batch_limits_and_errors(world):
    _spawn(_errors_worker, world)


@pytest.mark.parametrize("world", [2, 3])
def test_ddp_training_matches_one_process(world):
    _spawn(_ddp_worker, world)


def test_gather_without_torch_distributed_is_local():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 4, generator=g), torch.randn(5, 3, generator=g)
    assert losses.RKDLoss(gather=True)(s, t) == losses.RKDLoss()(s, t)
    assert losses.DISTLoss(gather=True)(s, s * 2) == losses.DISTLoss()(s, s * 2)


@pytest.mark.parametrize("backend", ["reference", *compiled_backends("cpu")])
def test_angle_vertex_shards_sum_to_the_angle_loss(backend):
    """Single process: the sharded op over any partition of the vertices is rkd_angle
    (tests/kernels/test_rkd_kernels.py has the kernels' partition, parity and range tests)."""
    require_backend(backend)
    g = torch.Generator().manual_seed(1)
    s = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    fn = kdfast._dispatch._IMPLS["rkd_angle_vertices"][backend].fn
    for cuts in ([0, 7], [0, 3, 7], [0, 0, 2, 5, 7]):
        parts = sum(fn(s, t, a, b) for a, b in zip(cuts, cuts[1:], strict=False))
        assert rel_error(parts, kdfast.functional.rkd_angle(s, t)) <= 1e-12
    assert torch.autograd.gradcheck(lambda s, t: fn(s, t, 2, 5), (s, t))

"""RKD near-duplicate pairs (semantics 1.5): every backend resolves a pair from
the direct differences of its rows, however close, as the official code does (F.normalize of
x_j - x_i; distances from x_i - x_j). Only exact duplicates are degenerate."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import compiled_backends, require_backend

import kdfast
from kdfast import functional
from kdfast.ops.rkd_angle import vertices_share
from kdfast.testing import rel_error

F64 = torch.float64
BACKENDS = [*compiled_backends("cpu"), "reference"]
SEPARATIONS = ["1ulp", 1e-9, 1e-7]


def official_distance(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """RKD distance loss with distances from direct differences (float64 oracle)."""

    def psi(x):
        diff = x.unsqueeze(0) - x.unsqueeze(1)
        d = (diff * diff).sum(2).clamp_min(1e-12).sqrt()
        d = d * (1.0 - torch.eye(x.shape[0], dtype=x.dtype))
        return d / d[d > 0].mean()

    return F.smooth_l1_loss(psi(s), psi(t))


def official_angles(x: torch.Tensor) -> torch.Tensor:
    """lenscloth/RKD RKdAngle: A_ijk = <normalize(x_j - x_i), normalize(x_k - x_i)>."""
    e = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), p=2, dim=2)
    return torch.bmm(e, e.transpose(1, 2))


def official_angle(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.smooth_l1_loss(official_angles(s), official_angles(t))


def official_angle_vertices(s, t, start, stop):
    d = official_angles(s)[start:stop] - official_angles(t)[start:stop]
    return F.smooth_l1_loss(d, torch.zeros_like(d), reduction="sum") / s.shape[0] ** 3


OPS = {
    "rkd_distance": (functional.rkd_distance, official_distance),
    "rkd_angle": (functional.rkd_angle, official_angle),
}


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _size(backend: str) -> int:
    return 12 if backend == "triton" else 24


def near_duplicate(x: torch.Tensor, a: int, b: int, separation, seed: int) -> torch.Tensor:
    """x with row a moved next to row b: one ulp apart in one coordinate ("1ulp"), or
    ``separation * ||x_b||`` apart in a random direction."""
    x = x.clone()
    if separation == "1ulp":
        x[a] = x[b]
        x[a, 0] = torch.nextafter(x[b, 0], torch.tensor(float("inf"), dtype=x.dtype))
    else:
        direction = _randn(x.shape[1], seed=seed)
        x[a] = x[b] + separation * x[b].norm() * direction / direction.norm()
    assert not torch.equal(x[a], x[b])
    return x


def _loss_and_grads(fn, s, t, *args):
    s = s.detach().clone().requires_grad_(True)
    t = t.detach().clone().requires_grad_(True)
    loss = fn(s, t, *args)
    return (loss, *torch.autograd.grad(loss, (s, t)))


def _check(got, want, loss_tol, grad_tol, what):
    errors = [rel_error(g.detach(), w.detach()) for g, w in zip(got, want, strict=True)]
    assert errors[0] <= loss_tol, f"{what}: loss rel error {errors[0]:.2e}"
    assert max(errors[1:]) <= grad_tol, f"{what}: grad rel errors {errors[1:]}"


@pytest.mark.parametrize("separation", SEPARATIONS, ids=str)
@pytest.mark.parametrize("side", ["student", "teacher"])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_near_duplicate_matches_official(backend, op, side, separation):
    require_backend(backend)
    n = _size(backend)
    # At a 1e11 scale even a 1-ulp pair is farther apart than the 1e-6 distance clamp.
    s, t = _randn(n, 8, seed=1) * 1e11, (_randn(n, 6, seed=2) + 3.0) * 1e11
    if side == "student":
        s = near_duplicate(s, 5, 2, separation, seed=3)
    else:
        t = near_duplicate(t, 5, 2, separation, seed=3)
    fn, official = OPS[op]
    with kdfast.use_backend(backend):
        got = _loss_and_grads(fn, s, t)
    _check(got, _loss_and_grads(official, s, t), 1e-9, 1e-7, f"{op} {backend} {separation}")


@pytest.mark.parametrize("separation", SEPARATIONS, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_near_duplicate_vertex_ranges(backend, separation):
    require_backend(backend)
    n = _size(backend)
    s = near_duplicate(_randn(n, 8, seed=4), 7, 3, separation, seed=5)
    t = near_duplicate(_randn(n, 5, seed=6), 1, 8, separation, seed=7)
    for start, stop in ((0, n // 2), (n // 2, n), (2, 4)):
        with kdfast.use_backend(backend):
            got = _loss_and_grads(vertices_share, s, t, start, stop)
        want = _loss_and_grads(official_angle_vertices, s, t, start, stop)
        _check(got, want, 1e-9, 1e-7, f"vertices [{start}, {stop}) {backend} {separation}")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_clustered_near_duplicates_against_exact_truth(backend, op):
    require_backend(backend)
    n = _size(backend)
    centres = _randn(10, 16, seed=8) * 10
    s = centres[torch.arange(n) % 10] + 1e-2 * _randn(n, 16, seed=9)
    s[7] = s[3] + 1e-6
    s = s.float()
    t = (_randn(10, 12, seed=10)[torch.arange(n) % 10] + 1e-3 * _randn(n, 12, seed=11)).float()
    t[9] = t[4]
    t[9, 0] = torch.nextafter(t[4, 0], torch.tensor(float("inf")))
    fn, official = OPS[op]
    with kdfast.use_backend(backend):
        got = _loss_and_grads(fn, s, t)
    truth = _loss_and_grads(official, s.double(), t.double())
    _check(got, truth, 1e-5, 1e-4, f"{op} {backend} float32 clustered")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_duplicate_gets_no_gradient_through_the_pair(backend, op):
    # The documented deviation: an exactly duplicated pair is degenerate (zero difference
    # vector, no gradient through it), where F.normalize's eps gives ~1e10. The angle
    # reference is the official formula, eps included.
    if backend == "reference" and op == "rkd_angle":
        pytest.skip("the angle reference keeps the official 1 / eps gradient")
    require_backend(backend)
    n = _size(backend)
    s, t = _randn(n, 8, seed=12), _randn(n, 6, seed=13)
    s[5] = s[2]
    fn, _ = OPS[op]
    with kdfast.use_backend(backend):
        loss, gs, gt = _loss_and_grads(fn, s, t)
    assert torch.isfinite(loss) and torch.isfinite(gs).all() and torch.isfinite(gt).all()
    assert gs.abs().max() < 1e3

"""RKD distance and angle kernels (issue 3): acceptance beyond the contract tests of
tests/test_backends.py, on every compiled backend that runs here (the Triton ones under
TRITON_INTERPRET=1, with N <= 12)."""

from __future__ import annotations

import pytest
import torch
from conftest import compiled_backends, require_backend

import kdfast
from kdfast import functional
from kdfast.testing import rel_error

F64 = torch.float64
T_EX = [[0.0, 0.0], [3.0, 4.0], [6.0, 0.0]]
S_EX = [[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]
S_DUP = [[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]]
BACKENDS = compiled_backends("cpu")
OPS = {"rkd_angle": functional.rkd_angle, "rkd_distance": functional.rkd_distance}
SPEC_EXAMPLES = {
    ("rkd_angle", "ex"): 0.017579546567412015,
    ("rkd_angle", "dup"): 0.0592,
    ("rkd_distance", "ex"): 0.0279368329695255,
    ("rkd_distance", "dup"): 0.148437168544001,
}


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _clustered(n: int, d: int, spread: float, seed: int) -> torch.Tensor:
    """10 class clusters whose spread is ``spread`` of their separation (SPEC 1.5)."""
    centres = _randn(10, d, seed=seed) * 10
    return centres[torch.arange(n) % 10] + spread * 10 * _randn(n, d, seed=seed + 1)


def _size(backend: str) -> int:
    return 12 if backend == "triton" else 40


def _loss_and_grads(fn, backend, s, t):
    s = s.detach().clone().requires_grad_(True)
    t = t.detach().clone().requires_grad_(True)
    with kdfast.use_backend(backend):
        loss = fn(s, t)
    return (loss, *torch.autograd.grad(loss, (s, t)))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_spec_examples(op, backend):
    require_backend(backend)
    t = torch.tensor(T_EX, dtype=F64)
    for key, rows in (("ex", S_EX), ("dup", S_DUP)):
        s = torch.tensor(rows, dtype=F64).requires_grad_(True)
        with kdfast.use_backend(backend):
            loss = OPS[op](s, t)
        assert abs(loss.item() - SPEC_EXAMPLES[op, key]) <= 1e-12 * SPEC_EXAMPLES[op, key]
        (grad,) = torch.autograd.grad(loss, s)
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize("spread", [1e-2, 1e-3])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_clustered_within_1e5_of_float64_truth(backend, op, spread):
    """SPEC 1.5: a float32 Gram kernel without float64 cancellation-prone terms is off by
    tens of percent here; the truth is the float64 reference on the same rounded inputs."""
    require_backend(backend)
    n = _size(backend)
    s = _clustered(n, 24, spread, seed=3).float()
    t = _clustered(n, 16, spread, seed=5).float()
    loss, gs, gt = _loss_and_grads(OPS[op], backend, s, t)
    ref_loss, ref_gs, ref_gt = _loss_and_grads(OPS[op], "reference", s.double(), t.double())
    assert loss.dtype == torch.float32 and gs.dtype == torch.float32
    assert rel_error(loss, ref_loss) <= 1e-5
    assert rel_error(gs, ref_gs) <= 1e-5
    assert rel_error(gt, ref_gt) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_clustered_beats_plain_float32_reference(backend):
    """A test that can fail: the float32 difference-based reference is itself close, so also
    check the kernel is no worse than 2x PyTorch's own float32 error, or 1e-5."""
    require_backend(backend)
    n = _size(backend)
    s = _clustered(n, 24, 1e-3, seed=7).float()
    t = _randn(n, 8, seed=8).float()
    with kdfast.use_backend(backend):
        got = functional.rkd_angle(s, t)
    with kdfast.use_backend("reference"):
        truth = functional.rkd_angle(s.double(), t.double())
        plain = functional.rkd_angle(s, t)
    assert rel_error(got, truth) <= max(1e-5, 2 * rel_error(plain, truth))


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicate_rows_reference_loss_finite_gradient(backend):
    require_backend(backend)
    n = _size(backend)
    s = _randn(n, 6, seed=11)
    s[2] = s[5]
    s[9] = s[5]
    t = _randn(n, 4, seed=12)
    t[1] = t[4]  # duplicates in the teacher too (its gradient is requested)
    for dtype in (F64, torch.float32):
        loss, gs, gt = _loss_and_grads(functional.rkd_angle, backend, s.to(dtype), t.to(dtype))
        with kdfast.use_backend("reference"):
            ref = functional.rkd_angle(s.to(dtype).double(), t.to(dtype).double())
        assert rel_error(loss, ref) <= (1e-12 if dtype == F64 else 1e-6)
        assert torch.isfinite(gs).all() and torch.isfinite(gt).all()
        assert gs.abs().max() < 1e3 and gt.abs().max() < 1e3  # not the reference's ~1e12


@pytest.mark.parametrize("backend", BACKENDS)
def test_rkd_loss_module_float64_parity(backend):
    require_backend(backend)
    n = _size(backend)
    s, t = _randn(n, 10, seed=21), _randn(n, 7, seed=22)
    module = kdfast.losses.RKDLoss(distance_weight=25.0, angle_weight=50.0)
    loss, gs, gt = _loss_and_grads(module, backend, s, t)
    ref_loss, ref_gs, ref_gt = _loss_and_grads(module, "reference", s, t)
    assert rel_error(loss, ref_loss) <= 1e-9
    assert rel_error(gs, ref_gs) <= 1e-7 and rel_error(gt, ref_gt) <= 1e-7


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates(backend):
    require_backend(backend)
    s, t = _randn(5, 3, seed=31), _randn(5, 3, seed=32)
    s[1, 0] = float("nan")
    with kdfast.use_backend(backend):
        assert torch.isnan(functional.rkd_angle(s, t))

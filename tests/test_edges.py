"""Edges of the public API: temperatures without meaning are refused, NaN teachers reach the
hard DeiT loss, logits with no classes get a clear error, and a NaN or Inf in a row the
mask drops reaches neither the loss nor a gradient, on every backend (docs/semantics.md 0,
2, 3)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import backends_for

import kdfast
from kdfast import functional as KF
from kdfast.losses import DeiTDistillationLoss, DISTLoss, JSDLoss, KDLoss
from kdfast.sampling import diversity_difficulty_weights
from kdfast.testing import rel_error, tolerance

BAD_TEMPERATURES = [math.inf, -math.inf, math.nan, 0.0, -1.0]


def logits(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


TEMPERATURE_CALLS = {
    "kd_loss": lambda T: KF.kd_loss(logits(4, 5), logits(4, 5), T),
    "per_sample_kl": lambda T: KF.per_sample_kl(logits(4, 5), logits(4, 5), T),
    "dist_loss": lambda T: KF.dist_loss(logits(4, 5), logits(4, 5), temperature=T),
    "jsd_loss": lambda T: KF.jsd_loss(logits(4, 5), logits(4, 5), 0.5, T),
    "KDLoss": lambda T: KDLoss(temperature=T),
    "DISTLoss": lambda T: DISTLoss(temperature=T),
    "JSDLoss": lambda T: JSDLoss(temperature=T),
    "DeiTDistillationLoss": lambda T: DeiTDistillationLoss(
        torch.nn.CrossEntropyLoss(), None, "soft", temperature=T
    ),
    "diversity_difficulty_weights": lambda T: diversity_difficulty_weights(
        logits(4, 5), temperature=T
    ),
}


@pytest.mark.parametrize("temperature", BAD_TEMPERATURES)
@pytest.mark.parametrize("call", TEMPERATURE_CALLS.values(), ids=TEMPERATURE_CALLS.keys())
def test_temperature_without_meaning_is_refused(call, temperature):
    """inf gave NaN (KD), inf (DIST) or 0 (per_sample_kl); the constructors accepted it."""
    with pytest.raises(ValueError, match="temperature"):
        call(temperature)


def test_hard_deit_propagates_a_nan_teacher():
    """argmax picks a label from a NaN row; the loss must be NaN, not a finite CE."""
    loss = DeiTDistillationLoss(torch.nn.CrossEntropyLoss(), None, "hard", alpha=0.5)
    cls, dist, labels = logits(3, 4), logits(3, 4).requires_grad_(), torch.tensor([0, 1, 2])
    teacher = logits(3, 4)
    assert torch.isfinite(loss(None, (cls, dist), labels, teacher_logits=teacher))
    teacher[1, 2] = math.nan
    assert torch.isnan(loss(None, (cls, dist), labels, teacher_logits=teacher))


@pytest.mark.parametrize("shape", [(2, 0, 3), (2, 0), (2, 0, 3, 4)])
@pytest.mark.parametrize(
    "call",
    [KF.kd_loss, KF.per_sample_kl, KF.dist_loss, KF.jsd_loss],
    ids=["kd_loss", "per_sample_kl", "dist_loss", "jsd_loss"],
)
def test_logits_without_classes_get_a_clear_error(call, shape):
    """(N, 0, S) failed in torch's reshape ("cannot reshape tensor of 0 elements")."""
    with pytest.raises(ValueError, match=r"student_logits must be non-empty, got shape"):
        call(torch.zeros(shape), torch.zeros(shape))


MASKED_CALLS = {
    "kd_loss": lambda s, t, mask: KF.kd_loss(s, t, 2.0, mask=mask),
    "dist_loss": lambda s, t, mask: KF.dist_loss(s, t, mask=mask),
    "jsd_loss": lambda s, t, mask: KF.jsd_loss(s, t, mask=mask),
}


@pytest.mark.parametrize("shape", [(6, 5), (2, 5, 3)])
@pytest.mark.parametrize("op, backend", [(op, b) for op in MASKED_CALLS for b in backends_for(op)])
def test_non_finite_masked_rows_leave_no_trace(op, backend, shape):
    """Row 1 (of (B, C), or n = 0, s = 1 of (N, C, S)) holds NaN and Inf and is masked
    out: the loss equals the loss without that row, and every gradient is finite, 0 in the
    dropped row (the reference gave that row a NaN gradient)."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(*shape, generator=g, dtype=torch.float64)
    t = torch.randn(*shape, generator=g, dtype=torch.float64)
    rows = shape[0] if len(shape) == 2 else shape[0] * shape[2]
    mask = torch.ones(rows, dtype=torch.bool)
    mask[1] = False
    # (B, C): row 1; (N, C, S): row r = n * S + s = 1 is n = 0, s = 1
    nan_at, inf_at = ((1, 2), (1, 0)) if len(shape) == 2 else ((0, 2, 1), (0, 0, 1))
    with kdfast.use_backend(backend):
        want = MASKED_CALLS[op](s, t, mask)  # every row finite
        s[nan_at], t[inf_at] = math.nan, math.inf
        s.requires_grad_(True)
        t.requires_grad_(True)
        loss = MASKED_CALLS[op](s, t, mask)
    assert torch.equal(loss, want) or abs(loss.item() - want.item()) <= 1e-12 * abs(want.item())
    grads = torch.autograd.grad(loss, (s, t))
    for grad in grads:
        assert torch.isfinite(grad).all()
        dropped = grad[1] if len(shape) == 2 else grad[0, :, 1]
        assert (dropped == 0).all()


@pytest.mark.parametrize("backend", backends_for("rkd_angle"))
def test_rkd_angle_of_features_near_the_float32_range(backend):
    """float32 features ~1e30: differences' squared norms overflow float32, which made the
    reference return 0 (every angle 0). Angles do not depend on scale, so the truth is the
    float64 loss of the features divided by 1e30, and the gradient that one's over 1e30."""
    g = torch.Generator().manual_seed(0)
    s = (1e30 * torch.randn(6, 4, generator=g)).float().requires_grad_(True)
    t = (1e30 * torch.randn(6, 3, generator=g)).float()
    s64 = (s.detach().double() / 1e30).requires_grad_(True)
    truth = KF.rkd_angle(s64, t.double() / 1e30)
    (truth_grad,) = torch.autograd.grad(truth, s64)
    with kdfast.use_backend(backend):
        loss = KF.rkd_angle(s, t)
    (grad,) = torch.autograd.grad(loss, s)
    assert rel_error(loss, truth) <= tolerance(torch.float32, "loss")
    assert rel_error(grad.double() * 1e30, truth_grad) <= tolerance(torch.float32, "grad")

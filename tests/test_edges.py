"""Edges of the public API: temperatures without meaning are refused, NaN teachers reach the
hard DeiT loss, and logits with no classes get a clear error (docs/semantics.md 0, 3)."""

from __future__ import annotations

import math

import pytest
import torch

from kdfast import functional as KF
from kdfast.losses import DeiTDistillationLoss, DISTLoss, JSDLoss, KDLoss
from kdfast.sampling import diversity_difficulty_weights

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

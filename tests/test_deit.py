"""DeiT distillation (semantics 3): DeiTDistillationLoss and deit_inference_logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from worked_examples import F64, ZS, ZT, rand, reference_backend  # noqa: F401

from kdfast.losses.kd import DeiTDistillationLoss, deit_inference_logits
from kdfast.testing import rel_error as rel
from kdfast.testing import tolerance

pytestmark = pytest.mark.usefixtures("reference_backend")


class OfficialDistillationLoss(nn.Module):
    """facebookresearch/deit losses.py ``DistillationLoss``, transcribed."""

    def __init__(self, base_criterion, teacher_model, distillation_type, alpha, tau):
        super().__init__()
        self.base_criterion = base_criterion
        self.teacher_model = teacher_model
        assert distillation_type in ["none", "soft", "hard"]
        self.distillation_type = distillation_type
        self.alpha = alpha
        self.tau = tau

    def forward(self, inputs, outputs, labels):
        outputs_kd = None
        if not isinstance(outputs, torch.Tensor):
            outputs, outputs_kd = outputs
        base_loss = self.base_criterion(outputs, labels)
        if self.distillation_type == "none":
            return base_loss
        if outputs_kd is None:
            raise ValueError("expected a Tuple[Tensor, Tensor]")
        with torch.no_grad():
            teacher_outputs = self.teacher_model(inputs)
        if self.distillation_type == "soft":
            T = self.tau
            distillation_loss = (
                F.kl_div(
                    F.log_softmax(outputs_kd / T, dim=1),
                    F.log_softmax(teacher_outputs / T, dim=1),
                    reduction="sum",
                    log_target=True,
                )
                * (T * T)
                / outputs_kd.numel()
            )
        elif self.distillation_type == "hard":
            distillation_loss = F.cross_entropy(outputs_kd, teacher_outputs.argmax(dim=1))
        return base_loss * (1 - self.alpha) + distillation_loss * self.alpha


class ConstantTeacher(nn.Module):
    """A teacher module that returns fixed logits whatever the inputs."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, inputs):
        return self.logits


def forbidden_teacher(inputs):
    raise AssertionError("the teacher must not run")


# --- docs/semantics.md worked examples ------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "tau", "expected"),
    [
        ("soft", 1.0, 0.2524326820596044),
        ("soft", 3.0, 0.27645711921979926),
        ("hard", 1.0, 1.979525339188216),
    ],
)
def test_spec_example(kind, tau, expected):
    zs, zt = torch.tensor(ZS, dtype=F64), torch.tensor(ZT, dtype=F64)
    cls = rand(2, 3, seed=1)
    labels = torch.tensor([2, 0])
    base = F.cross_entropy(cls, labels)
    # alpha = 1: the distillation term alone.
    only_kd = DeiTDistillationLoss(F.cross_entropy, ConstantTeacher(zt), kind, 1.0, tau)
    loss = only_kd(None, (cls, zs), labels)
    assert loss.dtype == F64 and abs(loss.item() - expected) <= 1e-12 * expected
    mixed = DeiTDistillationLoss(F.cross_entropy, None, kind, 0.25, tau)
    loss = mixed(None, (cls, zs), labels, teacher_logits=zt)
    want = 0.75 * base.item() + 0.25 * expected
    assert abs(loss.item() - want) <= 1e-12 * want


# --- against the official module ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["none", "soft", "hard"])
@pytest.mark.parametrize(("alpha", "tau"), [(0.5, 1.0), (0.1, 3.0)])
def test_matches_official(kind, alpha, tau):
    torch.manual_seed(0)
    teacher = nn.Linear(8, 10).double()
    inputs = rand(6, 8, seed=2)
    labels = torch.tensor([0, 3, 9, 2, 2, 5])
    base = nn.CrossEntropyLoss(label_smoothing=0.1)
    cls = rand(6, 10, seed=3).requires_grad_()
    dist = rand(6, 10, seed=4).requires_grad_()
    ours = DeiTDistillationLoss(base, teacher, kind, alpha, tau)(inputs, (cls, dist), labels)
    cls_o, dist_o = cls.detach().clone().requires_grad_(), dist.detach().clone().requires_grad_()
    official = OfficialDistillationLoss(base, teacher, kind, alpha, tau)
    theirs = official(inputs, (cls_o, dist_o), labels)
    assert rel(ours, theirs) <= 1e-12
    ours.backward()
    theirs.backward()
    assert rel(cls.grad, cls_o.grad) <= 1e-12
    if kind != "none":
        assert rel(dist.grad, dist_o.grad) <= 1e-12
    else:
        assert dist.grad is None
    assert all(p.grad is None for p in teacher.parameters())


def test_none_returns_base_and_skips_the_teacher():
    cls, labels = rand(4, 5, seed=5), torch.tensor([0, 1, 2, 3])
    loss_fn = DeiTDistillationLoss(F.cross_entropy, forbidden_teacher, "none")
    base = F.cross_entropy(cls, labels)
    assert loss_fn(None, cls, labels).item() == base.item()
    assert loss_fn(None, (cls, rand(4, 5, seed=6)), labels).item() == base.item()
    assert DeiTDistillationLoss(F.cross_entropy, None)(None, cls, labels).item() == base.item()


def test_teacher_runs_once_under_no_grad_on_inputs():
    seen = []

    def teacher(inputs):
        seen.append((inputs, torch.is_grad_enabled()))
        return inputs * 2

    inputs = rand(3, 4, seed=7)
    cls = rand(3, 4, seed=8).requires_grad_()
    loss = DeiTDistillationLoss(F.cross_entropy, teacher, "soft")(
        inputs, (cls, cls), torch.tensor([0, 1, 2])
    )
    assert len(seen) == 1 and seen[0][0] is inputs and seen[0][1] is False
    assert loss.requires_grad


def test_teacher_logits_replace_the_teacher():
    zt = torch.tensor(ZT, dtype=F64)
    cls, dist, labels = rand(2, 3, seed=9), torch.tensor(ZS, dtype=F64), torch.tensor([1, 2])
    for kind in ("soft", "hard"):
        with_module = DeiTDistillationLoss(F.cross_entropy, ConstantTeacher(zt), kind, 0.3, 2.0)
        skipped = DeiTDistillationLoss(F.cross_entropy, forbidden_teacher, kind, 0.3, 2.0)
        want = with_module(None, (cls, dist), labels)
        assert skipped(None, (cls, dist), labels, teacher_logits=zt).item() == want.item()
        with pytest.raises(ValueError, match="teacher_logits must be given"):
            DeiTDistillationLoss(F.cross_entropy, None, kind)(None, (cls, dist), labels)


def test_hard_ties_go_to_lowest_index():
    zt = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0], [5.0, 5.0, 5.0]], dtype=F64)
    assert zt.argmax(dim=1).tolist() == [0, 1, 0]
    dist = rand(3, 3, seed=10)
    loss_fn = DeiTDistillationLoss(F.cross_entropy, None, "hard", alpha=1.0)
    loss = loss_fn(None, (dist, dist), torch.tensor([2, 2, 2]), teacher_logits=zt)
    assert rel(loss, F.cross_entropy(dist, torch.tensor([0, 1, 0]))) <= 1e-15


def test_soft_mixed_dtype_and_float64():
    dist16 = rand(4, 6, seed=11, dtype=torch.float16)
    zt = rand(4, 6, seed=12, dtype=torch.float32)
    loss_fn = DeiTDistillationLoss(lambda x, y: x.float().sum() * 0, None, "soft", 1.0, 2.0)
    loss = loss_fn(None, (dist16, dist16), None, teacher_logits=zt)
    assert loss.dtype == torch.float32
    truth = loss_fn(None, (dist16.double(), dist16.double()), None, teacher_logits=zt.double())
    assert truth.dtype == F64 and rel(loss.double(), truth) <= tolerance(torch.float32)


# --- inference helper -----------------------------------------------------------------


def test_inference_logits_are_the_mean_of_the_heads():
    cls, dist = rand(3, 5, seed=13), rand(3, 5, seed=14)
    assert torch.equal(deit_inference_logits((cls, dist)), (cls + dist) / 2)
    assert torch.equal(deit_inference_logits([cls, dist]), (cls + dist) / 2)
    assert deit_inference_logits(cls) is cls
    with pytest.raises(ValueError, match=r"same shape.*\(3, 5\).*\(3, 4\)"):
        deit_inference_logits((cls, dist[:, :4]))


# --- bad inputs -----------------------------------------------------------------------


def test_plain_tensor_with_distillation_raises():
    cls = rand(2, 3)
    for kind in ("soft", "hard"):
        loss_fn = DeiTDistillationLoss(F.cross_entropy, forbidden_teacher, kind)
        with pytest.raises(ValueError, match=rf"outputs.*distillation_type='{kind}'.*\(2, 3\)"):
            loss_fn(None, cls, torch.tensor([0, 1]))


def test_bad_options_raise():
    with pytest.raises(ValueError, match="distillation_type.*'medium'"):
        DeiTDistillationLoss(F.cross_entropy, None, "medium")
    for bad in (-0.1, 1.5, True, "0.5", float("nan")):
        with pytest.raises(ValueError, match="alpha"):
            DeiTDistillationLoss(F.cross_entropy, None, "soft", alpha=bad)
    for bad in (0, -1.0, None):
        with pytest.raises(ValueError, match="temperature"):
            DeiTDistillationLoss(F.cross_entropy, None, "soft", temperature=bad)
    with pytest.raises(TypeError, match="base_criterion"):
        DeiTDistillationLoss("cross_entropy", None)
    with pytest.raises(TypeError, match="teacher"):
        DeiTDistillationLoss(F.cross_entropy, 3.0)
    assert DeiTDistillationLoss(F.cross_entropy, None, "soft", alpha=0).alpha == 0.0
    assert DeiTDistillationLoss(F.cross_entropy, None, "soft", alpha=1).alpha == 1.0


def test_bad_forward_inputs_raise():
    cls, labels = rand(2, 3), torch.tensor([0, 1])
    loss_fn = DeiTDistillationLoss(F.cross_entropy, None, "hard")
    with pytest.raises(TypeError, match="outputs.*length 3"):
        loss_fn(None, (cls, cls, cls), labels, teacher_logits=cls)
    with pytest.raises(TypeError, match="outputs.*dict"):
        loss_fn(None, {"cls": cls}, labels, teacher_logits=cls)
    for kind in ("soft", "hard"):
        loss_fn = DeiTDistillationLoss(F.cross_entropy, None, kind)
        with pytest.raises(ValueError, match=r"dist_logits and teacher_logits.*\(2, 3\).*\(2, 4\)"):
            loss_fn(None, (cls, cls), labels, teacher_logits=rand(2, 4))
        with pytest.raises(TypeError, match="teacher_logits.*torch.int64"):
            loss_fn(None, (cls, cls), labels, teacher_logits=labels[:, None].expand(2, 3))

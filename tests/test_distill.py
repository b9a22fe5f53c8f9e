"""The distillation loop helper, the DeiT token head, and examples/distill.py (reduced run)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import example_main
from torch import nn

from kdfast.losses import DeiTDistillationLoss, KDLoss
from kdfast.nn import DistillationTokenHead
from kdfast.training import DistillBatch, accuracy, distill, predict_logits


def _blobs(n: int = 120, classes: int = 3, dim: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(classes, dim, generator=g)
    y = torch.arange(n) % classes
    return centres[y] + torch.randn(n, dim, generator=g), y


class _Net(nn.Module):
    """Returns (logits, features), like the examples' models; BatchNorm to check eval mode."""

    def __init__(self, dim: int = 5, classes: int = 3, hidden: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU())
        self.fc = nn.Linear(hidden, classes)

    def forward(self, x):
        h = self.body(x)
        return self.fc(h), h


def test_distill_trains_with_a_teacher_and_reports_progress():
    x, y = _blobs()
    torch.manual_seed(0)
    teacher, student = _Net(), _Net(hidden=8)
    distill(teacher, None, x, y, lambda b: F.cross_entropy(b.student_out[0], b.labels), epochs=5)
    assert teacher.training is False
    kd = KDLoss(temperature=2.0)
    seen = []

    def loss_fn(b: DistillBatch):
        seen.append(b.step)
        assert b.student_out[0].requires_grad and not b.teacher_out[0].requires_grad
        return F.cross_entropy(b.student_out[0], b.labels) + kd(b.student_out[0], b.teacher_out[0])

    lines = []
    history = distill(
        student,
        teacher,
        x,
        y,
        loss_fn,
        epochs=6,
        batch_size=32,
        lr=1e-2,
        log=lines.append,
        log_every=3,
        generator=torch.Generator().manual_seed(0),
    )
    assert teacher.training is False  # BatchNorm statistics of the teacher stay frozen
    assert history.steps == 6 * (120 // 32) and seen == list(range(history.steps))
    assert len(history.epoch_losses) == 6 and all(map(math.isfinite, history.epoch_losses))
    assert history.epoch_losses[-1] < 0.7 * history.epoch_losses[0]
    assert len(lines) == 2 and "epoch" in lines[0]
    assert accuracy(student, x, y) > 0.9


def test_distill_extra_params_augment_and_errors():
    x, y = _blobs()
    student = _Net()
    adapter = nn.Linear(16, 16)
    before = adapter.weight.detach().clone()
    calls = []

    def augment(batch, generator):
        calls.append(batch.shape[0])
        return batch + 0.01 * torch.randn(batch.shape, generator=generator)

    def loss_fn(b):
        return F.cross_entropy(b.student_out[0], b.labels) + adapter(b.student_out[1]).pow(2).mean()

    distill(
        student,
        None,
        x,
        y,
        loss_fn,
        epochs=1,
        batch_size=50,
        extra_params=adapter.parameters(),
        augment=augment,
        generator=torch.Generator().manual_seed(1),
    )
    assert not torch.equal(before, adapter.weight) and calls == [50, 50]  # drop_last
    with pytest.raises(FloatingPointError, match="loss is nan"):
        distill(student, None, x, y, lambda b: b.student_out[0].sum() * math.nan, epochs=1)
    with pytest.raises(ValueError, match=r"\(120, 5\) and \(3,\)"):
        distill(student, None, x, y[:3], loss_fn, epochs=1)
    with pytest.raises(ValueError, match="epochs"):
        distill(student, None, x, y, loss_fn, epochs=0)
    with pytest.raises(ValueError, match="batch_size"):
        distill(student, None, x, y, loss_fn, epochs=1, batch_size=1)


def test_predict_logits_selects_and_batches():
    x, _ = _blobs(n=10)
    net = _Net().eval()
    full = net(x)[0]
    torch.testing.assert_close(predict_logits(net, x, batch_size=3), full)
    torch.testing.assert_close(predict_logits(net, x, select=lambda out: out[1]), net(x)[1])


def test_distillation_token_head():
    torch.manual_seed(0)
    head = DistillationTokenHead(dim=6, num_classes=4)
    patches = torch.randn(3, 5, 6)
    tokens = head.prepend(patches)
    assert tokens.shape == (3, 7, 6) and head.num_prefix_tokens == 2
    torch.testing.assert_close(tokens[:, 0], head.cls_token[0].expand(3, 6))
    torch.testing.assert_close(tokens[:, 1], head.dist_token[0].expand(3, 6))
    torch.testing.assert_close(head.patch_tokens(tokens), patches)
    cls_logits, dist_logits = head(tokens)  # training mode: both heads
    torch.testing.assert_close(cls_logits, head.head(tokens[:, 0]))
    torch.testing.assert_close(dist_logits, head.head_dist(tokens[:, 1]))
    head.eval()
    torch.testing.assert_close(head(tokens), (cls_logits + dist_logits) / 2)  # DeiT inference
    plain = DistillationTokenHead(6, 4, distillation_token=False)
    assert plain.dist_token is None and plain.prepend(patches).shape == (3, 6, 6)
    assert plain(plain.prepend(patches)).shape == (3, 4)
    with pytest.raises(ValueError, match=r"\(B, T, 6\).*\(3, 5, 7\)"):
        head.prepend(torch.randn(3, 5, 7))
    with pytest.raises(ValueError, match="T >= 2"):
        head(torch.randn(3, 1, 6))
    with pytest.raises(ValueError, match="num_classes"):
        DistillationTokenHead(6, 0)


def test_distillation_token_learns_from_the_teacher_through_deit_loss():
    head = DistillationTokenHead(dim=4, num_classes=3)
    encoder = nn.Linear(4, 4)
    teacher_logits = torch.randn(8, 3)
    labels = torch.randint(0, 3, (8,))
    deit = DeiTDistillationLoss(F.cross_entropy, None, "hard", alpha=0.5)
    outputs = head(encoder(head.prepend(torch.randn(8, 2, 4))))
    deit(None, outputs, labels, teacher_logits).backward()
    assert head.dist_token.grad.abs().sum() > 0 and head.head_dist.weight.grad.abs().sum() > 0


def test_distill_example_quick(tmp_path, capsys):
    main = example_main("distill.py")
    report = main(["--quick", "--out-dir", str(tmp_path)])
    assert "| no_kd |" in capsys.readouterr().out
    saved = json.loads((tmp_path / "distill_results.json").read_text())
    assert (tmp_path / "distill_results.png").stat().st_size > 0
    assert set(saved["table"]) == {"no_kd", "kd", "deit_soft", "deit_hard", "dist", "rkd", "vkd"}
    for name, runs in report["runs"].items():
        assert len(runs) == 2
        for run in runs:
            losses = run["epoch_losses"]
            assert all(map(math.isfinite, losses)), name
            assert losses[-1] < losses[0], (name, losses)
            assert 0.0 <= run["accuracy"] <= 1.0

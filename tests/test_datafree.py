"""SSD-KD synthesizer (kdfast.datafree) and examples/ssd_kd.py (reduced run)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import example_main
from torch import nn

from kdfast.datafree import Generator, SSDKDSynthesizer
from kdfast.functional import per_sample_kl
from kdfast.sampling import PrioritizedReplayBuffer

C, D = 4, 6


def _teacher() -> nn.Module:
    """A small BatchNorm MLP whose running statistics come from 'real' data."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(D, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, C))
    net.train()
    with torch.no_grad():
        for _ in range(20):
            net(0.5 + 2.0 * torch.randn(64, D))
    return net.eval().requires_grad_(False)


def _setup(alpha: float = 0.6, capacity: int = 40, lambda_adv: float = 1.0):
    teacher = _teacher()
    student = nn.Sequential(nn.Linear(D, 8), nn.ReLU(), nn.Linear(8, C))
    generator = Generator((D,), C, latent_dim=8, hidden=32, low=-4.0, high=4.0)
    buffer = PrioritizedReplayBuffer(capacity, alpha=alpha, beta=0.4)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    synth = SSDKDSynthesizer(
        teacher, student, generator, buffer, optimizer, generator_lr=1e-2, lambda_adv=lambda_adv
    )
    return synth, teacher, student


def test_generator_shape_range_and_validation():
    g = Generator((1, 3, 2), num_classes=5, latent_dim=4, hidden=8, low=-1.5, high=2.0)
    x = g(torch.randn(7, 4), torch.randint(0, 5, (7,)))
    assert x.shape == (7, 1, 3, 2) and x.min() >= -1.5 and x.max() <= 2.0
    with pytest.raises(ValueError, match=r"\(B, 4\).*\(7, 3\)"):
        g(torch.randn(7, 3), torch.zeros(7, dtype=torch.long))
    with pytest.raises(ValueError, match="low must be < high"):
        Generator((2,), 3, low=1.0, high=1.0)


def test_generator_loss_terms_decrease_and_only_the_generator_learns():
    synth, teacher, student = _setup(lambda_adv=0.1)
    student_before = [p.detach().clone() for p in student.parameters()]
    first = synth.synthesize(batch_size=32, steps=1)
    assert set(first) == {"l_g", "l_bn", "l_task", "l_kd"}
    later = synth.synthesize(batch_size=32, steps=30)
    last = synth.synthesize(batch_size=32, steps=1)
    assert all(math.isfinite(v) for v in (*first.values(), *later.values(), *last.values()))
    assert last["l_bn"] < first["l_bn"] and last["l_g"] < first["l_g"]
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is None for p in student.parameters())  # the generator step alone
    for before, after in zip(student_before, student.parameters(), strict=True):
        assert torch.equal(before, after)
    assert len(synth.buffer) == 40  # three adds of 32 fill the capacity of 40
    # cached teacher logits are the teacher's on what the buffer holds
    stored = synth.buffer.samples
    torch.testing.assert_close(synth._teacher_logits[: len(stored)], teacher(stored))


def test_generator_loss_is_the_documented_combination():
    synth, teacher, student = _setup(lambda_adv=0.7)
    synth.bn_weight, synth.task_weight = 2.0, 3.0
    x = torch.randn(12, D)
    labels = torch.arange(12) % C
    terms, logits = synth.generator_loss(x, labels)
    torch.testing.assert_close(logits, teacher(x))
    torch.testing.assert_close(
        terms["l_kd"], per_sample_kl(student(x), teacher(x)).mean(), rtol=1e-6, atol=1e-7
    )
    expected = 2.0 * terms["l_bn"] + 3.0 * terms["l_task"] - 0.7 * terms["l_kd"]
    torch.testing.assert_close(terms["l_g"], expected)


@pytest.mark.parametrize("alpha", [0.6, 0.0])
def test_student_step_uses_importance_weights_and_stores_priorities(alpha):
    synth, teacher, student = _setup(alpha=alpha)
    synth.synthesize(batch_size=32, steps=2)
    synth.buffer.update_priorities(torch.arange(32), torch.linspace(0.0, 3.0, 32))
    seen = {}
    real_loss, real_update = synth.student_loss, synth.buffer.update_priorities

    def spy_loss(x, weights, teacher_logits=None):
        torch.testing.assert_close(teacher_logits, teacher(x))  # cached = recomputed
        loss, kl = real_loss(x, weights, teacher_logits)
        seen.update(x=x, weights=weights, kl=kl.detach(), loss=loss.detach())
        return loss, kl

    def spy_update(indices, priorities):
        seen.update(indices=indices, priorities=priorities)
        real_update(indices, priorities)

    synth.student_loss, synth.buffer.update_priorities = spy_loss, spy_update
    loss = synth.student_step(batch_size=16)
    w, kl = seen["weights"], seen["kl"]
    assert loss == pytest.approx(((w * kl).sum() / w.sum()).item(), rel=1e-6)  # L_S
    torch.testing.assert_close(seen["priorities"], (w * kl).abs())  # delta = w * KL
    # a sample drawn twice keeps one of its priorities (equal up to rounding of its KL)
    indices, new = seen["indices"], (w * kl).abs().double()
    stored = synth.buffer.priorities[indices]
    for j in range(indices.shape[0]):
        same = indices == indices[j]
        assert torch.isclose(stored[j], new[same], rtol=1e-6, atol=0).any(), (j, stored[j])
    if alpha == 0:
        assert torch.all(w == 1)  # uniform replay: weights 1
    else:
        assert torch.all((w > 0) & (w <= 1)) and w.min() < 1  # max-normalised, not all equal


def test_run_trains_the_student_on_synthetic_data_only():
    synth, teacher, student = _setup()
    lines = []
    history = synth.run(
        30, batch_size=32, student_steps=3, evaluate=lambda: 0.5, log=lines.append, log_every=10
    )
    assert len(history.l_s) == len(history.l_g) == 30 and len(lines) == 3
    assert history.evals == [(10, 0.5), (20, 0.5), (30, 0.5)]
    assert synth.buffer.beta == pytest.approx(1.0)  # beta schedule reached its end
    for curve in (history.l_g, history.l_bn, history.l_task, history.l_kd, history.l_s):
        assert all(map(math.isfinite, curve))
    assert sum(history.l_bn[-5:]) < sum(history.l_bn[:5])
    assert sum(history.l_s[-5:]) < sum(history.l_s[:5])


def test_synthesizer_rejects_a_prefilled_buffer():
    buffer = PrioritizedReplayBuffer(8)
    buffer.add(torch.zeros(2, D))
    with pytest.raises(ValueError, match="buffer must start empty"):
        SSDKDSynthesizer(
            _teacher(),
            nn.Linear(D, C),
            Generator((D,), C),
            buffer,
            torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1),
        )


def test_ssd_kd_example_quick(tmp_path, capsys):
    main = example_main("ssd_kd.py")
    report = main(["--quick", "--out-dir", str(tmp_path)])
    assert "| ssd_kd |" in capsys.readouterr().out
    saved = json.loads((tmp_path / "ssd_kd_results.json").read_text())
    assert set(saved["table"]) == {"ssd_kd", "uniform_replay", "real_data"}
    assert (tmp_path / "ssd_kd_results.png").stat().st_size > 0
    for name in ("ssd_kd", "uniform_replay"):
        (run,) = report["runs"][name]
        assert run["buffer_capacity"] == round(0.1 * 1257)
        for key in ("l_g", "l_bn", "l_task", "l_kd", "l_s"):
            assert all(map(math.isfinite, run[key])), (name, key)
        assert run["l_bn"][-1] < run["l_bn"][0], run["l_bn"]
    (real,) = report["runs"]["real_data"]
    assert real["epoch_losses"][-1] < real["epoch_losses"][0]

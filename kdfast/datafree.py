"""Data-free distillation in the SSD-KD style: a generator against the frozen teacher and a
prioritized replay buffer feeding the student (semantics 5).

Liu et al., "Small Scale Data-Free Knowledge Distillation", CVPR 2024. No official code
exists; the loss forms below are the ones semantics 5 fixes, the rest are documented knobs.

Each round:

1. Synthesis (:meth:`SSDKDSynthesizer.synthesize`): the generator G maps noise and target
   classes y to inputs x and minimises
   ``L_G = bn_weight * L_BN(x) + task_weight * mean(phi(x) * CE(f_t(x), y))
   - lambda_adv * mean KL(f_t(x) || f_s(x))``:
   the teacher's BatchNorm statistics prior (:class:`kdfast.losses.BNStatisticsLoss`), the
   task term modulated by phi (:func:`kdfast.sampling.diversity_difficulty_weights`,
   normalised to mean 1: over-represented and easy classes count less), and the adversarial
   term that seeks inputs where student and teacher disagree. The last batch is added to
   the :class:`~kdfast.sampling.PrioritizedReplayBuffer` (new samples enter with the
   current maximum priority).
2. Student steps (:meth:`SSDKDSynthesizer.student_step`): draw a batch with probability
   P(x) ~ (|delta(x)| + eps)^alpha and importance weights w, minimise
   ``L_S = sum_i w_i KL_i / sum_i w_i``, then store the new priorities
   ``delta = w * KL`` (:func:`kdfast.sampling.ssd_kd_priorities`).

The student sees synthetic samples only. ``alpha = 0`` in the buffer gives uniform replay
(every weight 1): the ablation. The importance exponent beta follows a linear schedule
from its initial value to 1 over :meth:`SSDKDSynthesizer.run`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdfast.functional import per_sample_kl
from kdfast.losses import BNStatisticsLoss
from kdfast.sampling import (
    PrioritizedReplayBuffer,
    diversity_difficulty_weights,
    ssd_kd_priorities,
)

__all__ = ["Generator", "SSDKDSynthesizer", "SSDKDHistory"]


def _first(out: Any) -> Tensor:
    """Logits from a model output: the tensor itself or the first element of a tuple."""
    return out[0] if isinstance(out, (tuple, list)) else out


class Generator(nn.Module):
    """Class-conditional MLP generator: (z (B, latent_dim), y (B,)) -> x (B, *out_shape).

    Linear-BatchNorm-LeakyReLU blocks; the output is a sigmoid rescaled to [low, high]
    (e.g. the valid range of normalised pixels), so synthetic inputs stay in range.

    Args:
        out_shape: per-sample shape of the synthetic inputs, e.g. (1, 8, 8).
        num_classes: C; the target class enters as a learned embedding added to the noise.
        latent_dim: noise width. hidden: hidden width. low, high: output range (low < high).
    """

    def __init__(
        self,
        out_shape: Sequence[int],
        num_classes: int,
        latent_dim: int = 64,
        hidden: int = 256,
        low: float = -1.0,
        high: float = 1.0,
    ) -> None:
        super().__init__()
        if not low < high:
            raise ValueError(f"low must be < high, got low={low}, high={high}")
        self.out_shape = tuple(int(d) for d in out_shape)
        self.num_classes = num_classes
        self.latent_dim = latent_dim
        self.low, self.high = float(low), float(high)
        self.embed = nn.Embedding(num_classes, latent_dim)
        self.net = nn.Sequential(
            nn.Linear(latent_dim, hidden),
            nn.BatchNorm1d(hidden),
            nn.LeakyReLU(0.2),
            nn.Linear(hidden, hidden),
            nn.BatchNorm1d(hidden),
            nn.LeakyReLU(0.2),
            nn.Linear(hidden, math.prod(self.out_shape)),
        )

    def forward(self, z: Tensor, labels: Tensor) -> Tensor:
        if z.dim() != 2 or z.shape[1] != self.latent_dim or labels.shape != z.shape[:1]:
            raise ValueError(
                f"z must be (B, {self.latent_dim}) and labels (B,), got {tuple(z.shape)} and "
                f"{tuple(labels.shape)}"
            )
        x = torch.sigmoid(self.net(z + self.embed(labels)))
        return (self.low + (self.high - self.low) * x).view(-1, *self.out_shape)


@dataclass
class SSDKDHistory:
    """Per-round means: generator losses (L_G and its terms) and the student loss L_S."""

    l_g: list[float] = field(default_factory=list)
    l_bn: list[float] = field(default_factory=list)
    l_task: list[float] = field(default_factory=list)
    l_kd: list[float] = field(default_factory=list)
    l_s: list[float] = field(default_factory=list)
    evals: list[tuple[int, float]] = field(default_factory=list)  # (round, metric)


class SSDKDSynthesizer:
    """Generator + replay buffer + student updates of SSD-KD (see the module docstring).

    Args:
        teacher: frozen model (kept in eval mode; its parameters receive no gradient) with
            BatchNorm layers (their running statistics are the prior).
        student: the model distilled; returns logits or a tuple whose first item is logits.
        generator: a :class:`Generator` (or any module ``(z, labels) -> x``) with attributes
            ``latent_dim`` and ``num_classes``.
        buffer: an empty replay buffer, filled only by this synthesizer (capacity ~10% of
            the training-set size in SSD-KD's small-data regime); ``alpha = 0`` for uniform
            replay.
        student_optimizer: optimiser over the student's parameters.
        generator_lr: Adam learning rate of the generator.
        bn_weight, task_weight, lambda_adv: weights of L_BN, the phi-modulated task term and
            the adversarial KL in L_G [knobs, unverified values].
        gamma: difficulty exponent of phi. temperature: softmax temperature of every KL.
        bn_layer_weights: per-layer weights of L_BN (see BNStatisticsLoss).
        seed: seeds the noise, labels and replay sampling (a CPU torch.Generator).
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        generator: nn.Module,
        buffer: PrioritizedReplayBuffer,
        student_optimizer: torch.optim.Optimizer,
        *,
        generator_lr: float = 1e-3,
        bn_weight: float = 1.0,
        task_weight: float = 1.0,
        lambda_adv: float = 1.0,
        gamma: float = 1.0,
        temperature: float = 1.0,
        bn_layer_weights: Sequence[float] | None = None,
        seed: int = 0,
    ) -> None:
        self.teacher = teacher.eval()
        self.student = student
        self.generator = generator
        self.buffer = buffer
        self.student_optimizer = student_optimizer
        self.generator_optimizer = torch.optim.Adam(
            generator.parameters(), lr=generator_lr, betas=(0.5, 0.999)
        )
        self.bn_loss = BNStatisticsLoss(teacher, bn_layer_weights)
        self.bn_weight, self.task_weight = float(bn_weight), float(task_weight)
        self.lambda_adv, self.gamma = float(lambda_adv), float(gamma)
        self.temperature = float(temperature)
        self.rng = torch.Generator().manual_seed(seed)
        self.device = next(generator.parameters()).device
        if len(buffer):
            raise ValueError(
                f"buffer must start empty (the synthesizer caches the teacher logits of what "
                f"it adds), got {len(buffer)} samples"
            )
        self._teacher_logits: Tensor | None = None  # (capacity, C), by buffer slot

    # ------------------------------------------------------------------ synthesis
    def _noise(self, batch_size: int) -> tuple[Tensor, Tensor]:
        """Noise (B, latent_dim) and class-balanced target labels (B,) in random order."""
        classes = self.generator.num_classes
        labels = torch.arange(batch_size) % classes
        labels = labels[torch.randperm(batch_size, generator=self.rng)]
        z = torch.randn(batch_size, self.generator.latent_dim, generator=self.rng)
        return z.to(self.device), labels.to(self.device)

    def generator_loss(self, x: Tensor, labels: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """(L_G and its terms, teacher logits (B, C)) for synthetic x (B, *), targets (B,)."""
        teacher_logits = _first(self.teacher(x))
        l_bn = self.bn_loss()  # statistics of the teacher pass just made
        phi = diversity_difficulty_weights(teacher_logits, self.gamma)
        phi = phi / phi.mean()
        l_task = (phi * F.cross_entropy(teacher_logits, labels, reduction="none")).mean()
        was_training = self.student.training
        self.student.eval()
        student_logits = _first(self.student(x))
        self.student.train(was_training)
        l_kd = per_sample_kl(student_logits, teacher_logits, self.temperature).mean()
        l_g = self.bn_weight * l_bn + self.task_weight * l_task - self.lambda_adv * l_kd
        terms = {"l_g": l_g, "l_bn": l_bn, "l_task": l_task, "l_kd": l_kd}
        return terms, teacher_logits

    def synthesize(self, batch_size: int, steps: int = 1) -> dict[str, float]:
        """``steps`` generator updates on L_G; adds the last batch to the buffer.

        Returns the mean of each term over the steps. Only the generator's parameters are
        updated (gradients are taken w.r.t. them alone: teacher and student get none).
        """
        params = [p for p in self.generator.parameters() if p.requires_grad]
        self.generator.train()
        sums: dict[str, float] = {}
        x = teacher_logits = None
        for _ in range(steps):
            z, labels = self._noise(batch_size)
            x = self.generator(z, labels)
            terms, teacher_logits = self.generator_loss(x, labels)
            if not torch.isfinite(terms["l_g"]):
                raise FloatingPointError(f"generator loss is {terms['l_g'].item()}")
            grads = torch.autograd.grad(terms["l_g"], params)
            for p, g in zip(params, grads, strict=True):
                p.grad = g
            self.generator_optimizer.step()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.item()
        slots = self.buffer.add(x.detach())
        # The buffer's samples never change: keep their teacher logits (no teacher pass in
        # the student steps). x came from the generator before its last update, as stored.
        logits = teacher_logits.detach()[x.shape[0] - slots.shape[0] :]
        if self._teacher_logits is None:
            self._teacher_logits = logits.new_empty((self.buffer.capacity, logits.shape[1]))
        self._teacher_logits[slots.to(logits.device)] = logits
        return {k: v / steps for k, v in sums.items()}

    # ------------------------------------------------------------------ student
    def student_loss(
        self, x: Tensor, weights: Tensor, teacher_logits: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(L_S = sum w KL / sum w, per-sample KL (B,)) of the student on samples x (B, *).

        weights: importance weights (B,); teacher_logits: (B, C), computed when None.
        """
        if teacher_logits is None:
            with torch.no_grad():
                teacher_logits = _first(self.teacher(x))
        kl = per_sample_kl(_first(self.student(x)), teacher_logits, self.temperature)
        weights = weights.to(kl)
        return (weights * kl).sum() / weights.sum(), kl

    def student_step(self, batch_size: int) -> float:
        """One prioritized-replay student update; stores priorities w * KL. Returns L_S."""
        indices, x, weights = self.buffer.sample(batch_size, generator=self.rng)
        self.student.train()
        loss, kl = self.student_loss(x, weights, self._teacher_logits[indices])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"student loss is {loss.item()}")
        self.student_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.student_optimizer.step()
        self.buffer.update_priorities(indices, ssd_kd_priorities(kl.detach(), weights))
        return loss.item()

    # ------------------------------------------------------------------ loop
    def run(
        self,
        rounds: int,
        *,
        batch_size: int = 64,
        generator_steps: int = 1,
        student_steps: int = 5,
        student_batch_size: int | None = None,
        beta_end: float = 1.0,
        evaluate: Callable[[], float] | None = None,
        log: Callable[[str], None] | None = None,
        log_every: int = 50,
    ) -> SSDKDHistory:
        """``rounds`` x (synthesis, then ``student_steps`` replay updates).

        beta rises linearly from the buffer's initial beta to ``beta_end``. ``evaluate``
        (e.g. student accuracy on held-out data) is called at every progress line.
        """
        history = SSDKDHistory()
        beta0 = self.buffer.beta
        student_batch_size = student_batch_size or batch_size
        for r in range(rounds):
            self.buffer.beta = beta0 + (beta_end - beta0) * r / max(1, rounds - 1)
            terms = self.synthesize(batch_size, generator_steps)
            l_s = [self.student_step(student_batch_size) for _ in range(student_steps)]
            for k, v in terms.items():
                getattr(history, k).append(v)
            history.l_s.append(sum(l_s) / len(l_s))
            if (r + 1) % log_every == 0 or r + 1 == rounds:
                line = (
                    f"  round {r + 1:5d}/{rounds}  L_G {terms['l_g']:8.4f}  "
                    f"(L_BN {terms['l_bn']:.4f}, L_task {terms['l_task']:.4f}, "
                    f"L_KD {terms['l_kd']:.4f})  L_S {history.l_s[-1]:.4f}"
                )
                if evaluate is not None:
                    metric = evaluate()
                    history.evals.append((r + 1, metric))
                    line += f"  eval {metric:.4f}"
                if log is not None:
                    log(line)
        return history

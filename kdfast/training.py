"""A small distillation loop: train a student against a frozen teacher with any kdfast loss.

The loop is deliberately plain (mini-batches from in-memory tensors, one optimiser, no
scheduler) so that the loss callback is the only thing that changes between methods::

    def loss_fn(batch: DistillBatch) -> Tensor:
        return F.cross_entropy(batch.student_out, batch.labels) + kd(
            batch.student_out, batch.teacher_out
        )

    history = distill(student, teacher, x_train, y_train, loss_fn, epochs=50)
    accuracy(student, x_test, y_test)

Whatever the models return (a logits tensor, or a tuple such as (logits, features)) is handed
to the callback unchanged. The teacher runs in eval mode under ``torch.no_grad`` (its
BatchNorm statistics stay frozen); the student is put in train mode for the loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["DistillBatch", "History", "distill", "predict_logits", "accuracy"]


@dataclass
class DistillBatch:
    """What the loss callback sees for one mini-batch.

    inputs: (B, *) student inputs; labels: (B,) int64 class labels; student_out: the
    student's output on ``inputs`` (differentiable); teacher_out: the teacher's output
    (computed under no_grad), or None when no teacher was given; step: the optimiser step
    about to be taken (0-based).
    """

    inputs: Tensor
    labels: Tensor
    student_out: Any
    teacher_out: Any
    step: int


@dataclass
class History:
    """Mean training loss per epoch, optimiser steps taken and wall time in seconds."""

    epoch_losses: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0


def _check_data(inputs: Tensor, labels: Tensor) -> None:
    if not isinstance(inputs, Tensor) or not isinstance(labels, Tensor):
        raise TypeError(
            f"inputs and labels must be tensors, got {type(inputs).__name__} and "
            f"{type(labels).__name__}"
        )
    if inputs.dim() < 1 or labels.dim() != 1 or inputs.shape[0] != labels.shape[0]:
        raise ValueError(
            f"inputs must be (N, *) and labels (N,) with the same N, got "
            f"{tuple(inputs.shape)} and {tuple(labels.shape)}"
        )
    if inputs.shape[0] == 0:
        raise ValueError("inputs must hold at least one sample, got N = 0")


def distill(
    student: nn.Module,
    teacher: Callable[[Tensor], Any] | None,
    inputs: Tensor,
    labels: Tensor,
    loss_fn: Callable[[DistillBatch], Tensor],
    *,
    epochs: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    extra_params: Iterable[nn.Parameter] = (),
    augment: Callable[[Tensor, torch.Generator | None], Tensor] | None = None,
    generator: torch.Generator | None = None,
    log: Callable[[str], None] | None = None,
    log_every: int = 10,
    drop_last: bool = True,
) -> History:
    """Train ``student`` for ``epochs`` passes over (inputs, labels) with AdamW.

    Args:
        student: the model trained (its parameters, plus ``extra_params``, are optimised).
        teacher: frozen model or callable run under no_grad on each batch, or None (plain
            training: ``teacher_out`` is None).
        inputs: (N, *) training inputs; labels: (N,) int64 labels.
        loss_fn: ``DistillBatch -> scalar loss``.
        epochs: passes over the data (>= 1); batch_size: mini-batch size (>= 2).
        lr, weight_decay: AdamW settings.
        extra_params: more trainable parameters, e.g. ``VkDLoss(...).parameters()`` (the
            orthogonal projector) or a feature adapter.
        augment: ``(inputs batch, generator) -> augmented batch``, applied before both
            models see the batch (the teacher labels the augmented view: with a teacher,
            augmentation turns a small labelled set into many distinct teacher targets).
        generator: CPU torch.Generator for the shuffling and ``augment`` (reproducible runs).
        log: called with a progress line every ``log_every`` epochs (e.g. ``print``).
        drop_last: drop a trailing partial batch (batch statistics losses such as DIST's
            intra-class term and RKD need more than one row).

    Returns a :class:`History`. Raises FloatingPointError as soon as a loss is not finite.
    """
    _check_data(inputs, labels)
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    if not isinstance(batch_size, int) or batch_size < 2:
        raise ValueError(f"batch_size must be an int >= 2, got {batch_size!r}")
    if isinstance(teacher, nn.Module):
        teacher.eval()
    params = [p for p in student.parameters() if p.requires_grad]
    params += [p for p in extra_params if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    n = inputs.shape[0]
    if drop_last and n < batch_size:
        batch_size = n  # a subset smaller than one batch is one (full) batch
    history = History()
    start = time.perf_counter()
    student.train()
    for epoch in range(epochs):
        order = torch.randperm(n, generator=generator).to(inputs.device)
        stop = n - n % batch_size if drop_last else n
        total, count = 0.0, 0
        for first in range(0, stop, batch_size):
            idx = order[first : first + batch_size]
            x, y = inputs[idx], labels[idx]
            if augment is not None:
                x = augment(x, generator)
            teacher_out = None
            if teacher is not None:
                with torch.no_grad():
                    teacher_out = teacher(x)
            batch = DistillBatch(x, y, student(x), teacher_out, history.steps)
            loss = loss_fn(batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"loss is {loss.item()} at epoch {epoch}, step {history.steps}"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            history.steps += 1
            total += loss.item() * idx.shape[0]
            count += idx.shape[0]
        history.epoch_losses.append(total / count)
        if log is not None and ((epoch + 1) % log_every == 0 or epoch + 1 == epochs):
            log(f"  epoch {epoch + 1:4d}/{epochs}  loss {history.epoch_losses[-1]:.4f}")
    history.seconds = time.perf_counter() - start
    student.eval()
    return history


@torch.no_grad()
def predict_logits(
    model: Callable[[Tensor], Any],
    inputs: Tensor,
    select: Callable[[Any], Tensor] | None = None,
    batch_size: int = 1024,
) -> Tensor:
    """Logits (N, C) of ``model`` on ``inputs`` (N, *), in eval mode, in batches.

    ``select`` maps the model's output to the logits (e.g. ``lambda out: out[0]`` for a
    model returning (logits, features)); by default a tuple output's first element is taken.
    """
    if isinstance(model, nn.Module):
        model.eval()
    chunks = []
    for first in range(0, inputs.shape[0], batch_size):
        out = model(inputs[first : first + batch_size])
        if select is not None:
            out = select(out)
        elif isinstance(out, (tuple, list)):
            out = out[0]
        chunks.append(out)
    return torch.cat(chunks)


def accuracy(
    model: Callable[[Tensor], Any],
    inputs: Tensor,
    labels: Tensor,
    select: Callable[[Any], Tensor] | None = None,
) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` on (inputs (N, *), labels (N,)); see predict_logits."""
    _check_data(inputs, labels)
    logits = predict_logits(model, inputs, select)
    return (logits.argmax(dim=1) == labels).sum().item() / labels.shape[0]

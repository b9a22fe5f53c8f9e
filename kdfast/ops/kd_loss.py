"""Compiled fused softmax + KL ops: ``kdfast::kd_loss_cpp`` (CPU), with fake kernels,
autograd and the dispatcher registration of ``kd_loss`` and ``per_sample_kl`` (SPEC 3).

The op returns ``(loss, grad_student, grad_teacher)``: the gradients (for a unit upstream
gradient; per row for reduction "none") are written in the forward pass when the flags ask
for it, which the wrappers set from ``torch.is_grad_enabled()`` and ``requires_grad``;
empty (0,) tensors otherwise. The backward scales them (``kdfast::scale_saved_grad``), and
differentiating that backward raises (once-differentiable). The DeiT soft term is
``kd_loss(..., reduction="mean")``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdfast import _dispatch, _extension
from kdfast._validation import compute_dtype, logit_rows
from kdfast.ops._common import (
    grad_flags,
    grad_or_empty,
    logits_for,
    saved_grad_backward,
    setup_saved_grad,
)


def _fake(s, t, temperature, loss_scale, reduction, mask, teacher_kind, grad_s, grad_t):
    shape = (logit_rows(s),) if reduction == "none" else ()
    loss = s.new_empty(shape, dtype=compute_dtype(s, t))
    return loss, grad_or_empty(s, grad_s), grad_or_empty(t, grad_t)


def register_op(name: str) -> None:
    """Fake kernel and autograd of a kd_loss-schema op (shared by the Triton op)."""
    torch.library.register_fake(name)(_fake)

    def backward(ctx, grad, _grad_s, _grad_t):
        return (*saved_grad_backward(ctx, grad), None, None, None, None, None, None, None)

    torch.library.register_autograd(name, backward, setup_context=setup_saved_grad)


def make_impls(op, layout: str = "strided"):
    """(kd_loss, per_sample_kl) implementations calling ``op`` with the grad flags;
    ``layout``: how ``op`` takes (N, C, S) logits (:data:`LOGIT_LAYOUTS`)."""

    def kd_loss(s: Tensor, t: Tensor, temperature, reduction, mask, teacher) -> Tensor:
        s, t = logits_for(layout, s, t)
        need_s, need_t = grad_flags(s, t)
        return op(s, t, temperature, temperature**2, reduction, mask, teacher, need_s, need_t)[0]

    def per_sample_kl(s: Tensor, t: Tensor, temperature) -> Tensor:
        s, t = logits_for(layout, s, t)
        need_s, need_t = grad_flags(s, t)
        return op(s, t, temperature, 1.0, "none", None, "logits", need_s, need_t)[0]

    kd_loss.op = per_sample_kl.op = op
    kd_loss.layout = per_sample_kl.layout = layout
    return kd_loss, per_sample_kl


def register_backend(backend: str, op, devices, layout: str = "strided") -> None:
    kd_loss, per_sample_kl = make_impls(op, layout)
    _dispatch.implement("kd_loss", backend, kd_loss, devices=devices)
    _dispatch.implement("per_sample_kl", backend, per_sample_kl, devices=devices)


if _extension.unavailable_reason() is None:
    register_op("kdfast::kd_loss_cpp")
    register_backend("cpp", torch.ops.kdfast.kd_loss_cpp.default, {"cpu"})
if _dispatch.BACKENDS["triton"].unavailable is None:
    import kdfast.triton.kd_loss  # noqa: F401  (registers kdfast::kd_loss_triton)

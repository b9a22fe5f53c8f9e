"""Compiled fused DIST op ``kdfast::dist_loss_cpp`` (CPU), with fake kernel, autograd and
dispatcher registration (SPEC 2).

Same contract as :mod:`kdfast.ops.kd_loss`: ``(loss, grad_student, grad_teacher)``, the
gradients written in the forward pass only when the flags (from ``torch.is_grad_enabled()``
and ``requires_grad``) ask for them; once-differentiable.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdfast import _dispatch, _extension
from kdfast.ops._common import (
    grad_flags,
    grad_or_empty,
    logits_for,
    saved_grad_backward,
    scalar_like,
    setup_saved_grad,
)


def _fake(s, t, beta, gamma, tau, tau_squared, activation, mask, grad_s, grad_t):
    return scalar_like(s, t), grad_or_empty(s, grad_s), grad_or_empty(t, grad_t)


def register_op(name: str) -> None:
    """Fake kernel and autograd of a dist_loss-schema op (shared by the Triton op)."""
    torch.library.register_fake(name)(_fake)

    def backward(ctx, grad, _grad_s, _grad_t):
        return (*saved_grad_backward(ctx, grad), *(None,) * 8)

    torch.library.register_autograd(name, backward, setup_context=setup_saved_grad)


def make_impl(op, layout: str = "strided"):
    """The dist_loss implementation calling ``op`` with the grad flags; ``layout``: how
    ``op`` takes (N, C, S) logits (:data:`kdfast.ops._common.LOGIT_LAYOUTS`)."""

    def dist_loss(s: Tensor, t: Tensor, beta, gamma, tau, tau_squared, activation, mask):
        s, t = logits_for(layout, s, t)
        need_s, need_t = grad_flags(s, t)
        return op(s, t, beta, gamma, tau, tau_squared, activation, mask, need_s, need_t)[0]

    dist_loss.op = op
    dist_loss.layout = layout
    return dist_loss


if _extension.unavailable_reason() is None:
    register_op("kdfast::dist_loss_cpp")
    _dispatch.implement(
        "dist_loss",
        "cpp",
        make_impl(torch.ops.kdfast.dist_loss_cpp.default),
        devices={"cpu"},
    )
if _dispatch.BACKENDS["triton"].unavailable is None:
    import kdfast.triton.dist_loss  # noqa: F401  (registers kdfast::dist_loss_triton)

"""The ``rkd_loss`` op: RKDLoss with both terms (semantics 1.4), distance_weight * L_D +
angle_weight * L_A, and its samples.

* reference: :func:`kdfast.reference.rkd_loss.rkd_loss` (the two reference terms);
* cpp: ``kdfast::rkd_loss_cpp`` (csrc/rkd_loss_op.cpp on the CPU kernels of rkd_distance_cpp
  and rkd_angle_cpp): each side's centred float64 Gram matrix is formed once (one GEMM) and
  shared by both terms. When a gradient will be needed the forward also returns the two Gram
  matrices (O(N^2) float64 each, up to N = :data:`SAVE_GRAM_MAX_ROWS`) and
  ``kdfast::rkd_loss_cpp_backward`` reuses them: one training step forms each side's Gram
  matrix once, where the separate ops form it four times (two terms, forward and backward).
  Above that size the backward forms them again (twice per step). ``rkd_distance`` on cpp
  runs this op too (angle_weight 0) when a gradient will be needed, so that its backward
  needs one GEMM (to the features) instead of three.

The cuda and triton backends have no combined op: :func:`kdfast.functional.rkd_loss` adds
their ``rkd_distance`` and ``rkd_angle`` ops (it takes the combined op only when its backend
is the one ``rkd_angle`` would run on). Near pairs and exact duplicates are handled as in the
two ops (csrc/rkd_exact.h), on the same Gram matrix.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdfast import _dispatch, _extension
from kdfast.ops._common import forbid_double_backward, grad_or_empty, scalar_like
from kdfast.ops._samples import BadInput, Contract, declare
from kdfast.ops.rkd_distance import feature_bad_inputs, feature_samples
from kdfast.reference.rkd_loss import rkd_loss as reference

#: largest N whose Gram matrices the forward saves for the backward (2 N^2 float64 values:
#: 256 MiB at 4096); above it the backward forms them again
SAVE_GRAM_MAX_ROWS = 4096


def _saves_gram(student: Tensor, teacher: Tensor) -> bool:
    """Whether the forward should return the Gram matrices for the backward: a gradient
    will be needed and they fit (N <= SAVE_GRAM_MAX_ROWS)."""
    return (
        torch.is_grad_enabled()
        and (student.requires_grad or teacher.requires_grad)
        and student.shape[0] <= SAVE_GRAM_MAX_ROWS
    )


def _cpp(student: Tensor, teacher: Tensor, distance_weight: float, angle_weight: float) -> Tensor:
    save = _saves_gram(student, teacher)
    return torch.ops.kdfast.rkd_loss_cpp(student, teacher, distance_weight, angle_weight, save)[0]


def _cpp_distance(student: Tensor, teacher: Tensor) -> Tensor:
    """``rkd_distance`` on cpp: when a gradient will be needed, the combined op with
    angle_weight 0, whose backward reuses the forward's Gram matrices (one GEMM instead of
    three); otherwise ``kdfast::rkd_distance_cpp``, which saves nothing."""
    if _saves_gram(student, teacher):
        return torch.ops.kdfast.rkd_loss_cpp(student, teacher, 1.0, 0.0, True)[0]
    return torch.ops.kdfast.rkd_distance_cpp(student, teacher)


def _register_cpp() -> None:
    @torch.library.register_fake("kdfast::rkd_loss_cpp")
    def _(student, teacher, distance_weight, angle_weight, save_gram):
        n = student.shape[0]
        shape = (n, n) if save_gram else (0,)
        gram_s = student.new_empty(shape, dtype=torch.float64)
        gram_t = student.new_empty(shape, dtype=torch.float64)
        return scalar_like(student, teacher), gram_s, gram_t

    @torch.library.register_fake("kdfast::rkd_loss_cpp_backward")
    def _(grad, student, teacher, gram_s, gram_t, dw, aw, student_grad, teacher_grad):
        return grad_or_empty(student, student_grad), grad_or_empty(teacher, teacher_grad)

    def setup_context(ctx, inputs, output):
        student, teacher, distance_weight, angle_weight, _ = inputs
        _, gram_s, gram_t = output
        ctx.mark_non_differentiable(gram_s, gram_t)
        ctx.set_materialize_grads(False)  # the Gram outputs' gradients are never used
        ctx.weights = (distance_weight, angle_weight)
        ctx.save_for_backward(student, teacher, gram_s, gram_t)

    def backward(ctx, grad, *_):
        need_s, need_t = ctx.needs_input_grad[:2]
        if grad is None or not (need_s or need_t):
            return None, None, None, None, None
        student, teacher, gram_s, gram_t = ctx.saved_tensors
        grad_s, grad_t = torch.ops.kdfast.rkd_loss_cpp_backward(
            grad, student, teacher, gram_s, gram_t, *ctx.weights, need_s, need_t
        )
        return grad_s if need_s else None, grad_t if need_t else None, None, None, None

    torch.library.register_autograd("kdfast::rkd_loss_cpp", backward, setup_context=setup_context)
    forbid_double_backward("kdfast::rkd_loss_cpp_backward")
    _dispatch.implement("rkd_loss", "cpp", _cpp, devices={"cpu"})
    # replaces kdfast/ops/rkd_distance.py's cpp entry (kdfast::rkd_distance_cpp alone)
    _dispatch.implement("rkd_distance", "cpp", _cpp_distance, devices={"cpu"})


_dispatch.implement("rkd_loss", "reference", reference)
if _extension.unavailable_reason() is None:
    _register_cpp()


# --- samples ---------------------------------------------------------------------------
# Those of rkd_angle (N = 12, near duplicates 1e-7 apart) through RKDLoss's default weights.
declare(
    Contract(
        "rkd_loss",
        "kdfast.functional:rkd_loss",
        feature_samples(12, near=1e-7, min_rows=3),
        bad_inputs=feature_bad_inputs("rkd_loss", 3)
        + (
            BadInput(
                "negative_weight",
                lambda: ((torch.randn(5, 3), torch.randn(5, 2), -1.0, 2.0), {}),
                ValueError,
                "distance_weight",
            ),
            BadInput(
                "both_weights_zero",
                lambda: ((torch.randn(5, 3), torch.randn(5, 2), 0.0, 0.0), {}),
                ValueError,
                "both 0",
            ),
        ),
    )
)

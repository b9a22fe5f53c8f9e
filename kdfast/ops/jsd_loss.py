"""The ``jsd_loss`` op (generalised Jensen-Shannon divergence over logits): every backend's
implementation and its samples.

* reference: :func:`kdfast.reference.jsd_loss.jsd_loss`;
* cpp: ``kdfast::jsd_loss_cpp`` (csrc/cpu/jsd_loss.cpp, which also holds its schema);
* triton: ``kdfast::jsd_loss_triton`` around :func:`kdfast.triton.jsd_loss.jsd_loss_triton`
  (the same schema). Not yet run on a GPU: on CUDA devices it is opt-in
  (``kdfast.use_backend("triton")``) until a recorded GPU run passes it
  (kdfast/gpu_results.json, ``needs_gpu_record``).

Same contract as :mod:`kdfast.ops.kd_loss`: ``(loss, grad_student, grad_teacher)``, the
gradients (for a unit upstream gradient; per row for reduction "none") written in the
forward pass only when the flags (from ``torch.is_grad_enabled()`` and ``requires_grad``)
ask for them; once-differentiable. The cpp kernel takes (rows, C) logits: (N, C, S) logits
reach it as a permuted copy (the "rows" layout); the Triton kernel reads contiguous
(N, C, S) logits in place (the "contiguous" layout).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdfast import _dispatch, _extension
from kdfast._validation import compute_dtype, logit_rows
from kdfast.ops._common import (
    define_op,
    grad_flags,
    grad_or_empty,
    logits_for,
    saved_grad_backward,
    setup_saved_grad,
)
from kdfast.ops._samples import BadInput, Contract, Sample, declare, randn
from kdfast.ops.kd_loss import logit_bad_inputs, logit_samples
from kdfast.reference.jsd_loss import jsd_loss as reference


def _fake(s, t, beta, temperature, reduction, mask, grad_s, grad_t):
    shape = (logit_rows(s),) if reduction == "none" else ()
    loss = s.new_empty(shape, dtype=compute_dtype(s, t))
    return loss, grad_or_empty(s, grad_s), grad_or_empty(t, grad_t)


def register_op(name: str) -> None:
    """Fake kernel and autograd of a jsd_loss-schema op."""
    torch.library.register_fake(name)(_fake)

    def backward(ctx, grad, _grad_s, _grad_t):
        return (*saved_grad_backward(ctx, grad), *(None,) * 6)

    torch.library.register_autograd(name, backward, setup_context=setup_saved_grad)


def make_impl(op, layout: str = "rows"):
    """The jsd_loss implementation calling ``op`` with the grad flags; ``layout``: how
    ``op`` takes (N, C, S) logits (:data:`kdfast.ops._common.LOGIT_LAYOUTS`)."""

    def jsd_loss(s: Tensor, t: Tensor, beta, temperature, reduction, mask) -> Tensor:
        s, t = logits_for(layout, s, t)
        need_s, need_t = grad_flags(s, t)
        return op(s, t, beta, temperature, reduction, mask, need_s, need_t)[0]

    jsd_loss.op = op
    jsd_loss.layout = layout
    return jsd_loss


_dispatch.implement("jsd_loss", "reference", reference)
if _extension.unavailable_reason() is None:
    register_op("kdfast::jsd_loss_cpp")
    impl = make_impl(torch.ops.kdfast.jsd_loss_cpp.default)
    _dispatch.implement("jsd_loss", "cpp", impl, devices={"cpu"})
if _dispatch.BACKENDS["triton"].unavailable is None:
    from kdfast.triton import jsd_loss as _kernels

    define_op("kdfast::jsd_loss_triton", _kernels.jsd_loss_triton)
    register_op("kdfast::jsd_loss_triton")
    impl = make_impl(torch.ops.kdfast.jsd_loss_triton.default, "contiguous")
    _dispatch.implement("jsd_loss", "triton", impl, needs_gpu_record=True)


# --- samples ---------------------------------------------------------------------------


def _args(**kwargs):
    return lambda: ((torch.randn(4, 5), torch.randn(4, 5)), kwargs)


def _near(beta: float):
    """A teacher 0.01 away from the student (late in training): the loss is second order
    in the difference, where log m must keep its relative accuracy."""

    def make(gen):
        s = 3 * randn(gen, 16, 300)
        return (s, s + 0.01 * randn(gen, 16, 300)), {"beta": beta}

    return make


declare(
    Contract(
        "jsd_loss",
        "kdfast.functional:jsd_loss",
        logit_samples(
            {
                "beta_0": {"beta": 0.0, "temperature": 2.0},
                "beta_1": {"beta": 1.0, "temperature": 2.0},
                "beta_0.1": {"beta": 0.1},
                "beta_0.9_sum": {"beta": 0.9, "reduction": "sum", "temperature": 3.0},
                "mean": {"reduction": "mean", "temperature": 0.5},
                "none": {"reduction": "none", "beta": 0.3},
                "none_beta_1": {"reduction": "none", "beta": 1.0},
                "beta_1e-4": {"beta": 1e-4, "reduction": "none"},
                "beta_1-1e-4": {"beta": 1 - 1e-4, "temperature": 2.0},
            }
        )
        + (Sample("near_teacher", _near(0.5)), Sample("near_teacher_beta_0.05", _near(0.05))),
        bad_inputs=logit_bad_inputs(("student_logits", "teacher_logits"))
        + (
            BadInput(
                "mask_length",
                _args(mask=torch.ones(3).bool()),
                ValueError,
                "mask must have 4 entries",
            ),
            BadInput("beta_above_one", _args(beta=1.5), ValueError, r"beta must be in \[0, 1\]"),
            BadInput("beta_nan", _args(beta=float("nan")), ValueError, "beta must be in"),
            BadInput("beta_bool", _args(beta=True), TypeError, "beta must be a real number"),
            BadInput("temperature_zero", _args(temperature=0.0), ValueError, "temperature"),
            BadInput(
                "temperature_inf",
                _args(temperature=float("inf")),
                ValueError,
                "temperature must be finite",
            ),
            BadInput("reduction", _args(reduction="avg"), ValueError, "reduction must be one of"),
        ),
    )
)

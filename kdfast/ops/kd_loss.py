"""The ``kd_loss`` and ``per_sample_kl`` ops (fused softmax + KL, semantics 3): every backend's
implementation and their samples.

* reference: :mod:`kdfast.reference.kd_loss`;
* cpp: ``kdfast::kd_loss_cpp`` (csrc/cpu/kd_loss.cpp);
* triton: ``kdfast::kd_loss_triton`` around :func:`kdfast.triton.kd_loss.kd_loss_triton`.

The compiled op returns ``(loss, grad_student, grad_teacher)``: the gradients (for a unit
upstream gradient; per row for reduction "none") are written in the forward pass when the
flags ask for it, which the wrappers set from ``torch.is_grad_enabled()`` and
``requires_grad``; empty (0,) tensors otherwise. The backward scales them
(``kdfast::scale_saved_grad``), and differentiating that backward raises
(once-differentiable). The DeiT soft term is ``kd_loss(..., reduction="mean")``.
"""

from __future__ import annotations

import dataclasses

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
from kdfast.reference import kd_loss as reference


def _fake(s, t, temperature, loss_scale, reduction, mask, teacher_kind, grad_s, grad_t):
    shape = (logit_rows(s),) if reduction == "none" else ()
    loss = s.new_empty(shape, dtype=compute_dtype(s, t))
    return loss, grad_or_empty(s, grad_s), grad_or_empty(t, grad_t)


def register_op(name: str) -> None:
    """Fake kernel and autograd of a kd_loss-schema op."""
    torch.library.register_fake(name)(_fake)

    def backward(ctx, grad, _grad_s, _grad_t):
        return (*saved_grad_backward(ctx, grad), None, None, None, None, None, None, None)

    torch.library.register_autograd(name, backward, setup_context=setup_saved_grad)


def make_impls(op, layout: str = "strided"):
    """(kd_loss, per_sample_kl) implementations calling ``op`` with the grad flags;
    ``layout``: how ``op`` takes (N, C, S) logits (:data:`LOGIT_LAYOUTS`)."""

    def kd_loss(s: Tensor, t: Tensor, temperature, reduction, mask, teacher_kind) -> Tensor:
        s, t = logits_for(layout, s, t)
        need_s, need_t = grad_flags(s, t)
        return op(s, t, temperature, temperature**2, reduction, mask, teacher_kind, need_s, need_t)[
            0
        ]

    def per_sample_kl(s: Tensor, t: Tensor, temperature) -> Tensor:
        s, t = logits_for(layout, s, t)
        need_s, need_t = grad_flags(s, t)
        return op(s, t, temperature, 1.0, "none", None, "logits", need_s, need_t)[0]

    kd_loss.op = per_sample_kl.op = op
    kd_loss.layout = per_sample_kl.layout = layout
    return kd_loss, per_sample_kl


#: the fused kernels sum pt (log pt - log ps), whose terms are about 1/T and whose KL is
#: about 1/T^2: above this temperature the float32 cancellation can exceed the tolerance
#: table's 1e-5 (measured on N(0, 1) logits: 4e-6 at T = 10, 1e-5 at 16, 1.3 at 1e4), so the
#: reference's cancellation-free form runs instead
FUSED_MAX_TEMPERATURE = 10.0


def _temperature_limit(*args, **kwargs) -> str | None:
    """(s, t, temperature[, reduction, mask, teacher_kind]) as the implementations take them;
    a call without the temperature (a backend query by tensors alone) is not limited."""
    temperature = args[2] if len(args) > 2 else kwargs.get("temperature")
    teacher_kind = args[5] if len(args) > 5 else kwargs.get("teacher_kind", "logits")
    if temperature is not None and teacher_kind == "logits":
        if temperature > FUSED_MAX_TEMPERATURE:
            return (
                f"temperature {temperature:g} > {FUSED_MAX_TEMPERATURE:g}: the fused KL sum "
                "cancels in float32 there; the reference's cancellation-free form runs"
            )
    return None


def register_backend(backend: str, op, devices, layout: str = "strided") -> None:
    kd_loss, per_sample_kl = make_impls(op, layout)
    for name, fn in (("kd_loss", kd_loss), ("per_sample_kl", per_sample_kl)):
        _dispatch.implement(name, backend, fn, devices=devices, limit=_temperature_limit)


_dispatch.implement("kd_loss", "reference", reference.kd_loss)
_dispatch.implement("per_sample_kl", "reference", reference.per_sample_kl)
if _extension.unavailable_reason() is None:
    register_op("kdfast::kd_loss_cpp")
    register_backend("cpp", torch.ops.kdfast.kd_loss_cpp.default, {"cpu"})
if _dispatch.BACKENDS["triton"].unavailable is None:
    from kdfast.triton import kd_loss as _kernels

    define_op("kdfast::kd_loss_triton", _kernels.kd_loss_triton)
    register_op("kdfast::kd_loss_triton")
    register_backend("triton", torch.ops.kdfast.kd_loss_triton.default, None, "contiguous")


# --- samples ---------------------------------------------------------------------------


def logit_samples(
    variants: dict[str, dict],
    masks: bool = True,
    expanded_options: dict | None = None,
    gaps: dict[str, tuple[tuple[str, str], ...]] | None = None,
) -> tuple[Sample, ...]:
    """Random and adversarial (student, teacher) logit cases shared by the logit ops, each
    with default options, then ``variants`` (name -> keyword options) on random logits.

    Inputs: random (12, 37) logits; extreme (80 * N(0, 1)); one row; uniform rows
    (constant logits on either side); 130 classes; (N, C, S) = (2, 7, 5) logits read in
    place; transposed (non-contiguous) and expanded teacher rows (with ``expanded_options``:
    identical rows make a per-class statistic degenerate); with ``masks``, a mask dropping
    every third row, also over (N, C, S) logits. ``gaps``: sample name -> its known
    accuracy gaps (:class:`Sample`'s ``gaps``).
    """

    def pair(rows=12, cols=37, scale=1.0):
        def make(gen):
            return (scale * randn(gen, rows, cols), 2 * scale * randn(gen, rows, cols)), {}

        return make

    def uniform_rows(gen):
        (s, t), _ = pair()(gen)
        s[1], t[2], t[1] = 0.5, -3.0, 7.0
        return (s, t), {}

    def spatial(gen):
        return (randn(gen, 2, 7, 5), 2 * randn(gen, 2, 7, 5)), {}

    def masked(make, rows):
        def with_mask(gen):
            args, kwargs = make(gen)
            keep = torch.ones(rows, dtype=torch.bool)
            keep[::3] = False
            return args, {**kwargs, "mask": keep}

        return with_mask

    def expanded_teacher(gen):
        return (randn(gen, 12, 37), 2 * randn(gen, 1, 37)), dict(expanded_options or {})

    def with_options(options, make=None):
        make = make or pair()

        def variant(gen):
            args, kwargs = make(gen)
            return options.get("transform", lambda a: a)(args), {
                **kwargs,
                **{k: v for k, v in options.items() if k != "transform"},
            }

        return variant

    samples = [
        Sample("random", pair()),
        Sample("tiny", pair(rows=4, cols=5), frozenset({"small"})),
        Sample("extreme", pair(scale=80.0)),
        Sample("one_row", pair(rows=1)),
        Sample("uniform_rows", uniform_rows),
        Sample("wide", pair(rows=3, cols=130)),
        Sample("spatial", spatial),
        Sample(
            "transposed",
            lambda gen: ((randn(gen, 37, 12), randn(gen, 37, 12)), {}),
            view=lambda a: (a[0].T, a[1].T),
        ),  # fmt: skip
        Sample("expanded_teacher", expanded_teacher, view=lambda a: (a[0], a[1].expand(12, -1))),
    ]
    if masks:
        samples += [
            Sample("masked", masked(pair(), 12)),
            Sample("tiny_masked", masked(pair(rows=4, cols=5), 4), frozenset({"small"})),
            Sample("spatial_masked", masked(spatial, 10)),
        ]
    samples += [Sample(name, with_options(opts)) for name, opts in variants.items()]
    gaps = gaps or {}
    return tuple(dataclasses.replace(s, gaps=gaps.get(s.name, ())) for s in samples)


def _teacher_as(kind: str, temperature: float):
    """Turns teacher logits into ``kind`` ("probs" / "log_probs") at ``temperature``."""
    fn = torch.softmax if kind == "probs" else torch.log_softmax

    def transform(args):
        s, t = args
        return s, fn(t / temperature, dim=1)

    return {"teacher_kind": kind, "temperature": temperature, "transform": transform}


def logit_bad_inputs(public_names: tuple[str, str]) -> tuple[BadInput, ...]:
    """Arguments every logit loss rejects with a clear error."""
    z = torch.randn(4, 5)
    s_name, _ = public_names
    return (
        BadInput("shapes_differ", lambda: ((z, z[:, :4]), {}), ValueError, "same shape"),
        BadInput("integer", lambda: ((z.long(), z), {}), TypeError, f"{s_name} must be float"),
        BadInput("one_dim", lambda: ((z[0], z[0]), {}), ValueError, s_name),
        BadInput("empty", lambda: ((z[:0], z[:0]), {}), ValueError, "non-empty"),
    )


_KD_BAD = logit_bad_inputs(("student_logits", "teacher_logits"))
declare(
    Contract(
        "kd_loss",
        "kdfast.functional:kd_loss",
        logit_samples(
            {
                "temperature_4": {"temperature": 4.0},
                "sum": {"reduction": "sum", "temperature": 2.0},
                "mean": {"reduction": "mean"},
                "none": {"reduction": "none", "temperature": 3.0},
                "teacher_probs": _teacher_as("probs", 2.0),
                "teacher_log_probs": _teacher_as("log_probs", 4.0),
            }
        ),
        bad_inputs=_KD_BAD
        + (
            BadInput(
                "mask_length",
                lambda: ((torch.randn(4, 5), torch.randn(4, 5)), {"mask": torch.ones(3).bool()}),
                ValueError,
                "mask must have 4 entries",
            ),
            BadInput(
                "temperature_zero",
                lambda: ((torch.randn(4, 5), torch.randn(4, 5)), {"temperature": 0.0}),
                ValueError,
                "temperature",
            ),
            BadInput(
                "reduction",
                lambda: ((torch.randn(4, 5), torch.randn(4, 5)), {"reduction": "avg"}),
                ValueError,
                "reduction must be one of",
            ),
        ),
    )
)
declare(
    Contract(
        "per_sample_kl",
        "kdfast.functional:per_sample_kl",
        logit_samples({"temperature_3": {"temperature": 3.0}}, masks=False),
        bad_inputs=_KD_BAD,
    )
)

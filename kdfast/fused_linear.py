"""Fused linear-head distillation: the loss of ``x W^T + b`` logits without materialising
them (semantics 3.2).

The tokens are processed in row chunks. Per chunk: the two heads' (chunk, V) logits, the
per-token divergence through kdfast's dispatched logit ops (``kd_loss`` / ``jsd_loss`` with
reduction "none": the compiled row kernels on CPU, Triton's where it has them), the hard
cross-entropy, and the logit gradient, which is folded at once into
``grad_input[chunk] = dZ W`` and ``grad_weight += dZ^T X`` (and ``grad_bias += sum dZ``).
No (T, V) tensor ever exists; the largest temporaries are a few (chunk, V) buffers.

For the scalar reductions the gradients are computed in the forward pass (as Liger-Kernel
does) and scaled by the upstream gradient in the backward. For "none" the forward computes
the losses only and the backward recomputes the chunks with the per-token upstream
gradient (the GEMMs run twice).

This op sits above the dispatcher rather than in it: it is a composition of dispatched
logit ops and GEMMs, the same code on every device and backend, so registering it per
backend would copy it under every name. Forcing the "reference" backend runs the
materialised reference (:mod:`kdfast.reference.fused_linear_distill`) instead.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from kdfast import _dispatch, _fused_linear_dist
from kdfast._constants import FUSED_DIVERGENCES, FUSED_REDUCTIONS
from kdfast._validation import (
    check_choice,
    check_positive,
    check_real,
    check_tensor,
    check_unit_interval,
    compute_dtype,
)
from kdfast.reference import fused_linear_distill as reference
from kdfast.reference.fused_linear_distill import (
    DistillOptions,
    combine_rows,
    head_logits,
    kept_tokens,
)
from kdfast.reference.kd_loss import reduce_rows

#: bytes of (chunk, V) temporaries the automatic chunk size aims at
CHUNK_MEMORY_BUDGET = 256 << 20
#: (chunk, V) buffers alive at once per chunk: both logits, the kernel's saved gradient,
#: the cross-entropy's log-softmax and gradient, the scaled logit gradient
CHUNK_BUFFERS = 6


def auto_chunk_size(
    tokens: int, vocab: int, dtype: torch.dtype, buffers: int = CHUNK_BUFFERS
) -> int:
    """Rows per chunk so that the chunk's ``buffers`` (chunk, V) temporaries fit
    :data:`CHUNK_MEMORY_BUDGET`."""
    per_row = buffers * vocab * compute_dtype(dtype).itemsize
    return max(1, min(tokens, CHUNK_MEMORY_BUDGET // per_row))


def _check_optional(name: str, x, shape: tuple[int, ...], what: str) -> None:
    if x is None:
        return
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(x).__name__}")
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} ({what}), got {tuple(x.shape)}")


def check_inputs(xs, ws, bs, xt, wt, bt, labels, mask):
    """Validate the tensors; return (xs, xt) as (T, H) and labels / mask as (T,)."""
    names = ("student_input", "student_weight", "teacher_input", "teacher_weight")
    for name, x in zip(names, (xs, ws, xt, wt), strict=True):
        check_tensor(name, x)
    for name, b in (("student_bias", bs), ("teacher_bias", bt)):
        if b is not None:
            check_tensor(name, b)
    tensors = dict(zip(names, (xs, ws, xt, wt), strict=True))
    tensors.update(student_bias=bs, teacher_bias=bt, labels=labels, mask=mask)
    seen = {n: x.device for n, x in tensors.items() if isinstance(x, Tensor)}
    if len(set(seen.values())) > 1:
        raise ValueError(f"all tensors must be on one device, got {seen}")
    for name, w in (("student_weight", ws), ("teacher_weight", wt)):
        if w.dim() != 2 or w.numel() == 0:
            raise ValueError(f"{name} must be a non-empty (V, H) matrix, got {tuple(w.shape)}")
    if ws.shape[0] != wt.shape[0]:
        raise ValueError(
            f"student_weight and teacher_weight must share the vocabulary V, got "
            f"{tuple(ws.shape)} and {tuple(wt.shape)}"
        )
    for name, x, w in (("student", xs, ws), ("teacher", xt, wt)):
        if x.dim() < 1 or x.shape[-1] != w.shape[1]:
            raise ValueError(
                f"{name}_input must be (..., H) with H = {name}_weight.shape[1] = "
                f"{w.shape[1]}, got {name}_input {tuple(x.shape)}"
            )
    if xs.shape[:-1] != xt.shape[:-1]:
        raise ValueError(
            "student_input and teacher_input must have the same leading (token) shape, got "
            f"{tuple(xs.shape)} and {tuple(xt.shape)}"
        )
    tokens = math.prod(xs.shape[:-1])
    if tokens == 0:
        raise ValueError(f"student_input must hold at least one token, got {tuple(xs.shape)}")
    vocab = (ws.shape[0],)
    _check_optional("student_bias", bs, vocab, "one entry per vocabulary row")
    _check_optional("teacher_bias", bt, vocab, "one entry per vocabulary row")
    lead = tuple(xs.shape[:-1])
    for name, x in (("labels", labels), ("mask", mask)):
        if x is not None and isinstance(x, Tensor) and x.numel() == tokens:
            x = x.reshape(lead)
        _check_optional(name, x, lead, "the inputs' leading shape")
    if labels is not None and (labels.is_floating_point() or labels.dtype == torch.bool):
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if mask is not None and mask.dtype != torch.bool:
        raise TypeError(f"mask must have dtype torch.bool, got {mask.dtype}")
    flat = [None if x is None else x.reshape(tokens) for x in (labels, mask)]
    return xs.reshape(tokens, xs.shape[-1]), xt.reshape(tokens, xt.shape[-1]), *flat


def check_chunk_size(chunk_size) -> None:
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def check_options(
    divergence,
    beta,
    temperature,
    reduction,
    soft_weight,
    hard_weight,
    ignore_index,
    labels,
    inter_weight=1.0,
    intra_weight=1.0,
) -> DistillOptions:
    check_choice("divergence", divergence, FUSED_DIVERGENCES)
    check_choice("reduction", reduction, FUSED_REDUCTIONS)
    inter_weight, intra_weight = _fused_linear_dist.check_weights(inter_weight, intra_weight)
    if divergence == "dist" and reduction != "batchmean":
        raise ValueError(
            f"reduction must be 'batchmean' with divergence 'dist' (DIST is not a per-token "
            f"sum), got {reduction!r}"
        )
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    options = DistillOptions(
        divergence,
        check_unit_interval("beta", beta),
        check_positive("temperature", temperature, finite=True),
        reduction,
        check_real("soft_loss_weight", soft_weight),
        check_real("hard_loss_weight", hard_weight),
        ignore_index,
        inter_weight,
        intra_weight,
    )
    if options.hard_loss_weight != 0 and labels is None:
        raise ValueError(f"hard_loss_weight={hard_weight} needs labels (got labels=None)")
    return options


def _soft_rows(zs: Tensor, zt: Tensor, keep, options: DistillOptions) -> Tensor:
    """Per-token divergence through the dispatched logit ops."""
    if options.divergence == "kl":
        return _dispatch.call("kd_loss", zs, zt, options.temperature, "none", keep, "logits")
    return _dispatch.call("jsd_loss", zs, zt, options.jsd_beta, options.temperature, "none", keep)


def _chunk(xs, ws, bs, xt, wt, bt, labels, keep, options, row_weight):
    """(per-token losses, logit gradient of sum(row_weight * loss) or None) of one chunk."""
    zt = head_logits(xt, wt, bt)
    zs = head_logits(xs, ws, bs)
    if row_weight is None:
        soft = _soft_rows(zs, zt, keep, options)
        return combine_rows(soft, zs, labels, keep, options), None
    zs.requires_grad_(True)
    with torch.enable_grad():
        rows = combine_rows(_soft_rows(zs, zt, keep, options), zs, labels, keep, options)
        (dz,) = torch.autograd.grad(rows, zs, row_weight.to(rows.dtype))
    return rows.detach(), dz


def _sweep(inputs, labels, keep, options, chunk, row_weight, needs):
    """Per-token losses (T,) and the gradients (grad_input, grad_weight, grad_bias) of
    ``sum(row_weight * loss)`` for the student tensors flagged in ``needs``."""
    xs, ws, bs, xt, wt, bt = inputs
    tokens = xs.shape[0]
    rows = None
    grad_x = torch.empty_like(xs) if needs[0] else None
    acc = compute_dtype(ws)
    grad_w = torch.zeros(ws.shape, dtype=acc, device=ws.device) if needs[1] else None
    grad_b = torch.zeros(bs.shape, dtype=acc, device=bs.device) if needs[2] else None
    for start in range(0, tokens, chunk):
        part = slice(start, min(start + chunk, tokens))
        weight = None if row_weight is None else row_weight[part]
        pick = [None if x is None else x[part] for x in (labels, keep)]
        r, dz = _chunk(xs[part], ws, bs, xt[part], wt, bt, *pick, options, weight)
        if rows is None:
            rows = r.new_empty(tokens)
        rows[part] = r
        if dz is None:
            continue
        if grad_x is not None:
            grad_x[part] = (dz @ ws.to(dz.dtype)).to(xs.dtype)
        if grad_w is not None:
            grad_w += (dz.T @ xs[part].to(dz.dtype)).to(acc)
        if grad_b is not None:
            grad_b += dz.sum(0).to(acc)
    grads = (grad_x, None if grad_w is None else grad_w.to(ws.dtype))
    return rows, (*grads, None if grad_b is None else grad_b.to(bs.dtype))


class _FusedLinearDistill(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xs, ws, bs, xt, wt, bt, labels, keep, options, chunk, needs):
        inputs = (xs, ws, bs, xt, wt, bt)
        ctx.options, ctx.chunk, ctx.needs = options, chunk, needs
        if any(needs) and options.reduction != "none":
            dtype = compute_dtype(xs, ws, xt, wt)
            weight = torch.ones(xs.shape[0], dtype=dtype, device=xs.device)
            weight = weight if keep is None else keep.to(dtype)
            if options.reduction == "batchmean":
                weight = weight / weight.sum()
            rows, grads = _sweep(inputs, labels, keep, options, chunk, weight, needs)
            ctx.grads = grads
        else:
            rows, _ = _sweep(inputs, labels, keep, options, chunk, None, needs)
            if any(needs):
                ctx.save_for_backward(*inputs, labels, keep)
        return reduce_rows(rows, options.reduction, keep, 1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        if ctx.options.reduction != "none":
            grads = [None if g is None else g * grad.to(g.dtype) for g in ctx.grads]
        else:
            *inputs, labels, keep = ctx.saved_tensors
            weight = grad if keep is None else torch.where(keep, grad, 0)
            _, grads = _sweep(inputs, labels, keep, ctx.options, ctx.chunk, weight, ctx.needs)
        return (*grads[:2], grads[2], None, None, None, None, None, None, None, None)


def fused_linear_distill(xs, ws, bs, xt, wt, bt, labels, mask, options, chunk_size):
    """The loss of validated (T, H) inputs: the materialised reference when the reference
    backend is forced, else the chunked path."""
    if _dispatch.forced_backend() == "reference":
        return reference.fused_linear_distill(xs, ws, bs, xt, wt, bt, labels, mask, options)
    if options.divergence == "dist":  # two passes over the chunks, teacher gradients
        keep = kept_tokens(labels, mask, options.ignore_index)
        dtype, buffers = compute_dtype(xs, ws, xt, wt), _fused_linear_dist.CHUNK_BUFFERS
        chunk = chunk_size or auto_chunk_size(xs.shape[0], ws.shape[0], dtype, buffers)
        return _fused_linear_dist.fused_linear_dist(
            (xs, ws, bs, xt, wt, bt), labels, keep, options, chunk
        )
    if chunk_size is None:
        chunk_size = auto_chunk_size(xs.shape[0], ws.shape[0], compute_dtype(xs, ws, xt, wt))
    enabled = torch.is_grad_enabled()
    needs = tuple(enabled and x is not None and x.requires_grad for x in (xs, ws, bs))
    keep = kept_tokens(labels, mask, options.ignore_index)
    detached = [None if x is None else x.detach() for x in (xt, wt, bt)]
    return _FusedLinearDistill.apply(
        xs, ws, bs, *detached, labels, keep, options, chunk_size, needs
    )

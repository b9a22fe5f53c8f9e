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

The chunked path is a composition of dispatched logit ops and GEMMs, the same code on every
device: :mod:`kdfast.ops.fused_linear_distill` registers it as the implementation of every
compiled backend that has the logit kernels (so the contract suite runs it per backend, and
a forced backend reaches the chunks' logit ops). Forcing the "reference" backend runs the
materialised reference (:mod:`kdfast.reference.fused_linear_distill`) instead.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

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
from kdfast.reference.fused_linear_distill import (
    DistillOptions,
    head_logits,
    kept_tokens,
)

#: bytes of (chunk, V) temporaries the automatic chunk size aims at
CHUNK_MEMORY_BUDGET = 256 << 20
#: the most (chunk, V) buffers alive at once in a chunk of KD / JSD (:func:`chunk_buffers`)
CHUNK_BUFFERS = 6


def chunk_buffers(options: DistillOptions, needs: tuple[bool, ...]) -> int:
    """(chunk, V) temporaries alive at once in one chunk of the sweep, the automatic chunk
    size's divisor: both logits; the soft kernel's student gradient (or, without one, a
    log-sum-exp temporary of the cross-entropy); the teacher's gradient when the teacher is
    differentiated; the cross-entropy's gradient. DIST's two sweeps keep more
    (:data:`kdfast._fused_linear_dist.CHUNK_BUFFERS`). ``needs``: which of (xs, ws, bs, xt,
    wt, bt) get gradients. Checked against the live tensors by
    tests/ops/test_fused_linear_distill.py."""
    if options.divergence == "dist":
        return _fused_linear_dist.CHUNK_BUFFERS
    hard = options.hard_loss_weight != 0
    return 3 + any(needs[3:]) + hard


def auto_chunk_size(
    tokens: int, vocab: int, dtype: torch.dtype, buffers: int = CHUNK_BUFFERS
) -> int:
    """Rows per chunk so that the chunk's ``buffers`` (chunk, V) temporaries fit
    :data:`CHUNK_MEMORY_BUDGET`."""
    per_row = buffers * vocab * compute_dtype(dtype).itemsize
    most = max(1, min(tokens, CHUNK_MEMORY_BUDGET // per_row))
    # as many chunks as the budget needs, of equal size (no short last chunk: at
    # (1024, 512, 32000) JSD, 2 x 512 rows ran 10% faster than 699 + 325)
    return -(-tokens // -(-tokens // most))


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


def _soft_op(options: DistillOptions, reduction: str, keep) -> tuple[str, tuple, tuple]:
    """(dispatched logit op, the arguments after the logits of its implementations, those of
    the compiled op of the same contract before the two gradient flags)."""
    temperature = options.temperature
    if options.divergence == "kl":
        tail = (reduction, keep, "logits")
        return "kd_loss", (temperature, *tail), (temperature, temperature**2, *tail)
    args = (options.jsd_beta, temperature, reduction, keep)
    return "jsd_loss", args, args


def _soft(zs, zt, keep, options, weight, need_s, need_t):
    """Soft divergence of one chunk: ``(loss, dzs, dzt)``.

    ``weight`` a float: the sum over kept tokens and, where ``need_s`` / ``need_t`` ask,
    the gradients of that sum (unscaled: the caller folds ``weight`` into its GEMMs).
    A (rows,) tensor: the per-token losses (rows,) and the gradients of
    ``sum(weight * loss)``. None: the per-token losses alone. Compiled implementations
    (``.op``: the kd_loss / jsd_loss contract, gradients written in their forward pass) are
    called directly; any other (the reference, or past a backend's limit) is differentiated
    by autograd.
    """
    scalar = isinstance(weight, float)
    name, args, raw_args = _soft_op(options, "sum" if scalar else "none", keep)
    need_s, need_t = weight is not None and need_s, weight is not None and need_t
    impl = _dispatch.select(name, zs, zt, *args)[1]
    op = getattr(impl, "op", None)
    if op is not None:
        # the chunk's logits are contiguous (rows, V): every op layout takes them as they are
        loss, gs, gt = op(zs, zt, *raw_args, need_s, need_t)
        if not scalar and weight is not None:
            for g in (gs, gt):  # the kernel's own outputs: scaled in place
                if g.numel():
                    g.mul_(weight.to(g.dtype)[:, None])
        return loss, gs if need_s else None, gt if need_t else None
    if not (need_s or need_t):
        with torch.no_grad():
            return impl(zs, zt, *args), None, None
    zs = zs.detach().requires_grad_(need_s)
    zt = zt.detach().requires_grad_(need_t)
    with torch.enable_grad():
        loss = impl(zs, zt, *args)
        upstream = None if scalar else weight.to(loss.dtype)
        grads = iter(torch.autograd.grad(loss, [z for z in (zs, zt) if z.requires_grad], upstream))
    return loss.detach(), next(grads) if need_s else None, next(grads) if need_t else None


def _hard(zs, labels, keep, weight, need):
    """Cross-entropy of one chunk's student logits: ``(loss, dzs)`` with ``weight`` as in
    :func:`_soft` (a float: the sum over kept tokens and its unscaled gradient)."""
    z = zs.to(compute_dtype(zs))
    target = labels if keep is None else torch.where(keep, labels, 0)
    lse = torch.logsumexp(z, dim=1)
    rows = lse - z.gather(1, target[:, None]).squeeze(1)
    if keep is not None:
        rows = torch.where(keep, rows, 0.0)
    scalar = isinstance(weight, float)
    loss = rows.sum() if scalar else rows
    if weight is None or not need:
        return loss, None
    grad = (z - lse[:, None]).exp_()  # softmax - one_hot(target), per kept token
    grad[torch.arange(z.shape[0], device=z.device), target] -= 1
    row_weight = None if scalar else weight.to(grad.dtype)
    if keep is not None:
        kept = keep.to(grad.dtype)
        row_weight = kept if row_weight is None else row_weight * kept
    if row_weight is not None:
        grad *= row_weight[:, None]
    return loss, grad


def _chunk(zs, zt, labels, keep, options, weight, need_s, need_t):
    """(loss, (dzs, alpha_s), (dzt, alpha_t)) of one chunk: the true logit gradients are
    ``alpha * dz``, so that scalar weights fold into the GEMMs."""
    soft, dzs, dzt = _soft(zs, zt, keep, options, weight, need_s, need_t)
    alpha = weight if isinstance(weight, float) else 1.0
    loss = options.soft_loss_weight * soft
    alpha_t = alpha_s = alpha * options.soft_loss_weight
    if options.hard_loss_weight != 0:
        hard, dh = _hard(zs, labels, keep, weight, need_s)
        loss = loss + options.hard_loss_weight * hard
        if dh is not None:
            soft_scale = options.soft_loss_weight / options.hard_loss_weight
            dzs = dh if dzs is None else dh.add_(dzs, alpha=soft_scale)
            alpha_s = alpha * options.hard_loss_weight
    return loss, (dzs, alpha_s), (dzt, alpha_t)


def _fold(dz, alpha, x, w, grads, part, first):
    """Fold one chunk's logit gradient ``alpha * dz`` into (grad_input, grad_weight,
    grad_bias) of its head: ``dZ W``, ``dZ^T X`` (accumulated in place; the first chunk
    overwrites the uninitialised buffer) and ``sum dZ``."""
    grad_x, grad_w, grad_b = grads
    acc = grad_w.dtype if grad_w is not None else compute_dtype(dz)
    dz = dz.to(acc)  # the kernels write half gradients for half logits
    if grad_x is not None:
        gx = dz @ w.to(dz.dtype)
        grad_x[part] = (gx.mul_(alpha) if alpha != 1 else gx).to(grad_x.dtype)
    if grad_w is not None:
        grad_w.addmm_(dz.T, x[part].to(dz.dtype), alpha=alpha, beta=0 if first else 1)
    if grad_b is not None:
        grad_b.add_(dz.sum(0).to(grad_b.dtype), alpha=alpha)


def _logits(x, w, b, buffers: dict, side: str) -> Tensor:
    """``x W^T + b`` of one chunk, written into a (chunk, V) buffer reused across the chunks
    (a fresh allocation of that size per chunk costs page faults on CPU); mixed dtypes go
    through :func:`head_logits`."""
    if x.dtype != w.dtype or (b is not None and b.dtype != w.dtype):
        return head_logits(x, w, b)
    if side not in buffers:
        buffers[side] = x.new_empty(x.shape[0], w.shape[0])
    out = buffers[side][: x.shape[0]]
    return torch.mm(x, w.T, out=out) if b is None else torch.addmm(b, x, w.T, out=out)


def _sweep(inputs, labels, keep, options, chunk, weight, needs):
    """The loss over every chunk and the gradients of the tensors flagged in ``needs``
    (xs, ws, bs, xt, wt, bt), for ``weight`` as in :func:`_soft`: with a float, the loss is
    the sum over kept tokens and the gradients are those of ``weight`` times it."""
    grads = []
    for tensor, need, kind in zip(inputs, needs, ("x", "w", "b") * 2, strict=True):
        if not need:
            grads.append(None)
        elif kind == "x":
            grads.append(torch.empty_like(tensor))
        else:  # accumulated over the chunks in the compute dtype
            make = torch.empty if kind == "w" else torch.zeros
            grads.append(make(tensor.shape, dtype=compute_dtype(tensor), device=tensor.device))
    total = None
    need_s, need_t = weight is not None and any(needs[:3]), weight is not None and any(needs[3:])
    xs, ws, bs, xt, wt, bt = inputs
    tokens, buffers = xs.shape[0], {}
    for start in range(0, tokens, chunk):
        part = slice(start, min(start + chunk, tokens))
        w = weight[part] if isinstance(weight, Tensor) else weight
        pick = [None if x is None else x[part] for x in (labels, keep)]
        zs = _logits(xs[part], ws, bs, buffers, "student")
        zt = _logits(xt[part], wt, bt, buffers, "teacher")
        loss, (dzs, alpha_s), (dzt, alpha_t) = _chunk(zs, zt, *pick, options, w, need_s, need_t)
        if isinstance(weight, float):
            total = loss if total is None else total + loss
        else:
            if total is None:
                total = loss.new_empty(tokens)
            total[part] = loss
        if dzs is not None:
            _fold(dzs, alpha_s, xs, ws, grads[:3], part, start == 0)
        if dzt is not None:
            _fold(dzt, alpha_t, xt, wt, grads[3:], part, start == 0)
        del dzs, dzt  # freed before the next chunk's kernel writes its own
    return total, [None if g is None else g.to(x.dtype) for g, x in zip(grads, inputs, strict=True)]


class _FusedLinearDistill(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xs, ws, bs, xt, wt, bt, labels, keep, options, chunk, needs):
        inputs = (xs, ws, bs, xt, wt, bt)
        ctx.options, ctx.chunk, ctx.needs = options, chunk, needs
        ctx.save_for_backward(*inputs, labels, keep)
        if options.divergence == "dist":  # two passes over the chunks, "batchmean" only
            total, ctx.grads = _fused_linear_dist.dist_sweep(
                inputs, labels, keep, options, chunk, needs
            )
            return total
        if options.reduction == "none":
            rows, _ = _sweep(inputs, labels, keep, options, chunk, None, needs)
            return rows
        kept = xs.shape[0] if keep is None else int(keep.sum())
        scale = 1.0 / kept if options.reduction == "batchmean" and kept else 1.0
        total, ctx.grads = _sweep(inputs, labels, keep, options, chunk, scale, needs)
        if options.reduction == "batchmean":
            return total / kept if kept else total / 0.0
        return total

    @staticmethod
    def backward(ctx, grad):
        *inputs, labels, keep = ctx.saved_tensors
        if ctx.options.reduction != "none":
            grads = [None if g is None else _scaled(grad, g, x)
                     for g, x in zip(ctx.grads, inputs, strict=True)]  # fmt: skip
            from kdfast.ops._common import _graph_is_kept

            if not _graph_is_kept():
                # the last use: without ctx's reference, AccumulateGrad adopts the returned
                # gradients instead of copying them (a (V, H) copy of each weight's gradient)
                ctx.grads = None
        else:
            weight = grad if keep is None else torch.where(keep, grad, 0)
            with torch.no_grad():
                _, grads = _sweep(inputs, labels, keep, ctx.options, ctx.chunk, weight, ctx.needs)
            one = grad.new_ones(())
            grads = [None if g is None else _scaled(one, g, x)
                     for g, x in zip(grads, inputs, strict=True)]  # fmt: skip
        return (*grads, None, None, None, None, None)


def _scaled(grad: Tensor, saved: Tensor, x: Tensor) -> Tensor:
    """``grad * saved`` as kdfast's logit ops return their saved gradients: the tensor itself
    for the usual unit upstream gradient, else through ``kdfast::scale_saved_grad``, whose
    own gradient raises (a double backward through the chunks is refused clearly)."""
    from kdfast.ops._common import is_plain_unit_grad, scale_saved_grad

    if not torch.is_grad_enabled() and is_plain_unit_grad(grad, saved, x):
        return saved
    return scale_saved_grad(grad, saved, x)


def chunked(xs, ws, bs, xt, wt, bt, labels, mask, options, chunk_size):
    """The chunked path on validated (T, H) inputs: the implementation of every compiled
    backend (:mod:`kdfast.ops.fused_linear_distill`); each chunk's logit ops are dispatched
    in turn, so a forced backend reaches them."""
    enabled = torch.is_grad_enabled()
    needs = tuple(enabled and x is not None and x.requires_grad for x in (xs, ws, bs, xt, wt, bt))
    if chunk_size is None:
        dtype = compute_dtype(xs, ws, xt, wt)
        buffers = chunk_buffers(options, needs)
        chunk_size = auto_chunk_size(xs.shape[0], ws.shape[0], dtype, buffers)
    keep = kept_tokens(labels, mask, options.ignore_index)
    return _FusedLinearDistill.apply(
        xs, ws, bs, xt, wt, bt, labels, keep, options, chunk_size, needs
    )


def fused_linear_distill(xs, ws, bs, xt, wt, bt, labels, mask, options, chunk_size):
    """The loss of validated (T, H) inputs, through the dispatcher. Where no compiled
    backend can run (no extension built, no Triton on this device) the chunked path still
    runs, its logit ops on their references: the reference implementation (materialised
    logits) runs only when forced."""
    args = (xs, ws, bs, xt, wt, bt, labels, mask, options, chunk_size)
    backend, impl = _dispatch.select("fused_linear_distill", *args)
    if backend == "reference" and _dispatch.forced_backend() != "reference":
        impl = chunked
    return impl(*args)

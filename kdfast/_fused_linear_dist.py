"""Divergence "dist" of fused_linear_distill: DIST between two linear LM heads in two passes
over the row chunks (semantics 3.2).

DIST's intra-class term correlates each vocabulary column of ``p_s = softmax(z_s / T)`` with
that of ``p_t`` over all kept tokens, so no chunk's gradient is known before every chunk
has been read:

* pass 1 forms each chunk's logits (both heads' GEMMs), the inter term's per-row Pearson
  correlations, the hard cross-entropy, and per vocabulary column the kept count, the means
  and centred second moments of p_s and p_t and their co-moment, merged across chunks with
  the pairwise update of Chan, Golub and LeVeque in float64 (probabilities sit near 1/V:
  raw moments ``E[p^2] - E[p]^2`` would cancel);
* pass 2, only when a gradient is needed, recomputes each chunk's logits (so the GEMMs run
  twice) and forms the logit gradient of inter + intra (+ hard), folded at once into
  ``grad_input[chunk] = dZ W``, ``grad_weight += dZ^T X`` and ``grad_bias += sum dZ`` for
  the student and, for the tensors that require grad, the teacher.

The loss is the reference's formula term by term: a column's Pearson correlation is
``C / (sqrt(M2_s) sqrt(M2_t) + 1e-8)``, the cosine of the centred columns of
:func:`kdfast.reference.dist_loss.dist_loss` with its eps on the product of the norms.
This path is plain PyTorch (no dispatched kernel); it computes in compute_dtype of the
inputs (float32 for half, bfloat16 and float32 inputs, float64 for float64).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kdfast._validation import check_real, compute_dtype
from kdfast.reference.dist_loss import COSINE_EPS, _pearson
from kdfast.reference.fused_linear_distill import DistillOptions, hard_rows, head_logits

#: (chunk, V) buffers alive at once in pass 2: both logits and probabilities, the centred
#: probabilities, the intra coefficients, the Pearson and softmax temporaries of autograd,
#: the cross-entropy's log-softmax and the two logit gradients
CHUNK_BUFFERS = 12


def check_weights(inter_weight: object, intra_weight: object) -> tuple[float, float]:
    """DIST's beta and gamma: finite real numbers (bool excluded)."""
    weights = []
    for name, value in (("inter_weight", inter_weight), ("intra_weight", intra_weight)):
        value = check_real(name, value)
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value!r}")
        weights.append(value)
    return weights[0], weights[1]


def _probs(x: Tensor, w: Tensor, b: Tensor | None, dtype, temperature: float) -> Tensor:
    """(logits in compute dtype, softmax(logits / T)) of one chunk."""
    z = head_logits(x, w, b).to(dtype)
    return z, torch.softmax(z / temperature, dim=1)


def _centred(p: Tensor, mean: Tensor, keep: Tensor | None) -> Tensor:
    """p minus its column means on kept rows, exactly 0 on dropped ones."""
    c = p - mean
    return c if keep is None else torch.where(keep[:, None], c, 0.0)


def _chunk_moments(ps: Tensor, pt: Tensor, keep: Tensor | None):
    """(count, (5, V) float64 means of p_s and p_t, their centred second moments and the
    co-moment) over the chunk's kept rows."""
    if keep is None:
        count = torch.tensor(float(ps.shape[0]), dtype=torch.float64, device=ps.device)
    else:
        count = keep.sum().to(torch.float64)
        ps = torch.where(keep[:, None], ps, 0.0)  # where, so a NaN row cannot leak in
        pt = torch.where(keep[:, None], pt, 0.0)
    divisor = count.clamp_min(1).to(ps.dtype)
    mean_s, mean_t = ps.sum(0) / divisor, pt.sum(0) / divisor
    a, b = _centred(ps, mean_s, keep), _centred(pt, mean_t, keep)
    moments = torch.stack([mean_s, mean_t, (a * a).sum(0), (b * b).sum(0), (a * b).sum(0)])
    return count, moments.to(torch.float64)


def _merge(count_a: Tensor, acc: Tensor, count_b: Tensor, part: Tensor):
    """Chan, Golub and LeVeque's pairwise update of (count, moments); an empty part is a
    no-op."""
    count = count_a + count_b
    share = count_b / count.clamp_min(1)
    delta = part[:2] - acc[:2]
    cross = count_a * share  # n_a n_b / n
    means = acc[:2] + delta * share
    m2 = acc[2:4] + part[2:4] + delta * delta * cross
    co = acc[4] + part[4] + delta[0] * delta[1] * cross
    return count, torch.cat([means, m2, co[None]])


def _chunks(tokens: int, chunk: int):
    return [slice(s, min(s + chunk, tokens)) for s in range(0, tokens, chunk)]


def _pick(x: Tensor | None, part: slice) -> Tensor | None:
    return None if x is None else x[part]


def _first_pass(inputs, labels, keep, options: DistillOptions, chunk: int, dtype):
    """(kept count, sum of kept rows' inter Pearson, sum of kept CE, column moments), all
    float64."""
    xs, ws, bs, xt, wt, bt = inputs
    f64 = dict(dtype=torch.float64, device=xs.device)
    count, moments = torch.zeros((), **f64), torch.zeros(5, ws.shape[0], **f64)
    inter, hard = torch.zeros((), **f64), torch.zeros((), **f64)
    for part in _chunks(xs.shape[0], chunk):
        k = _pick(keep, part)
        zs, ps = _probs(xs[part], ws, bs, dtype, options.temperature)
        _, pt = _probs(xt[part], wt, bt, dtype, options.temperature)
        rho = _pearson(ps, pt, dim=1)
        inter += (rho if k is None else torch.where(k, rho, 0.0)).sum().to(torch.float64)
        if options.hard_loss_weight != 0:
            ce = hard_rows(zs, labels[part], k, options.ignore_index)
            hard += (ce if k is None else torch.where(k, ce, 0.0)).sum().to(torch.float64)
        count, moments = _merge(count, moments, *_chunk_moments(ps, pt, k))
    return count, inter, hard, moments


def _intra_coefficients(moments: Tensor):
    """Per column (V,): ``1 / D``, ``u_s`` and ``u_t`` with D = |a||b| + eps, so that
    ``d(rho_c) / dp_s[i, c] = (b_i - u_s a_i) / D`` (a, b the centred
    columns of p_s, p_t; u_s = rho |b| / |a|, 0 for a zero column, whose norm has zero
    gradient as in autograd) and symmetrically for p_t. The centring's own derivative
    vanishes: the centred columns sum to 0."""
    norm_s, norm_t = moments[2].sqrt(), moments[3].sqrt()
    denom = norm_s * norm_t + COSINE_EPS
    rho = moments[4] / denom
    u_s = torch.where(norm_s > 0, rho * norm_t / norm_s, 0.0)
    u_t = torch.where(norm_t > 0, rho * norm_s / norm_t, 0.0)
    return 1 / denom, u_s, u_t


def _logit_grads(zs, zt, labels, k, options, scales, columns, needs_s, needs_t):
    """The logit gradients (dZ_s, dZ_t) of one chunk (None where not needed): autograd
    through the chunk's softmaxes of the inter Pearson rows, of the hard cross-entropy, and
    of the intra term's linearisation ``sum(G * p)`` with the column coefficients fixed by
    pass 1 (``scales``: the inter, intra and hard weights; ``columns``: the column means,
    1 / D, u_s, u_t in the compute dtype)."""
    temperature = options.temperature
    inter_scale, intra_scale, hard_scale = scales
    mean_s, mean_t, over_d, u_s, u_t = columns
    wanted = [z.requires_grad_() for z, need in ((zs, needs_s), (zt, needs_t)) if need]
    with torch.enable_grad():
        ps, pt = torch.softmax(zs / temperature, 1), torch.softmax(zt / temperature, 1)
        rho = _pearson(ps, pt, dim=1)
        objective = -inter_scale * (rho if k is None else torch.where(k, rho, 0.0)).sum()
        a, b = _centred(ps.detach(), mean_s, k), _centred(pt.detach(), mean_t, k)
        if needs_s:
            objective = objective - (over_d * (b - u_s * a) * ps).sum() * intra_scale
        if needs_t:
            objective = objective - (over_d * (a - u_t * b) * pt).sum() * intra_scale
        if options.hard_loss_weight != 0 and needs_s:
            ce = hard_rows(zs, labels, k, options.ignore_index)
            ce = ce if k is None else torch.where(k, ce, 0.0)
            objective = objective + hard_scale * ce.sum()
        grads = iter(torch.autograd.grad(objective, wanted))
    out = [next(grads) if need else None for need in (needs_s, needs_t)]
    if k is not None:  # where, so a NaN in a dropped row cannot leak in
        out = [None if g is None else torch.where(k[:, None], g, 0.0) for g in out]
    return out


def _fold(dz: Tensor, x: Tensor, part: slice, w: Tensor, acc: list) -> None:
    """grad_input[part] = dZ W, grad_weight += dZ^T X, grad_bias += sum dZ."""
    grad_x, grad_w, grad_b = acc
    if grad_x is not None:
        grad_x[part] = (dz @ w.to(dz.dtype)).to(grad_x.dtype)
    if grad_w is not None:
        grad_w.addmm_(dz.T, x[part].to(dz.dtype))
    if grad_b is not None:
        grad_b += dz.sum(0)


def dist_sweep(inputs, labels, keep, options: DistillOptions, chunk: int, needs):
    """DIST (+ hard CE) of two linear heads over row chunks.

    Args:
        inputs: (xs, ws, bs, xt, wt, bt): (T, H) / (V, H) / (V,) or None, teacher alike.
        labels: (T,) integer or None; keep: (T,) bool of the counted tokens, or None.
        options: validated, divergence "dist", reduction "batchmean".
        chunk: rows per chunk.
        needs: 6 bools, whether to compute the gradient of each of ``inputs``.

    Returns:
        (loss, grads): the scalar in the compute dtype and a 6-tuple of gradients of the
        loss (None where not needed), each in its input's dtype.
    """
    xs, ws, bs, xt, wt, bt = inputs
    dtype = compute_dtype(*(x for x in inputs if x is not None))
    count, inter, hard, moments = _first_pass(inputs, labels, keep, options, chunk, dtype)
    vocab, t2 = ws.shape[0], options.temperature**2
    soft_scale = options.soft_loss_weight * t2
    norms = moments[2].sqrt() * moments[3].sqrt()
    intra = 1 - (moments[4] / (norms + COSINE_EPS)).mean()
    loss = soft_scale * (options.inter_weight * (1 - inter / count) + options.intra_weight * intra)
    if options.hard_loss_weight != 0:
        loss = loss + options.hard_loss_weight * hard / count
    if not any(needs):
        return loss.to(dtype), (None,) * 6
    scales = (
        (soft_scale * options.inter_weight / count).to(dtype),
        soft_scale * options.intra_weight / vocab,
        (options.hard_loss_weight / count).to(dtype),
    )
    columns = [c.to(dtype) for c in (moments[0], moments[1], *_intra_coefficients(moments))]
    # grad_input rows are written once per chunk; weight and bias accumulate in dtype
    grads = [
        None
        if not need
        else torch.empty_like(x)
        if i % 3 == 0
        else x.new_zeros(x.shape, dtype=dtype)
        for i, (need, x) in enumerate(zip(needs, inputs, strict=True))
    ]
    needs_s, needs_t = any(needs[:3]), any(needs[3:])
    for part in _chunks(xs.shape[0], chunk):
        k = _pick(keep, part)
        with torch.no_grad():
            zs = head_logits(xs[part], ws, bs).to(dtype)
            zt = head_logits(xt[part], wt, bt).to(dtype)
        dzs, dzt = _logit_grads(
            zs, zt, _pick(labels, part), k, options, scales, columns, needs_s, needs_t,
        )  # fmt: skip
        if dzs is not None:
            _fold(dzs, xs, part, ws, grads[0:3])
        if dzt is not None:
            _fold(dzt, xt, part, wt, grads[3:6])
    grads = [None if g is None else g.to(x.dtype) for g, x in zip(grads, inputs, strict=True)]
    return loss.to(dtype), tuple(grads)

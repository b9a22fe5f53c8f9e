"""Reference Hinton KD: ``T^2 * KL(p_t || p_s)`` with ``p = softmax(z / T)`` (semantics 3).

Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", 2015.

Inputs arrive validated from :mod:`kdfast.functional`: (rows, C) or (N, C, S) (taken as
N * S rows, r = n * S + s), one device, original dtypes (student and teacher may differ, may
be half, may be non-contiguous). Everything is computed in ``compute_dtype(s, t)`` and
returned in it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kdfast._validation import compute_dtype, kept_rows_2d, rows_2d


def _f_series(b: Tensor) -> Tensor:
    """exp(-b) - 1 + b = sum_{k >= 2} (-b)^k / k! for |b| < 0.1, to float64 accuracy."""
    acc = torch.full_like(b, 1.0 / math.factorial(11))
    for k in range(10, 1, -1):
        acc = 1.0 / math.factorial(k) - b * acc
    return b * b * acc


def _row_kl(s: Tensor, t: Tensor, temperature: float, teacher_kind: str) -> Tensor:
    """Per-row KL(p_t || p_s) at temperature T, shape (rows,), in compute_dtype(s, t).

    ``teacher_kind`` says what ``t`` holds: "logits" (tempered here), or "probs" / "log_probs"
    already at temperature T (cached teacher outputs, used as given).
    """
    dtype = compute_dtype(s, t)
    s, t = rows_2d(s), rows_2d(t)
    log_ps = F.log_softmax(s.to(dtype) / temperature, dim=1)
    t = t.to(dtype)
    if teacher_kind == "probs":
        # xlogy gives 0 * log 0 = 0: exact zeros in cached probabilities are legitimate.
        return (torch.special.xlogy(t, t) - t * log_ps).sum(dim=1)
    # -inf teacher logits / log-probs give NaN, as Inf inputs must propagate (semantics 0);
    # pass probabilities to express exact zeros.
    log_pt = F.log_softmax(t / temperature, dim=1) if teacher_kind == "logits" else t
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=1)
    if teacher_kind != "logits":
        return kl
    # Small KL (a high temperature; close teachers): the sum above cancels, each term being
    # about 1/T and the KL about 1/T^2, so float32 at T = 1e4 is off by a factor of 20. There
    # the cancellation-free form of the same quantity is used: with a = (zt - zs) / T and
    # b = a - sum_j pt_j a_j, ps = pt exp(-b) / Z and Z = sum pt exp(-b), so
    #     KL = log Z = log1p(sum_c pt_c f(b_c)),   f(b) = exp(-b) - 1 + b >= 0,
    # a sum of non-negative terms, f by its Taylor series where |b| < 0.1. Rows with KL >= 1
    # keep the sum above (Z = e^KL could overflow; the cancellation costs at most 1e-6 there).
    use = (kl < 1.0).detach()[:, None]
    a = torch.where(use, (t - s.to(dtype)) / temperature, 0.0)  # 0 where unused: finite
    pt = log_pt.exp()
    b = a - (pt * a).sum(dim=1, keepdim=True)
    small = b.abs() < 0.1
    bs, bl = torch.where(small, b, 0.0), torch.where(small, 0.0, b)
    # pt f(b) = exp(log pt - b) - pt + pt b where |b| >= 0.1 (no overflow for tiny pt)
    terms = torch.where(small, pt * _f_series(bs), torch.exp(log_pt - bl) - pt + pt * bl)
    stable = torch.log1p(terms.sum(dim=1))
    return torch.where(use[:, 0], stable, kl)


def per_sample_kl(s: Tensor, t: Tensor, temperature: float) -> Tensor:
    """Per-row KL(p_t || p_s) at temperature T, without the T^2 factor.

    Args:
        s: (rows, C) or (N, C, S) student logits (rows = N * S).
        t: teacher logits of the same shape.
        temperature: T > 0.

    Returns:
        (rows,) in compute_dtype(s, t).
    """
    return _row_kl(s, t, temperature, "logits")


def kd_loss(
    s: Tensor,
    t: Tensor,
    temperature: float,
    reduction: str,
    mask: Tensor | None,
    teacher_kind: str,
) -> Tensor:
    """``T^2 * KL(p_t || p_s)`` reduced over rows.

    Args:
        s: (rows, C) or (N, C, S) student logits (rows = N * S).
        t: teacher logits of the same shape, or probabilities / log-probabilities at
            temperature T when ``teacher_kind`` is "probs" / "log_probs".
        temperature: T > 0.
        reduction: "batchmean" (sum / kept rows), "sum", "mean" (sum / (kept rows * C), as
            ``F.kl_div``) or "none" ((rows,) vector of T^2 * per-row KL).
        mask: optional bool (rows,); False rows drop out (their "none" entry is 0, their
            values never reach the loss). An all-False mask gives 0 for "sum", zeros for
            "none" and NaN for "batchmean" and "mean" (the mean of no rows, like
            ``torch.mean`` of an empty tensor).
        teacher_kind: "logits", "probs" or "log_probs".

    Returns:
        A scalar, or (rows,) for "none", in compute_dtype(s, t).
    """
    n_cols = s.shape[1]
    s, t = kept_rows_2d(s, mask), kept_rows_2d(t, mask)
    dtype = compute_dtype(s, t)
    if dtype != torch.float64 and temperature > FLOAT32_MAX_TEMPERATURE:
        # T^2 (and the KL, about 1/T^2) leave the float32 range: computed in float64
        s, t = s.to(torch.float64), t.to(torch.float64)
    row_loss = (temperature**2 * _row_kl(s, t, temperature, teacher_kind)).to(dtype)
    return reduce_rows(row_loss, reduction, mask, n_cols)


#: above this temperature T^2 KL is formed in float64 for float32 (and half) inputs: T^2
#: overflows float32 near T = 1.8e19, and the KL (about 1/T^2) becomes subnormal
FLOAT32_MAX_TEMPERATURE = 1e18


def reduce_rows(row_loss: Tensor, reduction: str, mask: Tensor | None, n_cols: int) -> Tensor:
    """The KD-style reductions of per-row losses (rows,): "batchmean" (sum / kept rows),
    "sum", "mean" (sum / (kept rows * n_cols)) or "none" (the rows, 0 where masked)."""
    if mask is None:
        kept = row_loss.shape[0]
    else:
        # torch.where (not multiplication) so a NaN/Inf in a padding row cannot leak in.
        row_loss = torch.where(mask, row_loss, 0.0)
        kept = mask.sum().to(row_loss.dtype)
    if reduction == "none":
        return row_loss
    total = row_loss.sum()
    if reduction == "sum":
        return total
    if reduction == "batchmean":
        return total / kept
    return total / (kept * n_cols)  # "mean"

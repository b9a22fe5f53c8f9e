"""Reference generalised Jensen-Shannon divergence over logits (GKD; TRL, Liger-Kernel).

Agarwal et al., "On-Policy Distillation of Language Models: Learning from Self-Generated
Mistakes" (GKD), ICLR 2024, eq. (1); TRL ``GKDTrainer.generalized_jsd_loss``; Liger-Kernel
``LigerJSD``.

Per row, with ``p_s = softmax(z_s / T)``, ``p_t = softmax(z_t / T)`` over the class dim and
``0 <= beta <= 1``::

    m          = beta * p_t + (1 - beta) * p_s          (beta weights the teacher)
    JSD_beta   = beta * KL(p_t || m) + (1 - beta) * KL(p_s || m)     for 0 < beta < 1
    JSD_0      = KL(p_t || p_s)                          forward KL (teacher || student)
    JSD_1      = KL(p_s || p_t)                          reverse KL (student || teacher)

The end points follow TRL (and Liger), which switch to the pure KLs at ``beta == 0`` and
``beta == 1`` exactly: the mixture form tends to 0 there (``m -> p_s`` or ``p_t``), so the
loss is discontinuous at both ends; ``JSD_beta / beta -> KL(p_t || p_s)`` as beta -> 0 and
``JSD_beta / (1 - beta) -> KL(p_s || p_t)`` as beta -> 1. At ``beta = 1/2`` it is the
symmetric Jensen-Shannon divergence, at most ``log 2`` per row.

Temperature: logits are divided by T and, as in TRL, the loss is NOT multiplied by T^2
(unlike Hinton KD, ``kd_loss``); TRL's trainer itself calls the loss with T = 1.

Reductions over rows (row r = n * S + s of (N, C, S) logits; TRL's token logits (B, L, V)
are passed as (B * L, V), and its ``labels != -100`` becomes ``mask``):

* "batchmean": sum / kept rows (TRL: sum / (B * L), or / kept tokens with labels;
  Liger: / non-ignored rows);
* "sum": the sum; "mean": sum / (kept rows * C) (TRL's ``jsd.mean()``);
* "none": a (rows,) vector of per-row divergences (TRL returns the element-wise terms).

Gradients: with ``ds = log p_s - log m`` and ``dt = log p_t - log m``, for 0 < beta < 1::

    dJ/dz_s = (1 - beta) * p_s * (ds - KL(p_s || m)) / T
    dJ/dz_t = beta * p_t * (dt - KL(p_t || m)) / T

and for the end points those of the KL (``kdfast.reference.kd_loss``, without T^2).

NaN and +-Inf logits give NaN (or Inf), as TRL's formula does: a -inf logit makes
``p * (log p - log m) = 0 * -inf``.

Where kdfast differs from the official code:

* TRL: the class dim is last (kdfast: dim 1, so (B, L, V) is passed as (B * L, V)); its
  "batchmean" of a 2-D (rows, V) input divides by rows * V (``jsd.size(0) * jsd.size(1)``;
  kdfast: by rows, what TRL does for its documented 3-D input); "none" is element-wise;
  ``labels`` instead of a mask; the teacher is detached (kdfast differentiates a teacher
  that requires grad).
* Liger: takes log-probabilities (``log_softmax`` is the caller's, no temperature), computes
  m from them without renormalising, differentiates the student only, and returns one
  reduction (the sum over non-ignored rows divided by their number, kdfast's "batchmean").
  Its beta convention and end points equal TRL's.
* Matched: TRL's ``trl/trainer/gkd_trainer.py`` at a9fa292. Earlier TRL versions differ
  (one interpolated the log-probabilities, a geometric mixture, without end-point cases).

Inputs arrive validated from :mod:`kdfast.functional`: (rows, C) or (N, C, S), one device,
original dtypes; everything is computed in ``compute_dtype(s, t)`` and returned in it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kdfast._validation import compute_dtype, kept_rows_2d, rows_2d
from kdfast.reference.kd_loss import reduce_rows


def per_row_jsd(s: Tensor, t: Tensor, beta: float, temperature: float) -> Tensor:
    """Per-row generalised JSD (module docstring), shape (rows,), in compute_dtype(s, t)."""
    dtype = compute_dtype(s, t)
    log_ps = F.log_softmax(rows_2d(s).to(dtype) / temperature, dim=1)
    log_pt = F.log_softmax(rows_2d(t).to(dtype) / temperature, dim=1)
    if beta == 0:
        return (log_pt.exp() * (log_pt - log_ps)).sum(dim=1)
    if beta == 1:
        return (log_ps.exp() * (log_ps - log_pt)).sum(dim=1)
    # log m from the log-probabilities: no underflow of m where both p underflow
    log_m = torch.logaddexp(log_pt + math.log(beta), log_ps + math.log1p(-beta))
    kl_t = (log_pt.exp() * (log_pt - log_m)).sum(dim=1)
    kl_s = (log_ps.exp() * (log_ps - log_m)).sum(dim=1)
    return beta * kl_t + (1 - beta) * kl_s


def jsd_loss(
    s: Tensor,
    t: Tensor,
    beta: float,
    temperature: float,
    reduction: str,
    mask: Tensor | None,
) -> Tensor:
    """Generalised JSD reduced over rows.

    Args:
        s: (rows, C) or (N, C, S) student logits (rows = N * S).
        t: teacher logits of the same shape.
        beta: in [0, 1], the teacher's weight in the mixture (0: KL(p_t || p_s),
            1: KL(p_s || p_t)).
        temperature: T > 0 (no T^2 factor).
        reduction: "batchmean" (sum / kept rows), "sum", "mean" (sum / (kept rows * C)) or
            "none" ((rows,) per-row divergences).
        mask: optional bool (rows,); False rows drop out (their "none" entry is 0). An
            all-False mask gives 0 for "sum" and NaN for "batchmean" and "mean".

    Returns:
        A scalar, or (rows,) for "none", in compute_dtype(s, t).
    """
    row_loss = per_row_jsd(kept_rows_2d(s, mask), kept_rows_2d(t, mask), beta, temperature)
    return reduce_rows(row_loss, reduction, mask, s.shape[1])

"""Reference DIST: ``beta * T^2 * inter + gamma * T^2 * intra`` (semantics 2).

Huang, You, Wang, Qian, Xu, "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022
(hunto/DIST_KD). inter = 1 - mean over rows of the Pearson correlation across classes;
intra = 1 - mean over classes of the Pearson correlation across the batch; both on
softmax(z / T) (or the element-wise sigmoid of the detection heads).

Inputs arrive validated from :mod:`kdfast.functional`: (rows, C) or (N, C, S) (taken as
N * S rows, r = n * S + s), original dtypes. Everything is computed in
``compute_dtype(s, t)`` and returned in it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdfast._validation import compute_dtype, kept_rows_2d

#: Added to the product of the norms, as the official code does (not F.cosine_similarity,
#: which clamps each norm separately).
COSINE_EPS = 1e-8


def _cosine(a: Tensor, b: Tensor, dim: int) -> Tensor:
    """sum(a b) / (||a|| ||b|| + 1e-8) along ``dim`` (a zero vector gives 0)."""
    norms = torch.linalg.vector_norm(a, dim=dim) * torch.linalg.vector_norm(b, dim=dim)
    return (a * b).sum(dim) / (norms + COSINE_EPS)


def _pearson(a: Tensor, b: Tensor, dim: int) -> Tensor:
    """Cosine of the vectors centred along ``dim``."""
    return _cosine(a - a.mean(dim, keepdim=True), b - b.mean(dim, keepdim=True), dim)


def dist_loss(
    s: Tensor,
    t: Tensor,
    beta: float,
    gamma: float,
    temperature: float,
    temperature_squared: bool,
    activation: str,
    mask: Tensor | None,
) -> Tensor:
    """DIST loss of student logits ``s`` against teacher logits ``t``.

    Args:
        s: (rows, C) or (N, C, S) student logits (rows = N * S).
        t: teacher logits of the same shape.
        beta: weight of the inter (per-sample) term.
        gamma: weight of the intra (per-class) term.
        temperature: T > 0, applied before the activation.
        temperature_squared: multiply both terms by T^2 (the classification recipe); False for
            the segmentation / detection variants.
        activation: "softmax" over the class dim, or element-wise "sigmoid".
        mask: optional bool (rows,); False rows drop out of the inter mean and of the
            per-class statistics (exactly as if they were removed). An all-False mask gives
            NaN (the mean of no rows).

    Returns:
        A scalar in compute_dtype(s, t). B = 1 gives intra = 1 exactly (a centred column of
        one entry is the zero vector), with zero gradient.
    """
    dtype = compute_dtype(s, t)
    s, t = kept_rows_2d(s, mask), kept_rows_2d(t, mask)
    act = torch.sigmoid if activation == "sigmoid" else (lambda z: torch.softmax(z, dim=1))
    ys, yt = act(s.to(dtype) / temperature), act(t.to(dtype) / temperature)
    scale = temperature**2 if temperature_squared else 1.0
    if mask is None:
        inter = 1 - _pearson(ys, yt, dim=1).mean()
        intra = 1 - _pearson(ys, yt, dim=0).mean()
    else:
        # torch.where (not multiplication) so a NaN/Inf in a padding row cannot leak in.
        kept = mask.sum().to(dtype)
        inter = 1 - torch.where(mask, _pearson(ys, yt, dim=1), 0.0).sum() / kept
        keep = mask[:, None]
        ys, yt = torch.where(keep, ys, 0.0), torch.where(keep, yt, 0.0)
        # Centre each column with its kept-row mean; dropped rows stay exactly 0.
        ys_c = torch.where(keep, ys - ys.sum(0) / kept, 0.0)
        yt_c = torch.where(keep, yt - yt.sum(0) / kept, 0.0)
        intra = 1 - _cosine(ys_c, yt_c, dim=0).mean()
    return beta * scale * inter + gamma * scale * intra

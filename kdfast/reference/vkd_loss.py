"""Reference VkD representation loss (semantics 4): Miles, Elezi, Deng, "VkD: Improving Knowledge
Distillation using Orthogonal Projections", CVPR 2024 (roymiles/VkD).

The loss compares the orthogonally projected student features with normalised teacher
features; the projection itself lives in :class:`kdfast.nn.OrthogonalProjector` and is
applied before this function. Three normalisations are public helpers:

* :func:`standardize`: per-sample LayerNorm over channels (official default, teacher only);
* :func:`batch_standardize`: per-channel over the batch (official detection variant, both
  sides), with an eps the official code lacks;
* :func:`whiten`: ZCA whitening over the batch [unverified: described in the paper, absent
  from the released code].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdfast._validation import compute_dtype

#: eps of every normalisation (semantics 4).
EPS = 1e-5


def _scaled(x: Tensor, dim: int, eps: float) -> tuple[Tensor, Tensor]:
    """(x / c, eps / c^2) with c an exact power of two near max |x| along ``dim`` where that
    max is >= 2^50, else c = 1 (no host synchronisation: traceable): (x - mean) /
    sqrt(var + eps) is unchanged, and float32 features near 1e30 no longer overflow the
    variance (1e60) into inf and NaN."""
    m = x.detach().abs().amax(dim=dim, keepdim=True)
    big = torch.isfinite(m) & (m >= 2.0**50)
    c = torch.where(big, torch.exp2(torch.frexp(m).exponent.to(x.dtype)), 1.0)
    return x / c, eps / (c * c)


def standardize(x: Tensor, eps: float = EPS) -> Tensor:
    """Per-sample LayerNorm over the last dim, no affine: (x - mean) / sqrt(var + eps).

    Biased variance, as ``F.layer_norm`` and the official ``F.layer_norm(t, (D,))``. Rows
    with max |x| >= 2^50 are divided by an exact power of two first (eps with it).
    x: (B, D); returns (B, D) in promote_types(x, float32).
    """
    y, eps = _scaled(x.to(compute_dtype(x)), -1, eps)
    mean = y.mean(dim=-1, keepdim=True)
    var = (y - mean).square().mean(dim=-1, keepdim=True)
    return (y - mean) / (var + eps).sqrt()


def batch_standardize(x: Tensor, eps: float = EPS) -> Tensor:
    """Per-channel standardisation over the batch: (x - mean_0) / sqrt(var_0 + eps).

    var_0 is the unbiased (B - 1) variance over dim 0, as the official
    ``(x - x.mean(0)) / x.std(0)`` of roymiles/VkD's ViDT criterion. Deviation: the official
    code has no eps and returns NaN (0 / 0) on a constant channel. kdfast puts eps inside the
    square root, the BatchNorm convention, rather than after it ((x - mean) / (std + eps)):
    a constant channel maps to 0 either way, but inside the root the gain on a (nearly)
    constant channel is bounded by eps^-1/2 ~ 316 instead of 1 / eps = 1e5. For channels with
    var >> eps the result differs from the official one by a relative eps / (2 var).
    Channels with max |x| >= 2^50 are divided by an exact power of two first (eps with it).
    x: (B, D), B >= 2; returns (B, D) in promote_types(x, float32).
    """
    y, eps = _scaled(x.to(compute_dtype(x)), 0, eps)
    mean = y.mean(dim=0, keepdim=True)
    var = y.var(dim=0, correction=1, keepdim=True)
    return (y - mean) / (var + eps).sqrt()


def _inverse_sqrt(eigenvalues: Tensor, eps: float) -> Tensor:
    # Clamping at 0 removes the tiny negative eigenvalues rounding gives a singular matrix.
    return (eigenvalues.clamp_min(0.0) + eps).rsqrt()


def _zca_from_covariance(xc: Tensor, eps: float) -> Tensor:
    """Z = Xc V diag(lambda + eps)^(-1/2) V^T from the (D, D) biased covariance."""
    lam, v = torch.linalg.eigh(xc.T @ xc / xc.shape[0])
    return xc @ (v * _inverse_sqrt(lam, eps)) @ v.T


def _zca_from_gram(xc: Tensor, eps: float) -> Tensor:
    """The same Z from the (B, B) Gram matrix: Z = U diag(mu + eps)^(-1/2) U^T Xc.

    With the thin SVD Xc = U S V^T (mu = S^2 / B, the covariance's non-zero spectrum) this
    is U S (S^2 / B + eps)^(-1/2) V^T: Xc h(Xc^T Xc / B) = h(Xc Xc^T / B) Xc for any
    spectral function h. Null directions of either matrix meet Xc in zero, so both forms
    agree exactly in exact arithmetic.
    """
    mu, u = torch.linalg.eigh(xc @ xc.T / xc.shape[0])
    return (u * _inverse_sqrt(mu, eps)) @ (u.T @ xc)


def whiten(x: Tensor, eps: float = EPS) -> Tensor:
    """ZCA whitening over the batch [unverified: the paper's description, no official code].

    Z = (X - mean) V diag(lambda + eps)^(-1/2) V^T with (V, lambda) the eigenpairs of the
    biased batch covariance, lambda clamped at 0, so cov(Z) = V diag(lambda / (lambda + eps))
    V^T. Evaluated in float64 (an ill-conditioned path) from whichever of the (D, D)
    covariance or the (B, B) Gram matrix is smaller.

    Gradient: autograd records it only when ``x`` requires grad (a plain teacher costs no
    graph). The eigendecomposition's derivative needs distinct eigenvalues: a repeated
    eigenvalue (other than the single structural 0 of the centred Gram matrix) gives
    Inf/NaN gradients, so online distillation through "whiten" needs eigenvalue gaps.

    x: (B, D), B >= 2; returns (B, D) in promote_types(x, float32).
    """
    xc = x.to(torch.float64)
    xc = xc - xc.mean(dim=0, keepdim=True)
    b, d = xc.shape
    z = _zca_from_gram(xc, eps) if b < d else _zca_from_covariance(xc, eps)
    return z.to(compute_dtype(x))


def vkd_loss(projected_student: Tensor, teacher: Tensor, normalize: str | None) -> Tensor:
    """SmoothL1 mean over B x D between the projected student and the normalised teacher.

    Args:
        projected_student: (B, D) student features after the orthogonal projector.
        teacher: (B, D) teacher features (validated by :mod:`kdfast.functional`).
        normalize: "standardize" (teacher, per sample), "batch_standardize" (both sides,
            per channel), "whiten" (teacher, ZCA over the batch) or None.

    Returns:
        Scalar in promote_types(projected_student, teacher, float32).
    """
    dtype = compute_dtype(projected_student, teacher)
    p, t = projected_student.to(dtype), teacher.to(dtype)
    if normalize == "standardize":
        t = standardize(t)
    elif normalize == "batch_standardize":
        p, t = batch_standardize(p), batch_standardize(t)
    elif normalize == "whiten":
        t = whiten(t)
    return F.smooth_l1_loss(p, t, beta=1.0)

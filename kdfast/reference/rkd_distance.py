"""Reference RKD distance loss (semantics 1.1-1.2): Park et al., "Relational Knowledge
Distillation", CVPR 2019 (lenscloth/RKD).

The official pdist takes squared norms from a separate row sum and works in the input
dtype; in float32 that cancels catastrophically for features far from the origin or in tight
clusters. kdfast takes every distance from the direct float64 differences x_i - x_j (exact for
float32 and half inputs), so this reference is the float64 truth of semantics 7 for every input
dtype, near-duplicate pairs included (semantics 1.5: a Gram expansion would cancel there).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdfast._validation import compute_dtype

#: Floor of the squared distance: every off-diagonal distance is >= 1e-6 (official value).
D2_MIN = 1e-12


def pdist(e: Tensor) -> Tensor:
    """Pairwise Euclidean distances of the rows of ``e`` (semantics 1.1), in float64.

    D_ij = ||x_i - x_j|| from the direct differences (``torch.cdist`` without its Gram
    shortcut: O(N^2) memory; a duplicate pair gives exactly 0 before the clamp), clamped
    below at sqrt(1e-12) = 1e-6 with no gradient below the clamp (an exact duplicate pair
    gets none); the diagonal is exactly 0 and carries no gradient.

    Args:
        e: (N, D) features of any floating dtype (converted to float64 first: the
            differences of float32 and half values are exact, and nothing is TF32).

    Returns:
        (N, N) float64 distances.
    """
    x = e.to(torch.float64)
    d = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")
    d = d.clamp_min(D2_MIN**0.5)
    # A constant mask (not an in-place write) keeps autograd and torch.compile happy; the
    # product, unlike torch.where, still propagates a NaN input on the diagonal.
    off_diagonal = 1.0 - torch.eye(e.shape[0], dtype=torch.float64, device=e.device)
    return d * off_diagonal


def _normalised_distances(e: Tensor) -> Tensor:
    """psi = D / mu with mu the mean of the N (N - 1) off-diagonal distances."""
    d = pdist(e)
    n = d.shape[0]
    return d / (d.sum() / (n * (n - 1)))


def rkd_distance(s: Tensor, t: Tensor) -> Tensor:
    """RKD distance loss: mean over all N^2 entries of SmoothL1(psi_s - psi_t) (semantics 1.2).

    The gradient flows through mu_s, and through the teacher side when ``t`` requires grad
    (the official code detaches the teacher). Computed in float64.

    Args:
        s: (N, Ds) student features, N >= 2 (validated by :mod:`kdfast.functional`).
        t: (N, Dt) teacher features.

    Returns:
        Scalar in promote_types(s, t, float32).
    """
    loss = F.smooth_l1_loss(_normalised_distances(s), _normalised_distances(t), beta=1.0)
    return loss.to(compute_dtype(s, t))

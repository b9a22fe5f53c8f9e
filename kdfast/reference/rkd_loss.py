"""Reference RKD loss with both terms (semantics 1.4): the weighted sum of the reference
distance and angle losses (:mod:`kdfast.reference.rkd_distance`,
:mod:`kdfast.reference.rkd_angle`)."""

from __future__ import annotations

from torch import Tensor

from kdfast.reference.rkd_angle import rkd_angle
from kdfast.reference.rkd_distance import rkd_distance


def rkd_loss(s: Tensor, t: Tensor, distance_weight: float, angle_weight: float) -> Tensor:
    """distance_weight * L_D + angle_weight * L_A; a term whose weight is 0 is skipped.

    Args:
        s: (N, Ds) student features (validated by :mod:`kdfast.functional`).
        t: (N, Dt) teacher features.
        distance_weight, angle_weight: finite, >= 0.

    Returns:
        Scalar in promote_types(s, t, float32).
    """
    terms = []
    if distance_weight != 0:
        terms.append(distance_weight * rkd_distance(s, t))
    if angle_weight != 0:
        terms.append(angle_weight * rkd_angle(s, t))
    return terms[0] if len(terms) == 1 else terms[0] + terms[1]

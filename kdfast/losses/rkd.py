"""RKD loss modules: Park, Kim, Lu, Cho, "Relational Knowledge Distillation", CVPR 2019
(official code: lenscloth/RKD). docs/semantics.md section 1.

Recipes: the official metric-learning scripts use distance_weight = 1, angle_weight = 2 (the
defaults here) on the embeddings; the common classification recipe applies RKD to the
penultimate pooled feature with weights 25 and 50, added to cross-entropy.
"""

from __future__ import annotations

from torch import Tensor, nn

from kdfast import distributed, functional
from kdfast._validation import check_bool, check_weight

_GATHER_DOC = """
    gather: False (default) computes over the local batch. True, when torch.distributed is
        initialised, computes over the concatenated batch of every rank (local batch sizes
        may differ; N limits apply to the global batch); each rank's input gradient is then
        world_size times the single-process gradient of its slice, so that after DDP's
        gradient averaging the parameter gradients equal one process on the whole batch
        (:mod:`kdfast.distributed`). Without torch.distributed it is the local loss.
    process_group: the group to gather over (default: the world)."""


__all__ = ["RKDDistanceLoss", "RKDAngleLoss", "RKDLoss"]


class _Gathering(nn.Module):
    def __init__(self, gather: bool = False, process_group=None) -> None:
        super().__init__()
        self.gather = check_bool("gather", gather)
        self.process_group = process_group

    def _kwargs(self) -> dict:
        return {"gather": self.gather, "process_group": self.process_group}


class RKDDistanceLoss(_Gathering):
    __doc__ = (
        """Distance-wise RKD: SmoothL1 between mean-normalised pairwise distances (semantics 1.2).

    forward(student (N, Ds, *), teacher (N, Dt, *)) -> scalar; inputs are flattened to
    (N, -1), N >= 2. Invariant to translating or scaling either set.

    Args:"""
        + _GATHER_DOC
    )

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        return functional.rkd_distance(student, teacher, **self._kwargs())


class RKDAngleLoss(_Gathering):
    __doc__ = (
        """Angle-wise RKD: SmoothL1 between the cosines of all N^3 triplet angles (semantics 1.3).

    forward(student (N, Ds, *), teacher (N, Dt, *)) -> scalar; N >= 3. With gather=True each
    rank evaluates the angles at its own vertices (N^3 / world_size work).

    Args:"""
        + _GATHER_DOC
    )

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        return functional.rkd_angle(student, teacher, **self._kwargs())


class RKDLoss(_Gathering):
    """RKD: distance_weight * L_D + angle_weight * L_A (Park et al., CVPR 2019; semantics 1.4).

    Args:
        distance_weight: weight of the distance term (default 1.0, the metric-learning
            recipe; 25 in the classification recipe). 0 skips the term.
        angle_weight: weight of the angle term (default 2.0; 50 for classification). 0 skips
            the term, and then a batch of N = 2 is accepted (an angle needs 3 points).
        gather, process_group: as for :class:`RKDDistanceLoss`; the features are gathered
            once for both terms.

    Without gather, this is :func:`kdfast.functional.rkd_loss`: the inputs are validated once
    and, on the cpp backend with both weights > 0, one op forms each side's float64 Gram
    matrix once per step and shares it between the terms and with the backward
    (docs/semantics.md 1.5); other backends add the two terms' ops.

    forward(student (N, Ds, *), teacher (N, Dt, *)) -> scalar in
    promote_types(student, teacher, float32). The teacher is differentiated when it
    requires grad (semantics 0).
    """

    def __init__(
        self,
        distance_weight: float = 1.0,
        angle_weight: float = 2.0,
        *,
        gather: bool = False,
        process_group=None,
    ) -> None:
        super().__init__(gather, process_group)
        self.distance_weight = check_weight("distance_weight", distance_weight)
        self.angle_weight = check_weight("angle_weight", angle_weight)
        if self.distance_weight == 0 and self.angle_weight == 0:
            raise ValueError("RKDLoss needs distance_weight or angle_weight > 0, got both 0")

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        if self.gather and distributed.is_distributed(self.process_group):
            return self._forward_gathered(student, teacher)
        return functional.rkd_loss(student, teacher, self.distance_weight, self.angle_weight)

    def _forward_gathered(self, student: Tensor, teacher: Tensor) -> Tensor:
        min_rows = 3 if self.angle_weight != 0 else 2
        s, t, start, stop = functional.gather_features(
            student, teacher, min_rows, "RKDLoss", self.process_group
        )
        terms = []
        if self.distance_weight != 0:
            terms.append(self.distance_weight * functional._call("rkd_distance", s, t))
        if self.angle_weight != 0:
            angle = functional.rkd_angle_global(s, t, start, stop, self.process_group)
            terms.append(self.angle_weight * angle)
        return terms[0] if len(terms) == 1 else terms[0] + terms[1]

    def extra_repr(self) -> str:
        return (
            f"distance_weight={self.distance_weight}, angle_weight={self.angle_weight}, "
            f"gather={self.gather}"
        )

"""Drop-in replacements for the official codebases' loss classes, backed by kdfast's kernels.

Each class keeps its official name, constructor signature and defaults, forward signature and
return convention, so that ``from <official module> import X`` becomes
``from kdfast.compat import X``. The numbers are the official code's in float64 (loss within
1e-9, gradient within 1e-7 relative, ``tests/test_compat.py``) except where a class's
docstring lists a deviation.

=========================================  ===========================================
official entry point                       here
=========================================  ===========================================
lenscloth/RKD ``metric/loss.py``           :class:`RkdDistance`, :class:`RKdAngle`
hunto/DIST_KD (image_classification_sota)  :class:`DIST`, :class:`KLDivergence`
facebookresearch/deit ``losses.py``        :class:`DistillationLoss`
HobbitLong/RepDistiller ``distiller_zoo``  :class:`RKDLoss`, :class:`DistillKL`
roymiles/VkD ``engine.py`` (no class)      :class:`VkDLoss`
=========================================  ===========================================

Deviations shared by the RKD classes (semantics 1): N < 2 (N < 3 for angles) raises
ValueError where the official code returns NaN; at an exact duplicate student pair the
compiled kernels give zero gradient through that pair (the official gradient there is a
meaningless ~1e10 from F.normalize's eps, which the reference backend reproduces);
float32 and half inputs are computed accurately (the official float32 Gram formula is not).
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from kdfast import functional as KF
from kdfast._validation import check_choice, check_tensor
from kdfast.losses.kd import DeiTDistillationLoss
from kdfast.losses.rkd import RKDLoss as _KDFastRKDLoss
from kdfast.losses.vkd import VkDLoss as _KDFastVkDLoss

__all__ = [
    "DIST",
    "DistillKL",
    "DistillationLoss",
    "KLDivergence",
    "RKDLoss",
    "RKdAngle",
    "RkdDistance",
    "VkDLoss",
]

_KL_REDUCTIONS = ("none", "batchmean", "sum", "mean")


def _kl_sum_over_batch(z_s: Tensor, z_t: Tensor, temperature: float, batch: int) -> Tensor:
    """T^2 * sum KL(p_t || p_s) / batch (``F.kl_div(..., 'sum') * T^2 / z_s.shape[0]``)."""
    return KF.kd_loss(z_s, z_t, temperature, "sum") / batch


# ---------------------------------------------------------------- lenscloth/RKD metric/loss.py


class RkdDistance(nn.Module):
    """lenscloth/RKD ``RkdDistance``: distance-wise RKD (semantics 1.2).

    forward(student (N, Ds), teacher (N, Dt)) -> scalar. The teacher is a constant (the
    official code computes it under ``no_grad``). Deviations: N < 2 raises ValueError
    (official: NaN); inputs of rank > 2 are flattened to (N, -1) (official: wrong shapes);
    the shared RKD deviations of this module's docstring.
    """

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        return KF.rkd_distance(student, check_tensor("teacher", teacher).detach())


class RKdAngle(nn.Module):
    """lenscloth/RKD ``RKdAngle``: angle-wise RKD (semantics 1.3).

    forward(student (N, Ds), teacher (N, Dt)) -> scalar; the teacher is a constant, as in
    the official code. Deviations: N < 3 raises ValueError (official: a loss of 0 for N = 2,
    NaN for N = 1); the shared RKD deviations of this module's docstring.
    """

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        return KF.rkd_angle(student, check_tensor("teacher", teacher).detach())


# ------------------------------------------------------------------------- hunto/DIST_KD


class DIST(nn.Module):
    """hunto/DIST_KD ``DIST(beta=1.0, gamma=1.0, tau=1.0)`` (semantics 2).

    ``beta * tau^2 * inter + gamma * tau^2 * intra`` on ``softmax(z / tau)``, the cosine with
    eps 1e-8 added to the product of the norms (as the official code; torchdistill's
    ``DISTLoss`` clamps each norm instead). The teacher is used as given (the official code
    does not detach it either).

    forward(z_s (B, C), z_t (B, C)) -> scalar in promote_types(z_s, z_t, float32). (N, C, *)
    logits are treated as N * prod(*) rows (official: not defined for them).
    """

    def __init__(self, beta: float = 1.0, gamma: float = 1.0, tau: float = 1.0) -> None:
        super().__init__()
        self.beta, self.gamma, self.tau = KF.check_dist_options(beta, gamma, tau, True, "softmax")

    def forward(self, z_s: Tensor, z_t: Tensor) -> Tensor:
        return KF.dist_loss(z_s, z_t, self.beta, self.gamma, self.tau)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, gamma={self.gamma}, tau={self.tau}"


class KLDivergence(nn.Module):
    """hunto/DIST_KD ``KLDivergence(tau=1.0, reduction='batchmean')``: Hinton KD.

    ``tau^2 * F.kl_div(log_softmax(z_s / tau, 1), softmax(z_t / tau, 1), reduction)``:
    "batchmean" divides the sum by z_s.shape[0], "mean" by numel, "sum" sums; "none" returns
    the element-wise (B, C, *) tensor of ``F.kl_div`` (evaluated with plain PyTorch ops: kdfast
    has no element-wise kernel). Any other reduction raises ValueError (official: assert).

    forward(z_s (B, C, *), z_t (same shape)) -> scalar, or (B, C, *) for "none".
    """

    def __init__(self, tau: float = 1.0, reduction: str = "batchmean") -> None:
        super().__init__()
        check_choice("reduction", reduction, _KL_REDUCTIONS)
        self.tau = KF.check_kd_options(tau, "sum")
        self.reduction = reduction

    def forward(self, z_s: Tensor, z_t: Tensor) -> Tensor:
        if self.reduction == "none":
            z_s, z_t = check_tensor("z_s", z_s), check_tensor("z_t", z_t)
            log_p_s = F.log_softmax(z_s / self.tau, dim=1)
            p_t = F.softmax(z_t / self.tau, dim=1)
            return self.tau**2 * F.kl_div(log_p_s, p_t, reduction="none")
        if self.reduction == "batchmean":
            return _kl_sum_over_batch(z_s, z_t, self.tau, check_tensor("z_s", z_s).shape[0])
        return KF.kd_loss(z_s, z_t, self.tau, self.reduction)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, reduction={self.reduction!r}"


# ------------------------------------------------------------- facebookresearch/deit losses.py


class DistillationLoss(DeiTDistillationLoss):
    """facebookresearch/deit ``DistillationLoss(base_criterion, teacher_model,
    distillation_type, alpha, tau)`` (semantics 3), every argument required as in DeiT.

    forward(inputs, outputs, labels) -> scalar: ``outputs`` is (B, C) cls logits or a tuple
    (cls_logits (B, C), dist_logits (B, C)); base = base_criterion(cls_logits, labels);
    "none" returns base; otherwise the teacher runs on ``inputs`` under ``no_grad`` and
    ``(1 - alpha) * base + alpha * L_kd`` with "soft" ``L_kd = tau^2 * sum KL / numel`` and
    "hard" ``L_kd = cross_entropy(dist_logits, argmax teacher)``. A plain tensor with a type
    other than "none" raises ValueError, as in DeiT.

    Deviations: bad arguments raise ValueError / TypeError (DeiT: assert, or nothing: alpha
    must lie in [0, 1] and tau be > 0 here); the teacher is registered as the submodule
    ``teacher`` (state_dict keys ``teacher.*``, DeiT: ``teacher_model.*``);
    ``teacher_model`` reads it. ``forward`` also accepts kdfast's ``teacher_logits=``.
    """

    def __init__(
        self,
        base_criterion: Callable[[Tensor, Tensor], Tensor],
        teacher_model: Callable[[Tensor], Tensor] | None,
        distillation_type: str,
        alpha: float,
        tau: float,
    ) -> None:
        super().__init__(base_criterion, teacher_model, distillation_type, alpha, temperature=tau)

    @property
    def teacher_model(self) -> Callable[[Tensor], Tensor] | None:
        """DeiT's name of the teacher."""
        return self.teacher


# --------------------------------------------------------- HobbitLong/RepDistiller distiller_zoo


class RKDLoss(nn.Module):
    """RepDistiller ``RKDLoss(w_d=25, w_a=50)``: ``w_d * L_D + w_a * L_A`` (semantics 1.4).

    forward(f_s (N, *), f_t (N, *)) -> scalar: both flattened to (N, -1), the teacher a
    constant (official: ``no_grad``). Deviations: weights must be finite and >= 0, not both
    0 (ValueError); a weight of 0 skips its term, so N = 2 is accepted with w_a = 0 (the
    official code computes both terms); N < 3 raises otherwise; the shared RKD deviations of
    this module's docstring.
    """

    def __init__(self, w_d: float = 25, w_a: float = 50) -> None:
        super().__init__()
        self._loss = _KDFastRKDLoss(distance_weight=w_d, angle_weight=w_a)
        self.w_d, self.w_a = self._loss.distance_weight, self._loss.angle_weight

    def forward(self, f_s: Tensor, f_t: Tensor) -> Tensor:
        return self._loss(f_s, check_tensor("f_t", f_t).detach())

    def extra_repr(self) -> str:
        return f"w_d={self.w_d}, w_a={self.w_a}"


class DistillKL(nn.Module):
    """RepDistiller ``DistillKL(T)``: ``F.kl_div(log_softmax(y_s / T), softmax(y_t / T),
    'sum') * T^2 / y_s.shape[0]`` (semantics 3; equal to batchmean for (B, C) logits).

    forward(y_s (B, C, *), y_t (same shape)) -> scalar. The teacher is used as given, as in
    RepDistiller (which feeds it logits computed under ``no_grad``).
    """

    def __init__(self, T: float) -> None:
        super().__init__()
        self.T = KF.check_kd_options(T, "sum")

    def forward(self, y_s: Tensor, y_t: Tensor) -> Tensor:
        return _kl_sum_over_batch(y_s, y_t, self.T, check_tensor("y_s", y_s).shape[0])

    def extra_repr(self) -> str:
        return f"T={self.T}"


# ------------------------------------------------------------------------------ roymiles/VkD


class VkDLoss(_KDFastVkDLoss):
    """VkD's representation loss (roymiles/VkD ``engine.py``; semantics 4).

    The official code has no loss class: its training step computes
    ``F.smooth_l1_loss(projector(z_s.mean(1)), F.layer_norm(z_t_pool, (C,)))`` inline, with
    the projector a module of the student. This class is that line with kdfast's orthogonal
    projector held by the loss (the SPEC form of semantics 4, not the released Householder
    map): ``VkDLoss(student_dim, teacher_dim)``; give ``parameters()`` to the optimiser.

    forward(z_s (B, Ds) pooled student feature, z_t (B, Dt) pooled teacher feature) ->
    scalar. Deviation: the projector's parameterisation (the official one collapses to 0
    under weight decay, semantics 4); same P gives the same loss.
    """

    def __init__(self, student_dim: int, teacher_dim: int) -> None:
        super().__init__(student_dim, teacher_dim, normalize="standardize")

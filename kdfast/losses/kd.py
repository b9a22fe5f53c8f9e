"""Hinton KD, generalised JSD and DeiT distillation as ``nn.Module`` drop-ins (semantics 3)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdfast import functional as KF
from kdfast._constants import DEIT_DISTILLATION_TYPES
from kdfast._deprecation import renamed_keywords
from kdfast._validation import check_choice, check_logit_pair, check_positive, is_real


class KDLoss(nn.Module):
    """Hinton KD: ``T^2 * KL(p_t || p_s)`` with ``p = softmax(z / T)`` (semantics 3).

    Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", 2015.

    Args:
        temperature: T > 0. Default 1.
        reduction: "batchmean" (default: sum / rows, the mathematically correct KL mean),
            "sum", "mean" (sum / (rows * C), as ``F.kl_div``) or "none" (a (rows,) vector of
            T^2 * per-row KL; ``F.kl_div``'s "none" is element-wise instead).
        teacher_kind: what the teacher tensor holds: "logits" (default), or cached "probs" /
            "log_probs" already at temperature T (``teacher=``: deprecated alias).

    Shapes:
        student, teacher: (B, C) or (N, C, *) (class dim 1; N * prod(*) rows).
        mask: optional bool (rows,); False rows drop out, means are over kept rows (an
        all-False mask gives NaN for "batchmean" and "mean", 0 for "sum").
        Output: scalar, or (rows,) for "none", in promote_types(student, teacher, float32).

    Example::

        >>> loss = KDLoss(temperature=4.0)(student_logits, teacher_logits.detach())
    """

    @renamed_keywords(teacher=("teacher_kind", lambda value: isinstance(value, str)))
    def __init__(
        self, temperature: float = 1.0, reduction: str = "batchmean", teacher_kind: str = "logits"
    ) -> None:
        super().__init__()
        self.temperature = KF.check_kd_options(temperature, reduction, teacher_kind)
        self.reduction = reduction
        self.teacher_kind = teacher_kind

    @property
    def teacher(self) -> str:
        """Deprecated name of :attr:`teacher_kind` (read-only)."""
        return self.teacher_kind

    def forward(self, student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
        return KF.kd_loss(
            student, teacher, self.temperature, self.reduction, mask, self.teacher_kind
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, reduction={self.reduction!r}, "
            f"teacher_kind={self.teacher_kind!r}"
        )


class JSDLoss(nn.Module):
    """Generalised Jensen-Shannon divergence of GKD (Agarwal et al., ICLR 2024), as TRL's
    ``GKDTrainer.generalized_jsd_loss`` and Liger-Kernel's ``LigerJSD`` compute it.

    With ``p = softmax(z / T)`` and ``m = beta p_t + (1 - beta) p_s``, per row
    ``beta KL(p_t || m) + (1 - beta) KL(p_s || m)``; ``beta = 0`` is the forward
    ``KL(p_t || p_s)`` and ``beta = 1`` the reverse ``KL(p_s || p_t)`` (TRL's end points).
    No T^2 factor. See :func:`kdfast.functional.jsd_loss`.

    Args:
        beta: in [0, 1], the teacher's weight in the mixture. Default 0.5.
        temperature: T > 0, finite. Default 1.
        reduction: "batchmean" (default: sum / rows), "sum", "mean" (sum / (rows * C)) or
            "none" (a (rows,) vector of per-row divergences).

    Shapes:
        student, teacher: (B, C) or (N, C, *) (class dim 1; N * prod(*) rows); token
        logits (B, L, V) are passed as (B * L, V) (as given, L would be the class dim).
        mask: optional bool (rows,); False rows drop out (TRL's ``labels != -100``), means
        are over kept rows.
        Output: scalar, or (rows,) for "none", in promote_types(student, teacher, float32).

    Example::

        >>> loss = JSDLoss(beta=0.5)(student_logits.view(-1, V), teacher_logits.view(-1, V))
    """

    def __init__(
        self, beta: float = 0.5, temperature: float = 1.0, reduction: str = "batchmean"
    ) -> None:
        super().__init__()
        self.beta, self.temperature = KF.check_jsd_options(beta, temperature, reduction)
        self.reduction = reduction

    def forward(self, student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
        return KF.jsd_loss(student, teacher, self.beta, self.temperature, self.reduction, mask)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, temperature={self.temperature}, reduction={self.reduction!r}"


class ReverseKLLoss(nn.Module):
    """Reverse KL ``KL(p_s || p_t)`` per row with ``p = softmax(z / T)``, no T^2 factor
    (TRL's and Liger-Kernel's JSD at beta = 1). See :func:`kdfast.functional.reverse_kl_loss`.

    Args:
        temperature: T > 0, finite. Default 1.
        reduction: "batchmean" (default), "sum", "mean" or "none" (as :class:`JSDLoss`).

    Shapes: as :class:`JSDLoss`.

    Example::

        >>> loss = ReverseKLLoss()(student_logits.view(-1, V), teacher_logits.view(-1, V))
    """

    def __init__(self, temperature: float = 1.0, reduction: str = "batchmean") -> None:
        super().__init__()
        _, self.temperature = KF.check_jsd_options(1.0, temperature, reduction)
        self.reduction = reduction

    def forward(self, student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
        return KF.reverse_kl_loss(student, teacher, self.temperature, self.reduction, mask)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, reduction={self.reduction!r}"


class DeiTDistillationLoss(nn.Module):
    """DeiT's distillation loss (Touvron et al., "Training data-efficient image transformers
    & distillation through attention", ICML 2021; facebookresearch/deit ``losses.py``).

    ``total = (1 - alpha) * base_criterion(cls_logits, labels) + alpha * L_kd`` with
    * "soft": ``L_kd = T^2 * sum KL(p_t || p_s) / (B * C)`` (DeiT divides by numel, 1/C of
      batchmean), p = softmax(z / T) of the distillation head and of the teacher;
    * "hard": ``L_kd = cross_entropy(dist_logits, teacher_logits.argmax(1))`` (no label
      smoothing; ties go to the lowest class index);
    * "none": the base loss alone.

    Args:
        base_criterion: callable ``(cls_logits, labels) -> loss`` (e.g. CE with mixup targets).
        teacher: module or callable run on ``inputs`` under ``torch.no_grad``; may be None
            when every call passes ``teacher_logits``. A module is registered as a submodule,
            as in DeiT (its parameters appear in this module's ``parameters()``).
        distillation_type: "none" (default), "soft" or "hard".
        alpha: weight of the distillation term, in [0, 1]. Default 0.5.
        temperature: T > 0 of the soft loss. Default 1 (``tau=``: deprecated alias).

    Forward ``(inputs, outputs, labels, teacher_logits=None)``:
        outputs: (B, C) cls logits, or a tuple (cls_logits, dist_logits) of (B, C) tensors
        (required unless the type is "none"). teacher_logits: optional precomputed (B, C)
        teacher logits, used instead of running the teacher; used as given (a tensor that
        requires grad is differentiated, semantics 0; DeiT's frozen teacher is ``.detach()``).
        Returns a scalar.
    """

    @renamed_keywords(tau="temperature")
    def __init__(
        self,
        base_criterion: Callable[[Tensor, Tensor], Tensor],
        teacher: Callable[[Tensor], Tensor] | None,
        distillation_type: str = "none",
        alpha: float = 0.5,
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        if not callable(base_criterion):
            raise TypeError(f"base_criterion must be callable, got {type(base_criterion).__name__}")
        if teacher is not None and not callable(teacher):
            raise TypeError(f"teacher must be callable or None, got {type(teacher).__name__}")
        check_choice("distillation_type", distillation_type, DEIT_DISTILLATION_TYPES)
        if not is_real(alpha) or not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
        self.temperature = check_positive("temperature", temperature, finite=True)
        self.base_criterion = base_criterion
        self.teacher = teacher
        self.distillation_type = distillation_type
        self.alpha = float(alpha)

    @property
    def tau(self) -> float:
        """Deprecated name of :attr:`temperature` (read-only)."""
        return self.temperature

    def forward(
        self,
        inputs: Tensor,
        outputs: Tensor | Sequence[Tensor],
        labels: Tensor,
        teacher_logits: Tensor | None = None,
    ) -> Tensor:
        cls_logits, dist_logits = _split_heads(outputs)
        base_loss = self.base_criterion(cls_logits, labels)
        if self.distillation_type == "none":
            return base_loss
        if dist_logits is None:
            raise ValueError(
                f"outputs must be a tuple (cls_logits, dist_logits) when "
                f"distillation_type={self.distillation_type!r}, got a tensor of shape "
                f"{tuple(cls_logits.shape)}"
            )
        if teacher_logits is None:
            if self.teacher is None:
                raise ValueError("teacher_logits must be given when the loss has no teacher")
            with torch.no_grad():  # DeiT: no backprop through the teacher
                teacher_logits = self.teacher(inputs)
        check_logit_pair(dist_logits, teacher_logits, names=("dist_logits", "teacher_logits"))
        if self.distillation_type == "soft":
            # kd_loss "mean" = T^2 * sum KL / numel: DeiT's F.kl_div(..., "sum") * T^2 / numel.
            distillation_loss = KF.kd_loss(dist_logits, teacher_logits, self.temperature, "mean")
        else:
            distillation_loss = F.cross_entropy(dist_logits, teacher_logits.argmax(dim=1))
            # argmax picks a label even from a NaN row: the NaN must reach the loss instead
            nan = teacher_logits.isnan().any()
            distillation_loss = torch.where(nan, torch.nan, distillation_loss)
        return (1 - self.alpha) * base_loss + self.alpha * distillation_loss

    def extra_repr(self) -> str:
        return (
            f"distillation_type={self.distillation_type!r}, alpha={self.alpha}, "
            f"temperature={self.temperature}"
        )


def _split_heads(outputs: Tensor | Sequence[Tensor]) -> tuple[Tensor, Tensor | None]:
    """(cls_logits, dist_logits or None) from a tensor or a (cls, dist) pair."""
    if isinstance(outputs, Tensor):
        return outputs, None
    if not isinstance(outputs, (tuple, list)) or len(outputs) != 2:
        raise TypeError(
            "outputs must be a tensor or a pair (cls_logits, dist_logits), got "
            f"{type(outputs).__name__}"
            + (f" of length {len(outputs)}" if isinstance(outputs, (tuple, list)) else "")
        )
    return outputs[0], outputs[1]


def deit_inference_logits(outputs: Tensor | Sequence[Tensor]) -> Tensor:
    """Prediction logits of a distilled ViT: the mean of its two heads (DeiT, semantics 3).

    ``outputs`` is (cls_logits, dist_logits), each (B, C); a plain tensor (a model without
    a distillation head) is returned unchanged.
    """
    cls_logits, dist_logits = _split_heads(outputs)
    if dist_logits is None:
        return cls_logits
    if cls_logits.shape != dist_logits.shape:
        raise ValueError(
            f"cls_logits and dist_logits must have the same shape, got "
            f"{tuple(cls_logits.shape)} and {tuple(dist_logits.shape)}"
        )
    return (cls_logits + dist_logits) / 2


__all__ = ["KDLoss", "JSDLoss", "ReverseKLLoss", "DeiTDistillationLoss", "deit_inference_logits"]

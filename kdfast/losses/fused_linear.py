"""Fused linear-head distillation as an ``nn.Module`` (semantics 3.2)."""

from __future__ import annotations

from torch import Tensor, nn

from kdfast import functional as KF
from kdfast import fused_linear


class FusedLinearDistillationLoss(nn.Module):
    """KD, reverse KL, generalised JSD or DIST between two LM heads, with an optional hard
    cross-entropy, without materialising the (tokens, V) logits.
    See :func:`kdfast.functional.fused_linear_distill`.

    ``forward(student_input, student_weight, teacher_input, teacher_weight, labels=None,
    student_bias=None, teacher_bias=None, mask=None)``; teacher tensors get gradients only
    when they require grad.

    "dist" is DIST (Huang et al. 2022) over the kept tokens:
    ``soft_loss_weight * T^2 * (inter_weight * inter + intra_weight * intra)`` (DIST's beta
    and gamma, official defaults 1 and 1) plus ``hard_loss_weight`` times the mean
    cross-entropy; reduction "batchmean" only. Its chunked path reads the chunks twice (the
    intra term needs column statistics over all tokens), so the head GEMMs run twice.

    Example (replacing Liger-Kernel's ``LigerFusedLinearJSDLoss(weight_hard_loss=a,
    weight_soft_loss=b, beta=beta, temperature=T)``)::

        >>> loss_fn = FusedLinearDistillationLoss("jsd", beta=beta, temperature=T,
        ...                                       soft_loss_weight=b, hard_loss_weight=a)
        >>> loss = loss_fn(h_s, student.lm_head.weight, h_t, teacher.lm_head.weight, labels)
    """

    def __init__(
        self,
        divergence: str = "kl",
        beta: float = 0.5,
        temperature: float = 1.0,
        reduction: str = "batchmean",
        soft_loss_weight: float = 1.0,
        hard_loss_weight: float = 0.0,
        ignore_index: int = -100,
        chunk_size: int | None = None,
        inter_weight: float = 1.0,
        intra_weight: float = 1.0,
    ) -> None:
        super().__init__()
        fused_linear.check_options(
            divergence, beta, temperature, reduction, soft_loss_weight, 0.0, ignore_index,
            None, inter_weight, intra_weight,
        )  # fmt: skip
        fused_linear.check_chunk_size(chunk_size)
        self.divergence, self.beta, self.temperature = divergence, beta, temperature
        self.reduction, self.ignore_index, self.chunk_size = reduction, ignore_index, chunk_size
        self.soft_loss_weight, self.hard_loss_weight = soft_loss_weight, hard_loss_weight
        self.inter_weight, self.intra_weight = inter_weight, intra_weight

    def forward(
        self,
        student_input: Tensor,
        student_weight: Tensor,
        teacher_input: Tensor,
        teacher_weight: Tensor,
        labels: Tensor | None = None,
        student_bias: Tensor | None = None,
        teacher_bias: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        return KF.fused_linear_distill(
            student_input,
            student_weight,
            teacher_input,
            teacher_weight,
            divergence=self.divergence,
            student_bias=student_bias,
            teacher_bias=teacher_bias,
            labels=labels,
            mask=mask,
            beta=self.beta,
            temperature=self.temperature,
            reduction=self.reduction,
            soft_loss_weight=self.soft_loss_weight,
            hard_loss_weight=self.hard_loss_weight,
            ignore_index=self.ignore_index,
            chunk_size=self.chunk_size,
            inter_weight=self.inter_weight,
            intra_weight=self.intra_weight,
        )

    def extra_repr(self) -> str:
        return (
            f"divergence={self.divergence!r}, beta={self.beta}, temperature={self.temperature}, "
            f"reduction={self.reduction!r}, soft_loss_weight={self.soft_loss_weight}, "
            f"hard_loss_weight={self.hard_loss_weight}, chunk_size={self.chunk_size}, "
            f"inter_weight={self.inter_weight}, intra_weight={self.intra_weight}"
        )


__all__ = ["FusedLinearDistillationLoss"]

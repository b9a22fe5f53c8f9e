"""Reference fused linear-head distillation: both heads' (tokens, V) logits are materialised,
then kdfast's reference logit losses run on them (semantics 3.2). The executable spec of
:mod:`kdfast.fused_linear`, differentiated by autograd.

Per token i (rows of the flattened (T, H) hidden states), with ``z = x W^T + b``::

    soft_i = T^2 KL(p_t || p_s)                       divergence "kl" (kd_loss, Hinton)
             KL(p_s || p_t)                           "reverse_kl" (jsd_loss, beta = 1)
             JSD_beta(p_s, p_t)                       "jsd" (jsd_loss, TRL's beta)
    hard_i = cross_entropy(z_s[i], labels[i])         student logits at temperature 1
    loss_i = soft_loss_weight * soft_i + hard_loss_weight * hard_i

A token is kept when ``labels[i] != ignore_index`` (with labels) and ``mask[i]`` (with a
mask); dropped tokens contribute 0. Reductions over kept tokens: "batchmean" (sum / kept),
"sum", "none" ((T,) per token). The teacher's tensors receive gradients when they require
grad (as kdfast's logit ops differentiate a teacher that requires grad); a frozen teacher,
or hidden states computed under ``torch.no_grad()``, costs nothing.

"dist" is not a per-token sum: DIST (dist_loss, ``temperature_squared=True``, softmax) runs
on the materialised kept rows, ``inter_weight`` and ``intra_weight`` as its beta and gamma::

    loss = soft_loss_weight * T^2 (inter_weight * inter + intra_weight * intra)
           + hard_loss_weight * mean over kept tokens of hard_i

("batchmean" only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kdfast._validation import compute_dtype
from kdfast.reference.dist_loss import dist_loss
from kdfast.reference.jsd_loss import jsd_loss
from kdfast.reference.kd_loss import kd_loss, reduce_rows


@dataclass(frozen=True)
class DistillOptions:
    """The validated options of a fused linear distillation."""

    divergence: str
    beta: float
    temperature: float
    reduction: str
    soft_loss_weight: float
    hard_loss_weight: float
    ignore_index: int
    inter_weight: float = 1.0
    intra_weight: float = 1.0

    @property
    def jsd_beta(self) -> float:
        """jsd_loss's beta for "reverse_kl" (1) and "jsd"."""
        return 1.0 if self.divergence == "reverse_kl" else self.beta


def head_logits(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x W^T + b`` in promote_types(x, weight, bias) (no float32 floor: a half lm_head
    runs its matmul in half, as the model does)."""
    dtype = torch.promote_types(x.dtype, weight.dtype)
    if bias is not None:
        dtype = torch.promote_types(dtype, bias.dtype)
    b = None if bias is None else bias.to(dtype)
    return F.linear(x.to(dtype), weight.to(dtype), b)


def kept_tokens(labels: Tensor | None, mask: Tensor | None, ignore_index: int):
    """Bool (T,) of the tokens that count, or None when every token does."""
    keep = None if labels is None else labels != ignore_index
    if mask is not None:
        keep = mask if keep is None else keep & mask
    return keep


def hard_rows(zs: Tensor, labels: Tensor, keep: Tensor | None, ignore_index: int) -> Tensor:
    """Per-token cross-entropy of the student logits (0 on dropped tokens)."""
    if keep is not None:
        labels = torch.where(keep, labels, ignore_index)
    z = zs.to(compute_dtype(zs))
    return F.cross_entropy(z, labels, reduction="none", ignore_index=ignore_index)


def combine_rows(soft: Tensor, zs: Tensor, labels, keep, options: DistillOptions) -> Tensor:
    """``soft_loss_weight * soft + hard_loss_weight * hard`` per token."""
    rows = options.soft_loss_weight * soft
    if options.hard_loss_weight != 0:
        rows = rows + options.hard_loss_weight * hard_rows(zs, labels, keep, options.ignore_index)
    return rows


def soft_rows(zs: Tensor, zt: Tensor, keep: Tensor | None, options: DistillOptions) -> Tensor:
    """Per-token divergence from kdfast's reference logit losses."""
    if options.divergence == "kl":
        return kd_loss(zs, zt, options.temperature, "none", keep, "logits")
    return jsd_loss(zs, zt, options.jsd_beta, options.temperature, "none", keep)


def fused_linear_distill(
    student_input: Tensor,
    student_weight: Tensor,
    student_bias: Tensor | None,
    teacher_input: Tensor,
    teacher_weight: Tensor,
    teacher_bias: Tensor | None,
    labels: Tensor | None,
    mask: Tensor | None,
    options: DistillOptions,
) -> Tensor:
    """The loss from materialised logits; inputs validated, (T, H) hidden states, (T,)
    labels and mask. A scalar, or (T,) for "none", in the loss's compute dtype."""
    if options.divergence == "dist":
        inputs = (student_input, student_weight, student_bias)
        return dist_distill(
            *inputs, teacher_input, teacher_weight, teacher_bias, labels, mask, options
        )
    zs = head_logits(student_input, student_weight, student_bias)
    zt = head_logits(teacher_input, teacher_weight, teacher_bias)
    keep = kept_tokens(labels, mask, options.ignore_index)
    rows = combine_rows(soft_rows(zs, zt, keep, options), zs, labels, keep, options)
    return reduce_rows(rows, options.reduction, keep, 1)


def dist_distill(xs, ws, bs, xt, wt, bt, labels, mask, options: DistillOptions) -> Tensor:
    """Divergence "dist": the reference dist_loss on the kept rows of the materialised
    logits (teacher included in autograd), plus the mean hard cross-entropy."""
    zs, zt = head_logits(xs, ws, bs), head_logits(xt, wt, bt)
    keep = kept_tokens(labels, mask, options.ignore_index)
    rows = slice(None) if keep is None else keep
    soft = dist_loss(
        zs[rows], zt[rows], options.inter_weight, options.intra_weight, options.temperature,
        True, "softmax", None,
    )  # fmt: skip
    loss = options.soft_loss_weight * soft
    if options.hard_loss_weight != 0:
        hard = hard_rows(zs, labels, keep, options.ignore_index)
        loss = loss + options.hard_loss_weight * reduce_rows(hard, "batchmean", keep, 1)
    return loss

"""VkD loss module: Miles, Elezi, Deng, "VkD: Improving Knowledge Distillation using
Orthogonal Projections", CVPR 2024 (official code: roymiles/VkD). docs/semantics.md section 4.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kdfast import functional
from kdfast._constants import VKD_NORMALIZATIONS
from kdfast._validation import check_choice, check_tensor
from kdfast.nn.projector import OrthogonalProjector


class VkDLoss(nn.Module):
    """Orthogonal projection of the student, then SmoothL1 to the normalised teacher.

    loss = SmoothL1-mean(P z_s, norm(z_t)) with P an orthogonal (isometric) projector
    parameterised by the matrix exponential (:class:`kdfast.nn.OrthogonalProjector`).

    The projector is trainable: **give the optimiser** ``VkDLoss.parameters()`` (with the
    student's parameters), or the projection stays at its initialisation ``[I; 0]``.
    Weight decay on these parameters is harmless (it pulls P towards ``[I; 0]``).

    Official recipe (DeiT student, RegNetY-16GF teacher): student feature = mean of the patch
    tokens (cls and distillation tokens excluded), teacher feature = the spatially pooled last
    feature map (Dt = 3024), normalize="standardize"; total = CE + KL(batchmean, T = 1, on the
    distillation head) + 1.0 * VkDLoss.

    Args:
        student_dim: Ds, width of the student features.
        teacher_dim: Dt, width of the teacher features.
        normalize: "standardize" (per-sample LayerNorm of the teacher, official default),
            "batch_standardize" (per channel over the batch, both sides; official detection
            variant plus eps), "whiten" (ZCA of the teacher over the batch; unverified, not in
            the released code) or None.
        fold_every, device, dtype: passed to :class:`~kdfast.nn.OrthogonalProjector`.

    forward(student_features (B, Ds), teacher_features (B, Dt)) -> scalar in
    promote_types(projected student, teacher, float32).
    """

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        normalize: str | None = "standardize",
        *,
        fold_every: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_choice("normalize", normalize, VKD_NORMALIZATIONS)
        self.student_dim = student_dim
        self.teacher_dim = teacher_dim
        self.normalize = normalize
        self.projector = OrthogonalProjector(
            student_dim, teacher_dim, fold_every=fold_every, device=device, dtype=dtype
        )

    def forward(self, student_features: Tensor, teacher_features: Tensor) -> Tensor:
        for name, x, width in (
            ("student_features", student_features, self.student_dim),
            ("teacher_features", teacher_features, self.teacher_dim),
        ):
            check_tensor(name, x)
            if x.dim() != 2 or x.shape[1] != width:
                raise ValueError(
                    f"{name} must have shape (B, {width}), got {tuple(x.shape)} (VkDLoss was "
                    f"built with student_dim={self.student_dim}, teacher_dim={self.teacher_dim})"
                )
        if student_features.shape[0] != teacher_features.shape[0]:
            raise ValueError(
                "student_features and teacher_features must have the same batch size, got "
                f"{tuple(student_features.shape)} and {tuple(teacher_features.shape)}"
            )
        # half features meet float32 parameters: project in the promoted dtype (semantics 0)
        param_dtype = next(self.projector.parameters()).dtype
        dtype = torch.promote_types(student_features.dtype, param_dtype)
        projected = self.projector(student_features.to(dtype))
        return functional.vkd_loss(projected, teacher_features, self.normalize)

    def extra_repr(self) -> str:
        return (
            f"student_dim={self.student_dim}, teacher_dim={self.teacher_dim}, "
            f"normalize={self.normalize!r}"
        )

"""kdfast losses in torchdistill's loss registry (torchdistill 1.1.x; tested with 1.1.5).

``import kdfast.integrations.torchdistill`` registers the middle-level losses below with
``torchdistill.losses.registry.register_mid_level_loss``. They take torchdistill's
constructor keywords and its io-dict forward ``(student_io_dict, teacher_io_dict, targets)``,
so a YAML config switches from torchdistill's loss to kdfast's by changing its ``key:``.
Import this module (e.g. from the training script, or with torchdistill's
``!import_call``) before the config is built.

Names: ``KDFast<X>`` gives the numbers of torchdistill's ``<X>``; ``KDFastOfficial<X>``
gives those of the method's official code where torchdistill's formula differs.

* ``KDFastKDLoss`` = torchdistill ``KDLoss``: ``alpha * CE + beta * T^2 * KL`` with
  ``beta = 1 - alpha`` by default, but the bare ``KL`` (no T^2, no beta) when alpha is
  None or 0 or no targets are passed.
* ``KDFastOfficialKDLoss``: Hinton's form with the same keywords, the T^2 always kept:
  ``beta * T^2 * KL`` plus ``alpha * CE`` when alpha and targets are given.
* ``KDFastDISTLoss`` = torchdistill ``DISTLoss``: its cosine clamps each norm at eps
  separately (``F.cosine_similarity``). No kdfast kernel computes that cosine, so this one
  runs plain PyTorch ops; prefer ``KDFastOfficialDISTLoss``.
* ``KDFastOfficialDISTLoss``: hunto/DIST_KD's DIST (eps 1e-8 added to the product of the
  norms), kdfast's fused kernel.
* ``KDFastRKDLoss`` = torchdistill ``RKDLoss`` (lenscloth/RKD's formula, teacher constant),
  kdfast's kernels; reduction "mean" or "sum".
"""

from __future__ import annotations

try:
    from torchdistill.losses.registry import register_mid_level_loss
except ImportError as error:  # pragma: no cover - exercised without torchdistill
    raise ImportError(
        "kdfast.integrations.torchdistill needs torchdistill: pip install torchdistill "
        "(tested with torchdistill 1.1.5; or pip install 'kdfast[torchdistill]')"
    ) from error

import torch.nn.functional as F
from torch import Tensor, nn

from kdfast import functional as KF
from kdfast._validation import check_choice

__all__ = [
    "KDFastDISTLoss",
    "KDFastKDLoss",
    "KDFastOfficialDISTLoss",
    "KDFastOfficialKDLoss",
    "KDFastRKDLoss",
]


def _logits(io_dict: dict, path: str, io: str, name: str) -> Tensor:
    try:
        return io_dict[path][io]
    except KeyError as error:
        raise KeyError(
            f"{name}: no {io!r} of module {path!r} in the io dict (modules hooked: "
            f"{sorted(io_dict)}); add a forward hook for it in the config"
        ) from error


class _LogitPair(nn.Module):
    def __init__(
        self, student_module_path, student_module_io, teacher_module_path, teacher_module_io
    ) -> None:
        super().__init__()
        self.student_module_path = student_module_path
        self.student_module_io = student_module_io
        self.teacher_module_path = teacher_module_path
        self.teacher_module_io = teacher_module_io

    def _pair(self, student_io_dict: dict, teacher_io_dict: dict) -> tuple[Tensor, Tensor]:
        name = type(self).__name__
        s = _logits(student_io_dict, self.student_module_path, self.student_module_io, name)
        t = _logits(teacher_io_dict, self.teacher_module_path, self.teacher_module_io, name)
        return s, t


class _KD(_LogitPair):
    official = False

    def __init__(
        self,
        student_module_path,
        student_module_io,
        teacher_module_path,
        teacher_module_io,
        temperature,
        alpha=None,
        beta=None,
        reduction="batchmean",
        **kwargs,
    ) -> None:
        super().__init__(
            student_module_path, student_module_io, teacher_module_path, teacher_module_io
        )
        check_choice("reduction", reduction, ("batchmean", "sum", "mean"))
        self.temperature = KF.check_kd_options(temperature, "sum")
        if alpha is None and beta is None:
            raise TypeError(f"{type(self).__name__} needs alpha or beta (torchdistill: 1 - None)")
        self.alpha = alpha
        self.beta = 1 - alpha if beta is None else beta
        self.reduction = reduction
        ce_reduction = "mean" if reduction == "batchmean" else reduction
        self.cross_entropy_loss = nn.CrossEntropyLoss(reduction=ce_reduction, **kwargs)

    def _t2_kl(self, s: Tensor, t: Tensor) -> Tensor:
        """T^2 * KL(p_t || p_s) with nn.KLDivLoss's reduction (batchmean: / s.shape[0])."""
        if self.reduction == "batchmean":
            return KF.kd_loss(s, t, self.temperature, "sum") / s.shape[0]
        return KF.kd_loss(s, t, self.temperature, self.reduction)

    def forward(self, student_io_dict, teacher_io_dict, targets=None, *args, **kwargs):
        s, t = self._pair(student_io_dict, teacher_io_dict)
        with_ce = not (self.alpha is None or self.alpha == 0 or targets is None)
        t2_kl = self._t2_kl(s, t)
        if not with_ce:
            return self.beta * t2_kl if self.official else t2_kl / self.temperature**2
        return self.alpha * self.cross_entropy_loss(s, targets) + self.beta * t2_kl


@register_mid_level_loss
class KDFastKDLoss(_KD):
    """torchdistill ``KDLoss``'s numbers on kdfast's KD kernel (same keywords)."""


@register_mid_level_loss
class KDFastOfficialKDLoss(_KD):
    """Hinton KD with torchdistill ``KDLoss``'s keywords, T^2 always kept (module doc)."""

    official = True


class _DISTKeywords(_LogitPair):
    """torchdistill ``DISTLoss``'s constructor keywords."""

    def __init__(
        self,
        student_module_path,
        student_module_io,
        teacher_module_path,
        teacher_module_io,
        beta=1.0,
        gamma=1.0,
        tau=1.0,
        eps=1e-8,
        **kwargs,
    ) -> None:
        super().__init__(
            student_module_path, student_module_io, teacher_module_path, teacher_module_io
        )
        self.beta, self.gamma, self.tau = KF.check_dist_options(beta, gamma, tau, True, "softmax")
        self.eps = float(eps)


@register_mid_level_loss
class KDFastOfficialDISTLoss(_DISTKeywords):
    """hunto/DIST_KD's DIST with torchdistill ``DISTLoss``'s keywords (kdfast kernel).

    ``eps`` is accepted for the same keywords and must be 1e-8, DIST_KD's constant.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.eps != 1e-8:
            raise ValueError(
                f"eps must be 1e-8 (DIST_KD's, fixed in kdfast's kernel), got {self.eps!r}"
            )

    def forward(self, student_io_dict, teacher_io_dict, *args, **kwargs):
        s, t = self._pair(student_io_dict, teacher_io_dict)
        return KF.dist_loss(s, t, self.beta, self.gamma, self.tau)


@register_mid_level_loss
class KDFastDISTLoss(_DISTKeywords):
    """torchdistill ``DISTLoss``'s numbers (each norm clamped at eps): plain PyTorch ops."""

    def _one_minus_mean_pearson(self, a: Tensor, b: Tensor) -> Tensor:
        a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
        return 1 - F.cosine_similarity(a, b, dim=1, eps=self.eps).mean()

    def forward(self, student_io_dict, teacher_io_dict, *args, **kwargs):
        s, t = self._pair(student_io_dict, teacher_io_dict)
        y_s, y_t = (s / self.tau).softmax(dim=1), (t / self.tau).softmax(dim=1)
        inter = self._one_minus_mean_pearson(y_s, y_t)
        intra = self._one_minus_mean_pearson(y_s.transpose(0, 1), y_t.transpose(0, 1))
        return self.tau**2 * (self.beta * inter + self.gamma * intra)


@register_mid_level_loss
class KDFastRKDLoss(nn.Module):
    """torchdistill ``RKDLoss`` (lenscloth/RKD's formula) on kdfast's RKD kernels.

    Keywords as torchdistill's; the teacher is a constant; features are flattened to
    (N, -1). ``reduction``: "mean" (the RKD loss) or "sum" (mean * N^2 for the distance term,
    mean * N^3 for the angle term, as ``nn.SmoothL1Loss``). A factor of 0 or None skips its
    term. Deviations: those of the RKD classes of :mod:`kdfast.compat`.
    """

    def __init__(
        self,
        student_output_path,
        teacher_output_path,
        dist_factor,
        angle_factor,
        reduction,
        **kwargs,
    ) -> None:
        super().__init__()
        check_choice("reduction", reduction, ("mean", "sum"))
        self.student_output_path = student_output_path
        self.teacher_output_path = teacher_output_path
        self.dist_factor = dist_factor
        self.angle_factor = angle_factor
        self.reduction = reduction

    def forward(self, student_io_dict, teacher_io_dict, *args, **kwargs):
        name = type(self).__name__
        s = _logits(student_io_dict, self.student_output_path, "output", name).flatten(1)
        t = _logits(teacher_io_dict, self.teacher_output_path, "output", name).flatten(1)
        t = t.detach()
        n = s.shape[0]
        loss = 0
        if self.dist_factor:
            scale = n**2 if self.reduction == "sum" else 1
            loss = loss + self.dist_factor * scale * KF.rkd_distance(s, t)
        if self.angle_factor:
            scale = n**3 if self.reduction == "sum" else 1
            loss = loss + self.angle_factor * scale * KF.rkd_angle(s, t)
        return loss

"""Modules: :class:`OrthogonalProjector` (VkD's orthogonal projection, SPEC 4) and
:class:`DistillationTokenHead` (DeiT's class and distillation tokens, SPEC 3)."""

from kdfast.nn.distillation_head import DistillationTokenHead
from kdfast.nn.projector import OrthogonalProjector

__all__ = ["DistillationTokenHead", "OrthogonalProjector"]

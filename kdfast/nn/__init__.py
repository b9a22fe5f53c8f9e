"""Modules: :class:`OrthogonalProjector` (VkD's orthogonal projection, semantics 4) and
:class:`DistillationTokenHead` (DeiT's class and distillation tokens, semantics 3)."""

from kdfast.nn.distillation_head import DistillationTokenHead
from kdfast.nn.projector import OrthogonalProjector

__all__ = ["DistillationTokenHead", "OrthogonalProjector"]

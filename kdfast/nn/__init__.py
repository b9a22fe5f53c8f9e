"""Modules: :class:`OrthogonalProjector` (VkD's orthogonal projection, SPEC 4)."""

from kdfast.nn.projector import OrthogonalProjector

__all__ = ["OrthogonalProjector"]

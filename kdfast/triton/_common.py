"""Launcher helpers shared by the Triton logit kernels (kd_loss, dist_loss)."""

from __future__ import annotations

import torch
from torch import Tensor


def mask_flags(mask: Tensor | None, rows: int, device) -> Tensor:
    """The bool (rows,) mask as contiguous int8 kept-row flags (a 1-element dummy, unread
    under HAS_MASK=False, when there is none)."""
    if mask is None:
        return torch.ones(1, dtype=torch.int8, device=device)
    return mask.reshape(rows).contiguous().view(torch.int8)

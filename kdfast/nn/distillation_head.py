"""DeiT's class and distillation tokens with their two classification heads (semantics 3).

Touvron et al., "Training data-efficient image transformers & distillation through
attention", ICML 2021 (facebookresearch/deit ``models.py``: ``DistilledVisionTransformer``).
A distilled transformer carries two learned tokens through its encoder: the class token,
read by ``head`` and trained on the labels, and the distillation token, read by
``head_dist`` and trained on the teacher (soft KL or hard teacher labels, see
:class:`kdfast.losses.DeiTDistillationLoss`). In training mode both heads' logits are
returned; in eval mode their mean, DeiT's inference rule.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["DistillationTokenHead"]


class DistillationTokenHead(nn.Module):
    """Learned class (+ distillation) tokens and their linear heads, for any token encoder.

    Use: ``tokens = head.prepend(patch_tokens)`` before the encoder, ``head(encoded)`` after.

    Args:
        dim: token width D.
        num_classes: C.
        distillation_token: add DeiT's distillation token and ``head_dist`` (default True);
            False gives a plain class-token ViT head (the no-distillation baseline).

    ``prepend(tokens (B, T, D)) -> (B, T + P, D)`` with P = ``num_prefix_tokens`` (2 or 1):
    the class token at position 0, the distillation token at position 1.
    ``forward(encoded (B, T + P, D))``: with a distillation token, ``(cls_logits,
    dist_logits)`` (each (B, C)) in training mode and their mean (B, C) in eval mode; without
    one, the class logits (B, C). ``patch_tokens(encoded)`` returns the (B, T, D) tokens
    after the prefix (VkD's student feature is their mean).
    """

    def __init__(self, dim: int, num_classes: int, distillation_token: bool = True) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("num_classes", num_classes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.dim = dim
        self.num_classes = num_classes
        self.num_prefix_tokens = 2 if distillation_token else 1
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.head = nn.Linear(dim, num_classes)
        if distillation_token:
            self.dist_token = nn.Parameter(torch.zeros(1, 1, dim))
            self.head_dist = nn.Linear(dim, num_classes)
        else:
            self.register_parameter("dist_token", None)
            self.head_dist = None
        for token in (self.cls_token, self.dist_token):
            if token is not None:
                nn.init.trunc_normal_(token, std=0.02)  # as DeiT

    def _check(self, name: str, tokens: Tensor, min_tokens: int) -> None:
        if not isinstance(tokens, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tokens).__name__}")
        if tokens.dim() != 3 or tokens.shape[2] != self.dim or tokens.shape[1] < min_tokens:
            raise ValueError(
                f"{name} must have shape (B, T, {self.dim}) with T >= {min_tokens}, got "
                f"{tuple(tokens.shape)}"
            )

    def prepend(self, tokens: Tensor) -> Tensor:
        """(B, T, D) -> (B, P + T, D): class token, [distillation token,] then ``tokens``."""
        self._check("tokens", tokens, 0)
        batch = tokens.shape[0]
        prefix = [self.cls_token.expand(batch, -1, -1)]
        if self.dist_token is not None:
            prefix.append(self.dist_token.expand(batch, -1, -1))
        return torch.cat([*prefix, tokens], dim=1)

    def patch_tokens(self, encoded: Tensor) -> Tensor:
        """The encoded tokens after the prefix, (B, T, D)."""
        self._check("encoded", encoded, self.num_prefix_tokens)
        return encoded[:, self.num_prefix_tokens :]

    def forward(self, encoded: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        self._check("encoded", encoded, self.num_prefix_tokens)
        cls_logits = self.head(encoded[:, 0])
        if self.head_dist is None:
            return cls_logits
        dist_logits = self.head_dist(encoded[:, 1])
        if self.training:
            return cls_logits, dist_logits
        return (cls_logits + dist_logits) / 2

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_classes={self.num_classes}, "
            f"distillation_token={self.head_dist is not None}"
        )

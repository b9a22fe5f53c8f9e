"""Helpers for registering compiled kdfast ops with torch.library."""

from __future__ import annotations

import torch

from kdfast._validation import compute_dtype


def scalar_like(*tensors: torch.Tensor) -> torch.Tensor:
    """A fake scalar loss in promote_types(*dtypes, float32) on the first tensor's device."""
    return tensors[0].new_empty((), dtype=compute_dtype(*tensors))


def grad_or_empty(x: torch.Tensor, needed: bool) -> torch.Tensor:
    """Fake gradient of ``x``: contiguous like ``x`` when needed, else an empty (0,) tensor."""
    return x.new_empty(x.shape) if needed else x.new_empty((0,))


def forbid_double_backward(op_name: str) -> None:
    """Make differentiating through ``op_name`` (a backward op) raise a clear error."""

    def backward(ctx, *grads):
        raise RuntimeError(
            f"{op_name} is a once-differentiable backward: double backward through kdfast's "
            "compiled kernels is not supported; use kdfast.use_backend('reference') for "
            "higher-order gradients"
        )

    torch.library.register_autograd(
        op_name, backward, setup_context=lambda ctx, inputs, output: None
    )

"""Compiled RKD distance ops: ``kdfast::rkd_distance_cpp`` (CPU) and
``kdfast::rkd_distance_cuda`` (CUDA), their fake kernels and autograd.

The C++ op computes the loss from the float64 Gram matrix of the centred features
(SPEC 1.5); its backward op recomputes the Gram matrices (two GEMMs) instead of saving
N x N intermediates.
"""

from __future__ import annotations

import torch

from kdfast import _dispatch, _extension
from kdfast.ops._common import register_relational_loss

#: backend -> device the compiled op is registered for
BACKEND_DEVICES = {"cpp": "cpu", "cuda": "cuda"}


def _register(backend: str) -> None:
    name = f"kdfast::rkd_distance_{backend}"
    backward_op = getattr(torch.ops.kdfast, f"rkd_distance_{backend}_backward").default
    register_relational_loss("rkd_distance", name, backward_op, backend, {BACKEND_DEVICES[backend]})


if _extension.unavailable_reason() is None:
    _register("cpp")
    if _extension.cuda_unavailable_reason() is None:
        _register("cuda")
if _dispatch.BACKENDS["triton"].unavailable is None:
    import kdfast.triton.rkd_distance  # noqa: F401  (registers kdfast::rkd_distance_triton)

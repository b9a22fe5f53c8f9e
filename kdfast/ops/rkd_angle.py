"""Compiled RKD angle ops: ``kdfast::rkd_angle_cpp`` (CPU) and
``kdfast::rkd_angle_cuda`` (CUDA), their fake kernels and autograd.

The C++ op computes the loss from the float64 Gram matrix of the centred features
(SPEC 1.5) with a streamed triple loop over (i, j, k) that stores nothing of size N^3; its
backward op recomputes the Gram matrices (two GEMMs) and runs the fused triple loop that
accumulates dL/dG (O(N^2) memory), then one GEMM back to the features.
"""

from __future__ import annotations

import torch

from kdfast import _dispatch, _extension
from kdfast.ops._common import register_relational_loss

#: backend -> device the compiled op is registered for
BACKEND_DEVICES = {"cpp": "cpu", "cuda": "cuda"}


def _register(backend: str) -> None:
    name = f"kdfast::rkd_angle_{backend}"
    backward_op = getattr(torch.ops.kdfast, f"rkd_angle_{backend}_backward").default
    register_relational_loss("rkd_angle", name, backward_op, backend, {BACKEND_DEVICES[backend]})


if _extension.unavailable_reason() is None:
    _register("cpp")
    if _extension.cuda_unavailable_reason() is None:
        _register("cuda")
if _dispatch.BACKENDS["triton"].unavailable is None:
    import kdfast.triton.rkd_angle  # noqa: F401  (registers kdfast::rkd_angle_triton)

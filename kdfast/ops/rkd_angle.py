"""Compiled RKD angle ops: ``kdfast::rkd_angle_cpp`` (CPU) and ``kdfast::rkd_angle_cuda``
(CUDA), their vertex-range variants ``kdfast::rkd_angle_vertices_{cpp,cuda}`` (the
``rkd_angle_vertices`` op of ``gather=True``), their fake kernels and autograd.

The C++ op computes the loss from the float64 Gram matrix of the centred features
(SPEC 1.5) with a streamed triple loop over (i, j, k) that stores nothing of size N^3; its
backward op recomputes the Gram matrices (two GEMMs) and runs the fused triple loop that
accumulates dL/dG (O(N^2) memory), then one GEMM back to the features. The vertex-range
ops run the same loops over the vertices i in [start, stop) only: (stop - start) N^2
triplets, still O(N^2) memory, and the gradient of that share with respect to every row.
"""

from __future__ import annotations

import torch

from kdfast import _dispatch, _extension
from kdfast._validation import check_vertex_range
from kdfast.ops._common import register_relational_loss

#: backend -> device the compiled op is registered for
BACKEND_DEVICES = {"cpp": "cpu", "cuda": "cuda"}


def check_vertex_args(student: torch.Tensor, teacher: torch.Tensor, start, stop) -> None:
    """Argument check of the ``rkd_angle_vertices_*`` fake kernels."""
    check_vertex_range(start, stop, student.shape[0])


def _register(backend: str) -> None:
    devices = {BACKEND_DEVICES[backend]}
    for op, check in (("rkd_angle", None), ("rkd_angle_vertices", check_vertex_args)):
        name = f"kdfast::{op}_{backend}"
        backward_op = getattr(torch.ops.kdfast, f"{op}_{backend}_backward").default
        register_relational_loss(op, name, backward_op, backend, devices, check)


if _extension.unavailable_reason() is None:
    _register("cpp")
    if _extension.cuda_unavailable_reason() is None:
        _register("cuda")
if _dispatch.BACKENDS["triton"].unavailable is None:
    import kdfast.triton.rkd_angle  # noqa: F401  (registers kdfast::rkd_angle_triton)

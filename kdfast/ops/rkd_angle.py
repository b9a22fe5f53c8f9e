"""The ``rkd_angle`` and ``rkd_angle_vertices`` ops: every backend's implementation and
their samples.

``rkd_angle_vertices(student, teacher, start, stop)`` is the share of the angle loss whose
vertex i lies in [start, stop) (what one rank computes under ``gather=True``).

* reference: :mod:`kdfast.reference.rkd_angle`;
* cpp / cuda: ``kdfast::rkd_angle_{cpp,cuda}`` and ``kdfast::rkd_angle_vertices_{cpp,cuda}``
  (csrc/cpu/rkd_angle.cpp, csrc/cuda/rkd_angle.cu): the loss from the float64 Gram matrix of
  the centred features (semantics 1.5) with a streamed triple loop over (i, j, k) that stores
  nothing of size N^3; the backward op recomputes the Gram matrices and runs the fused
  triple loop that accumulates dL/dG (O(N^2) memory), then one GEMM back to the features;
* triton: ``kdfast::rkd_angle_triton`` / ``kdfast::rkd_angle_vertices_triton`` around the
  launchers of :mod:`kdfast.triton.rkd_angle`.

Near pairs (semantics 1.5): every vertex with a pair whose Gram D2 cancels
(D2 <= 1e-8 (G_ii + G_jj), on either side) is computed from the direct float64 differences
of its rows, as the official code does (csrc/rkd_exact.cpp, kdfast/triton/_rkd_exact.py), so
near duplicates however close are exact. Only an exact duplicate is degenerate: its angles
are 0 and no gradient flows through it, where the official code (and the reference) gives a
meaningless ~1e10 from F.normalize's eps (documented deviation of the compiled kernels).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdfast import _dispatch, _extension
from kdfast._validation import check_feature_pair, check_vertex_range
from kdfast.ops._common import define_op, register_relational_loss
from kdfast.ops._samples import BadInput, Contract, Sample, declare
from kdfast.ops.rkd_distance import feature_bad_inputs, feature_samples
from kdfast.reference import rkd_angle as reference

#: backend -> device the compiled op is registered for
BACKEND_DEVICES = {"cpp": "cpu", "cuda": "cuda"}


def check_vertex_args(student: Tensor, teacher: Tensor, start, stop) -> None:
    """Argument check of the ``rkd_angle_vertices_*`` fake kernels."""
    check_vertex_range(start, stop, student.shape[0])


def vertices_share(student: Tensor, teacher: Tensor, start: int, stop: int) -> Tensor:
    """The share of the angle loss whose vertex lies in [start, stop): the
    ``rkd_angle_vertices`` op on (N, D, *) features, as ``gather=True`` calls it after the
    all-gather."""
    s, t = check_feature_pair(student, teacher, 0, "rkd_angle_vertices")
    check_vertex_range(start, stop, s.shape[0])
    return _dispatch.call("rkd_angle_vertices", s, t, start, stop)


def _register_compiled(backend: str) -> None:
    devices = {BACKEND_DEVICES[backend]}
    for op, check in (("rkd_angle", None), ("rkd_angle_vertices", check_vertex_args)):
        name = f"kdfast::{op}_{backend}"
        backward_op = getattr(torch.ops.kdfast, f"{op}_{backend}_backward").default
        register_relational_loss(op, name, backward_op, backend, devices, check)


def _register_triton() -> None:
    from kdfast.triton import rkd_angle as kernels

    for op, check in (("rkd_angle", None), ("rkd_angle_vertices", check_vertex_args)):
        name = f"kdfast::{op}_triton"
        define_op(name, getattr(kernels, f"{op}_triton"))
        backward = define_op(f"{name}_backward", getattr(kernels, f"{op}_triton_backward"))
        register_relational_loss(op, name, backward, "triton", check_args=check)


_dispatch.implement("rkd_angle", "reference", reference.rkd_angle)
_dispatch.implement("rkd_angle_vertices", "reference", reference.rkd_angle_vertices)
if _extension.unavailable_reason() is None:
    _register_compiled("cpp")
    if _extension.cuda_unavailable_reason() is None:
        _register_compiled("cuda")
if _dispatch.BACKENDS["triton"].unavailable is None:
    _register_triton()


# --- samples ---------------------------------------------------------------------------
# N = 12 keeps the N^3 triplets cheap under the Triton interpreter. Near duplicates are
# 1e-7 apart: every kernel resolves such a pair from direct differences (semantics 1.5).
_ANGLE_SAMPLES = feature_samples(12, near=1e-7, min_rows=3)


def _with_vertex_range(sample: Sample) -> Sample:
    """``sample`` with a proper, non-empty vertex range [n // 3, n - 1) appended."""

    def make(gen):
        (s, t), kwargs = sample.make(gen)
        n = s.shape[0]
        return (s, t, n // 3, max(n // 3, n - 1)), kwargs

    view = sample.view
    return Sample(
        sample.name,
        make,
        sample.tags,
        None if view is None else (lambda args, view=view: (*view(args[:2]), *args[2:])),
    )


declare(
    Contract(
        "rkd_angle",
        "kdfast.functional:rkd_angle",
        _ANGLE_SAMPLES,
        bad_inputs=feature_bad_inputs("rkd_angle", 3),
    )
)
declare(
    Contract(
        "rkd_angle_vertices",
        "kdfast.ops.rkd_angle:vertices_share",
        tuple(_with_vertex_range(s) for s in _ANGLE_SAMPLES),
        bad_inputs=(
            BadInput(
                "range_past_end",
                lambda: ((torch.randn(5, 3), torch.randn(5, 2), 2, 6), {}),
                ValueError,
                "stop",
            ),
            BadInput(
                "float_start",
                lambda: ((torch.randn(5, 3), torch.randn(5, 2), 1.0, 3), {}),
                TypeError,
                "start",
            ),
        ),
    )
)

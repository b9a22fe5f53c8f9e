"""The ``rkd_distance`` op: every backend's implementation and its samples.

* reference: :func:`kdfast.reference.rkd_distance.rkd_distance`;
* cpp / cuda: ``kdfast::rkd_distance_{cpp,cuda}`` (csrc/cpu/rkd_distance.cpp,
  csrc/cuda/rkd_distance.cu): the loss from the float64 Gram matrix of the centred features
  (semantics 1.5); the backward op recomputes the Gram matrices (two GEMMs) instead of saving
  N x N intermediates. On cpp, when a gradient will be needed, the dispatcher runs the
  combined op ``kdfast::rkd_loss_cpp`` with angle_weight 0 instead (:mod:`kdfast.ops.rkd_loss`):
  it saves the two Gram matrices, so its backward needs only the GEMM to the features;
* triton: ``kdfast::rkd_distance_triton`` around the launchers of
  :mod:`kdfast.triton.rkd_distance`.

Near pairs (semantics 1.5): a pair whose Gram D2 cancels (D2 <= 1e-8 (G_ii + G_jj)) takes its
distance and its gradient from the direct float64 difference of its rows, at O(D) per pair,
in every backend (the reference takes every distance from direct differences). Only an
exact duplicate is degenerate: distance 1e-6 (the clamp), no gradient through it.
"""

from __future__ import annotations

import torch

from kdfast import _dispatch, _extension
from kdfast.ops._common import define_op, register_relational_loss
from kdfast.ops._samples import BadInput, Contract, Sample, declare, randn
from kdfast.reference.rkd_distance import rkd_distance as reference

#: backend -> device the compiled op is registered for
BACKEND_DEVICES = {"cpp": "cpu", "cuda": "cuda"}


def _register_compiled(backend: str) -> None:
    name = f"kdfast::rkd_distance_{backend}"
    backward_op = getattr(torch.ops.kdfast, f"rkd_distance_{backend}_backward").default
    register_relational_loss("rkd_distance", name, backward_op, backend, {BACKEND_DEVICES[backend]})


def _register_triton() -> None:
    from kdfast.triton import rkd_distance as kernels

    define_op("kdfast::rkd_distance_triton", kernels.rkd_distance_triton)
    backward = define_op(
        "kdfast::rkd_distance_triton_backward", kernels.rkd_distance_triton_backward
    )
    register_relational_loss("rkd_distance", "kdfast::rkd_distance_triton", backward, "triton")


_dispatch.implement("rkd_distance", "reference", reference)
if _extension.unavailable_reason() is None:
    _register_compiled("cpp")
    if _extension.cuda_unavailable_reason() is None:
        _register_compiled("cuda")
if _dispatch.BACKENDS["triton"].unavailable is None:
    _register_triton()


# --- samples ---------------------------------------------------------------------------


def feature_samples(n: int, near: float, min_rows: int) -> tuple[Sample, ...]:
    """Random and adversarial (student, teacher) feature pairs of ``n`` rows, shared by the
    RKD ops: a large common offset, clustered rows (spread 1e-2 and 1e-3 of the cluster
    separation), exact duplicate rows, near duplicates ``near`` apart, the smallest and a
    wide batch, and transposed / expanded / strided layouts."""

    def base(gen):
        return randn(gen, n, 8), randn(gen, n, 12)

    def clustered(spread, side=0):
        def make(gen):
            centres = randn(gen, 10, 16) * 10
            noise = randn(gen, n, 16)
            s, t = base(gen)
            rows = centres[torch.arange(n) % 10] + spread * 10 * noise
            return ((rows, t) if side == 0 else (s, rows[:, :12])), {}

        return make

    def duplicates(gen):
        s, t = base(gen)
        s[3] = s[7]
        s[n - 1] = s[7]
        return (s, t), {}

    def near_duplicates(gen):
        s, t = base(gen)
        s[5] = s[6] + near
        return (s, t), {}

    def rows(k, width=None):
        def make(gen):
            s, t = base(gen)
            if width is not None:
                s = randn(gen, k, width)
            return (s[:k], t[:k]), {}

        return make

    def offset(gen):
        s, t = base(gen)
        return (s + 100.0, t - 1000.0), {}

    def tiny(gen):
        return (randn(gen, 6, 4), randn(gen, 6, 3)), {}

    return (
        Sample("random", lambda gen: (base(gen), {})),
        Sample("tiny", tiny, frozenset({"small"})),
        Sample("offset", offset, frozenset({"float32_and_up"})),
        Sample("clustered_1e-2", clustered(1e-2)),
        Sample("clustered_1e-3", clustered(1e-3)),
        Sample("teacher_clustered", clustered(1e-3, side=1)),
        Sample("exact_duplicates", duplicates, frozenset({"exact_duplicates"})),
        Sample("near_duplicates", near_duplicates),
        Sample("smallest", rows(min_rows), frozenset({"small"})),
        Sample("wide", rows(6, width=300)),
        Sample(
            "transposed", lambda gen: (base(gen), {}), view=lambda a: (a[0].T.contiguous().T, a[1])
        ),
        Sample(
            # (N, 3, 1) expanded to (N, 3, 2): repeated, not collinear, teacher features
            "expanded_teacher",
            lambda gen: ((randn(gen, n, 8), randn(gen, n, 3, 1)), {}),
            view=lambda a: (a[0], a[1].expand(-1, -1, 2)),
        ),  # fmt: skip
        Sample(
            "strided",
            lambda gen: ((randn(gen, n, 16), randn(gen, n, 24)), {}),
            view=lambda a: (a[0][:, ::2], a[1][:, ::2]),
        ),  # fmt: skip
    )


def feature_bad_inputs(what: str, min_rows: int) -> tuple[BadInput, ...]:
    """Arguments the RKD losses reject with a clear error."""
    x = torch.randn(6, 4)
    return (
        BadInput(
            "too_few_rows",
            lambda: ((x[: min_rows - 1], x[: min_rows - 1]), {}),
            ValueError,
            f"at least {min_rows}",
        ),  # fmt: skip
        BadInput("rows_differ", lambda: ((x, x[:5]), {}), ValueError, "same batch size"),
        BadInput("integer", lambda: ((x.long(), x), {}), TypeError, "student must be float16"),
        BadInput("not_a_tensor", lambda: ((x.tolist(), x), {}), TypeError, "torch.Tensor"),
    )


declare(
    Contract(
        "rkd_distance",
        "kdfast.functional:rkd_distance",
        feature_samples(24, near=1e-7, min_rows=2),
        bad_inputs=feature_bad_inputs("rkd_distance", 2),
    )
)

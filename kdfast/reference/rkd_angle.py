"""Reference RKD angle loss (semantics 1.3): Park et al., "Relational Knowledge Distillation",
CVPR 2019 (lenscloth/RKD).

The official difference-based formula, evaluated in promote_types(s, t, float32) without an
upcast: normalising the differences x_j - x_i before the inner products keeps it accurate
(about 4e-7 relative in float32 on clustered features, semantics 1.5), and it is the baseline the
kernels are benchmarked against. It needs O(N^2 D + N^3) memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdfast._validation import check_vertex_range, compute_dtype


def unit_scaled(x: Tensor) -> Tensor:
    """``x``, or where max |x| >= 2^50, ``x`` divided by the power of two that brings it into
    [0.5, 1): exact, and angles do not change with scale, but differences of float32
    features near 1e30 would overflow their norms (every angle 0). Below 2^50 nothing
    changes, so the 1e-12 of ``F.normalize`` acts as in the official code (duplicate rows'
    gradients included). The factor is a constant for autograd."""
    _, exponent = torch.frexp(x.detach().abs().amax())
    one = torch.ones((), dtype=x.dtype, device=x.device)
    return x * torch.ldexp(one, -torch.where(exponent > 50, exponent, 0).clamp(max=120))


def angles(x: Tensor) -> Tensor:
    """A_ijk = <e_ij, e_ik> with e_ij = normalize(x_j - x_i): (N, N, N), vertex i first.

    ``F.normalize`` maps a zero difference (a duplicate row, or j = i) to the zero vector,
    so every angle through it is exactly 0. Its backward there is finite: the norm's
    gradient at 0 is 0 and the clamp contributes 1 / 1e-12 per unit of upstream gradient
    (huge, as in the official code, but NaN-free).

    Args:
        x: (N, D) features; the computation runs in ``x.dtype``. On CUDA, float32 matmuls
            follow the global TF32 setting, as in the official code.
    """
    x = unit_scaled(x)
    diff = x.unsqueeze(0) - x.unsqueeze(1)  # diff[i, j] = x_j - x_i
    e = F.normalize(diff, p=2.0, dim=2)
    return torch.bmm(e, e.transpose(1, 2))


def rkd_angle(s: Tensor, t: Tensor) -> Tensor:
    """RKD angle loss: mean over all N^3 triplets of SmoothL1(A^s_ijk - A^t_ijk) (semantics 1.3).

    Degenerate entries (j = i or k = i: 0 on both sides; j = k != i: 1 on both sides) stay
    in the denominator, as in the official code. The teacher side is differentiated when
    ``t`` requires grad (the official code runs it under no_grad).

    Args:
        s: (N, Ds) student features, N >= 3 (validated by :mod:`kdfast.functional`).
        t: (N, Dt) teacher features.

    Returns:
        Scalar in promote_types(s, t, float32), also the dtype of the computation.
    """
    dtype = compute_dtype(s, t)
    return F.smooth_l1_loss(angles(s.to(dtype)), angles(t.to(dtype)), beta=1.0)


def rkd_angle_vertices(s: Tensor, t: Tensor, start: int, stop: int) -> Tensor:
    """The share of the RKD angle loss whose vertex i lies in ``[start, stop)``.

    sum over i in [start, stop), all j, k of SmoothL1(A^s_ijk - A^t_ijk) / N^3: summed over
    a partition of the vertices it is :func:`rkd_angle`. ``kdfast.functional.rkd_angle``
    with ``gather=True`` gives each rank its own rows as vertices (N^3 / world_size work).

    Args:
        s: (N, Ds) student features of the whole (gathered) batch.
        t: (N, Dt) teacher features.
        start, stop: vertex range, 0 <= start <= stop <= N (may be empty: gives 0).

    Returns:
        Scalar in promote_types(s, t, float32).

    Raises:
        TypeError: start or stop is not an int. ValueError: the range is out of order or
            out of [0, N].
    """
    dtype = compute_dtype(s, t)
    n = s.shape[0]
    check_vertex_range(start, stop, n)

    def vertex_angles(x: Tensor) -> Tensor:
        x = unit_scaled(x.to(dtype))
        e = F.normalize(x.unsqueeze(0) - x[start:stop].unsqueeze(1), p=2.0, dim=2)
        return torch.bmm(e, e.transpose(1, 2))  # (stop - start, N, N)

    diff = vertex_angles(s) - vertex_angles(t)
    return F.smooth_l1_loss(diff, torch.zeros_like(diff), beta=1.0, reduction="sum") / n**3

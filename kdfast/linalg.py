"""Matrix functions: the matrix exponential and its Frechet derivative (semantics 6).

Both run on whichever backend :mod:`kdfast._dispatch` picks (the reference backend is
``kdfast.ops.expm``) and are differentiable to any order; float64 gradients pass gradcheck.
"""

from __future__ import annotations

from torch import Tensor

import kdfast.ops.expm  # noqa: F401  (registers the reference implementations)
from kdfast import _dispatch
from kdfast._validation import (
    check_bool,
    check_rank,
    check_same_device,
    check_tensor,
    compute_dtype,
)

__all__ = ["expm", "expm_frechet"]


def _check_square(name: str, x: object) -> Tensor:
    check_tensor(name, x)
    check_rank(name, x, 2)
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(
            f"{name} must be a (batch of) square matrices (..., n, n), got shape {tuple(x.shape)}"
        )
    return x


def expm(A: Tensor, skew: bool = False) -> Tensor:
    """Matrix exponential exp(A) = sum_k A^k / k!, batched over leading dims.

    Scaling and squaring with diagonal Pade approximants (Higham 2005; Al-Mohy and Higham
    2009, the algorithm of ``scipy.linalg.expm``): each matrix gets its own degree
    m in {3, 5, 7, 9, 13} (float32: {3, 5, 7}) and number of squarings
    s = max(0, ceil(log2(eta / theta_m))), eta from the estimates ||A^p||_1^(1/p).
    Accuracy in float64: relative error <= 100 u max(1, ||A||_1) for small matrices, and
    1e-13 max(1, ||A||_2) for skew-symmetric or symmetric ones (semantics 6). The gradient is
    grad_A = L(A^T, grad_out), the Frechet derivative from :func:`expm_frechet`. On the cpp
    backend (n > 32), when a gradient will be needed the forward chooses (m, s) with the
    joint thresholds l_m and keeps its powers and LU, which the backward reuses.

    Args:
        A: (..., n, n) float16, bfloat16, float32 or float64. Half inputs are computed in
            float32.
        skew: promise that every matrix is skew-symmetric (A^T = -A). Enables cheaper norm
            estimates (fewer squarings, better float32 gradients); the result for a matrix
            that breaks the promise is still exp(A), possibly less accurate. Not checked (a
            check would need a host synchronisation).

    Returns:
        exp(A), shape (..., n, n), dtype float64 for float64 input, float32 otherwise.
        For skew A the result is orthogonal to rounding: the squarings lose orthogonality
        as about u ||A||_1, so with ``skew=True`` a float32 batch of ||A||_1 > 64 is
        computed in float64 (one host synchronisation), and above ||A||_1 = 2^30, where not
        even float64 can, a ValueError says so.
    """
    _check_square("A", A)
    check_bool("skew", skew)
    return _dispatch.call("expm", A.to(compute_dtype(A)), skew)


def expm_frechet(A: Tensor, E: Tensor) -> tuple[Tensor, Tensor]:
    """(exp(A), L(A, E)): the exponential and its Frechet derivative in direction E.

    L(A, E) = d/dt exp(A + t E) at t = 0. Computed jointly by differentiating the scaling
    and squaring scheme (Al-Mohy and Higham, "Computing the Frechet derivative of the matrix
    exponential", SIAM J. Matrix Anal. Appl. 2009; SciPy's ``expm_frechet``), reusing the
    powers and the LU of the exponential, with the thresholds l_m of that paper.
    Equivalently, the top-right block of exp([[A, E], [0, A]]).

    Args:
        A: (..., n, n) float tensor.
        E: direction, same shape and device as A.

    Returns:
        (exp(A), L(A, E)), both (..., n, n), in promote_types(A, E, float32).
    """
    _check_square("A", A)
    check_tensor("E", E)
    check_same_device(A=A, E=E)
    if E.shape != A.shape:
        raise ValueError(
            f"E must have the shape of A, got A {tuple(A.shape)} and E {tuple(E.shape)}"
        )
    dtype = compute_dtype(A, E)
    return _dispatch.call("expm_frechet", A.to(dtype), E.to(dtype))

"""Error measures and tolerances of docs/semantics.md section 7, for tests and benchmarks.

* relative error = ||x - x_ref||_F / ||x_ref||_F (norm-wise);
* truth for half/float32 inputs = the float64 computation on the same rounded inputs;
* float64 kernel parity: loss <= 1e-9, gradient <= 1e-7;
* half/float32: within 1e-5 of the truth, or within 2x the error of PyTorch's own reference
  evaluated in that dtype, whichever is larger.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: semantics 7 float64 parity of a kernel with the reference: loss, gradient (relative error)
PARITY_LOSS = 1e-9
PARITY_GRAD = 1e-7

#: semantics 7 tolerances keyed by input dtype: (loss, gradient) relative error vs the truth.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (PARITY_LOSS, PARITY_GRAD),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (1e-5, 1e-5),
    torch.float16: (1e-5, 1e-5),
}


#: semantics 6 accuracy targets of expm keyed by dtype: float64, normal (skew-symmetric or
#: symmetric) A against an eigendecomposition, times max(1, ||A||_2); float32, the gradient
#: against float64 (n = 768, ||A||_2 <= 8)
EXPM_TARGETS: dict[torch.dtype, float] = {torch.float64: 1e-13, torch.float32: 2e-6}
#: semantics 6: expm_frechet against scipy.linalg.expm_frechet, float64, ||A||_1 <= 100
EXPM_FRECHET_TARGET = 1e-12
#: semantics 6: ||Q^T Q - I||_max of a float32 skew-symmetric exponential
EXPM_ORTHOGONALITY_FLOAT32 = 1e-5


def rel_error(x: Tensor, ref: Tensor) -> float:
    """Norm-wise relative error ||x - ref||_F / ||ref||_F, computed in float64.

    When ``ref`` is exactly zero the absolute error ||x||_F is returned.
    """
    x64, r64 = x.detach().to(torch.float64), ref.detach().to(torch.float64)
    if x64.shape != r64.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(ref.shape)}")
    denom = torch.linalg.vector_norm(r64)
    num = torch.linalg.vector_norm(x64 - r64)
    if denom == 0:
        return float(num)
    return float(num / denom)


def tolerance(
    dtype: torch.dtype,
    kind: str = "loss",
    pytorch_error: float | None = None,
    rounded: bool = False,
) -> float:
    """semantics 7 tolerance for ``kind`` in {"loss", "grad"} at input ``dtype``.

    For half and float32 inputs pass ``pytorch_error`` (PyTorch's reference evaluated in
    that dtype, against the truth) to get max(1e-5, 2 * pytorch_error). ``rounded``: the
    result was returned in ``dtype`` (a gradient), so it may also be off by that final
    rounding, finfo(dtype).eps (semantics 7's second refinement); no effect on float64.
    """
    loss_tol, grad_tol = TOLERANCES[dtype]
    tol = loss_tol if kind == "loss" else grad_tol
    if dtype != torch.float64 and pytorch_error is not None:
        tol = max(tol, 2.0 * pytorch_error)
    if dtype != torch.float64 and rounded:
        tol = max(tol, torch.finfo(dtype).eps)
    return tol


def assert_rel_close(x: Tensor, ref: Tensor, tol: float, what: str = "value") -> None:
    """Assert rel_error(x, ref) <= tol with a message giving the figure."""
    err = rel_error(x, ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > tolerance {tol:.1e}"

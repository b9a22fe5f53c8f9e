"""Custom ops for the matrix exponential on the reference backend (SPEC 6).

``kdfast::expm_reference(Tensor A, bool skew) -> Tensor`` and
``kdfast::expm_frechet_reference(Tensor A, Tensor E, bool skew=False) -> (Tensor, Tensor)``
wrap :mod:`kdfast.reference.expm` (whose degree and scaling choice needs a host
synchronisation, so it must be opaque to tracing), with fake and autograd registrations.

Backward of expm: grad_A = L(A^T, grad) for real A (the adjoint of L(A, .) is L(A^T, .)),
computed by the joint algorithm. The forward is not redone with the Frechet thresholds l_m:
the backward recomputes exp(A^T) with its own scaling inside ``expm_frechet_reference``
(simplest; a fused kernel would save the powers and the LU instead, SPEC 6).

Backward of expm_frechet: with M = [[A, E], [0, A]], exp(M) = [[exp(A), L(A, E)], [0, exp(A)]]
(Higham, Functions of Matrices, 2008, Thm 3.6), so the gradient with respect to M of the
two top blocks is L(M^T, [[grad_X, grad_L], [0, 0]]), again from the joint op (on 2n x 2n
matrices); dA is the sum of its diagonal blocks and dE its top-right block. Both backwards
call the custom op, so every order of derivative works and tracing stays opaque.

The extra ``skew`` flag of the Frechet op carries expm's promise of skew-symmetry into its
backward (the cheaper norm estimates, SPEC 6); it defaults to False.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdfast import _dispatch
from kdfast.reference import expm as reference


@torch.library.custom_op("kdfast::expm_reference", mutates_args=())
def expm_reference(A: Tensor, skew: bool) -> Tensor:
    return reference.expm(A, skew)


@expm_reference.register_fake
def _(A: Tensor, skew: bool) -> Tensor:
    return A.new_empty(A.shape)


def _expm_setup_context(ctx, inputs, output) -> None:
    A, skew = inputs
    ctx.skew = skew
    ctx.save_for_backward(A)


def _expm_backward(ctx, grad: Tensor):
    (A,) = ctx.saved_tensors
    _, grad_A = expm_frechet_reference(A.mT, grad, ctx.skew)
    return grad_A, None


expm_reference.register_autograd(_expm_backward, setup_context=_expm_setup_context)


@torch.library.custom_op("kdfast::expm_frechet_reference", mutates_args=())
def expm_frechet_reference(A: Tensor, E: Tensor, skew: bool = False) -> tuple[Tensor, Tensor]:
    return reference.expm_frechet(A, E, skew)


@expm_frechet_reference.register_fake
def _(A: Tensor, E: Tensor, skew: bool = False) -> tuple[Tensor, Tensor]:
    return A.new_empty(A.shape), A.new_empty(A.shape)


def _frechet_setup_context(ctx, inputs, output) -> None:
    A, E, _ = inputs
    ctx.save_for_backward(A, E)


def _frechet_backward(ctx, grad_X: Tensor | None, grad_L: Tensor | None):
    A, E = ctx.saved_tensors
    n = A.shape[-1]
    zero = torch.zeros_like(A)
    grad_X = zero if grad_X is None else grad_X
    grad_L = zero if grad_L is None else grad_L
    Mt = torch.cat([torch.cat([A.mT, zero], -1), torch.cat([E.mT, A.mT], -1)], -2)
    G = torch.cat([torch.cat([grad_X, grad_L], -1), torch.cat([zero, zero], -1)], -2)
    _, grad_M = expm_frechet_reference(Mt, G, False)  # M is not skew even when A is
    grad_A = grad_M[..., :n, :n] + grad_M[..., n:, n:]
    return grad_A, grad_M[..., :n, n:], None


expm_frechet_reference.register_autograd(_frechet_backward, setup_context=_frechet_setup_context)


def _expm(A: Tensor, skew: bool) -> Tensor:
    return expm_reference(A, skew)


def _expm_frechet(A: Tensor, E: Tensor) -> tuple[Tensor, Tensor]:
    return expm_frechet_reference(A, E)


# kdfast.linalg upcasts half inputs to float32 before dispatching
_FLOATS = (torch.float32, torch.float64)
_dispatch.implement("expm", "reference", _expm, dtypes=_FLOATS)
_dispatch.implement("expm_frechet", "reference", _expm_frechet, dtypes=_FLOATS)

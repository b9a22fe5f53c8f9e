"""Custom ops for the matrix exponential on the reference backend (semantics 6).

``kdfast::expm_reference(Tensor A, bool skew) -> Tensor`` and
``kdfast::expm_frechet_reference(Tensor A, Tensor E, bool skew=False) -> (Tensor, Tensor)``
wrap :mod:`kdfast.reference.expm` (whose degree and scaling choice needs a host
synchronisation, so it must be opaque to tracing), with fake and autograd registrations.

Backward of expm: grad_A = L(A^T, grad) for real A (the adjoint of L(A, .) is L(A^T, .)),
computed by the joint algorithm. The forward is not redone with the Frechet thresholds l_m:
the backward recomputes exp(A^T) with its own scaling inside ``expm_frechet_reference``
(simplest; a fused kernel would save the powers and the LU instead, semantics 6).

Backward of expm_frechet: with M = [[A, E], [0, A]], exp(M) = [[exp(A), L(A, E)], [0, exp(A)]]
(Higham, Functions of Matrices, 2008, Thm 3.6), so the gradient with respect to M of the
two top blocks is L(M^T, [[grad_X, grad_L], [0, 0]]), again from the joint op (on 2n x 2n
matrices); dA is the sum of its diagonal blocks and dE its top-right block. Both backwards
call the custom op, so every order of derivative works and tracing stays opaque.

The extra ``skew`` flag of the Frechet op carries expm's promise of skew-symmetry into its
backward (the cheaper norm estimates, semantics 6); it defaults to False.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdfast import _dispatch, _extension
from kdfast.ops._samples import BadInput, Contract, Sample, declare, randn
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


# --- cpp backend -----------------------------------------------------------------------
# ``kdfast::expm_cpp`` / ``kdfast::expm_frechet_cpp``: the device-generic ATen port of the
# reference (csrc/expm_op.cpp; CPU and, in the CUDA build, CUDA tensors), and
# ``kdfast::expm_small_cpp`` / ``kdfast::expm_frechet_small_cpp``: the fused per-matrix
# kernel (csrc/expm_small.h; CPU: tiles of matrices claimed dynamically, csrc/cpu/tiles.h;
# CUDA one matrix per block).
#
# Backward of the ATen path: save, not recompute (semantics 6). When a gradient will be needed
# (grad mode on and A requires grad) the forward runs ``kdfast::expm_save_cpp``: the
# Frechet-safe thresholds l_m, and it returns its scaled powers, the LU of V - U, r_m and
# (m, s) as extra outputs; ``kdfast::expm_backward_cpp`` computes grad_A = L(A, G^T)^T from
# them: the M_p (2 matmuls each), Lu, the right-hand side, one solve and the s squarings
# (R recomputed, 3 matmuls each). n x n matmul units (float32, m = 7, skew): forward
# 3 powers + U + LU + solve + s, backward 9 + solve + 3 s - 1 (recomputing instead cost
# 3 + 12 + LU + 2 solves + 3 s). The powers are only formed as far as the degree needs:
# when ||A^2||_1^(1/2) passes the degree-3 test, only A^2 (csrc/expm_op.cpp).
# Higher derivatives (create_graph) take the differentiable joint op on (A^T, G) instead.
# The fused small kernel still recomputes (its per-matrix work is cache-resident).

#: kMaxN of csrc/expm_small.h: the fused per-matrix kernel's largest n
FUSED_MAX_N = 32
#: largest n for which the cpp implementation runs the fused per-matrix kernel, per device.
#: On CPU the ATen path with its saved-state backward is faster, so the CPU build of the
#: fused kernel serves as the tested host form of the CUDA kernel's math (tests set the CPU
#: entry to FUSED_MAX_N to run it through the dispatcher). On CUDA the fused kernel is the
#: ``cuda`` backend's implementation instead, so that it is chosen only once recorded on a
#: GPU (``kdfast/gpu_results.json``).
SMALL_N = {"cpu": 0}


def _fused_limit(A: Tensor, *rest) -> str | None:
    n = A.shape[-1]
    return None if n <= FUSED_MAX_N else f"n = {n} > {FUSED_MAX_N} (the fused kernel's limit)"


def _use_small(A: Tensor) -> bool:
    return A.shape[-1] <= SMALL_N.get(A.device.type, 0)


# 0 x 0 matrices: the compiled kernels cannot infer a batch from 0 elements; the reference
# ops return the empty results (differentiable, on any device), so the compiled wrappers
# hand them over.


def _cpp_frechet(A: Tensor, E: Tensor, skew: bool) -> tuple[Tensor, Tensor]:
    if A.shape[-1] == 0:
        return expm_frechet_reference(A, E, skew)
    ops = torch.ops.kdfast
    op = ops.expm_frechet_small_cpp if _use_small(A) else ops.expm_frechet_cpp
    return op(A, E, skew)


def _cpp_expm(A: Tensor, skew: bool) -> Tensor:
    if A.shape[-1] == 0:
        return expm_reference(A, skew)
    ops = torch.ops.kdfast
    if _use_small(A):
        return ops.expm_small_cpp(A, skew)
    if A.requires_grad and torch.is_grad_enabled():
        return ops.expm_save_cpp(A, skew)[0]
    return ops.expm_cpp(A, skew)


def _fused_frechet(A: Tensor, E: Tensor, skew: bool) -> tuple[Tensor, Tensor]:
    if A.shape[-1] == 0:
        return expm_frechet_reference(A, E, skew)
    return torch.ops.kdfast.expm_frechet_small_cpp(A, E, skew)


def _fused_expm(A: Tensor, skew: bool) -> Tensor:
    if A.shape[-1] == 0:
        return expm_reference(A, skew)
    return torch.ops.kdfast.expm_small_cpp(A, skew)


def _fused_expm_frechet(A: Tensor, E: Tensor) -> tuple[Tensor, Tensor]:
    return _fused_frechet(A, E, False)


def _register_save() -> None:
    """Fake and autograd of ``kdfast::expm_save_cpp`` / ``kdfast::expm_backward_cpp``."""

    @torch.library.register_fake("kdfast::expm_save_cpp")
    def _(A, skew):
        n = A.shape[-1]
        batch = A.numel() // (n * n) if n else 0
        slots = 5 if A.dtype == torch.float64 else 4
        square = A.new_empty(batch, n, n)
        return (
            A.new_empty(A.shape),
            A.new_empty(batch, slots, n, n),
            square,
            A.new_empty(batch, n, dtype=torch.int32),
            A.new_empty(batch, n, n),
            A.new_empty(batch, dtype=torch.long),
            A.new_empty(batch, dtype=torch.long),
        )

    torch.library.register_fake("kdfast::expm_backward_cpp")(
        lambda grad, powers, LUt, pivots, R0t, m, s: grad.new_empty(grad.shape)
    )

    def setup_context(ctx, inputs, output):
        A, skew = inputs
        ctx.skew = skew
        ctx.mark_non_differentiable(*output[1:])
        ctx.save_for_backward(A, *output[1:])

    def backward(ctx, grad, *_):
        A, *state = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: the differentiable joint op
            return _cpp_frechet(A.mT, grad, ctx.skew)[1], None
        return torch.ops.kdfast.expm_backward_cpp(grad, *state), None

    torch.library.register_autograd("kdfast::expm_save_cpp", backward, setup_context=setup_context)


def _register_cpp(expm_name: str, frechet_name: str, frechet=_cpp_frechet) -> None:
    torch.library.register_fake(f"kdfast::{expm_name}")(lambda A, skew: A.new_empty(A.shape))

    @torch.library.register_fake(f"kdfast::{frechet_name}")
    def _(A, E, skew=False):
        return A.new_empty(A.shape), A.new_empty(A.shape)

    def expm_backward(ctx, grad):
        (A,) = ctx.saved_tensors
        return frechet(A.mT, grad, ctx.skew)[1], None

    torch.library.register_autograd(
        f"kdfast::{expm_name}", expm_backward, setup_context=_expm_setup_context
    )

    def frechet_setup_context(ctx, inputs, output):
        A, E, _ = inputs
        ctx.save_for_backward(A, E)

    def frechet_backward(ctx, grad_X, grad_L):  # the block identity, as the reference op
        A, E = ctx.saved_tensors
        n = A.shape[-1]
        zero = torch.zeros_like(A)
        grad_X = zero if grad_X is None else grad_X
        grad_L = zero if grad_L is None else grad_L
        Mt = torch.cat([torch.cat([A.mT, zero], -1), torch.cat([E.mT, A.mT], -1)], -2)
        G = torch.cat([torch.cat([grad_X, grad_L], -1), torch.cat([zero, zero], -1)], -2)
        _, grad_M = frechet(Mt, G, False)
        return grad_M[..., :n, :n] + grad_M[..., n:, n:], grad_M[..., :n, n:], None

    torch.library.register_autograd(
        f"kdfast::{frechet_name}", frechet_backward, setup_context=frechet_setup_context
    )


def _cpp_expm_frechet(A: Tensor, E: Tensor) -> tuple[Tensor, Tensor]:
    return _cpp_frechet(A, E, False)


if _extension.unavailable_reason() is None:
    _register_cpp("expm_cpp", "expm_frechet_cpp")
    _register_cpp("expm_small_cpp", "expm_frechet_small_cpp", _fused_frechet)
    _register_save()
    _dispatch.implement("expm", "cpp", _cpp_expm, dtypes=_FLOATS)
    _dispatch.implement("expm_frechet", "cpp", _cpp_expm_frechet, dtypes=_FLOATS)
    if _extension.cuda_unavailable_reason() is None:  # csrc/cuda/expm_small.cu
        for op, fn in (("expm", _fused_expm), ("expm_frechet", _fused_expm_frechet)):
            _dispatch.implement(op, "cuda", fn, dtypes=_FLOATS, limit=_fused_limit)


# --- samples ---------------------------------------------------------------------------


def _matrices(n: int, batch: tuple[int, ...] = (3,), scale: float = 1.0, skew: bool = False):
    def make(gen):
        A = scale * randn(gen, *batch, n, n) / max(n, 1) ** 0.5
        return (A - A.mT if skew else A,), ({"skew": True} if skew else {})

    return make


def _pair(n: int, batch: tuple[int, ...] = (2,), scale: float = 1.0):
    def make(gen):
        A = scale * randn(gen, *batch, n, n) / n**0.5
        return (A, randn(gen, *batch, n, n)), {}

    return make


declare(
    Contract(
        "expm",
        "kdfast.linalg:expm",
        (
            Sample("random", _matrices(5)),
            Sample("tiny", _matrices(3, batch=(1,)), frozenset({"small"})),
            Sample("skew", _matrices(6, skew=True)),
            Sample("tiny_skew", _matrices(3, batch=(1,), skew=True), frozenset({"small"})),
            Sample("one_by_one", _matrices(1, batch=(4,))),
            Sample("large_norm", _matrices(7, scale=40.0)),
            Sample("tiny_norm", _matrices(4, scale=1e-6)),
            Sample("batched", _matrices(3, batch=(2, 3))),
            Sample("beyond_fused", _matrices(FUSED_MAX_N + 3, batch=(1,))),
            Sample("transposed", _matrices(5), view=lambda a: (a[0].mT.contiguous().mT,)),
        ),
        grad_args=(0,),
        bad_inputs=(
            BadInput("not_square", lambda: ((torch.randn(3, 4),), {}), ValueError, "square"),
            BadInput("skew_flag", lambda: ((torch.randn(3, 3),), {"skew": 1}), TypeError, "skew"),
        ),
    )
)
declare(
    Contract(
        "expm_frechet",
        "kdfast.linalg:expm_frechet",
        (
            Sample("random", _pair(4)),
            Sample("tiny", _pair(2, batch=(1,)), frozenset({"small"})),
            Sample("large_norm", _pair(6, scale=30.0)),
            Sample("batched", _pair(3, batch=(2, 2))),
        ),
        bad_inputs=(
            BadInput(
                "shapes_differ",
                lambda: ((torch.randn(3, 3), torch.randn(4, 4)), {}),
                ValueError,
                "E",
            ),
        ),
    )
)

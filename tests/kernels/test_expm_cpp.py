"""The cpp backend of expm (semantics 6): the ATen port (``kdfast::expm_cpp``,
``kdfast::expm_frechet_cpp``) and the fused small-matrix kernel (``kdfast::expm_small_cpp``,
``kdfast::expm_frechet_small_cpp``) against each other, the reference and float64 truths;
opcheck, gradcheck and the n = 768 float32 targets. The accuracy suite of tests/ops/test_expm.py
also runs on this backend (its fixture is parametrised over backends).
"""

from __future__ import annotations

import pytest
import scipy.linalg
import torch
from conftest import NO_EXT, require_backend
from worked_examples import check_expm_float32_against_float64

import kdfast
from kdfast import linalg
from kdfast.ops import expm as expm_ops
from kdfast.reference import expm as ref
from kdfast.testing import (
    EXPM_TARGETS,
    rel_error,
)

F64, F32 = torch.float64, torch.float32

pytestmark = pytest.mark.skipif(NO_EXT, reason="KDFAST_NO_EXT=1: no compiled backend")


@pytest.fixture(autouse=True)
def cpp_backend():
    require_backend("cpp")
    with kdfast.use_backend("cpp"):
        yield


def ops():
    return torch.ops.kdfast


def mixed_batch(n, dtype, seed=0, skew=False):
    """(8, n, n) with ||A||_1 from 1e-8 to 300 (60): every degree and several scalings."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(8, n, n, generator=g, dtype=F64)
    if skew:
        A = A - A.mT
    top = 300.0 if dtype == F64 else 60.0  # float32: exp(300) overflows (n = 1)
    norms = torch.tensor([1e-8, 5e-3, 0.2, 0.9, 1.9, 4.0, 30.0, top], dtype=F64)
    A = A / A.abs().sum(-2).amax(-1).clamp(min=1e-300)[:, None, None] * norms[:, None, None]
    return A.to(dtype)


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("skew", [False, True])
@pytest.mark.parametrize("n", [1, 5, 32])
def test_small_kernel_matches_aten_and_reference(n, skew, dtype):
    A = mixed_batch(n, dtype, seed=n, skew=skew and n > 1)
    E = torch.randn(A.shape, generator=torch.Generator().manual_seed(1), dtype=F64).to(dtype)
    tol = EXPM_TARGETS[dtype]
    for i in range(A.shape[0]):  # per matrix: the batch spans 1e-8 .. 300
        X_ref = ref.expm(A[i], skew)
        assert rel_error(ops().expm_small_cpp(A, skew)[i], X_ref) <= tol * 300
        assert rel_error(ops().expm_cpp(A, skew)[i], X_ref) <= tol * 300
    X_ref, L_ref = ref.expm_frechet(A, E, skew)
    for op in (ops().expm_frechet_small_cpp, ops().expm_frechet_cpp):
        X, L = op(A, E, skew)
        for i in range(A.shape[0]):
            assert rel_error(X[i], X_ref[i]) <= tol * 300, (op, i)
            assert rel_error(L[i], L_ref[i]) <= tol * 300, (op, i)


def test_small_kernel_float64_parity_with_reference():
    """semantics 7 float64 parity of the fused kernel on moderate norms: <= 1e-13 matrix-wise."""
    for n in (2, 7, 16, 32):
        A = mixed_batch(n, F64, seed=40 + n)[:6]  # ||A||_1 <= 4
        E = torch.randn(A.shape, generator=torch.Generator().manual_seed(n), dtype=F64)
        X, L = ops().expm_frechet_small_cpp(A, E, False)
        Xr, Lr = ref.expm_frechet(A, E)
        assert rel_error(X, Xr) <= 1e-14 and rel_error(L, Lr) <= 1e-14
        assert rel_error(ops().expm_small_cpp(A, False), ref.expm(A)) <= 1e-14


def test_dispatch_uses_small_kernel_up_to_its_limit(monkeypatch):
    A = mixed_batch(32, F64)[:4]
    B = mixed_batch(33, F64)[:4]
    assert torch.equal(linalg.expm(A), ops().expm_cpp(A, False))  # CPU default: ATen path
    monkeypatch.setitem(expm_ops.SMALL_N, "cpu", expm_ops.FUSED_MAX_N)  # as on CUDA
    assert torch.equal(linalg.expm(A), ops().expm_small_cpp(A, False))
    assert torch.equal(linalg.expm(B), ops().expm_cpp(B, False))
    # on CUDA the fused kernel is the cuda backend's implementation, limited to n <= 32
    assert expm_ops.FUSED_MAX_N == 32
    assert expm_ops._fused_limit(torch.empty(2, 32, 32)) is None
    assert "33 > 32" in expm_ops._fused_limit(torch.empty(2, 33, 33))


def test_non_contiguous_and_batched_leading_dims():
    A = mixed_batch(6, F64, seed=3).reshape(2, 4, 6, 6)
    At = A.mT  # non-contiguous view
    for op in (ops().expm_small_cpp, ops().expm_cpp):
        assert rel_error(op(At, False), ref.expm(At.contiguous())) <= 1e-13
    X, L = ops().expm_frechet_small_cpp(At, A, False)
    Xr, Lr = ref.expm_frechet(At.contiguous(), A)
    assert X.shape == (2, 4, 6, 6) and rel_error(L, Lr) <= 1e-13


def test_empty_batch_and_nan():
    for op in (ops().expm_small_cpp, ops().expm_cpp):
        assert op(torch.zeros(0, 3, 3, dtype=F64), False).shape == (0, 3, 3)
    A = mixed_batch(4, F64)[:3]
    A[1, 0, 0] = float("nan")
    for op in (ops().expm_small_cpp, ops().expm_cpp):
        X = op(A, False)
        assert torch.isnan(X[1]).all() and torch.isfinite(X[[0, 2]]).all()


def test_small_kernel_rejects_large_n():
    with pytest.raises(RuntimeError, match="n must be <= 32"):
        ops().expm_small_cpp(torch.zeros(33, 33), False)


@pytest.mark.parametrize("n", [5, 40])  # fused kernel and ATen path
def test_backward_is_frechet_of_transpose(n):
    g = torch.Generator().manual_seed(n)
    A = torch.randn(n, n, generator=g, dtype=F64) * (6.0 / n**0.5)
    G = torch.randn(n, n, generator=g, dtype=F64)
    a = A.clone().requires_grad_(True)
    linalg.expm(a).backward(G)
    truth = torch.from_numpy(scipy.linalg.expm_frechet(A.mT.numpy(), G.numpy())[1])
    assert rel_error(a.grad, truth) <= 1e-12


@pytest.mark.parametrize("n", [4, 34])
def test_gradcheck(n):
    g = torch.Generator().manual_seed(n)
    A = (
        torch.randn(2, n, n, generator=g, dtype=F64)
        * torch.tensor([0.1, 2.0], dtype=F64)[:, None, None]
        / n**0.5
    ).requires_grad_()
    E = torch.randn(2, n, n, generator=g, dtype=F64).requires_grad_()
    fast = n > 8  # the full Jacobian of a 34 x 34 batch is 2312 columns: use a projection
    assert torch.autograd.gradcheck(linalg.expm, (A,), fast_mode=fast)
    assert torch.autograd.gradcheck(
        lambda b: linalg.expm(b - b.mT, skew=True), (A,), fast_mode=fast
    )
    if n == 4:
        assert torch.autograd.gradcheck(linalg.expm_frechet, (A, E))
        assert torch.autograd.gradgradcheck(linalg.expm, (A,))


def test_opcheck():
    g = torch.Generator().manual_seed(5)
    for n in (3, 34):
        A = (torch.randn(2, n, n, generator=g, dtype=F64) / n**0.5).requires_grad_()
        E = torch.randn(2, n, n, generator=g, dtype=F64).requires_grad_()
        S = (A - A.mT).detach().requires_grad_()
        for expm_op, frechet_op in (
            (ops().expm_cpp, ops().expm_frechet_cpp),
            (ops().expm_small_cpp, ops().expm_frechet_small_cpp),
        ):
            if n > 32 and expm_op is ops().expm_small_cpp:
                continue
            torch.library.opcheck(expm_op, (A, False))
            torch.library.opcheck(expm_op, (S, True))
            torch.library.opcheck(frechet_op, (A, E, False))
            torch.library.opcheck(frechet_op, (S, E, True))


@pytest.mark.parametrize("kind", ["skew", "gaussian"])
def test_float32_gradient_and_orthogonality_n768(kind):
    """semantics 6: float32, ||A||_2 = 8, G ~ N(0, 1), n = 768: gradient within 2e-6 of float64."""
    n = 768
    g = torch.Generator().manual_seed(7)
    B = torch.randn(n, n, generator=g, dtype=F64)
    A = (B - B.mT if kind == "skew" else B).float()
    A = A / torch.linalg.matrix_norm(A.double(), 2).float() * 8
    G = torch.randn(n, n, generator=g, dtype=F64).float()
    err = check_expm_float32_against_float64(A, G, skew=kind == "skew")
    print(f"{kind} n=768 float32 gradient error {err:.1e}")


def _grad_via_save(A, G, skew):
    a = A.clone().requires_grad_(True)
    X = linalg.expm(a, skew=skew)
    (g,) = torch.autograd.grad(X, a, G)
    return X.detach(), g


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("skew", [False, True])
@pytest.mark.parametrize("scales", ["mixed", "small", "large"])
def test_saved_state_backward_matches_joint_op(scales, skew, dtype):
    """The ATen backward from the forward's powers and LU (kdfast::expm_save_cpp and
    kdfast::expm_backward_cpp) equals L(A^T, G) from the reference's joint algorithm:
    a batch mixing every degree and scaling (gathered groups), all degree 3 (only A^2
    formed) and all of one high degree (powers written in place)."""
    n = 40
    A = mixed_batch(n, dtype, seed=11, skew=skew)
    if scales == "small":
        A = A[: 2 if dtype == F64 else 3]  # degree 3 from the bound on ||A^2|| alone
    elif scales == "large":
        A = A[6:] if dtype == F64 else A[5:7]
    G = torch.randn(A.shape, generator=torch.Generator().manual_seed(2), dtype=F64).to(dtype)
    X, g = _grad_via_save(A, G, skew)
    X_ref, g_ref = ref.expm_frechet(A.mT, G, skew)
    tol = EXPM_TARGETS[dtype]
    for i in range(A.shape[0]):
        assert rel_error(X[i], ref.expm(A[i], skew)) <= tol * 300, i
        assert rel_error(g[i], g_ref[i]) <= tol * 300, i
    if scales == "small":
        m, _ = ref.scaling_parameters(A, skew, frechet=True)
        assert (m == 3).all()


def test_saved_state_is_used_and_opcheck():
    g = torch.Generator().manual_seed(9)
    A = (torch.randn(2, 36, 36, generator=g, dtype=F64) / 6).requires_grad_()
    X = linalg.expm(A)
    assert "expm_save_cpp" in type(X.grad_fn).__name__
    out = ops().expm_save_cpp(A.detach(), False)
    assert out[1].shape == (2, 5, 36, 36) and out[3].dtype == torch.int32
    G = torch.randn(2, 36, 36, generator=g, dtype=F64)
    torch.library.opcheck(ops().expm_save_cpp, (A, False))
    torch.library.opcheck(ops().expm_save_cpp, ((A - A.mT).detach().float(), True))
    torch.library.opcheck(ops().expm_backward_cpp, (G, *out[1:]))
    with torch.no_grad():  # no gradient needed: the plain op (thresholds theta_m)
        assert linalg.expm(A).grad_fn is None

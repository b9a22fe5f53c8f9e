"""Matrix exponential and Frechet derivative (semantics 6) on every backend
(reference, and cpp: the ATen port and the fused small-matrix kernel for n <= 32).

Truths: mpmath at 50 digits (small n), eigendecompositions (skew and symmetric A), SciPy's
``expm`` / ``expm_frechet``, and float64 for float32 inputs (semantics 7).
"""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import scipy.linalg
import torch
from conftest import backends_for, require_backend
from worked_examples import check_expm_float32_against_float64

import kdfast
from kdfast import linalg
from kdfast.ops import expm as expm_ops
from kdfast.ops.expm import expm_frechet_reference, expm_reference
from kdfast.reference import expm as ref
from kdfast.testing import (
    EXPM_FRECHET_TARGET,
    EXPM_TARGETS,
    rel_error,
)

F64, F32 = torch.float64, torch.float32
U64 = 2.0**-53
# semantics 6 thresholds, copied here so that a wrong table in the implementation fails a test
THETA64 = {
    3: 1.495585217958292e-2,
    5: 2.539398330063230e-1,
    7: 9.504178996162932e-1,
    9: 2.097847961257068,
    13: 5.371920351148152,
}
THETA32 = {3: 4.258730016922831e-1, 5: 1.880152677804762, 7: 3.925724783138660}
ELL64 = {3: 1.08e-2, 5: 2.00e-1, 7: 7.83e-1, 9: 1.78, 13: 4.74}
ELL32 = {3: 0.308033, 5: 1.48253, 7: 3.24867}


BACKENDS = backends_for("expm")


@pytest.fixture(autouse=True, params=[*BACKENDS, *(["cpp-fused"] if "cpp" in BACKENDS else [])])
def backend(request, monkeypatch):
    """Every backend; "cpp-fused": cpp with the fused small-matrix kernel for n <= 32 on CPU
    (the dispatcher's CUDA choice; on CPU it picks the ATen path)."""
    name = request.param
    if name == "cpp-fused":
        monkeypatch.setitem(expm_ops.SMALL_N, "cpu", expm_ops.FUSED_MAX_N)
        name = "cpp"
    if name != "reference":
        require_backend(name)
    with kdfast.use_backend(name):
        yield name


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def onenorm(A):
    return A.abs().sum(-2).amax(-1)


def gaussian(n, norm1, seed=0, batch=()):
    """Gaussian matrices scaled to ||A||_1 = norm1 (a float or a (batch,) tensor)."""
    A = randn(*batch, n, n, seed=seed)
    return A / onenorm(A)[..., None, None] * torch.as_tensor(norm1, dtype=F64)[..., None, None]


def skew(n, norm2, seed=0):
    B = randn(n, n, seed=seed)
    S = B - B.mT
    return S / torch.linalg.matrix_norm(S, 2) * norm2


def symmetric(n, norm2, seed=0):
    B = randn(n, n, seed=seed)
    H = B + B.mT
    return H / torch.linalg.matrix_norm(H, 2) * norm2


def mp_expm(A):
    with mpmath.workdps(50):
        X = mpmath.expm(mpmath.matrix(A.tolist()))
        n = A.shape[0]
        return torch.tensor([[float(X[i, j]) for j in range(n)] for i in range(n)], dtype=F64)


def eig_expm(A, kind):
    if kind == "symmetric":
        w, V = torch.linalg.eigh(A)
        return (V * torch.exp(w)[..., None, :]) @ V.mT
    w, V = torch.linalg.eigh(1j * A.to(torch.complex128))  # iA is Hermitian for skew A
    return ((V * torch.exp(-1j * w)[..., None, :]) @ V.mH).real


def scipy_frechet(A, E):
    return torch.from_numpy(scipy.linalg.expm_frechet(A.numpy(), E.numpy())[1])


# --- float64 accuracy -----------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 3, 8])
def test_matches_mpmath(n):
    degrees = set()
    for norm in (1e-3, 0.1, 0.8, 1.8, 5.0, 30.0, 80.0):
        A = gaussian(n, norm, seed=n)
        err = rel_error(linalg.expm(A), mp_expm(A))
        assert err <= 100 * U64 * max(1.0, norm), f"n={n}, ||A||_1={norm}: {err:.2e}"
        degrees.add(int(ref.scaling_parameters(A)[0]))
    assert degrees == {3, 5, 7, 9, 13} or n == 1  # every Pade degree was exercised


def test_non_normal_matches_mpmath():
    n = 6
    Q, _ = torch.linalg.qr(randn(n, n, seed=1))
    T = torch.diag(-3 * torch.rand(n, generator=torch.Generator().manual_seed(2), dtype=F64))
    cases = [
        Q @ (T + 50 * randn(n, n, seed=3).triu(1)) @ Q.mT,  # far from normal
        30 * torch.diag(torch.ones(n - 1, dtype=F64), 1) - 2 * torch.eye(n, dtype=F64),  # Jordan
        torch.tensor([[-1.0, 1e4], [0.0, -2.0]], dtype=F64),
    ]
    for A in cases:
        err = rel_error(linalg.expm(A), mp_expm(A))
        assert err <= 100 * U64 * max(1.0, float(onenorm(A))), f"{err:.2e}"


@pytest.mark.parametrize("kind", ["skew", "skew_as_general", "symmetric"])
@pytest.mark.parametrize("n", [4, 32, 128])
def test_normal_matrices_vs_eigendecomposition(kind, n):
    for norm2 in (0.05, 2.0, 40.0):
        A = (symmetric if kind == "symmetric" else skew)(n, norm2, seed=n)
        X = linalg.expm(A, skew=kind == "skew")
        err = rel_error(X, eig_expm(A, "symmetric" if kind == "symmetric" else "skew"))
        assert err <= EXPM_TARGETS[F64] * max(1.0, norm2), (
            f"{kind} n={n} ||A||_2={norm2}: {err:.2e}"
        )


def test_skew_n512_vs_eigendecomposition():
    A = skew(512, 10.0, seed=5)
    X = linalg.expm(A, skew=True)
    assert rel_error(X, eig_expm(A, "skew")) <= EXPM_TARGETS[F64] * 10.0
    assert float((X.mT @ X - torch.eye(512, dtype=F64)).abs().max()) <= EXPM_TARGETS[F64]


def test_general_matrices_vs_scipy():
    # Non-normal exponentials are ill-conditioned (SciPy itself can be off by 1e-6): report,
    # gate loosely.
    errors = []
    for norm in (0.01, 1.0, 10.0, 100.0, 400.0):
        A = gaussian(16, norm, seed=7)
        errors.append(rel_error(linalg.expm(A), torch.from_numpy(scipy.linalg.expm(A.numpy()))))
    print("expm vs scipy.linalg.expm, ||A||_1 = 0.01 .. 400:", [f"{e:.1e}" for e in errors])
    assert max(errors) <= 1e-9


def rounding_check(A, m, u):
    """ell(A, m) of Al-Mohy-Higham 2009 from its definition, |c_{2m+1}| = m!^2/((2m)!(2m+1)!)."""
    c = math.factorial(m) ** 2 / (math.factorial(2 * m) * math.factorial(2 * m + 1))
    power_norm = np.linalg.norm(np.linalg.matrix_power(abs(A), 2 * m + 1), 1)
    if power_norm == 0:
        return 0
    alpha = c * power_norm / np.linalg.norm(A, 1)
    return max(0, math.ceil(math.log2(alpha / u) / (2 * m)))


def spec_choice(A, thresholds, u, skew=False, check_rounding=True):
    """(m, s) as semantics 6 writes it, in NumPy."""
    A = A.numpy()
    d = {p: np.linalg.norm(np.linalg.matrix_power(A, p), 1) ** (1 / p) for p in (4, 6, 8, 10)}
    eta46, eta68 = max(d[4], d[6]), max(d[6], d[8])
    degrees = sorted(thresholds)
    top = degrees[-1]
    eta = dict.fromkeys(degrees, eta46) if skew else {3: eta46, 5: eta46, 7: eta68, 9: eta68}
    if not skew:
        eta[top] = min(eta68, max(d[8], d[10])) if top == 13 else eta68

    def ell(X, m):
        return rounding_check(X, m, u) if check_rounding and not skew else 0

    for m in degrees[:-1]:
        if eta[m] <= thresholds[m] and ell(A, m) == 0:
            return m, 0
    s = max(0, math.ceil(math.log2(eta[top] / thresholds[top]))) if eta[top] > 0 else 0
    return top, s + ell(2.0**-s * A, top)


def test_degree_and_scaling_follow_spec():
    from scipy.sparse.linalg._matfuncs import _ell as scipy_ell

    cases = [gaussian(6, norm, seed=8) for norm in (1e-3, 0.2, 0.9, 2.0, 5.0, 9.0, 40.0, 900.0)]
    cases.append(50 * randn(6, 6, seed=9).triu(1) - torch.eye(6, dtype=F64))  # non-normal
    N = randn(6, 6, seed=10).triu(1)  # nilpotent: d6 = d8 = 0 < theta_7 < d4 picks m = 7
    cases.append(
        N * 1.5 / float(torch.linalg.matrix_norm(torch.linalg.matrix_power(N, 4), 1)) ** 0.25
    )
    got = []
    for A in cases:
        for m in (3, 5, 7, 9, 13):
            assert rounding_check(A.numpy(), m, U64) == scipy_ell(A.numpy(), m)
        got.append(spec_choice(A, THETA64, U64))
        assert tuple(map(int, ref.scaling_parameters(A))) == got[-1]
        S = A - A.mT
        expected = spec_choice(S, THETA64, U64, skew=True)
        assert tuple(map(int, ref.scaling_parameters(S, skew=True))) == expected
        expected = spec_choice(A, ELL64, U64, check_rounding=False)
        assert tuple(map(int, ref.scaling_parameters(A, frechet=True))) == expected
        A32 = A.float()
        expected = spec_choice(A32.double(), THETA32, 2.0**-24)
        assert tuple(map(int, ref.scaling_parameters(A32))) == expected
        expected = spec_choice(A32.double(), ELL32, 2.0**-24, check_rounding=False)
        assert tuple(map(int, ref.scaling_parameters(A32, frechet=True))) == expected
    assert {m for m, _ in got} == {3, 5, 7, 9, 13} and max(s for _, s in got) >= 5


def test_zero_and_scalar():
    for dtype in (F32, F64):
        Z = torch.zeros(2, 5, 5, dtype=dtype)
        assert torch.equal(linalg.expm(Z), torch.eye(5, dtype=dtype).expand(2, 5, 5))
        m, s = ref.scaling_parameters(Z)
        assert m.tolist() == [3, 3] and s.tolist() == [0, 0]
    a = torch.tensor([[[-7.5]], [[0.3]], [[12.0]]], dtype=F64)
    # semantics 6 (n <= 8): 100 u max(1, ||A||_1); the reference and fused kernel reach ~1 u, the
    # ATen path's two squarings at ||a|| = 12 about 6 u
    assert rel_error(linalg.expm(a), torch.exp(a)) <= 100 * U64 * 12


def test_batch_with_mixed_norms_is_per_matrix():
    norms = torch.tensor([1e-8, 5e-3, 0.2, 0.9, 1.9, 4.0, 30.0, 300.0], dtype=F64)
    A = gaussian(6, norms, seed=11, batch=(8,)).reshape(2, 4, 6, 6)
    X = linalg.expm(A)
    m, s = ref.scaling_parameters(A)
    assert len(set(m.flatten().tolist())) >= 4 and len(set(s.flatten().tolist())) >= 3
    for i in range(2):
        for j in range(4):
            truth = torch.from_numpy(scipy.linalg.expm(A[i, j].numpy()))
            tol = 200 * U64 * max(1.0, float(norms[4 * i + j]))
            assert rel_error(X[i, j], truth) <= tol, (i, j)
            m1, s1 = ref.scaling_parameters(A[i, j])
            assert (int(m1), int(s1)) == (int(m[i, j]), int(s[i, j]))
    # Frechet and skew paths, same batch
    E = randn(2, 4, 6, 6, seed=12)
    _, L = linalg.expm_frechet(A, E)
    for i in range(2):
        for j in range(4):
            assert rel_error(L[i, j], scipy_frechet(A[i, j], E[i, j])) <= EXPM_FRECHET_TARGET
    S = A - A.mT
    Xs = linalg.expm(S, skew=True)
    for i in range(2):
        for j in range(4):
            assert rel_error(Xs[i, j], eig_expm(S[i, j], "skew")) <= EXPM_TARGETS[F64] * max(
                1, float(norms[4 * i + j])
            )


def test_nan_propagates_per_matrix():
    A = gaussian(4, 3.0, seed=13, batch=(3,))
    A[1, 2, 0] = float("nan")
    X = linalg.expm(A)
    assert torch.isnan(X[1]).all() and torch.isfinite(X[[0, 2]]).all()


def test_large_norm_does_not_overflow_the_estimates():
    # ||A||_1 = 1e5 in float32: A^8 overflows, but the estimates come from a pre-scaled copy.
    A = skew(24, 1e5, seed=14)
    X32 = linalg.expm(A.float())
    assert torch.isfinite(X32).all()
    assert rel_error(X32, linalg.expm(A.float().double())) <= 1e-1


# --- Frechet derivative and gradients ------------------------------------------------


def test_expm_frechet_vs_scipy():
    for norm in (1e-3, 0.1, 1.0, 5.0, 20.0, 100.0):
        A = gaussian(10, norm, seed=15, batch=(2,))
        E = randn(2, 10, 10, seed=16)
        X, L = linalg.expm_frechet(A, E)
        for i in range(2):
            assert rel_error(L[i], scipy_frechet(A[i], E[i])) <= EXPM_FRECHET_TARGET, norm
            assert (
                rel_error(X[i], torch.from_numpy(scipy.linalg.expm(A[i].numpy())))
                <= EXPM_FRECHET_TARGET
            )
    A, E = gaussian(10, 300.0, seed=17), randn(10, 10, seed=18)
    err = rel_error(linalg.expm_frechet(A, E)[1], scipy_frechet(A, E))
    print(f"expm_frechet vs scipy at ||A||_1 = 300: {err:.1e}")


def test_expm_frechet_is_the_block_exponential():
    A, E = gaussian(5, 3.0, seed=19), randn(5, 5, seed=20)
    M = torch.cat([torch.cat([A, E], 1), torch.cat([torch.zeros_like(A), A], 1)], 0)
    block = linalg.expm(M)
    X, L = linalg.expm_frechet(A, E)
    assert rel_error(X, block[:5, :5]) <= 1e-14 and rel_error(L, block[:5, 5:]) <= 1e-13


@pytest.mark.parametrize("is_skew", [False, True])
def test_backward_is_frechet_of_transpose(is_skew):
    A = skew(7, 9.0, seed=21) if is_skew else gaussian(7, 9.0, seed=21)
    G = randn(7, 7, seed=22)
    a = A.clone().requires_grad_(True)
    linalg.expm(a, skew=is_skew).backward(G)
    assert rel_error(a.grad, scipy_frechet(A.mT, G)) <= EXPM_FRECHET_TARGET
    # the plain-PyTorch reference differentiated by autograd is an independent oracle
    a2 = A.clone().requires_grad_(True)
    ref.expm(a2, is_skew).backward(G)
    assert rel_error(a.grad, a2.grad) <= 1e-12


def test_gradcheck_expm():
    A = gaussian(4, torch.tensor([0.05, 1.5, 12.0], dtype=F64), seed=23, batch=(3,))
    assert torch.autograd.gradcheck(linalg.expm, (A.requires_grad_(),))
    B = randn(2, 4, 4, seed=24).requires_grad_()
    assert torch.autograd.gradcheck(lambda b: linalg.expm(3 * (b - b.mT), skew=True), (B,))
    C = gaussian(3, 4.0, seed=25).requires_grad_()
    assert torch.autograd.gradgradcheck(linalg.expm, (C,))


def test_gradcheck_expm_frechet():
    A = gaussian(3, torch.tensor([0.05, 8.0], dtype=F64), seed=26, batch=(2,)).requires_grad_()
    E = randn(2, 3, 3, seed=27).requires_grad_()
    assert torch.autograd.gradcheck(linalg.expm_frechet, (A, E))


def test_opcheck():
    A = gaussian(3, torch.tensor([0.1, 6.0], dtype=F64), seed=28, batch=(2,)).requires_grad_()
    E = randn(2, 3, 3, seed=29).requires_grad_()
    S = (A - A.mT).detach().requires_grad_()
    torch.library.opcheck(expm_reference, (A, False))
    torch.library.opcheck(expm_reference, (S, True))
    torch.library.opcheck(expm_frechet_reference, (A, E))
    torch.library.opcheck(expm_frechet_reference, (S, E, True))


# --- float32 and half -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["skew", "gaussian"])
def test_float32_gradient_vs_float64(kind):
    n = 128
    B = randn(n, n, seed=30)
    A = (B - B.mT if kind == "skew" else B).float()
    A = A / torch.linalg.matrix_norm(A, 2) * 8
    G = randn(n, n, seed=31).float()
    check_expm_float32_against_float64(A, G, skew=kind == "skew")


def test_half_inputs_are_computed_in_float32():
    A = gaussian(5, 2.0, seed=32)
    for dtype in (torch.float16, torch.bfloat16):
        h = A.to(dtype)
        X = linalg.expm(h)
        assert X.dtype == F32
        assert torch.equal(X, linalg.expm(h.float()))
        X, L = linalg.expm_frechet(h, h)
        assert X.dtype == L.dtype == F32


# --- validation ---------------------------------------------------------------------


def test_bad_inputs_raise():
    A = torch.zeros(3, 3)
    with pytest.raises(TypeError, match="A must be a torch.Tensor"):
        linalg.expm([[0.0]])
    with pytest.raises(TypeError, match="A must be float16.*int64"):
        linalg.expm(torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"A must have at least 2 dims, got shape \(3,\)"):
        linalg.expm(torch.zeros(3))
    with pytest.raises(ValueError, match=r"A must be .*square.*\(2, 3, 4\)"):
        linalg.expm(torch.zeros(2, 3, 4))
    with pytest.raises(TypeError, match="skew must be a bool"):
        linalg.expm(A, skew=1)
    with pytest.raises(
        ValueError, match=r"E must have the shape of A, got A \(3, 3\) and E \(3, 4\)"
    ):
        linalg.expm_frechet(A, torch.zeros(3, 4))
    with pytest.raises(TypeError, match="E must be float16"):
        linalg.expm_frechet(A, torch.zeros(3, 3, dtype=torch.complex64))
    with pytest.raises(ValueError, match="one device"):
        linalg.expm_frechet(A, torch.zeros(3, 3, device="meta"))


def _skew_of_norm(norm: float, n: int = 6, dtype=F64) -> torch.Tensor:
    A = randn(n, n, seed=4)
    A = A - A.T
    return (A / onenorm(A) * norm).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
@pytest.mark.parametrize("norm", [1e2, 1e4, 1e8])
def test_skew_is_orthogonal_at_large_norms(norm, dtype):
    """The squarings lose orthogonality as about u ||A||_1: float32 at ||A|| = 1e4 was off
    by 3e-4 and at 1e8 by 3 to 68. float32 batches above ||A||_1 = 64 are computed in
    float64: orthogonal to float32 rounding, and the same matrix as the float64 result."""
    A = _skew_of_norm(norm, dtype=dtype)
    X = linalg.expm(A, skew=True)
    assert X.dtype == dtype
    eye = torch.eye(A.shape[-1], dtype=dtype)
    limit = 1e-5 if dtype == torch.float32 else 1e-8
    assert (X.mT @ X - eye).abs().max() <= limit
    if dtype == torch.float32 and norm <= 1e4:  # the float64 result, rounded
        X64 = linalg.expm(A.double(), skew=True)
        assert (X.double() - X64).abs().max() <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
@pytest.mark.parametrize("norm", [1e12, 1e20, 1e30])
def test_skew_beyond_float64_raises(norm, dtype):
    """Above ||A||_1 = 2^30 not even float64 gives an orthogonal matrix; the reference
    returned an exact zero matrix at 1e20 and cpp NaN. Now a ValueError says why."""
    with pytest.raises(ValueError, match=r"skew=True.*2\^30"):
        linalg.expm(_skew_of_norm(norm, dtype=dtype), skew=True)
    assert linalg.expm(torch.full((2, 2), float("nan"), dtype=dtype), skew=True).isnan().all()


def test_batch_above_the_serial_glue_size():
    # 260 x 32 x 32 > 512^2 entries: the cpp ops keep ATen's parallel regions, the ATen
    # port's batched GEMMs falling back from kdfast's tiles to at::bmm / baddbmm_
    # (csrc/cpu/tile_gemm.h), the fused kernel ("cpp-fused") running in one OpenMP region
    g = torch.Generator().manual_seed(31)
    A = (0.3 * torch.randn(260, 32, 32, dtype=F64, generator=g)).requires_grad_(True)
    G = torch.randn(260, 32, 32, dtype=F64, generator=g)
    X = linalg.expm(A)
    (grad,) = torch.autograd.grad(X, A, G)
    assert rel_error(X, torch.linalg.matrix_exp(A.detach())) <= EXPM_TARGETS[F64] * 10.0
    _, L = expm_frechet_reference(A.detach().mT, G)  # the adjoint: L(A^T, G)
    assert rel_error(grad, L) <= EXPM_FRECHET_TARGET * 10.0

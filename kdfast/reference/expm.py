"""Matrix exponential and its Frechet derivative by Pade scaling and squaring (semantics 6).

The executable spec: plain PyTorch ops, batched over leading dims ``(..., n, n)``, float32 or
float64 (callers upcast half inputs). Autograd can differentiate these functions directly,
so they are also an independent gradient oracle for the custom ops of ``kdfast.ops.expm``.

Algorithm (per matrix of the batch): pick a Pade degree m and a scaling s from the
Al-Mohy-Higham estimates d_p = ||A^p||_1^(1/p), evaluate r_m(2^-s A) = (V - U)^-1 (V + U)
with one LU and one solve, then square s times. Every matrix gets its own (m, s): matrices
are grouped by degree (one Python iteration per degree, none per matrix) and squared under
a per-matrix mask. Grouping and the squaring loop read (m, s) on the host (a few
synchronisations per call).

References:
    N. J. Higham, "The scaling and squaring method for the matrix exponential revisited",
    SIAM J. Matrix Anal. Appl. 26(4), 2005 (degrees, theta_m, the m = 13 evaluation).
    A. H. Al-Mohy and N. J. Higham, "A new scaling and squaring algorithm for the matrix
    exponential", SIAM J. Matrix Anal. Appl. 31(3), 2009 (d_p estimates, rounding check).
    A. H. Al-Mohy and N. J. Higham, "Computing the Frechet derivative of the matrix
    exponential, with an application to condition number estimation", SIAM J. Matrix Anal.
    Appl. 30(4), 2009 (the joint algorithm, l_m thresholds; SciPy's ``expm_frechet``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: Diagonal Pade numerator coefficients b_j = (2m - j)! / (j! (m - j)!), j = 0..m.
PADE: dict[int, tuple[float, ...]] = {
    3: (120.0, 60.0, 12.0, 1.0),
    5: (30240.0, 15120.0, 3360.0, 420.0, 30.0, 1.0),
    7: (17297280.0, 8648640.0, 1995840.0, 277200.0, 25200.0, 1512.0, 56.0, 1.0),
    9: (17643225600.0, 8821612800.0, 2075673600.0, 302702400.0, 30270240.0, 2162160.0,
        110880.0, 3960.0, 90.0, 1.0),
    13: (64764752532480000.0, 32382376266240000.0, 7771770303897600.0, 1187353796428800.0,
         129060195264000.0, 10559470521600.0, 670442572800.0, 33522128640.0, 1323241920.0,
         40840800.0, 960960.0, 16380.0, 182.0, 1.0),
}  # fmt: skip

#: theta_m: largest ||2^-s A||_1 for which r_m has backward error <= unit roundoff.
THETA: dict[torch.dtype, dict[int, float]] = {
    torch.float64: {
        3: 1.495585217958292e-2,
        5: 2.539398330063230e-1,
        7: 9.504178996162932e-1,
        9: 2.097847961257068,
        13: 5.371920351148152,
    },
    torch.float32: {3: 4.258730016922831e-1, 5: 1.880152677804762, 7: 3.925724783138660},
}

#: l_m: the same bound for the joint exp + Frechet algorithm (float32 l_13 = 9.97739 unused:
#: float32 stops at m = 7).
ELL: dict[torch.dtype, dict[int, float]] = {
    torch.float64: {3: 1.08e-2, 5: 2.00e-1, 7: 7.83e-1, 9: 1.78, 13: 4.74},
    torch.float32: {3: 0.308033, 5: 1.48253, 7: 3.24867},
}

#: 1 / |c_{2m+1}|, leading coefficient of the backward-error series (Al-Mohy-Higham 2009,
#: used by their rounding-error check ell(A, m); SciPy's ``_ell``).
ERROR_COEFF = {
    3: 100800.0,
    5: 10059033600.0,
    7: 4487938430976000.0,
    9: 5914384781877411840000.0,
    13: 113250775606021113483283660800000000.0,
}

UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24}


def expm(A: Tensor, skew: bool = False) -> Tensor:
    """exp(A) for A of shape (..., n, n), float32 or float64; returns the same shape and dtype.

    ``skew=True`` promises skew-symmetric matrices: the scaling then comes from
    max(d4, d6) for every degree and the rounding-error check is skipped (normal matrices
    need neither the sharper estimates nor the check), which saves squarings. Its result
    must be orthogonal, and the squarings lose orthogonality as about u ||A||_1: float32
    batches with ||A||_1 > SKEW_FLOAT32_MAX_NORM are computed in float64, and above
    SKEW_MAX_NORM a ValueError says why (:func:`skew_compute_dtype`).
    """
    if skew and A.numel() > 0:
        dtype = skew_compute_dtype(A)
        if dtype != A.dtype:
            return _scaling_and_squaring(A.to(dtype), None, True)[0].to(A.dtype)
    return _scaling_and_squaring(A, None, skew)[0]


#: expm(A, skew=True): float32 batches above this ||A||_1 are computed in float64 (the
#: float32 result would be orthogonal only to about 3e-8 ||A||_1); csrc/expm_op.h mirrors it
SKEW_FLOAT32_MAX_NORM = 64.0
#: above this ||A||_1 not even float64 returns an orthogonal matrix (the rotation angles are
#: known only to about u ||A|| ~ 1e-7): expm(A, skew=True) raises
SKEW_MAX_NORM = 2.0**30


def skew_compute_dtype(A: Tensor) -> torch.dtype:
    """The dtype expm(A, skew=True) computes in (one host synchronisation): float64 for a
    float32 batch of ||A||_1 > SKEW_FLOAT32_MAX_NORM, else A's; ValueError above
    SKEW_MAX_NORM. Non-finite input keeps its dtype (NaN propagates)."""
    norm = _onenorm(A.reshape(-1, A.shape[-1], A.shape[-1])).amax().item()
    if not math.isfinite(norm):
        return A.dtype
    if norm > SKEW_MAX_NORM:
        raise ValueError(
            f"expm(A, skew=True): ||A||_1 = {norm:.3g} > 2^30, where scaling and squaring "
            "cannot return an orthogonal matrix even in float64 (the rotation angles are "
            "known only to about u ||A||); scale A down or pass skew=False"
        )
    if A.dtype != torch.float64 and norm > SKEW_FLOAT32_MAX_NORM:
        return torch.float64
    return A.dtype


def expm_frechet(A: Tensor, E: Tensor, skew: bool = False) -> tuple[Tensor, Tensor]:
    """(exp(A), L(A, E)) for A, E of shape (..., n, n), computed jointly.

    L(A, E) is the Frechet derivative of exp at A in direction E. The degree and scaling use
    the same d_p estimates as :func:`expm`, without its rounding-error check, with the
    thresholds l_m of the joint algorithm (SciPy's ``expm_frechet`` uses ||A||_1 instead of
    d_p; the d_p are sharper and save squarings, see semantics 6).
    """
    return _scaling_and_squaring(A, E, skew)


def scaling_parameters(A: Tensor, skew: bool = False, frechet: bool = False):
    """(m, s): per-matrix Pade degree and number of squarings, int64 tensors of shape (...)."""
    n = A.shape[-1]
    A0, t = _prescale(A.reshape(-1, n, n))
    thresholds = (ELL if frechet else THETA)[A.dtype]
    m, s = _choose(A0, t, _powers(A0, skew, thresholds), skew, thresholds, not frechet)
    return m.reshape(A.shape[:-2]), s.reshape(A.shape[:-2])


def _onenorm(X: Tensor) -> Tensor:
    """Matrix 1-norm (max column sum) of each matrix: (N, n, n) -> (N,)."""
    return X.abs().sum(-2).amax(-1)


def _prescale(A: Tensor) -> tuple[Tensor, Tensor]:
    """A0 = 2^-t A with integer t >= 0 and ||A0||_1 <= 1, so that its powers cannot overflow.

    The estimates d_p(A) = 2^t d_p(A0) come from A0's powers, which the evaluation reuses.
    """
    t = torch.log2(_onenorm(A)).ceil().clamp(min=0)
    t = torch.nan_to_num(t, nan=0.0, posinf=0.0)  # NaN/Inf input: propagate, do not scale
    return A * torch.exp2(-t)[:, None, None], t


def _powers(A0: Tensor, skew: bool, thresholds: dict[int, float]) -> dict[int, Tensor]:
    """A0^p for the p the estimates need: {2, 4, 6}, plus 8 (and 10 for m = 13) unless skew."""
    A2 = A0 @ A0
    A4 = A2 @ A2
    powers = {2: A2, 4: A4, 6: A4 @ A2}
    if not skew:
        powers[8] = A4 @ A4
        if 13 in thresholds:
            powers[10] = A4 @ powers[6]
    return powers


def _rounding_check(A0: Tensor, t: Tensor, degrees) -> dict[int, Tensor]:
    """Unclamped ell(A, m) = ceil(log2(alpha_m / u) / (2m)) of Al-Mohy-Higham 2009, per degree.

    alpha_m = |c_{2m+1}| || |A|^(2m+1) ||_1 / ||A||_1; ell > 0 means rounding errors in
    evaluating r_m could exceed the truncation bound, so more scaling is needed. Computed
    in log2 from |A0| / ||A0||_1 (norm 1, so its powers neither overflow nor underflow early).
    """
    norm = _onenorm(A0)
    B = A0.abs() / torch.where(norm > 0, norm, 1.0)[:, None, None]
    v = torch.ones_like(A0[:, :1, :])
    log2_u = math.log2(UNIT_ROUNDOFF[A0.dtype])
    log2_norm = t + torch.log2(norm)  # log2 ||A||_1
    ell, p = {}, 0
    for m in sorted(degrees):
        while p < 2 * m + 1:  # v = 1^T B^p: its max entry is ||B^p||_1 (B >= 0)
            v, p = v @ B, p + 1
        log2_alpha = 2 * m * log2_norm + torch.log2(v.amax(-1)[:, 0]) - math.log2(ERROR_COEFF[m])
        ell[m] = torch.ceil((log2_alpha - log2_u) / (2 * m))
    return ell


def _choose(
    A0: Tensor, t: Tensor, powers, skew: bool, thresholds, rounding_check: bool
) -> tuple[Tensor, Tensor]:
    """Per-matrix degree m and scaling s (Al-Mohy-Higham 2009, as SciPy's expm), int64 (N,).

    The rounding-error check applies to the exponential only (as in SciPy: its
    ``expm_frechet`` has none). It adds squarings for dense matrices whose |A| has a much
    larger spectral radius than A: with it, the float32 gradient of a Gaussian A (n = 768,
    ||A||_2 = 8) was off by 3e-6 instead of 8e-7.
    """
    degrees = sorted(thresholds)
    top = degrees[-1]
    log2_d = {p: t + torch.log2(_onenorm(P)) / p for p, P in powers.items()}
    eta46 = torch.maximum(log2_d[4], log2_d[6])
    if skew:
        eta = dict.fromkeys(degrees, eta46)
        excess = None
    else:
        eta68 = torch.maximum(log2_d[6], log2_d[8])
        eta = {3: eta46, 5: eta46, 7: eta68, 9: eta68}
        # (d8, d10) is a valid pair only for m = 13 (its error series starts at x^27)
        eta[top] = (
            torch.minimum(eta68, torch.maximum(log2_d[8], log2_d[10])) if top == 13 else eta68
        )
        excess = _rounding_check(A0, t, degrees) if rounding_check else None
    # log2 eta = -inf for a zero (or nilpotent) matrix: s = 0
    s = torch.ceil(eta[top] - math.log2(thresholds[top])).clamp(min=0)
    if excess is not None:  # ell(2^-s A, m) = ell(A, m) - s
        s = s + (excess[top] - s).clamp(min=0)
    m = torch.full_like(s, top)
    for deg in reversed(degrees[:-1]):  # the smallest degree that suffices wins
        ok = eta[deg] <= math.log2(thresholds[deg])
        if excess is not None:
            ok = ok & (excess[deg] <= 0)
        m = torch.where(ok, deg, m)
        s = torch.where(ok, 0.0, s)
    s = torch.nan_to_num(s, nan=0.0, posinf=0.0)  # NaN/Inf input: no squarings, NaN out
    return m.long(), s.long()


def _times_pow2(X: Tensor, log2_c: Tensor, p: int) -> Tensor:
    """X * c^p for c = 2^log2_c, multiplying p times: c^p may overflow where X c^p does not."""
    c = torch.exp2(log2_c)[:, None, None]
    for _ in range(p):
        X = X * c
    return X


def _pade_terms(m: int, X: Tensor, pw: dict[int, Tensor], F: Tensor | None):
    """U, V with r_m(X) = (V - U)^-1 (V + U); with a direction F also their derivatives Lu, Lv.

    pw holds X^p for even p (pw[0] = I). The Frechet derivatives M_p of X^p in direction F
    follow the product rule on the same chain of products (Al-Mohy-Higham 2009, (3.3)).
    """
    b = PADE[m]

    def comb(P, js, shift):  # sum_j b_j P[j - shift], skipping terms P lacks (M has no M_0)
        return sum(b[j] * P[j - shift] for j in js if j - shift in P)

    M = {}
    if F is not None:
        M[2] = X @ F + F @ X
        for p in range(4, m if m < 13 else 7, 2):  # M_p = X^{p-2} M_2 + M_{p-2} X^2
            M[p] = pw[p - 2] @ M[2] + M[p - 2] @ pw[2]
    if m == 13:  # Higham 2005: 6 matmuls in all (3 for A2, A4, A6; 3 here)
        A6 = pw[6]
        W1, Z1 = comb(pw, (13, 11, 9), 7), comb(pw, (12, 10, 8), 6)
        W = A6 @ W1 + comb(pw, (7, 5, 3, 1), 1)
        U, V = X @ W, A6 @ Z1 + comb(pw, (6, 4, 2, 0), 0)
        if F is None:
            return U, V, None, None
        Lw = A6 @ comb(M, (13, 11, 9), 7) + M[6] @ W1 + comb(M, (7, 5, 3, 1), 1)
        Lu = X @ Lw + F @ W
        Lv = A6 @ comb(M, (12, 10, 8), 6) + M[6] @ Z1 + comb(M, (6, 4, 2, 0), 0)
        return U, V, Lu, Lv
    odd, even = range(m, 0, -2), range(m - 1, -1, -2)
    W = comb(pw, odd, 1)
    U, V = X @ W, comb(pw, even, 0)
    if F is None:
        return U, V, None, None
    return U, V, X @ comb(M, odd, 1) + F @ W, comb(M, even, 0)


def _scaling_and_squaring(A: Tensor, E: Tensor | None, skew: bool):
    """exp(A) and, when E is given, L(A, E); see :func:`expm` and :func:`expm_frechet`."""
    shape, n = A.shape, A.shape[-1]
    if A.numel() == 0:
        empty = A.clone(memory_format=torch.contiguous_format)
        return empty, None if E is None else empty.clone()
    thresholds = (THETA if E is None else ELL)[A.dtype]
    A0, t = _prescale(A.reshape(-1, n, n))
    E = None if E is None else E.reshape(-1, n, n)
    powers = _powers(A0, skew, thresholds)
    m, s = _choose(A0, t, powers, skew, thresholds, E is None)
    log2_c = t - s  # X = 2^-s A = 2^(t - s) A0
    eye = torch.eye(n, dtype=A.dtype, device=A.device)
    R = torch.empty_like(A0)
    L = None if E is None else torch.empty_like(A0)
    for deg in sorted(thresholds):
        idx = (m == deg).nonzero()[:, 0]  # host sync
        if idx.numel() == 0:
            continue
        c = log2_c[idx]
        needed = range(2, deg if deg < 13 else 7, 2)  # m = 13 evaluates with A2, A4, A6
        pw = {p: _times_pow2(powers[p][idx], c, p) for p in needed if p in powers}
        if deg == 9 and 8 not in pw:  # the skew estimates did not need A^8
            pw[8] = pw[4] @ pw[4]
        X = _times_pow2(A0[idx], c, 1)
        F = None if E is None else E[idx] * torch.exp2(-s[idx].to(A.dtype))[:, None, None]
        U, V, Lu, Lv = _pade_terms(deg, X, {0: eye, **pw}, F)
        LU, pivots, _ = torch.linalg.lu_factor_ex(V - U)
        Rg = torch.linalg.lu_solve(LU, pivots, V + U)
        R = R.index_copy(0, idx, Rg)
        if E is not None:  # differentiate (V - U) R = V + U
            Lg = torch.linalg.lu_solve(LU, pivots, Lu + Lv + (Lu - Lv) @ Rg)
            L = L.index_copy(0, idx, Lg)
    for k in range(int(s.max())):  # host sync; matrices with s <= k are left as they are
        square = (s > k)[:, None, None]
        if L is not None:
            L = torch.where(square, R @ L + L @ R, L)
        R = torch.where(square, R @ R, R)
    return R.reshape(shape), None if L is None else L.reshape(shape)

"""VkD loss (semantics 4): normalisations, the reference loss, the functional API and VkDLoss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdfast import functional
from kdfast.losses.vkd import VkDLoss
from kdfast.reference.vkd_loss import (
    _zca_from_covariance,
    _zca_from_gram,
    batch_standardize,
    standardize,
    whiten,
)
from kdfast.reference.vkd_loss import vkd_loss as reference_vkd_loss
from kdfast.testing import assert_rel_close, rel_error, tolerance

F64 = torch.float64
EPS = 1e-5
L_EX = 0.8594295143437977
ZS_EX = [[1.0, 2.0], [0.0, -1.0]]
ZT_EX = [[1.0, 2.0, 3.0], [0.0, 0.0, 6.0]]
NORMALIZATIONS = ["standardize", "batch_standardize", "whiten", None]


def randn(*shape, seed: int = 0, dtype=F64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def separated(b: int, d: int, seed: int) -> torch.Tensor:
    """Random (b, d) features whose columns have distinct scales: clear eigenvalue gaps."""
    scales = 2.0 ** torch.arange(d, dtype=F64)
    return randn(b, d, seed=seed) * scales + 3.0


def numpy_zca(x: torch.Tensor, eps: float = EPS) -> np.ndarray:
    """ZCA from the (D, D) biased covariance's eigendecomposition, in numpy float64."""
    xc = x.double().numpy()
    xc = xc - xc.mean(axis=0)
    lam, v = np.linalg.eigh(xc.T @ xc / xc.shape[0])
    return xc @ v @ np.diag((np.maximum(lam, 0) + eps) ** -0.5) @ v.T


def smooth_l1_mean(a: np.ndarray, b: np.ndarray) -> float:
    x = np.abs(a - b)
    return float(np.where(x < 1, 0.5 * x * x, x - 0.5).mean())


# --- docs/semantics.md worked example -------------------------------------------------------------


def test_worked_example_reference():
    p = torch.eye(3, dtype=F64)[:, :2]  # first 2 columns of I_3
    projected = torch.tensor(ZS_EX, dtype=F64) @ p.T
    loss = reference_vkd_loss(projected, torch.tensor(ZT_EX, dtype=F64), "standardize")
    assert loss.dtype == F64
    assert_rel_close(loss, torch.tensor(L_EX, dtype=F64), 1e-12, "worked example")


def test_worked_example_through_the_module():
    module = VkDLoss(2, 3, dtype=F64)  # A = 0 at initialisation: P = [I; 0]
    assert torch.allclose(module.projector.weight, torch.eye(3, dtype=F64)[:, :2], atol=1e-15)
    loss = module(torch.tensor(ZS_EX, dtype=F64), torch.tensor(ZT_EX, dtype=F64))
    assert_rel_close(loss, torch.tensor(L_EX, dtype=F64), 1e-12, "VkDLoss worked example")


# --- normalisations against their definitions ----------------------------------------------


def test_standardize_definition():
    x = randn(5, 7, seed=1) * 3 + 2
    xn = x.numpy()
    expected = (xn - xn.mean(1, keepdims=True)) / np.sqrt(xn.var(1, keepdims=True) + EPS)
    assert_rel_close(standardize(x), torch.from_numpy(expected), 1e-13, "standardize")


def test_batch_standardize_definition():
    x = randn(6, 4, seed=2) * 5 - 1
    xn = x.numpy()
    expected = (xn - xn.mean(0)) / np.sqrt(xn.var(0, ddof=1) + EPS)  # unbiased, eps in root
    assert_rel_close(batch_standardize(x), torch.from_numpy(expected), 1e-13, "batch_std")


def test_batch_standardize_constant_channel_is_finite():
    p = randn(5, 3, seed=3).requires_grad_(True)
    t = randn(5, 3, seed=4)
    t[:, 1] = 2.5  # a constant teacher channel
    with torch.no_grad():
        p[:, 2] = -1.0  # and a constant student channel
    # the official (x - mean) / std gives 0 / 0 here
    assert torch.isnan((t - t.mean(0)) / t.std(0)).any()
    assert torch.all(batch_standardize(t)[:, 1] == 0)
    loss = functional.vkd_loss(p, t, "batch_standardize")
    (grad,) = torch.autograd.grad(loss, p)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


@pytest.mark.parametrize("b, d", [(12, 5), (5, 5), (6, 10), (2, 4)])
def test_whiten_matches_dxd_eigendecomposition(b, d):
    x = randn(b, d, seed=b * d) * 2 + 7
    z = whiten(x)
    assert z.dtype == F64
    assert_rel_close(z, torch.from_numpy(numpy_zca(x)), 1e-10, f"whiten B={b} D={d}")


@pytest.mark.parametrize("b, d", [(6, 10), (3, 8), (12, 5)])
def test_gram_path_equals_covariance_path(b, d):
    xc = randn(b, d, seed=b + d)
    xc = xc - xc.mean(0)
    assert_rel_close(_zca_from_gram(xc, EPS), _zca_from_covariance(xc, EPS), 1e-10, "paths")


def test_whiten_has_identity_covariance_up_to_eps():
    mixing = randn(6, 6, seed=5) + 3 * torch.eye(6, dtype=F64)
    x = randn(200, 6, seed=6) @ mixing + 4.0
    z = whiten(x)
    assert torch.allclose(z.mean(0), torch.zeros(6, dtype=F64), atol=1e-12)
    cov = z.T @ z / z.shape[0]
    xc = (x - x.mean(0)).numpy()
    lam, v = np.linalg.eigh(xc.T @ xc / xc.shape[0])
    exact = v @ np.diag(lam / (lam + EPS)) @ v.T  # the eps effect, exactly
    assert_rel_close(cov, torch.from_numpy(exact), 1e-10, "cov(Z)")
    assert (cov - torch.eye(6, dtype=F64)).abs().max() <= 2 * EPS / lam.min()


def test_whiten_rank_deficient_batch():
    # B < D: cov(Z) is the projection onto the centred row space (scaled by lambda/(lambda+eps))
    x = randn(4, 9, seed=7)
    z = whiten(x)
    eig = torch.linalg.eigvalsh(z.T @ z / 4)
    assert torch.allclose(eig[:-3], torch.zeros(6, dtype=F64), atol=1e-12)
    assert torch.allclose(eig[-3:], torch.ones(3, dtype=F64), atol=1e-3)


def test_whiten_float32_is_computed_in_float64():
    x = separated(16, 6, seed=8).float() * 1e-2  # condition number 1e3 on the variances
    z = whiten(x)
    assert z.dtype == torch.float32
    assert_rel_close(z, whiten(x.double()), 1e-6, "float32 whiten vs float64")


# --- the loss ------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", NORMALIZATIONS)
def test_loss_matches_numpy(normalize):
    p, t = randn(6, 5, seed=9), randn(6, 5, seed=10) * 2 + 1
    pn, tn = p.numpy(), t.numpy()
    if normalize == "standardize":
        tn = (tn - tn.mean(1, keepdims=True)) / np.sqrt(tn.var(1, keepdims=True) + EPS)
    elif normalize == "batch_standardize":
        pn = (pn - pn.mean(0)) / np.sqrt(pn.var(0, ddof=1) + EPS)
        tn = (tn - tn.mean(0)) / np.sqrt(tn.var(0, ddof=1) + EPS)
    elif normalize == "whiten":
        tn = numpy_zca(t)
    loss = reference_vkd_loss(p, t, normalize)
    assert loss.item() == pytest.approx(smooth_l1_mean(pn, tn), rel=1e-12)


@pytest.mark.parametrize("normalize", NORMALIZATIONS)
@pytest.mark.parametrize("b, d", [(7, 4), (4, 6)])
def test_gradcheck_student_and_teacher(normalize, b, d):
    p = randn(b, d, seed=11).requires_grad_(True)
    t = separated(b, d, seed=12).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, c: reference_vkd_loss(a, c, normalize), (p, t))


@pytest.mark.parametrize(
    "dp, dt, expected",
    [
        (torch.float16, torch.float32, torch.float32),
        (torch.bfloat16, torch.float16, torch.float32),
        (torch.float32, F64, F64),
    ],
)
@pytest.mark.parametrize("normalize", NORMALIZATIONS)
def test_mixed_dtypes(dp, dt, expected, normalize):
    p, t = randn(8, 4, seed=13).to(dp), randn(8, 4, seed=14).to(dt)
    loss = functional.vkd_loss(p, t, normalize)
    assert loss.dtype == expected
    truth = reference_vkd_loss(p.double(), t.double(), normalize)
    assert rel_error(loss, truth) <= tolerance(torch.float32)


def test_non_contiguous_inputs():
    p, t = randn(5, 6, seed=15).T, randn(5, 6, seed=16).T
    expected = reference_vkd_loss(p.contiguous(), t.contiguous(), "whiten")
    assert_rel_close(functional.vkd_loss(p, t, "whiten"), expected, 1e-13, "non-contiguous")


def test_functional_errors():
    with pytest.raises(ValueError, match=r"equal shapes.*\(4, 3\).*\(4, 5\)"):
        functional.vkd_loss(randn(4, 3), randn(4, 5))
    with pytest.raises(ValueError, match="normalize"):
        functional.vkd_loss(randn(4, 3), randn(4, 3), "layernorm")
    with pytest.raises(ValueError, match="at least 2"):
        functional.vkd_loss(randn(1, 3), randn(1, 3), "batch_standardize")
    with pytest.raises(ValueError, match="at least 2"):
        functional.vkd_loss(randn(1, 3), randn(1, 3), "whiten")


# --- VkDLoss -------------------------------------------------------------------------------


def test_module_parameters_are_the_projectors_and_receive_gradients():
    module = VkDLoss(3, 5, normalize="standardize")
    params = list(module.parameters())
    assert params and {id(q) for q in params} == {id(q) for q in module.projector.parameters()}
    s = randn(8, 3, seed=17, dtype=torch.float32).requires_grad_(True)
    t = randn(8, 5, seed=18, dtype=torch.float32)
    loss = module(s, t)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert any(q.grad is not None and q.grad.abs().sum() > 0 for q in params)


def test_module_training_lowers_the_loss():
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(randn(6, 3, seed=19))  # the teacher is a rotated student
    s = randn(32, 3, seed=20)
    t = 1.5 * s @ q.T
    module = VkDLoss(3, 6, normalize="batch_standardize", dtype=F64)
    opt = torch.optim.Adam(module.parameters(), lr=0.05)
    first = module(s, t).item()
    for _ in range(60):
        opt.zero_grad()
        loss = module(s, t)
        loss.backward()
        opt.step()
    assert module(s, t).item() < 0.5 * first


def test_module_validates_widths():
    module = VkDLoss(3, 5)
    with pytest.raises(ValueError, match=r"student_features.*\(B, 3\).*\(4, 4\)"):
        module(torch.randn(4, 4), torch.randn(4, 5))
    with pytest.raises(ValueError, match=r"teacher_features.*\(B, 5\).*\(4, 6\)"):
        module(torch.randn(4, 3), torch.randn(4, 6))
    with pytest.raises(ValueError, match="same batch size"):
        module(torch.randn(4, 3), torch.randn(5, 5))
    with pytest.raises(ValueError, match=r"student_features.*\(2, 4, 3\)"):
        module(torch.randn(2, 4, 3), torch.randn(2, 5))
    with pytest.raises(TypeError, match="teacher_features"):
        module(torch.randn(4, 3), torch.ones(4, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="normalize"):
        VkDLoss(3, 5, normalize="zca")


def test_vkd_module_half_features_compute_in_float32():
    torch.manual_seed(0)
    loss_fn = VkDLoss(4, 8)
    s, t = torch.randn(5, 4), torch.randn(5, 8)
    half = loss_fn(s.half(), t.half())
    full = loss_fn(s.half().float(), t.half().float())
    assert half.dtype == torch.float32
    assert torch.equal(half, full)


@pytest.mark.parametrize("normalize", ["standardize", "batch_standardize"])
def test_float32_features_near_1e30(normalize):
    """float32 teacher (and student) features around 1e30 overflowed the variance (1e60)
    into NaN; the normalisations now divide such rows / channels by an exact power of two.
    The float32 loss and its gradient match the float64 computation (where 1e60 fits)."""
    gen = torch.Generator().manual_seed(3)
    p64 = torch.randn(8, 16, generator=gen, dtype=torch.float64)
    t64 = 1e30 * torch.randn(8, 16, generator=gen, dtype=torch.float64)
    if normalize == "batch_standardize":
        p64 = 1e30 * p64
    results = []
    for dtype in (torch.float64, torch.float32):
        p = p64.to(dtype).clone().requires_grad_(True)
        loss = functional.vkd_loss(p, t64.to(dtype), normalize=normalize)
        loss.backward()
        results.append((loss.detach().double(), p.grad.double()))
    (l64, g64), (l32, g32) = results
    assert torch.isfinite(l32) and torch.isfinite(g32).all()
    assert rel_error(l32, l64) <= 1e-5 and rel_error(g32, g64) <= 1e-5

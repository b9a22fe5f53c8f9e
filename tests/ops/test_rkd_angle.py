"""RKD angle loss (semantics 1.3): reference backend, functional API and module."""

from __future__ import annotations

import pytest
import torch
from worked_examples import (
    F64,
    L_A_EX,
    S_DUP,
    S_EX,
    T_EX,
    clustered,
    loss_and_grad,
    official_rkd_angle,
    randn,
    tensor,
)

from kdfast import functional
from kdfast.losses.rkd import RKDAngleLoss
from kdfast.reference.rkd_angle import angles
from kdfast.reference.rkd_angle import rkd_angle as reference_rkd_angle
from kdfast.testing import assert_rel_close, rel_error, tolerance

L_A_DUP = 0.0592


# --- docs/semantics.md worked examples ------------------------------------------------------------


def test_worked_example_triangle():
    loss = reference_rkd_angle(tensor(S_EX), tensor(T_EX))
    assert loss.dtype == F64
    assert_rel_close(loss, torch.tensor(L_A_EX, dtype=F64), 1e-12, "L_A")


def test_worked_example_duplicate_rows():
    loss = reference_rkd_angle(tensor(S_DUP), tensor(T_EX))
    assert_rel_close(loss, torch.tensor(L_A_DUP, dtype=F64), 1e-12, "L_A duplicates")


def test_worked_example_invariance():
    s, t = tensor(S_EX), tensor(T_EX)
    moved = reference_rkd_angle(2 * s + 1, t - 4)
    assert_rel_close(moved, torch.tensor(L_A_EX, dtype=F64), 1e-12, "L_A(2s + 1, t - 4)")


def test_degenerate_entries():
    a = angles(randn(5, 3, seed=1))
    idx = torch.arange(5)
    assert torch.all(a[idx, idx, :] == 0) and torch.all(a[idx, :, idx] == 0)
    j_eq_k = torch.diagonal(a, dim1=1, dim2=2)  # (i, j) -> A_ijj
    off = ~torch.eye(5, dtype=torch.bool)
    assert torch.allclose(j_eq_k[off], torch.ones(20, dtype=F64), atol=1e-15)


# --- invariants and the official code ------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_translation_and_scale_invariance(seed):
    s, t = randn(7, 5, seed=seed), randn(7, 3, seed=seed + 10)
    base = reference_rkd_angle(s, t)
    moved = reference_rkd_angle(0.3 * s - 2 * randn(5, seed=seed + 20), 40 * t + randn(3))
    assert_rel_close(moved, base, 1e-12, "translated and scaled")
    assert rel_error(reference_rkd_angle(s, t.flip(0)), base) > 1e-3


@pytest.mark.parametrize("n, ds, dt", [(6, 5, 3), (12, 4, 9)])
def test_matches_official_code_float64(n, ds, dt):
    s, t = randn(n, ds, seed=n), randn(n, dt, seed=n + 1)
    loss, grad = loss_and_grad(reference_rkd_angle, s, t)
    official_loss, official_grad = loss_and_grad(official_rkd_angle, s, t)
    assert_rel_close(loss, official_loss, 1e-12, "loss vs official")
    assert_rel_close(grad, official_grad, 1e-12, "student grad vs official")


def test_float32_is_computed_in_float32():
    # The angle reference is the benchmark baseline: float32 in, float32 arithmetic.
    s, t = randn(8, 6, seed=2, dtype=torch.float32), randn(8, 4, seed=3, dtype=torch.float32)
    loss = reference_rkd_angle(s, t)
    assert loss.dtype == torch.float32
    assert_rel_close(loss, official_rkd_angle(s, t), 1e-6, "float32 vs official float32")


# --- float32 / half accuracy against the float64 truth (semantics 1.5, 7) -----------------------


def check_against_truth(s: torch.Tensor, t: torch.Tensor, tol: float):
    loss, grad = loss_and_grad(reference_rkd_angle, s, t)
    truth_loss, truth_grad = loss_and_grad(reference_rkd_angle, s.double(), t.double())
    assert loss.dtype == torch.float32 and grad.dtype == s.dtype
    assert_rel_close(loss, truth_loss, tol, "loss vs float64 truth")
    rounding = rel_error(truth_grad.to(s.dtype), truth_grad)  # a half input gets a half grad
    assert_rel_close(grad, truth_grad, max(tol, 2 * rounding), "grad vs float64 truth")


def test_float32_clustered_is_accurate():
    s, t = clustered(30, 16, seed=5), clustered(30, 8, seed=7)
    check_against_truth(s, t, tolerance(torch.float32, "grad"))


def test_float32_common_offset_is_accurate():
    s = randn(20, 8, seed=8, dtype=torch.float32) + 100
    t = randn(20, 4, seed=9, dtype=torch.float32) + 100
    check_against_truth(s, t, tolerance(torch.float32, "grad"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype):
    s, t = randn(10, 6, seed=10).to(dtype), randn(10, 4, seed=11).to(dtype)
    check_against_truth(s, t, tolerance(dtype, "loss"))


# --- degenerate inputs ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_duplicate_rows_give_finite_gradients(dtype):
    s = randn(5, 4, seed=12, dtype=dtype)
    s = torch.cat([s, s[:2]]).requires_grad_(True)
    t = randn(7, 3, seed=13, dtype=dtype).requires_grad_(True)
    loss = functional.rkd_angle(s, t)
    gs, gt = torch.autograd.grad(loss, (s, t))
    assert torch.isfinite(loss)
    assert torch.isfinite(gs).all() and torch.isfinite(gt).all()


def test_duplicate_rows_gradient_matches_official():
    s, t = tensor(S_DUP), tensor(T_EX)
    _, grad = loss_and_grad(reference_rkd_angle, s, t)
    _, official = loss_and_grad(official_rkd_angle, s, t)
    assert torch.isfinite(grad).all()
    assert_rel_close(grad, official, 1e-12, "duplicate-row gradient vs official")


def test_nan_propagates():
    s = randn(4, 3, seed=14)
    s[0, 0] = float("nan")
    assert torch.isnan(functional.rkd_angle(s, randn(4, 3, seed=15)))


# --- gradients -----------------------------------------------------------------------------


@pytest.mark.parametrize("n, ds, dt", [(5, 3, 4), (6, 4, 3)])
def test_gradcheck_student_and_teacher(n, ds, dt):
    s = randn(n, ds, seed=20 + n).requires_grad_(True)
    t = randn(n, dt, seed=30 + n).requires_grad_(True)
    assert torch.autograd.gradcheck(reference_rkd_angle, (s, t))


# --- functional API: shapes, dtypes, errors ------------------------------------------------


def test_nchw_features_are_flattened():
    s, t = randn(5, 2, 2, 2, seed=50), randn(5, 3, 2, seed=51)
    expected = reference_rkd_angle(s.reshape(5, -1), t.reshape(5, -1))
    assert_rel_close(functional.rkd_angle(s, t), expected, 1e-14, "flattened")


def test_non_contiguous_inputs():
    s, t = randn(4, 6, seed=52).T, randn(3, 6, seed=53).T
    assert not s.is_contiguous()
    expected = reference_rkd_angle(s.contiguous(), t.contiguous())
    assert_rel_close(functional.rkd_angle(s, t), expected, 1e-14, "non-contiguous")


@pytest.mark.parametrize(
    "ds, dt, expected",
    [
        (torch.float16, torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16, torch.float32),
        (F64, torch.float16, F64),
    ],
)
def test_mixed_dtypes(ds, dt, expected):
    s, t = randn(6, 4, seed=54).to(ds), randn(6, 3, seed=55).to(dt)
    loss = functional.rkd_angle(s, t)
    assert loss.dtype == expected
    assert_rel_close(loss, reference_rkd_angle(s.double(), t.double()), 1e-5, "mixed dtypes")


@pytest.mark.parametrize("n", [1, 2])
def test_too_few_samples_raise(n):
    with pytest.raises(ValueError, match=rf"at least 3 samples.*\({n}, 3\)"):
        functional.rkd_angle(randn(n, 3), randn(n, 2))


def test_angle_module():
    loss = RKDAngleLoss()(tensor(S_EX), tensor(T_EX))
    assert_rel_close(loss, torch.tensor(L_A_EX, dtype=F64), 1e-12, "RKDAngleLoss")

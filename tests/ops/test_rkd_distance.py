"""RKD distance loss (semantics 1.1, 1.2, 1.4): reference backend, functional API and modules."""

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
    official_pdist,
    official_rkd_distance,
    randn,
    tensor,
)

from kdfast import functional
from kdfast.losses.rkd import RKDDistanceLoss, RKDLoss
from kdfast.reference.rkd_distance import pdist
from kdfast.reference.rkd_distance import rkd_distance as reference_rkd_distance
from kdfast.testing import assert_rel_close, rel_error, tolerance

L_D_EX = 0.0279368329695255
L_D_DUP = 0.148437168544001


# --- docs/semantics.md worked examples ------------------------------------------------------------


def test_pdist_worked_example():
    expected = tensor([[0, 5, 6], [5, 0, 5], [6, 5, 0]])
    assert_rel_close(pdist(tensor(T_EX)), expected, 1e-15, "D(t)")


def test_worked_example_triangle():
    loss = reference_rkd_distance(tensor(S_EX), tensor(T_EX))
    assert loss.dtype == F64
    assert_rel_close(loss, torch.tensor(L_D_EX, dtype=F64), 1e-12, "L_D")


def test_worked_example_duplicate_rows():
    d = pdist(tensor(S_DUP))
    assert d[0, 1].item() == pytest.approx(1e-6, rel=1e-12)
    assert d[1, 0].item() == pytest.approx(1e-6, rel=1e-12)
    assert torch.all(torch.diagonal(d) == 0)
    loss = reference_rkd_distance(tensor(S_DUP), tensor(T_EX))
    assert_rel_close(loss, torch.tensor(L_D_DUP, dtype=F64), 1e-12, "L_D duplicates")


def test_worked_example_invariance():
    s, t = tensor(S_EX), tensor(T_EX)
    scaled = reference_rkd_distance(3 * s, 0.5 * t)
    assert_rel_close(scaled, torch.tensor(L_D_EX, dtype=F64), 1e-12, "L_D(3s, 0.5t)")


# --- invariants and the official code ------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_translation_and_scale_invariance(seed):
    s, t = randn(9, 5, seed=seed), randn(9, 3, seed=seed + 10)
    base = reference_rkd_distance(s, t)
    moved = reference_rkd_distance(
        2.5 * s + randn(5, seed=seed + 20), 0.1 * t - 7 * randn(3, seed=seed + 30)
    )
    assert_rel_close(moved, base, 1e-12, "translated and scaled")
    # a different configuration does change the loss (the test can fail)
    assert rel_error(reference_rkd_distance(s, t.flip(0)), base) > 1e-3


@pytest.mark.parametrize("n, ds, dt", [(7, 5, 3), (16, 4, 12)])
def test_matches_official_code_float64(n, ds, dt):
    s, t = randn(n, ds, seed=n), randn(n, dt, seed=n + 1)
    loss, grad = loss_and_grad(reference_rkd_distance, s, t)
    official_loss, official_grad = loss_and_grad(official_rkd_distance, s, t)
    assert_rel_close(loss, official_loss, 1e-12, "loss vs official")
    assert_rel_close(grad, official_grad, 1e-10, "student grad vs official")
    official_d = official_pdist(s)
    assert_rel_close(pdist(s), official_d, 1e-12, "pdist vs official")


# --- float32 / half accuracy against the float64 truth (semantics 1.1, 1.5, 7) -------------------


def check_against_truth(s: torch.Tensor, t: torch.Tensor, tol: float):
    loss, grad = loss_and_grad(reference_rkd_distance, s, t)
    truth_loss, truth_grad = loss_and_grad(reference_rkd_distance, s.double(), t.double())
    assert loss.dtype == torch.float32
    assert grad.dtype == s.dtype
    assert_rel_close(loss, truth_loss, tol, "loss vs float64 truth")
    # A half input receives a half gradient: nothing beats rounding the truth to its dtype.
    rounding = rel_error(truth_grad.to(s.dtype), truth_grad)
    assert_rel_close(grad, truth_grad, max(tol, 2 * rounding), "grad vs float64 truth")


def test_float32_common_offset_is_accurate():
    s, t = randn(32, 16, seed=3, dtype=torch.float32), randn(32, 8, seed=4, dtype=torch.float32)
    s, t = s + 100, t + 100
    check_against_truth(s, t, tolerance(torch.float32, "loss"))
    # The uncentred float32 formula of the official code fails here: the case is hard.
    official = official_rkd_distance(s, t)
    truth = reference_rkd_distance(s.double(), t.double())
    assert rel_error(official, truth) > 10 * tolerance(torch.float32, "loss")


def test_float32_clustered_is_accurate():
    s, t = clustered(40, 16, seed=5), clustered(40, 8, seed=7)
    check_against_truth(s, t, tolerance(torch.float32, "grad"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_match_truth_on_rounded_inputs(dtype):
    s, t = (randn(12, 6, seed=8) + 30).to(dtype), randn(12, 4, seed=9).to(dtype)
    check_against_truth(s, t, tolerance(dtype, "loss"))


# --- degenerate inputs ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_duplicate_rows_give_finite_gradients(dtype):
    s = randn(6, 4, seed=11, dtype=dtype)
    s = torch.cat([s, s[:2]]).requires_grad_(True)
    t = randn(8, 3, seed=12, dtype=dtype).requires_grad_(True)
    loss = functional.rkd_distance(s, t)
    gs, gt = torch.autograd.grad(loss, (s, t))
    assert torch.isfinite(loss)
    assert torch.isfinite(gs).all() and torch.isfinite(gt).all()


def test_nan_propagates():
    s = randn(5, 3, seed=13)
    s[2, 1] = float("nan")
    assert torch.isnan(functional.rkd_distance(s, randn(5, 3, seed=14)))


# --- gradients -----------------------------------------------------------------------------


@pytest.mark.parametrize("n, ds, dt", [(5, 3, 4), (6, 4, 3)])
def test_gradcheck_student_and_teacher(n, ds, dt):
    s = randn(n, ds, seed=20 + n).requires_grad_(True)
    t = randn(n, dt, seed=30 + n).requires_grad_(True)
    assert torch.autograd.gradcheck(reference_rkd_distance, (s, t))


def test_teacher_gradient_flows_only_when_required():
    s = randn(6, 3, seed=40).requires_grad_(True)
    t = randn(6, 3, seed=41)
    loss = functional.rkd_distance(s, t)
    assert loss.requires_grad and not t.requires_grad
    t.requires_grad_(True)
    (gt,) = torch.autograd.grad(functional.rkd_distance(s, t), t)
    assert gt.abs().sum() > 0


# --- functional API: shapes, dtypes, errors ------------------------------------------------


def test_nchw_features_are_flattened():
    s, t = randn(6, 2, 3, 3, seed=50), randn(6, 5, 2, seed=51)
    expected = reference_rkd_distance(s.reshape(6, -1), t.reshape(6, -1))
    assert_rel_close(functional.rkd_distance(s, t), expected, 1e-14, "flattened")


def test_non_contiguous_inputs():
    s, t = randn(5, 7, seed=52).T, randn(3, 7, seed=53).T  # (7, 5), (7, 3) transposed views
    assert not s.is_contiguous()
    expected = reference_rkd_distance(s.contiguous(), t.contiguous())
    assert_rel_close(functional.rkd_distance(s, t), expected, 1e-14, "non-contiguous")


@pytest.mark.parametrize(
    "ds, dt, expected",
    [
        (torch.float16, torch.float32, torch.float32),
        (torch.bfloat16, torch.float16, torch.float32),
        (torch.float32, F64, F64),
    ],
)
def test_mixed_dtypes(ds, dt, expected):
    s, t = randn(6, 4, seed=54).to(ds), randn(6, 3, seed=55).to(dt)
    loss = functional.rkd_distance(s, t)
    assert loss.dtype == expected
    truth = reference_rkd_distance(s.double(), t.double())
    assert_rel_close(loss, truth, 1e-5, "mixed dtypes")


def test_too_few_samples_raise():
    with pytest.raises(ValueError, match=r"at least 2 samples.*\(1, 3\)"):
        functional.rkd_distance(randn(1, 3), randn(1, 3))
    with pytest.raises(ValueError, match="same batch size"):
        functional.rkd_distance(randn(4, 3), randn(5, 3))
    with pytest.raises(TypeError, match="student"):
        functional.rkd_distance(torch.ones(4, 3, dtype=torch.int64), randn(4, 3))


# --- modules -------------------------------------------------------------------------------


def test_distance_module():
    loss = RKDDistanceLoss()(tensor(S_EX), tensor(T_EX))
    assert_rel_close(loss, torch.tensor(L_D_EX, dtype=F64), 1e-12, "RKDDistanceLoss")


def test_rkd_loss_combines_weights():
    loss = RKDLoss()(tensor(S_EX), tensor(T_EX))
    expected = torch.tensor(L_D_EX + 2.0 * L_A_EX, dtype=F64)
    assert_rel_close(loss, expected, 1e-12, "RKDLoss(1, 2)")
    loss = RKDLoss(distance_weight=25.0, angle_weight=50.0)(tensor(S_EX), tensor(T_EX))
    assert_rel_close(loss, 25.0 * expected, 1e-12, "RKDLoss(25, 50)")
    only_angle = RKDLoss(distance_weight=0.0, angle_weight=1.0)(tensor(S_EX), tensor(T_EX))
    assert_rel_close(only_angle, torch.tensor(L_A_EX, dtype=F64), 1e-12, "angle only")


def test_rkd_loss_two_samples_without_angle_term():
    s, t = randn(2, 3, seed=60).requires_grad_(True), randn(2, 5, seed=61)
    loss = RKDLoss(distance_weight=1.5, angle_weight=0.0)(s, t)
    assert_rel_close(loss, 1.5 * reference_rkd_distance(s, t), 1e-14, "N = 2")
    loss.backward()
    assert torch.isfinite(s.grad).all()
    with pytest.raises(ValueError, match="at least 3 samples"):
        RKDLoss()(s, t)


def test_rkd_loss_rejects_bad_weights():
    with pytest.raises(ValueError, match="both 0"):
        RKDLoss(0.0, 0.0)
    with pytest.raises(ValueError, match="angle_weight"):
        RKDLoss(1.0, -1.0)
    with pytest.raises(TypeError, match="distance_weight"):
        RKDLoss("1", 2.0)

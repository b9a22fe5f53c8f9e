"""Hinton KD (semantics 3): kd_loss, per_sample_kl and KDLoss on the reference backend."""

from __future__ import annotations

import pytest
import scipy.special
import torch
import torch.nn.functional as F
from worked_examples import F64, ZS, ZT, rand, reference_backend, teacher_as  # noqa: F401

from kdfast import functional as KF
from kdfast.losses.kd import KDLoss
from kdfast.testing import rel_error as rel

pytestmark = pytest.mark.usefixtures("reference_backend")

REDUCTIONS = ("batchmean", "sum", "mean", "none")


# --- docs/semantics.md worked examples ------------------------------------------------------------


@pytest.mark.parametrize(
    ("temperature", "expected"), [(1.0, 0.2524326820596044), (3.0, 0.27645711921979926)]
)
def test_spec_example_mean(temperature, expected):
    # semantics 3's DeiT soft numbers are T^2 * sum KL / (B * C), i.e. kd_loss "mean".
    zs, zt = torch.tensor(ZS, dtype=F64), torch.tensor(ZT, dtype=F64)
    loss = KF.kd_loss(zs, zt, temperature, reduction="mean")
    assert loss.dtype == F64 and loss.shape == ()
    assert abs(loss.item() - expected) <= 1e-12 * expected
    batchmean = KF.kd_loss(zs, zt, temperature)  # batchmean = C * mean
    assert abs(batchmean.item() - 3 * expected) <= 1e-12 * 3 * expected


# --- invariants and relations ---------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_identical_inputs_give_zero(reduction, temperature):
    z = rand(5, 7)
    loss = KF.kd_loss(z, z.clone(), temperature, reduction=reduction)
    assert torch.all(loss == 0)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_matches_scipy_rel_entr(temperature):
    s, t = rand(6, 5, seed=1), rand(6, 5, seed=2)
    p_s = torch.softmax(s / temperature, dim=1).numpy()
    p_t = torch.softmax(t / temperature, dim=1).numpy()
    per_row = torch.from_numpy(scipy.special.rel_entr(p_t, p_s).sum(axis=1))
    got = KF.per_sample_kl(s, t, temperature)
    assert got.shape == (6,) and rel(got, per_row) <= 1e-12
    torch_batchmean = temperature**2 * F.kl_div(
        F.log_softmax(s / temperature, 1),
        F.log_softmax(t / temperature, 1),
        reduction="batchmean",
        log_target=True,
    )
    assert rel(KF.kd_loss(s, t, temperature), torch_batchmean) <= 1e-12


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_reductions_relate(temperature):
    s, t = rand(8, 5, seed=3), rand(8, 5, seed=4)
    none = KF.kd_loss(s, t, temperature, reduction="none")
    assert none.shape == (8,)
    assert rel(none, temperature**2 * KF.per_sample_kl(s, t, temperature)) <= 1e-15
    total = KF.kd_loss(s, t, temperature, reduction="sum")
    assert rel(total, none.sum()) <= 1e-14
    assert rel(KF.kd_loss(s, t, temperature, reduction="batchmean"), total / 8) <= 1e-14
    assert rel(KF.kd_loss(s, t, temperature, reduction="mean"), total / 40) <= 1e-14


@pytest.mark.parametrize("kind", ["probs", "log_probs"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_teacher_kinds_equal_logits(kind, reduction, temperature):
    s, t = rand(6, 5, seed=5), rand(6, 5, seed=6)
    want = KF.kd_loss(s, t, temperature, reduction=reduction)
    cached = teacher_as(t, kind, temperature)
    got = KF.kd_loss(s, cached, temperature, reduction=reduction, teacher=kind)
    assert rel(got, want) <= 1e-12


def test_probs_with_zeros_use_zero_log_zero():
    s = rand(3, 4, seed=7)
    p_t = torch.tensor(
        [[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4]], dtype=F64
    )
    p_s = torch.softmax(s, dim=1)
    want = torch.from_numpy(scipy.special.rel_entr(p_t.numpy(), p_s.numpy()).sum(axis=1))
    got = KF.kd_loss(s, p_t, reduction="none", teacher="probs")
    assert torch.isfinite(got).all() and rel(got, want) <= 1e-12


def test_inf_in_teacher_logits_propagates():
    s, t = rand(2, 3), rand(2, 3, seed=1)
    t[0, 1] = -float("inf")
    assert torch.isnan(KF.kd_loss(s, t, reduction="none")[0])  # semantics 0: never silently masked


def test_nchw_equals_permuted_rows():
    s, t = rand(2, 5, 3, 4, seed=8), rand(2, 5, 3, 4, seed=9)
    s2, t2 = (x.permute(0, 2, 3, 1).reshape(-1, 5) for x in (s, t))
    for reduction in REDUCTIONS:
        assert rel(KF.kd_loss(s, t, 2.0, reduction), KF.kd_loss(s2, t2, 2.0, reduction)) <= 1e-14
    assert rel(KF.per_sample_kl(s, t), KF.per_sample_kl(s2, t2)) <= 1e-14


def test_non_contiguous_inputs():
    s, t = rand(5, 6, seed=10), rand(5, 6, seed=11)
    s_nc, t_nc = s.t().contiguous().t(), t.t().contiguous().t()
    assert not s_nc.is_contiguous()
    assert rel(KF.kd_loss(s_nc, t_nc), KF.kd_loss(s, t)) <= 1e-15
    expanded = t[:1].expand(5, 6)  # stride 0 along rows
    assert rel(KF.kd_loss(s, expanded), KF.kd_loss(s, expanded.contiguous())) <= 1e-15


# --- masks ----------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["logits", "probs"])
def test_mask_equals_dropping_rows(reduction, kind):
    s, t = rand(7, 4, seed=12), teacher_as(rand(7, 4, seed=13), kind, 2.0)
    mask = torch.tensor([True, False, True, True, False, False, True])
    got = KF.kd_loss(s, t, 2.0, reduction, mask=mask, teacher=kind)
    kept = KF.kd_loss(s[mask], t[mask], 2.0, reduction, teacher=kind)
    if reduction == "none":
        assert torch.all(got[~mask] == 0)
        got = got[mask]
    assert rel(got, kept) <= 1e-14


def test_mask_blocks_nan_padding_rows():
    s, t = rand(4, 3, seed=14), rand(4, 3, seed=15)
    s[1] = float("nan")
    t[3, 0] = float("inf")
    mask = torch.tensor([True, False, True, False])
    for reduction in REDUCTIONS:
        got = KF.kd_loss(s, t, reduction=reduction, mask=mask)
        assert torch.isfinite(got).all(), reduction


def test_all_false_mask():
    s, t = rand(3, 4), rand(3, 4, seed=1)
    mask = torch.zeros(3, dtype=torch.bool)
    assert KF.kd_loss(s, t, reduction="sum", mask=mask).item() == 0
    assert torch.all(KF.kd_loss(s, t, reduction="none", mask=mask) == 0)
    assert torch.isnan(KF.kd_loss(s, t, reduction="batchmean", mask=mask))
    assert torch.isnan(KF.kd_loss(s, t, reduction="mean", mask=mask))


# --- dtypes ---------------------------------------------------------------------------


def test_mixed_half_student_float_teacher_returns_float32():
    s, t = rand(6, 5, dtype=torch.float16, seed=16), rand(6, 5, dtype=torch.float32, seed=17)
    for reduction in REDUCTIONS:
        loss = KF.kd_loss(s, t, 2.0, reduction)
        assert loss.dtype == torch.float32
        truth = KF.kd_loss(s.double(), t.double(), 2.0, reduction)
        assert rel(loss.double(), truth) <= 1e-5
    assert KF.per_sample_kl(s, t).dtype == torch.float32
    bf = KF.kd_loss(s.bfloat16(), t.bfloat16())
    assert bf.dtype == torch.float32


def test_float64_stays_float64():
    s, t = rand(3, 4), rand(3, 4, seed=1)
    assert KF.kd_loss(s, t).dtype == F64
    assert KF.kd_loss(s.float(), t).dtype == F64
    assert KF.per_sample_kl(s, t).dtype == F64


# --- gradients ------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["logits", "probs", "log_probs"])
@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck_kd_loss(reduction, kind, masked):
    s = rand(4, 3, seed=18).requires_grad_()
    t = teacher_as(rand(4, 3, seed=19), kind, 1.5).detach().requires_grad_()
    mask = torch.tensor([True, False, True, True]) if masked else None

    def f(s, t):
        return KF.kd_loss(s, t, 1.5, reduction, mask=mask, teacher=kind)

    assert torch.autograd.gradcheck(f, (s, t))


def test_gradcheck_per_sample_kl():
    s, t = rand(4, 5, seed=20).requires_grad_(), rand(4, 5, seed=21).requires_grad_()
    assert torch.autograd.gradcheck(lambda s, t: KF.per_sample_kl(s, t, 2.0), (s, t))


def test_masked_rows_get_zero_gradient():
    s, t = rand(4, 3, seed=22).requires_grad_(), rand(4, 3, seed=23).requires_grad_()
    mask = torch.tensor([True, False, True, False])
    KF.kd_loss(s, t, mask=mask).backward()
    assert torch.all(s.grad[~mask] == 0) and torch.all(t.grad[~mask] == 0)
    assert torch.all(s.grad[mask].abs().sum(1) > 0)


def test_traces_with_fullgraph():
    s, t = rand(4, 3, seed=24), rand(4, 3, seed=25)
    mask = torch.tensor([True, False, True, True])
    torch._dynamo.reset()
    for reduction in REDUCTIONS:
        fn = torch.compile(KF.kd_loss, fullgraph=True, backend="eager")
        got = fn(s, t, 2.0, reduction, mask)
        assert rel(got, KF.kd_loss(s, t, 2.0, reduction, mask)) <= 1e-15


# --- module ---------------------------------------------------------------------------


def test_kdloss_module_matches_functional():
    s, t = rand(4, 6, 2, seed=26), rand(4, 6, 2, seed=27)
    mask = torch.tensor([True, True, False, True, True, False, True, True])
    module = KDLoss(temperature=3.0, reduction="sum")
    assert rel(module(s, t, mask), KF.kd_loss(s, t, 3.0, "sum", mask)) <= 1e-15
    assert rel(KDLoss()(s, t), KF.kd_loss(s, t)) <= 1e-15
    probs = KDLoss(2.0, teacher="probs")(s, torch.softmax(t / 2.0, dim=1))
    assert rel(probs, KF.kd_loss(s, t, 2.0)) <= 1e-12
    assert "temperature=3.0" in repr(module)


# --- bad inputs -----------------------------------------------------------------------


def test_bad_tensors_raise():
    s = rand(3, 4)
    with pytest.raises(ValueError, match=r"student_logits.*at least 2 dims.*\(4,\)"):
        KF.kd_loss(s[0], s[0])
    with pytest.raises(ValueError, match=r"same shape.*\(3, 4\).*\(3, 5\)"):
        KF.kd_loss(s, rand(3, 5))
    with pytest.raises(TypeError, match="teacher_logits.*torch.int64"):
        KF.kd_loss(s, torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="student_logits.*complex"):
        KF.per_sample_kl(s.to(torch.complex128), s)
    with pytest.raises(TypeError, match="teacher_logits must be a torch.Tensor"):
        KF.kd_loss(s, s.tolist())
    with pytest.raises(ValueError, match=r"non-empty.*\(0, 4\)"):
        KF.kd_loss(s[:0], s[:0])


def test_bad_options_raise():
    s = rand(3, 4)
    for bad in (0, -1.0, "2", True, float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            KF.kd_loss(s, s, temperature=bad)
        with pytest.raises(ValueError, match="temperature"):
            KF.per_sample_kl(s, s, temperature=bad)
        with pytest.raises(ValueError, match="temperature"):
            KDLoss(temperature=bad)
    with pytest.raises(ValueError, match="reduction.*'elementwise'"):
        KF.kd_loss(s, s, reduction="elementwise")
    with pytest.raises(ValueError, match="reduction"):
        KDLoss(reduction="avg")
    with pytest.raises(ValueError, match="teacher.*'softmax'"):
        KF.kd_loss(s, s, teacher="softmax")
    with pytest.raises(ValueError, match="teacher"):
        KDLoss(teacher="probabilities")


def test_bad_masks_raise():
    s = rand(3, 4)
    with pytest.raises(TypeError, match="mask.*torch.float32"):
        KF.kd_loss(s, s, mask=torch.ones(3))
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        KF.kd_loss(s, s, mask=[True, True, True])
    with pytest.raises(ValueError, match=r"mask must have 3 entries.*\(4,\)"):
        KF.kd_loss(s, s, mask=torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask must have 3 entries.*\(\)"):
        KF.kd_loss(s, s, mask=torch.tensor(True))

"""DIST (semantics 2): dist_loss and DISTLoss against the worked examples, the official code
and the loss's invariants on every backend that runs here (the ``backend`` fixture; input
validation on the reference), then every compiled backend against the reference (the tests
shared with KD come from tests/fused_logits.py)."""

from __future__ import annotations

import mpmath
import pytest
import torch
from fused_logits import (  # noqa: F401  the tests run here for this file's ops
    compiled_pairs,
    test_double_backward_raises,
    test_float64_parity,
    test_gradient_only_when_requested,
    test_identical_rows_against_float64_truth,
    test_low_precision_against_float64_truth,
    test_mixed_dtypes_and_all_masked,
    test_nc_star_gradcheck_and_opcheck,
    test_opcheck,
    test_strided_expanded_and_nc_star_inputs,
)
from fused_logits import test_gradcheck as test_kernel_gradcheck  # noqa: F401
from worked_examples import F64, ZS, ZT, float64_bound, rand, reference_backend  # noqa: F401

from kdfast import functional as KF
from kdfast.losses.dist import DISTLoss
from kdfast.testing import rel_error as rel
from kdfast.testing import tolerance

pytestmark = pytest.mark.usefixtures("reference_backend")
#: the ``backend`` fixture runs a test on every backend of this op (tests/conftest.py)
OP = "dist_loss"


def official_dist(z_s, z_t, beta=1.0, gamma=1.0, tau=1.0, use_sigmoid=False):
    """hunto/DIST_KD, transcribed (classification DIST with the detection sigmoid option)."""

    def cosine_similarity(a, b, eps=1e-8):
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)

    def pearson_correlation(a, b, eps=1e-8):
        return cosine_similarity(a - a.mean(1).unsqueeze(1), b - b.mean(1).unsqueeze(1), eps)

    def inter_class_relation(y_s, y_t):
        return 1 - pearson_correlation(y_s, y_t).mean()

    def intra_class_relation(y_s, y_t):
        return inter_class_relation(y_s.transpose(0, 1), y_t.transpose(0, 1))

    if use_sigmoid:
        y_s, y_t = (z_s / tau).sigmoid(), (z_t / tau).sigmoid()
    else:
        y_s, y_t = (z_s / tau).softmax(dim=1), (z_t / tau).softmax(dim=1)
    inter_loss = tau**2 * inter_class_relation(y_s, y_t)
    intra_loss = tau**2 * intra_class_relation(y_s, y_t)
    return beta * inter_loss + gamma * intra_loss


# --- docs/semantics.md worked examples ------------------------------------------------------------


def close(x: torch.Tensor, expected: float, backend: str) -> bool:
    tol = float64_bound(backend, 1e-12)
    return x.dtype == F64 and x.shape == () and abs(x.item() - expected) <= tol * abs(expected)


def mp_dist(zs, zt, beta=1.0, gamma=1.0, temperature=1.0):
    """DIST in 50-digit arithmetic, written from the official formula (``DIST`` above):
    y = softmax(z / T) per row; rho(a, b) = <a - mean a, b - mean b> / (|a - mean a|
    |b - mean b| + eps) with eps the float 1e-8; inter = 1 - mean over rows of rho(ys, yt),
    intra = 1 - mean over classes of rho of the columns; L = T^2 (beta inter + gamma intra)."""
    mpmath.mp.dps = 50
    T, eps = mpmath.mpf(temperature), mpmath.mpf(1e-8)

    def softmax(row):
        e = [mpmath.exp(mpmath.mpf(v) / T) for v in row]
        total = mpmath.fsum(e)
        return [x / total for x in e]

    def rho(a, b):
        a = [x - mpmath.fsum(a) / len(a) for x in a]
        b = [x - mpmath.fsum(b) / len(b) for x in b]
        dot = mpmath.fsum(x * y for x, y in zip(a, b, strict=True))
        norms = mpmath.sqrt(mpmath.fsum(x * x for x in a) * mpmath.fsum(x * x for x in b))
        return dot / (norms + eps)

    def one_minus_mean_rho(ys, yt):
        return 1 - mpmath.fsum(rho(a, b) for a, b in zip(ys, yt, strict=True)) / len(ys)

    ys, yt = [softmax(r) for r in zs], [softmax(r) for r in zt]
    inter = one_minus_mean_rho(ys, yt)
    columns = [[list(c) for c in zip(*y, strict=True)] for y in (ys, yt)]
    intra = one_minus_mean_rho(*columns)
    return float(T**2 * (beta * inter + gamma * intra))


#: docs/semantics.md 2's worked examples as printed: (zs, zt, options, value)
DOCUMENTED = [
    (ZS, ZT, {}, 3.016884608267537),
    (ZS, ZT, {"gamma": 0.0}, 1.6835463005504512),  # inter alone
    (ZS, ZT, {"beta": 0.0}, 1.3333383077170857),  # intra alone
    (ZS, ZT, {"temperature": 4.0}, 49.25133969135766),
    (ZT, ZT, {}, 7.574169520557809e-06),  # identical inputs: only eps keeps rho from 1
    ([[1.0, 2.0, 3.0]], [[3.0, 1.0, 2.0]], {}, 2.499999971784846),  # B = 1
]


@pytest.mark.parametrize("zs, zt, options, documented", DOCUMENTED)
def test_documented_examples_are_exact(zs, zt, options, documented):
    """The printed figures are the 50-digit values rounded once (not a backend's output)."""
    assert documented == mp_dist(zs, zt, **options)


def test_spec_example(backend):
    zs, zt = torch.tensor(ZS, dtype=F64), torch.tensor(ZT, dtype=F64)
    for _, _, options, documented in DOCUMENTED[:4]:
        assert close(KF.dist_loss(zs, zt, **options), documented, backend), options


def test_spec_example_identical(backend):
    """1 - rho with rho = 1 - 7.6e-6: float64's rounding of rho (1.1e-16) is ~1.5e-11 of
    the result, so the bound is that cancellation, not the 1e-12 of the other examples."""
    zt = torch.tensor(ZT, dtype=F64)
    got = KF.dist_loss(zt, zt.clone())
    assert got.dtype == F64
    exact = DOCUMENTED[4][3]
    assert abs(got.item() - exact) <= float64_bound(backend, 5e-11) * exact


def test_spec_example_single_row(backend):
    zs, zt = torch.tensor([[1.0, 2.0, 3.0]], dtype=F64), torch.tensor([[3.0, 1.0, 2.0]], dtype=F64)
    assert close(KF.dist_loss(zs, zt), 2.499999971784846, backend)
    assert KF.dist_loss(zs, zt, beta=0.0).item() == 1.0  # intra exactly 1


# --- against the official code ---------------------------------------------------------


@pytest.mark.parametrize("tau", [1.0, 4.0])
@pytest.mark.parametrize("sigmoid", [False, True])
@pytest.mark.parametrize(("beta", "gamma"), [(1.0, 1.0), (2.0, 0.5)])
def test_matches_official(tau, sigmoid, beta, gamma, backend):
    zs, zt = rand(9, 7, seed=1), rand(9, 7, seed=2)
    activation = "sigmoid" if sigmoid else "softmax"
    got = KF.dist_loss(zs, zt, beta, gamma, tau, activation=activation)
    assert rel(got, official_dist(zs, zt, beta, gamma, tau, sigmoid)) <= 1e-12


def test_tau_squared_false_drops_the_factor(backend):
    zs, zt = rand(5, 6, seed=3), rand(5, 6, seed=4)
    with_factor = KF.dist_loss(zs, zt, temperature=4.0)
    without = KF.dist_loss(zs, zt, temperature=4.0, temperature_squared=False)
    assert rel(16.0 * without, with_factor) <= 1e-14
    assert (
        rel(KF.dist_loss(zs, zt, temperature=1.0, temperature_squared=False), KF.dist_loss(zs, zt))
        == 0
    )


# --- invariants and edge cases ------------------------------------------------------------


def test_softmax_invariant_to_row_shift_sigmoid_not(backend):
    zs, zt = rand(6, 5, seed=5), rand(6, 5, seed=6)
    shift = rand(6, 1, seed=7, scale=10.0)
    base = KF.dist_loss(zs, zt, temperature=2.0)
    assert rel(KF.dist_loss(zs + shift, zt - shift, temperature=2.0), base) <= 1e-12
    sig = KF.dist_loss(zs, zt, activation="sigmoid")
    assert rel(KF.dist_loss(zs + shift, zt, activation="sigmoid"), sig) > 1e-3


def test_single_row_intra_has_zero_gradient(backend):
    zs, zt = rand(1, 5, seed=8).requires_grad_(), rand(1, 5, seed=9).requires_grad_()
    intra = KF.dist_loss(zs, zt, beta=0.0, gamma=1.0)
    assert intra.item() == 1.0
    intra.backward()
    assert torch.all(zs.grad == 0) and torch.all(zt.grad == 0)


def test_uniform_teacher_row_contributes_one_to_inter(backend):
    zs = rand(4, 5, seed=10)
    zt = rand(4, 5, seed=11)
    zt[2] = 3.0  # uniform teacher probabilities in row 2
    assert KF.dist_loss(zs[2:3], zt[2:3], gamma=0.0).item() == 1.0
    others = torch.tensor([0, 1, 3])
    inter_all = KF.dist_loss(zs, zt, gamma=0.0)
    inter_others = KF.dist_loss(zs[others], zt[others], gamma=0.0)
    assert rel(4 * inter_all, 1 + 3 * inter_others) <= 1e-14


def test_nchw_equals_permuted_rows(backend):
    zs, zt = rand(2, 4, 3, 5, seed=12), rand(2, 4, 3, 5, seed=13)
    s2, t2 = (x.permute(0, 2, 3, 1).reshape(-1, 4) for x in (zs, zt))
    for activation in ("softmax", "sigmoid"):
        got = KF.dist_loss(zs, zt, activation=activation)
        assert rel(got, KF.dist_loss(s2, t2, activation=activation)) <= 1e-14


def test_non_contiguous_inputs(backend):
    zs, zt = rand(6, 4, seed=14), rand(6, 4, seed=15)
    zs_nc = zs.t().contiguous().t()
    assert not zs_nc.is_contiguous()
    assert rel(KF.dist_loss(zs_nc, zt[::1]), KF.dist_loss(zs, zt)) <= 1e-15


# --- masks ----------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_mask_equals_dropping_rows(activation, backend):
    zs, zt = rand(7, 5, seed=16), rand(7, 5, seed=17)
    mask = torch.tensor([True, False, True, True, False, True, True])
    got = KF.dist_loss(zs, zt, 1.0, 2.0, 3.0, activation=activation, mask=mask)
    want = official_dist(zs[mask], zt[mask], 1.0, 2.0, 3.0, activation == "sigmoid")
    assert rel(got, want) <= 1e-12
    everything = torch.ones(7, dtype=torch.bool)
    assert rel(KF.dist_loss(zs, zt, mask=everything), KF.dist_loss(zs, zt)) <= 1e-14


def test_mask_blocks_nan_padding_rows(backend):
    zs, zt = rand(4, 3, seed=18), rand(4, 3, seed=19)
    zs[1] = float("nan")
    zt[3, 2] = float("inf")
    mask = torch.tensor([True, False, True, False])
    got = KF.dist_loss(zs, zt, mask=mask)
    assert rel(got, official_dist(zs[mask], zt[mask])) <= 1e-12


def test_all_false_mask_gives_nan(backend):
    zs, zt = rand(3, 4), rand(3, 4, seed=1)
    assert torch.isnan(KF.dist_loss(zs, zt, mask=torch.zeros(3, dtype=torch.bool)))


# --- dtypes ---------------------------------------------------------------------------


def test_mixed_half_student_float_teacher_returns_float32(backend):
    zs, zt = rand(6, 5, seed=20, dtype=torch.float16), rand(6, 5, seed=21, dtype=torch.float32)
    for activation in ("softmax", "sigmoid"):
        loss = KF.dist_loss(zs, zt, activation=activation)
        assert loss.dtype == torch.float32
        truth = KF.dist_loss(zs.double(), zt.double(), activation=activation)
        assert rel(loss.double(), truth) <= tolerance(torch.float32)
    assert KF.dist_loss(zs.bfloat16(), zt.bfloat16()).dtype == torch.float32


def test_float64_stays_float64(backend):
    zs, zt = rand(3, 4), rand(3, 4, seed=1)
    assert KF.dist_loss(zs, zt).dtype == F64
    assert KF.dist_loss(zs.half(), zt).dtype == F64


# --- gradients ------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
@pytest.mark.parametrize("tau_squared", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck(activation, tau_squared, masked, backend):
    zs, zt = rand(5, 4, seed=22).requires_grad_(), rand(5, 4, seed=23).requires_grad_()
    mask = torch.tensor([True, True, False, True, False]) if masked else None

    def f(zs, zt):
        return KF.dist_loss(zs, zt, 1.0, 0.7, 2.0, tau_squared, activation, mask)

    assert torch.autograd.gradcheck(f, (zs, zt))


def test_masked_rows_get_zero_gradient(backend):
    zs, zt = rand(5, 3, seed=24).requires_grad_(), rand(5, 3, seed=25).requires_grad_()
    mask = torch.tensor([True, False, True, True, False])
    KF.dist_loss(zs, zt, mask=mask).backward()
    assert torch.all(zs.grad[~mask] == 0) and torch.all(zt.grad[~mask] == 0)


def test_traces_with_fullgraph():
    zs, zt = rand(5, 4, seed=26), rand(5, 4, seed=27)
    mask = torch.tensor([True, False, True, True, True])
    torch._dynamo.reset()
    fn = torch.compile(KF.dist_loss, fullgraph=True, backend="eager")
    for activation in ("softmax", "sigmoid"):
        got = fn(zs, zt, 1.0, 1.0, 2.0, True, activation, mask)
        assert rel(got, KF.dist_loss(zs, zt, 1.0, 1.0, 2.0, True, activation, mask)) <= 1e-15


# --- module ---------------------------------------------------------------------------


def test_module_matches_functional(backend):
    zs, zt = rand(6, 5, seed=28), rand(6, 5, seed=29)
    mask = torch.tensor([True, True, False, True, True, True])
    module = DISTLoss(
        beta=2.0, gamma=0.5, temperature=4.0, temperature_squared=False, activation="sigmoid"
    )
    want = KF.dist_loss(zs, zt, 2.0, 0.5, 4.0, False, "sigmoid", mask)
    assert rel(module(zs, zt, mask), want) <= 1e-15
    assert rel(DISTLoss()(zs, zt), official_dist(zs, zt)) <= 1e-12
    assert "activation='sigmoid'" in repr(module)


# --- bad inputs -----------------------------------------------------------------------


def test_bad_tensors_raise():
    z = rand(3, 4)
    with pytest.raises(ValueError, match=r"student_logits.*at least 2 dims.*\(4,\)"):
        KF.dist_loss(z[0], z[0])
    with pytest.raises(ValueError, match=r"same shape.*\(3, 4\).*\(2, 4\)"):
        KF.dist_loss(z, z[:2])
    with pytest.raises(TypeError, match="student_logits.*torch.int32"):
        KF.dist_loss(z.int(), z)
    with pytest.raises(TypeError, match="teacher_logits.*complex"):
        KF.dist_loss(z, z.to(torch.complex64))


def test_bad_options_raise():
    z = rand(3, 4)
    for bad in (0.0, -2, "1"):
        with pytest.raises(ValueError, match="temperature"):
            KF.dist_loss(z, z, temperature=bad)
        with pytest.raises(ValueError, match="temperature"):
            DISTLoss(temperature=bad)
    with pytest.raises(ValueError, match="activation.*'relu'"):
        KF.dist_loss(z, z, activation="relu")
    with pytest.raises(ValueError, match="activation"):
        DISTLoss(activation="tanh")
    with pytest.raises(TypeError, match="temperature_squared"):
        KF.dist_loss(z, z, temperature_squared=1)
    with pytest.raises(TypeError, match="temperature_squared"):
        DISTLoss(temperature_squared="yes")
    with pytest.raises(TypeError, match="beta"):
        DISTLoss(beta="1")
    with pytest.raises(TypeError, match="gamma"):
        DISTLoss(gamma=None)


def test_bad_masks_raise():
    z = rand(3, 4)
    with pytest.raises(TypeError, match="mask.*torch.int64"):
        KF.dist_loss(z, z, mask=torch.ones(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"mask must have 3 entries.*\(2,\)"):
        KF.dist_loss(z, z, mask=torch.ones(2, dtype=torch.bool))


# --- the fused kernels against the reference (tests/fused_logits.py) ---------------------------


@pytest.fixture(params=compiled_pairs(["dist_loss"]), ids="-".join)
def logit_impl(request):
    """(op, backend) of every compiled backend that runs dist_loss here (cpp;
    triton under TRITON_INTERPRET=1), for the tests imported from tests/fused_logits.py."""
    return request.param

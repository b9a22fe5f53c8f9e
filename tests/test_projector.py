"""OrthogonalProjector (semantics 4): exp-parameterised orthonormal projection, with folding."""

from __future__ import annotations

import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from conftest import backends_for, require_backend

import kdfast
from kdfast import linalg
from kdfast.nn import OrthogonalProjector

F64, F32 = torch.float64, torch.float32
# (in, out): reduced 2k x 2k form (k <= n/2) and the full n x n form, both orientations
SHAPES = [(3, 10), (10, 3), (4, 8), (6, 8), (8, 6), (5, 5)]


@pytest.fixture(autouse=True, params=backends_for("expm"))
def backend(request):
    if request.param != "reference":
        require_backend(request.param)
    with kdfast.use_backend(request.param):
        yield request.param


def randomise(module, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (module.skew_block, module.coupling):
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=F64))
    return module


def full_generator(module):
    """A = [[B, -C^T], [C, 0]] (n x n) built from the parameters as semantics 4 writes it."""
    lower = module.skew_block.detach().double().tril(-1)
    B, C = lower - lower.mT, module.coupling.detach().double()
    A = torch.zeros(module.n, module.n, dtype=F64)
    A[: module.k, : module.k], A[module.k :, : module.k], A[: module.k, module.k :] = B, C, -C.mT
    return A


def orthonormality_error(P):
    G = P.mT @ P if P.shape[0] >= P.shape[1] else P @ P.mT
    return float((G - torch.eye(G.shape[0], dtype=G.dtype)).abs().max())


@pytest.mark.parametrize(("dtype", "tol"), [(F32, 1e-5), (F64, 1e-12)])
@pytest.mark.parametrize(("n_in", "n_out"), SHAPES)
def test_orthonormal(n_in, n_out, dtype, tol):
    module = randomise(OrthogonalProjector(n_in, n_out, dtype=dtype), seed=n_in)
    P = module.weight
    assert P.shape == (n_out, n_in) and P.dtype == dtype
    assert orthonormality_error(P.detach()) <= tol
    x = torch.randn(2, 7, n_in, dtype=dtype)
    y = module(x)
    assert y.shape == (2, 7, n_out)
    torch.testing.assert_close(y, x @ P.mT)


@pytest.mark.parametrize(("n_in", "n_out"), SHAPES)
def test_initial_weight_is_identity_block(n_in, n_out):
    P = OrthogonalProjector(n_in, n_out).weight
    assert torch.equal(P, torch.eye(n_out, n_in))


@pytest.mark.parametrize(("n_in", "n_out"), SHAPES)
def test_equals_first_columns_of_full_exponential(n_in, n_out):
    module = randomise(OrthogonalProjector(n_in, n_out, dtype=F64), seed=2 * n_in + n_out)
    Q = torch.from_numpy(scipy.linalg.expm(full_generator(module).numpy()))[:, : module.k]
    expected = Q if n_out >= n_in else Q.mT
    assert float((module.weight.detach() - expected).abs().max()) <= 1e-12


@pytest.mark.parametrize("coupling", ["zero", "rank_one", "random"])
def test_gradient_matches_full_form(coupling):
    # The reduced form is differentiable at C = 0 and for rank-deficient C; its gradient
    # must equal the full n x n exponential's.
    module = OrthogonalProjector(4, 11, dtype=F64)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        module.skew_block.copy_(torch.randn(4, 4, generator=g, dtype=F64))
        u, v = torch.randn(7, 1, generator=g, dtype=F64), torch.randn(1, 4, generator=g, dtype=F64)
        C = {"zero": 0 * u @ v, "rank_one": u @ v, "random": torch.randn(7, 4, generator=g)}
        module.coupling.copy_(C[coupling])
    W = torch.randn(11, 4, generator=g, dtype=F64)
    (module.weight * W).sum().backward()
    lower = module.skew_block.tril(-1)
    B, C = lower - lower.mT, module.coupling
    A = torch.cat([torch.cat([B, -C.mT], 1), torch.cat([C, torch.zeros(7, 7, dtype=F64)], 1)], 0)
    grads = torch.autograd.grad((linalg.expm(A)[:, :4] * W).sum(), (module.skew_block, C))
    for got, expected in zip((module.skew_block.grad, module.coupling.grad), grads, strict=True):
        assert torch.isfinite(got).all()
        assert float((got - expected).abs().max()) <= 1e-12


@pytest.mark.parametrize(("n_in", "n_out"), [(3, 8), (8, 3), (5, 6)])
def test_gradcheck_weight(n_in, n_out):
    module = randomise(OrthogonalProjector(n_in, n_out, dtype=F64), seed=4, scale=0.7)
    eye = torch.eye(n_in, dtype=F64)
    params = (
        module.skew_block.detach().requires_grad_(),
        module.coupling.detach().requires_grad_(),
    )

    def weight(b, c):  # forward(I) = P^T
        values = {"skew_block": b, "coupling": c}
        return torch.func.functional_call(module, values, (eye,))

    assert torch.autograd.gradcheck(weight, params)
    zeros = tuple(torch.zeros_like(p).requires_grad_() for p in params)
    assert torch.autograd.gradcheck(weight, zeros)


@pytest.mark.parametrize(("n_in", "n_out"), [(16, 48), (40, 24), (20, 24)])
def test_adamw_with_weight_decay_stays_orthonormal(n_in, n_out):
    torch.manual_seed(5)
    module = OrthogonalProjector(n_in, n_out)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2, weight_decay=0.05)
    x, target = torch.randn(64, n_in), torch.randn(64, n_out)
    first = None
    for _ in range(100):
        loss = F.smooth_l1_loss(module(x), target)
        first = float(loss.detach()) if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(loss.detach()) < 0.95 * first  # it trains
    assert orthonormality_error(module.weight.detach()) <= 1e-5


def test_weight_decay_alone_keeps_the_identity_block():
    # the released Householder map collapses to P = 0 here (semantics 4)
    module = OrthogonalProjector(6, 12)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2, weight_decay=0.05)
    module(torch.randn(3, 6)).sum().mul(0).backward()
    optimizer.step()
    assert torch.equal(module.weight, torch.eye(12, 6))


# --- dynamic trivialisation (folding) -------------------------------------------------


@pytest.mark.parametrize(("n_in", "n_out"), [(3, 10), (10, 3), (6, 8)])
def test_fold_is_base_times_full_exponential(n_in, n_out):
    module = randomise(OrthogonalProjector(n_in, n_out, fold_every=5, dtype=F64), seed=6)
    with torch.no_grad():
        module.base.copy_(torch.linalg.qr(torch.randn(module.n, module.n, dtype=F64))[0])
    expected = module.base @ torch.from_numpy(scipy.linalg.expm(full_generator(module).numpy()))
    P = module.weight.detach()
    module.fold()
    assert float((module.base - expected).abs().max()) <= 1e-12
    assert not module.skew_block.any() and not module.coupling.any()
    assert float((module.weight.detach() - P).abs().max()) <= 1e-12


def test_fold_every_k_training_forwards_and_state_dict_round_trip():
    torch.manual_seed(7)
    module = OrthogonalProjector(4, 12, fold_every=3)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    x, target = torch.randn(32, 4), torch.randn(32, 12)

    def step(m, opt):
        loss = F.smooth_l1_loss(m(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()

    folded_at = []
    for i in range(7):
        before = module.base.clone()
        step(module, optimizer)
        if not torch.equal(before, module.base):
            folded_at.append(i + 1)
        module.eval()
        module(x)  # eval-mode forwards neither count nor fold
        module.train()
    assert folded_at == [4, 7] and int(module.fold_counter) == 1
    assert orthonormality_error(module.base) <= 1e-14
    assert orthonormality_error(module.weight.detach()) <= 1e-5

    state = module.state_dict()
    assert set(state) == {"skew_block", "coupling", "base", "fold_counter"}
    clone = OrthogonalProjector(4, 12, fold_every=3)
    clone.load_state_dict(state)
    torch.testing.assert_close(clone.weight, module.weight, rtol=0, atol=0)
    clone_optimizer = torch.optim.SGD(clone.parameters(), lr=0.1)
    for _ in range(3):  # the next fold happens at the same step in both
        step(module, optimizer)
        step(clone, clone_optimizer)
    assert int(clone.fold_counter) == int(module.fold_counter) == 1
    torch.testing.assert_close(clone.base, module.base, rtol=0, atol=0)
    torch.testing.assert_close(clone.weight, module.weight, rtol=0, atol=0)


def test_state_dict_without_folding_has_only_parameters():
    assert set(OrthogonalProjector(3, 5).state_dict()) == {"skew_block", "coupling"}
    with pytest.raises(RuntimeError, match="fold_every"):
        OrthogonalProjector(3, 5).fold()


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="in_features must be a positive int, got 0"):
        OrthogonalProjector(0, 4)
    with pytest.raises(ValueError, match="out_features must be a positive int, got 2.5"):
        OrthogonalProjector(3, 2.5)
    with pytest.raises(ValueError, match="fold_every must be a positive int, got 0"):
        OrthogonalProjector(3, 4, fold_every=0)
    with pytest.raises(TypeError, match="dtype must be a floating-point dtype"):
        OrthogonalProjector(3, 4, dtype=torch.int32)

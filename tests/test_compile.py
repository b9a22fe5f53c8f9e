"""torch.compile(fullgraph=True) of every public function and module, forward and backward.

The dispatcher (``kdfast._dispatch.select``) runs in Python while Dynamo traces: these tests
prove it traces without graph breaks (fullgraph=True raises on any break) and that the
compiled results equal eager ones. backend="aot_eager" for everything (it runs the AOT
autograd decomposition, fake tensors included, without codegen); inductor for RKDLoss,
DISTLoss and KDLoss on the reference and the automatic (compiled where available) backends.
Compiled ops (triton, cuda) are covered here through whichever backend the dispatcher picks
on CPU, and by opcheck's fake-tensor and AOT-dispatch checks in tests/contract.
"""

from __future__ import annotations

import pytest
import torch
from public_api import OP_BACKENDS, PUBLIC_OPS

import kdfast
from kdfast import losses, sampling
from kdfast.testing import rel_error


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _grads(out: torch.Tensor, wrt: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(out.sum(), wrt, allow_unused=True))


def assert_compiled_matches_eager(fn, args, wrt, *, backend="aot_eager", tol=1e-12):
    """fn compiled with fullgraph=True gives eager's outputs and gradients w.r.t. ``wrt``."""
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    got = compiled(*args)
    want = fn(*args)
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert rel_error(g, w) <= tol, rel_error(g, w)
    if wrt:
        for g, w in zip(
            _grads(sum(x.sum() for x in got), wrt),
            _grads(sum(x.sum() for x in want), wrt),
            strict=True,
        ):
            if w is None:
                assert g is None
            else:
                assert rel_error(g, w) <= tol, rel_error(g, w)


def _pair(n=7, c=5, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, c, generator=g, dtype=dtype, requires_grad=True)
    t = torch.randn(n, c, generator=g, dtype=dtype, requires_grad=True)
    return s, t


@pytest.mark.parametrize("op,backend", OP_BACKENDS)
def test_functional_aot_eager(op, backend):
    s, t = _pair()
    with kdfast.use_backend(backend):
        assert_compiled_matches_eager(PUBLIC_OPS[op].call, (s, t), [s, t])


def test_functional_options_and_mask_aot_eager():
    s, t = _pair()
    mask = torch.tensor([True, False, True, True, True, False, True])
    F = kdfast.functional
    cases = [
        lambda s, t: F.kd_loss(s, t, 3.0, "none", mask),
        lambda s, t: F.kd_loss(s, t.softmax(1), 1.0, "mean", None, "probs"),
        lambda s, t: F.dist_loss(s, t, 0.5, 2.0, 4.0, False, "sigmoid", mask),
        lambda s, t: F.dist_loss(s.view(7, 5, 1), t.view(7, 5, 1), mask=mask),
        lambda s, t: F.vkd_loss(s, t, "whiten"),
        lambda s, t: F.vkd_loss(s, t, "batch_standardize"),
        lambda s, t: F.vkd_loss(s, t, None),
    ]
    for fn in cases:
        assert_compiled_matches_eager(fn, (s, t), [s, t], tol=1e-10)


def test_linalg_aot_eager():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(2, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    e = torch.randn(2, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert_compiled_matches_eager(kdfast.linalg.expm, (a,), [a])
    skew = (a - a.mT).detach().requires_grad_(True)
    assert_compiled_matches_eager(lambda x: kdfast.linalg.expm(x, skew=True), (skew,), [skew])
    assert_compiled_matches_eager(kdfast.linalg.expm_frechet, (a, e), [a, e])


def _modules():
    """(name, module, student, teacher, extra forward args) for every loss module."""
    s, t = _pair(n=8, c=6)
    yield "KDLoss", losses.KDLoss(4.0), s, t
    yield "DISTLoss", losses.DISTLoss(temperature=4.0), s, t
    yield "RKDLoss", losses.RKDLoss(25.0, 50.0), s, t
    yield "RKDDistanceLoss", losses.RKDDistanceLoss(), s, t
    yield "RKDAngleLoss", losses.RKDAngleLoss(), s, t
    vkd = losses.VkDLoss(4, 6, dtype=torch.float64)
    with torch.no_grad():
        for p in vkd.parameters():
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(5))
    s4 = s[:, :4].detach().requires_grad_(True)
    yield "VkDLoss", vkd, s4, t


@pytest.mark.parametrize(
    "name", ["KDLoss", "DISTLoss", "RKDLoss", "RKDDistanceLoss", "RKDAngleLoss", "VkDLoss"]
)
def test_modules_aot_eager(name):
    for n, module, s, t in _modules():
        if n == name:
            wrt = [s, t, *module.parameters()]
            assert_compiled_matches_eager(module, (s, t), wrt, tol=1e-10)


def test_projector_aot_eager():
    proj = kdfast.nn.OrthogonalProjector(3, 7, dtype=torch.float64)
    wide = kdfast.nn.OrthogonalProjector(5, 6, dtype=torch.float64)  # k > n/2: full skew expm
    g = torch.Generator().manual_seed(2)
    for p in [*proj.parameters(), *wide.parameters()]:
        with torch.no_grad():
            p.normal_(0, 0.5, generator=g)
    for module, width in ((proj, 3), (wide, 5)):
        x = torch.randn(4, width, generator=g, dtype=torch.float64, requires_grad=True)
        assert_compiled_matches_eager(module, (x,), [x, *module.parameters()], tol=1e-10)


def test_deit_aot_eager():
    g = torch.Generator().manual_seed(4)
    teacher = torch.nn.Linear(6, 5).double()
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    x = torch.randn(6, 6, generator=g, dtype=torch.float64)
    cls = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    dist = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    for kind in ("soft", "hard"):
        loss = losses.DeiTDistillationLoss(
            torch.nn.functional.cross_entropy, teacher, kind, 0.5, 3.0
        )
        assert_compiled_matches_eager(
            lambda c, d, loss=loss: loss(x, (c, d), labels), (cls, dist), [cls, dist]
        )


def test_bn_statistics_aot_eager():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.BatchNorm2d(4)
    ).double()
    model.eval()
    with torch.no_grad():
        for bn in (model[1], model[3]):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
    prior = losses.BNStatisticsLoss(model, layer_weights=[10.0, 1.0])
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)

    def fn(x):
        model(x)
        return prior()

    assert_compiled_matches_eager(fn, (x,), [x], tol=1e-10)


def test_sampling_helpers_aot_eager():
    g = torch.Generator().manual_seed(6)
    z = torch.randn(9, 4, generator=g, dtype=torch.float64)
    w = torch.rand(9, generator=g, dtype=torch.float64)
    assert_compiled_matches_eager(
        lambda z: sampling.diversity_difficulty_weights(z, 2.0, 3.0), (z,), []
    )
    assert_compiled_matches_eager(lambda k, w: sampling.ssd_kd_priorities(k, w), (z[:, 0], w), [])


@pytest.mark.parametrize("backend", ["reference", None])
@pytest.mark.parametrize("name", ["RKDLoss", "DISTLoss", "KDLoss"])
def test_inductor(name, backend):
    """Inductor (C++ codegen on CPU); backend None = automatic choice (compiled where built)."""
    for n, module, s, t in _modules():
        if n != name:
            continue
        with kdfast.use_backend(backend):
            dtype = torch.float64 if backend is None else torch.float32
            sd = s.detach().to(dtype).requires_grad_(True)
            td = t.detach().to(dtype)
            tol = 1e-10 if dtype == torch.float64 else 1e-5
            assert_compiled_matches_eager(module, (sd, td), [sd], backend="inductor", tol=tol)

"""Autocast: every loss computes its statistics as semantics 0 / 7 say, whatever
``torch.autocast`` is active, and returns a finite float32 loss where a half-precision
evaluation of the official formulas overflows (RKD on unnormalised features around 100).
"""

from __future__ import annotations

import pytest
import torch
from conftest import require_backend
from public_api import OP_BACKENDS, PUBLIC_OPS

import kdfast
from kdfast import _dispatch, losses
from kdfast.ops import _autocast
from kdfast.testing import rel_error, tolerance

HALF = [torch.float16, torch.bfloat16]


def _features(n=16, ds=32, dt=32, offset=100.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, ds, generator=g) * 3 + offset
    t = torch.randn(n, dt, generator=g) * 3 + offset
    return s, t


def _official_rkd_distance(s, t):
    """lenscloth/RKD's formula, evaluated in whatever precision autocast picks."""

    def pdist(e):
        prod = e @ e.t()
        sq = prod.diag()
        d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * prod).clamp(min=1e-12).sqrt()
        d = d.clone()
        d[range(len(e)), range(len(e))] = 0
        return d

    ds, dt = pdist(s), pdist(t)
    ds = ds / ds[ds > 0].mean()
    dt = dt / dt[dt > 0].mean()
    return torch.nn.functional.smooth_l1_loss(ds, dt)


@pytest.mark.parametrize("amp_dtype", HALF)
@pytest.mark.parametrize("op,backend", OP_BACKENDS)
def test_losses_ignore_autocast(op, backend, amp_dtype):
    """float32 and half inputs under autocast: float32 loss within semantics 7 of the truth."""
    if backend != "reference":
        require_backend(backend)
    s, t = _features()
    if PUBLIC_OPS[op].logits:
        s, t = (s - 100) / 2, (t - 100) / 2  # logits of a sensible scale
    for in_dtype in (torch.float32, amp_dtype):
        si, ti = s.to(in_dtype), t.to(in_dtype)
        truth = PUBLIC_OPS[op].call(si.double(), ti.double())
        with kdfast.use_backend(backend), torch.autocast("cpu", dtype=amp_dtype):
            loss = PUBLIC_OPS[op].call(si, ti)
        assert loss.dtype == torch.float32, (op, loss.dtype)
        assert torch.isfinite(loss)
        # computing in float32 from (rounded) inputs: float32's tolerance against the truth
        assert rel_error(loss, truth) <= tolerance(torch.float32, "loss"), rel_error(loss, truth)


@pytest.mark.parametrize("amp_dtype", HALF)
def test_rkd_finite_where_half_reference_overflows(amp_dtype):
    s, t = _features()
    truth = kdfast.losses.RKDLoss()(s.double(), t.double())
    with torch.autocast("cpu", dtype=amp_dtype):
        official = _official_rkd_distance(s, t)
        loss = kdfast.losses.RKDLoss()(s, t)
    if amp_dtype == torch.float16:
        assert not torch.isfinite(official)  # 100^2 * 32 > 65504: the Gram matrix overflows
    else:
        assert rel_error(official, truth) > 1e-2  # bfloat16's 8 bits cancel catastrophically
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert rel_error(loss, truth) <= tolerance(torch.float32)


@pytest.mark.parametrize("amp_dtype", HALF)
def test_training_step_under_autocast(amp_dtype):
    """Features from autocast layers (half) into every loss module: float32, finite, and the
    parameter gradients match the same step without autocast on the same half features."""
    g = torch.Generator().manual_seed(1)
    student = torch.nn.Linear(8, 12)
    x = torch.randn(10, 8, generator=g) * 30
    teacher = torch.randn(10, 12, generator=g) * 30 + 100
    labels_t = torch.randn(10, 12, generator=g)
    modules = {
        "rkd": (losses.RKDLoss(25.0, 50.0), teacher),
        "dist": (losses.DISTLoss(temperature=4.0), labels_t),
        "kd": (losses.KDLoss(4.0), labels_t),
        "vkd": (losses.VkDLoss(12, 12), teacher),
    }
    for name, (module, target) in modules.items():
        student.zero_grad()
        with torch.autocast("cpu", dtype=amp_dtype):
            features = student(x)
            assert features.dtype == amp_dtype
            loss = module(features, target)
        assert loss.dtype == torch.float32 and torch.isfinite(loss), name
        loss.backward()
        grad = student.weight.grad.clone()
        assert torch.isfinite(grad).all(), name
        # Same loss computed outside autocast from the same half features.
        student.zero_grad()
        with torch.autocast("cpu", dtype=amp_dtype):
            features = student(x)
        module(features, target).backward()
        assert rel_error(grad, student.weight.grad) <= 1e-6, name


def test_autocast_rules_registered_for_every_custom_op():
    registered = _autocast.register_all()
    for impls in _dispatch._IMPLS.values():
        for backend, impl in impls.items():
            name = _autocast._qualname(impl.fn)
            if name is None:
                continue
            for device in impl.devices or _dispatch.BACKENDS[backend].devices or ("cpu",):
                assert (name, device) in registered
                key = "AutocastCPU" if device == "cpu" else "AutocastCUDA"
                assert torch._C._dispatch_has_kernel_for_dispatch_key(name, key), (name, key)
    assert ("kdfast::expm_reference", "cpu") in registered


@pytest.mark.parametrize("amp_dtype", HALF)
def test_custom_ops_called_directly_under_autocast(amp_dtype):
    """Without its rule, expm_reference ran its matmuls in float16 and returned NaN."""
    g = torch.Generator().manual_seed(2)
    a = torch.randn(2, 6, 6, generator=g)
    want = torch.ops.kdfast.expm_reference(a, False)
    with torch.autocast("cpu", dtype=amp_dtype):
        got = torch.ops.kdfast.expm_reference(a, False)
        public = kdfast.linalg.expm(a)
        with_grad = kdfast.linalg.expm(a.clone().requires_grad_(True))  # saves its state
        frechet = torch.ops.kdfast.expm_frechet_reference(a, a, False)[1]
    assert got.dtype == public.dtype == with_grad.dtype == torch.float32
    assert rel_error(got, want) <= 1e-6 and rel_error(public, want) <= 1e-6
    assert rel_error(with_grad, want) <= 1e-6
    assert rel_error(frechet, torch.ops.kdfast.expm_frechet_reference(a, a, False)[1]) <= 1e-6
    for backend in ("cpp",):
        impl = _dispatch._IMPLS["rkd_distance"].get(backend)
        if impl is None or _dispatch.BACKENDS[backend].unavailable:
            continue
        s, t = _features(8, 6, 5)
        with torch.autocast("cpu", dtype=amp_dtype):
            out = impl.fn(s.to(amp_dtype), t)
        assert out.dtype == torch.float32
        assert rel_error(out, impl.fn(s.to(amp_dtype).float(), t)) <= 1e-12


def test_compile_under_autocast():
    s, t = _features(8, 6, 5)
    module = losses.RKDLoss()
    with torch.autocast("cpu", dtype=torch.float16):
        want = module(s, t)
        got = torch.compile(module, fullgraph=True, backend="aot_eager")(s, t)
    torch._dynamo.reset()
    assert got.dtype == torch.float32 and rel_error(got, want) <= 1e-6

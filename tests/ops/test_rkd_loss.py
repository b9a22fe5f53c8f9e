"""The combined RKD op (``rkd_loss``, semantics 1.4, 1.5): RKDLoss with both terms forms each
side's Gram matrix once per training step on the cpp backend, and equals the sum of the
separate terms (loss and gradients, float64 and float32, near-duplicate rows included)."""

from __future__ import annotations

import pytest
import torch
from conftest import NO_EXT

import kdfast
from kdfast import _dispatch, functional
from kdfast.losses.rkd import RKDLoss
from kdfast.ops import rkd_loss as rkd_loss_op
from kdfast.testing import rel_error

F64 = torch.float64
needs_cpp = pytest.mark.skipif(NO_EXT, reason="the C++ extension is not built")
N, DS, DT = 12, 8, 6


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _inputs(kind: str, dtype=F64, seed: int = 0):
    """(student, teacher) in ``dtype``; near duplicates are made in that dtype (1 ulp apart,
    and a few ulps of float32 or ~1e-9 / 1e-7 relative in float64), on both sides."""
    s, t = _randn(N, DS, seed=seed).to(dtype), (_randn(N, DT, seed=seed + 1) + 3.0).to(dtype)
    if kind == "near_duplicates":
        s[5] = s[2]
        s[5, 0] = torch.nextafter(s[2, 0], torch.tensor(float("inf"), dtype=dtype))
        s[9] = s[1] * (1 + (1e-9 if dtype == F64 else 1e-6))
        t[7] = t[3] + (1e-7 if dtype == F64 else 1e-5)
        assert not torch.equal(s[9], s[1]) and not torch.equal(t[7], t[3])
    elif kind == "exact_duplicates":
        s[4] = s[8]
        t[10] = t[0]
    elif kind == "clustered":
        centres = _randn(4, DS, seed=seed + 2) * 10
        s = (centres[torch.arange(N) % 4] + 1e-3 * _randn(N, DS, seed=seed + 3)).to(dtype)
    return s, t


def _loss_and_grads(fn, s, t, dtype):
    s = s.detach().to(dtype).requires_grad_(True)
    t = t.detach().to(dtype).requires_grad_(True)
    loss = fn(s, t)
    return (loss, *torch.autograd.grad(loss, (s, t)))


def _separate(distance_weight, angle_weight):
    def fn(s, t):
        return distance_weight * functional.rkd_distance(
            s, t
        ) + angle_weight * functional.rkd_angle(s, t)

    return fn


def _gram_gemms(fn, *inputs) -> dict[int, int]:
    """Forward and backward of ``fn(*inputs)`` under the profiler: the number of float64
    GEMMs of the Gram form (N, D) x (D, N), by D (one per Gram matrix formed)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                record_shapes=True) as prof:  # fmt: skip
        fn(*inputs).backward()
    counts: dict[int, int] = {}
    for event in prof.events():
        if event.name != "aten::mm" or len(event.input_shapes) < 2:
            continue
        a, b = event.input_shapes[:2]
        if len(a) == 2 and len(b) == 2 and a[0] == b[1] == N and a[1] == b[0] != N:
            counts[a[1]] = counts.get(a[1], 0) + 1
    return counts


@needs_cpp
def test_gram_formed_once_per_step():
    s, t = _inputs("random")
    s.requires_grad_(True)
    with kdfast.use_backend("cpp"):
        combined = _gram_gemms(RKDLoss(), s, t)
    ops = torch.ops.kdfast
    separate = _gram_gemms(lambda a, b: ops.rkd_distance_cpp(a, b) + ops.rkd_angle_cpp(a, b), s, t)
    # the two ops that save nothing form each side's Gram matrix four times: two terms,
    # forward and backward (this shows that the count sees every one of them)
    assert separate == {DS: 4, DT: 4}
    assert combined == {DS: 1, DT: 1}


@needs_cpp
def test_rkd_distance_reuses_its_gram_in_the_backward():
    s, t = _inputs("random")
    s.requires_grad_(True)
    with kdfast.use_backend("cpp"):
        assert _gram_gemms(functional.rkd_distance, s, t) == {DS: 1, DT: 1}
        with torch.no_grad():  # forward only: the op that saves nothing
            want = torch.ops.kdfast.rkd_distance_cpp(s, t)
            assert rel_error(functional.rkd_distance(s, t), want) == 0
        assert rel_error(functional.rkd_distance(s, t), want) <= 1e-15


@needs_cpp
def test_gram_formed_twice_when_too_large_to_save(monkeypatch):
    monkeypatch.setattr(rkd_loss_op, "SAVE_GRAM_MAX_ROWS", N - 1)
    s, t = _inputs("random")
    s.requires_grad_(True)
    with kdfast.use_backend("cpp"):
        assert _gram_gemms(RKDLoss(), s, t) == {DS: 2, DT: 2}
        assert _gram_gemms(functional.rkd_distance, s, t) == {DS: 2, DT: 2}


@needs_cpp
def test_rkd_loss_takes_the_combined_op_on_cpp():
    s, t = _inputs("random")
    assert _dispatch.select("rkd_angle", s, t)[0] == "cpp"
    assert _dispatch.runnable("rkd_loss", "cpp", s, t, 1.0, 2.0) is rkd_loss_op._cpp
    seen = []

    class Record(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Record():
        RKDLoss()(s, t)
    assert "kdfast.rkd_loss_cpp.default" in seen
    assert not any("rkd_distance" in name or "rkd_angle" in name for name in seen)


@needs_cpp
@pytest.mark.parametrize("kind", ["random", "near_duplicates", "exact_duplicates", "clustered"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("weights", [(1.0, 2.0), (25.0, 50.0)], ids=str)
def test_combined_equals_the_sum_of_the_terms(kind, dtype, weights):
    s, t = _inputs(kind, dtype)
    with kdfast.use_backend("cpp"):
        got = _loss_and_grads(RKDLoss(*weights), s, t, dtype)
        want = _loss_and_grads(_separate(*weights), s, t, dtype)
    assert got[0].dtype == want[0].dtype == dtype
    assert got[1].dtype == got[2].dtype == dtype
    # float64: the same float64 terms, summed in another order; float32: the separate
    # path rounds each term (and each gradient) to float32 before adding
    loss_tol, grad_tol = (1e-12, 1e-10) if dtype == F64 else (1e-6, 1e-5)
    errors = [rel_error(g, w) for g, w in zip(got, want, strict=True)]
    assert errors[0] <= loss_tol, f"loss rel error {errors[0]:.2e}"
    assert max(errors[1:]) <= grad_tol, f"gradient rel errors {errors[1:]}"
    # and within semantics 7 of the float64 reference on the same (rounded) inputs
    with kdfast.use_backend("reference"):
        truth = _loss_and_grads(_separate(*weights), s, t, F64)
    if kind != "exact_duplicates":  # the angle reference keeps F.normalize's 1 / eps there
        tol = (1e-9, 1e-7) if dtype == F64 else (1e-5, 1e-4)
        errors = [rel_error(g, w) for g, w in zip(got, truth, strict=True)]
        assert errors[0] <= tol[0] and max(errors[1:]) <= tol[1], errors


@needs_cpp
@pytest.mark.parametrize("kind", ["random", "clustered"])
def test_gradcheck(kind):
    s, t = _inputs(kind)
    s, t = s[:6].requires_grad_(True), t[:6].requires_grad_(True)
    with kdfast.use_backend("cpp"):
        assert torch.autograd.gradcheck(lambda a, b: functional.rkd_loss(a, b, 1.0, 2.0), (s, t))


@needs_cpp
def test_backward_twice_with_retain_graph_reuses_the_saved_gram():
    s, t = _inputs("near_duplicates")
    s.requires_grad_(True)
    with kdfast.use_backend("cpp"):
        loss = RKDLoss()(s, t)
    (first,) = torch.autograd.grad(loss, s, retain_graph=True)
    (second,) = torch.autograd.grad(loss, s, retain_graph=True)
    (third,) = torch.autograd.grad(3.0 * loss, s)
    assert torch.equal(first, second)
    assert rel_error(third, 3.0 * first) <= 1e-14


@needs_cpp
def test_saves_the_gram_only_when_a_gradient_is_needed():
    s, t = _inputs("random")
    op = torch.ops.kdfast.rkd_loss_cpp
    loss, gram_s, gram_t = op(s, t, 1.0, 2.0, True)
    centred = s - s.mean(0)
    assert rel_error(gram_s, centred @ centred.T) <= 1e-14
    assert gram_t.shape == (N, N)
    loss_unsaved, empty_s, empty_t = op(s, t, 1.0, 2.0, False)
    assert empty_s.numel() == empty_t.numel() == 0
    assert torch.equal(loss, loss_unsaved)
    flags = []

    class Record(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is op.default:
                flags.append(args[4])
            return func(*args, **(kwargs or {}))

    s.requires_grad_(True)
    with kdfast.use_backend("cpp"), Record():
        with torch.no_grad():
            RKDLoss()(s, t)
        RKDLoss()(s.detach(), t)
        RKDLoss()(s, t)
    assert flags == [False, False, True]


@needs_cpp
def test_teacher_gradient_and_zero_weights():
    s, t = _inputs("random")
    with kdfast.use_backend("cpp"):
        for weights in ((1.0, 2.0), (0.0, 2.0), (3.0, 0.0)):
            got = _loss_and_grads(lambda a, b, w=weights: functional.rkd_loss(a, b, *w), s, t, F64)
            want = _loss_and_grads(_separate(*weights), s, t, F64)
            errors = [rel_error(g, w) for g, w in zip(got, want, strict=True)]
            assert max(errors) <= 1e-10, (weights, errors)


def test_rkd_loss_validates_once_with_clear_errors():
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="at least 3"):
        functional.rkd_loss(x, x)
    assert torch.isfinite(functional.rkd_loss(x, x.flip(0), 1.0, 0.0))
    with pytest.raises(ValueError, match="both 0"):
        functional.rkd_loss(x, x, 0.0, 0.0)
    with pytest.raises(ValueError, match="angle_weight"):
        functional.rkd_loss(x, x, 1.0, float("nan"))

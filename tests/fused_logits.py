"""The fused logit-loss kernels (kd_loss, per_sample_kl, dist_loss) against the reference on
every compiled backend that runs here (cpp; triton under TRITON_INTERPRET=1): shared inputs,
options and helpers, and the tests that every one of these ops passes.

The tests below are collected by the op files that import them (tests/ops/test_kd_loss.py,
tests/ops/test_dist_loss.py), each with a ``logit_impl`` fixture over its own
(op, backend) pairs; this module itself is not a test module.

Every option of semantics 2 and 3 against the reference: float64 parity (loss <= 1e-9, student
and teacher gradients <= 1e-7) on random, extreme (80 * N(0, 1)), B = 1, uniform-row and
masked inputs; half and float32 inputs by semantics 7's rule; gradcheck; opcheck; the
compute-grad contract (nothing requested under no_grad or for a detached teacher); double
backward raises; non-contiguous, expanded and (N, C, *) inputs. Kernel-specific tests (read
counts, cache reuse, tiling, in-place (N, C, *) reads, the gradient pool) are in
tests/kernels/test_logit_kernels.py.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch
from conftest import compiled_backends, require_backend
from public_api import public_function
from worked_examples import teacher_as

import kdfast
from kdfast import _dispatch
from kdfast.testing import PARITY_GRAD, PARITY_LOSS, rel_error, tolerance

#: the ops of the fused logit kernels -> their public functions (their contracts')
OPS = {op: public_function(op) for op in ("kd_loss", "per_sample_kl", "dist_loss")}


#: float64 first, then the half and single precisions of semantics 7
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
#: Triton runs interpreted here: keep shapes tiny there.
SMALL = os.environ.get("TRITON_INTERPRET") == "1"


def compiled_pairs(ops) -> list[tuple[str, str]]:
    """(op, backend) of every compiled backend that runs each of ``ops`` on CPU here."""
    return [
        (op, b) for op in ops for b in compiled_backends("cpu") if b in _dispatch._IMPLS.get(op, {})
    ]


def inputs(dtype: torch.dtype, rows: int = 12, cols: int = 37) -> dict:
    """Named (student, teacher, mask-or-None) logit cases."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    s, t = randn(rows, cols), randn(rows, cols)
    uniform_s, uniform_t = s.clone(), t.clone()
    uniform_s[1] = 0.5
    uniform_t[2] = -3.0
    uniform_t[1] = 7.0
    keep = torch.ones(rows, dtype=torch.bool)
    keep[::3] = False
    cases = {
        "random": (s, 2 * t, None),
        "extreme": (80 * s, 80 * t, None),
        "b1": (s[:1], t[:1], None),
        "uniform_rows": (uniform_s, uniform_t, None),
        "masked": (s, t, keep),
        "wide": (randn(3, 700 if not SMALL else 130), randn(3, 700 if not SMALL else 130), None),
    }
    return {k: (a.to(dtype), b.to(dtype), m) for k, (a, b, m) in cases.items()}


#: op -> list of option dicts (everything but the inputs and the mask)
OPTIONS = {
    "kd_loss": [
        dict(temperature=temperature, reduction=reduction, teacher_kind=teacher)
        for temperature in (1.0, 4.0)
        for reduction in ("batchmean", "sum", "mean", "none")
        for teacher in ("logits", "probs", "log_probs")
    ],
    "per_sample_kl": [dict(temperature=1.0), dict(temperature=3.0)],
    "dist_loss": [
        dict(),
        dict(temperature=4.0),
        dict(temperature=4.0, temperature_squared=False),
        dict(activation="sigmoid", temperature=2.0),
        dict(beta=0.5, gamma=2.0),
        dict(beta=1.0, gamma=0.0),
    ],
}


def call(op, backend, s, t, mask, options, grad_teacher=True, unit=False, as_given=False):
    """(loss, gradients) of sum(loss * w): w from 0.5 to 1.5 (0.5 for a scalar loss) so the
    backward's scaling is exercised, or 1 (``unit``: the plain gradient of the loss). KD's
    teacher logits t are turned into options["teacher_kind"] unless ``as_given``."""
    options = dict(options)
    if op == "kd_loss" and not as_given:
        t = teacher_as(t, options["teacher_kind"], options["temperature"])
    if mask is not None:
        if op == "per_sample_kl":
            return None
        options["mask"] = mask
    s = s.detach().clone().requires_grad_(True)
    t = t.detach().clone().requires_grad_(grad_teacher)
    with kdfast.use_backend(backend):
        loss = OPS[op](s, t, **options)
    weights = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    if unit:
        weights = torch.ones_like(weights)
    wrt = (s, t) if grad_teacher else (s,)
    grads = torch.autograd.grad((loss * weights).sum(), wrt)
    return loss.detach(), grads


def op_args(op, s, t, mask, need_s, need_t):
    """Positional arguments of the custom op behind ``op``."""
    if op == "kd_loss":
        return (s, t, 2.0, 4.0, "batchmean", mask, "logits", need_s, need_t)
    if op == "per_sample_kl":
        return (s, t, 1.0, 1.0, "none", None, "logits", need_s, need_t)
    return (s, t, 1.0, 1.0, 2.0, True, "softmax", mask, need_s, need_t)


class Spy:
    """Wraps a custom op, recording the compute-grad flags and the gradient sizes."""

    def __init__(self, op):
        self.op, self.calls = op, []

    def __call__(self, *args):
        out = self.op(*args)
        self.calls.append((args[-2], args[-1], out[1].numel(), out[2].numel()))
        return out


def identical_row_cases(dtype: torch.dtype) -> dict:
    """Named (student, teacher, mask-or-None) cases in which one logit row repeats over the
    batch (expanded: row stride 0; or stored in every row), so that every class column of
    that side is constant."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    s, t, row = randn(12, 37), 2 * randn(12, 37), 2 * randn(1, 37)
    keep = torch.ones(12, dtype=torch.bool)
    keep[::3] = False
    # several 16-row tiles of the CPU kernel's pass 1, and blocks of tiles on 2 threads
    rows, cols = (40, 9) if SMALL else (2048, 70)
    return {
        "expanded_teacher": (s, row.expand(12, -1), None),
        "repeated_teacher": (s, row.repeat(12, 1), None),
        "expanded_student": (row.expand(12, -1), t, None),
        "both_expanded": (row.expand(12, -1), (2 * randn(1, 37)).expand(12, -1), None),
        "transposed_student": (randn(37, 12).t(), row.expand(12, -1), None),
        "masked": (s, row.expand(12, -1), keep),
        "nc_star": (randn(3, 37, 5), (2 * randn(1, 37, 1)).expand(3, -1, 5), None),
        "many_rows": (randn(rows, cols), (2 * randn(1, cols)).expand(rows, -1), None),
    }


def grads_as_given(op, backend, s, t, options):
    """(loss, student gradient of loss.sum()) with the inputs' strides kept (``_call``
    clones them, and a clone of an expanded tensor is contiguous)."""
    s = s.detach().requires_grad_(True)
    with kdfast.use_backend(backend):
        loss = OPS[op](s, t.detach(), **options)
    return loss.detach(), torch.autograd.grad(loss.sum(), s)[0]


def triton_only(ops):
    return [op for op, b in compiled_pairs(ops) if b == "triton"]


def tiny_tiles(monkeypatch, resident: bool) -> None:
    """Tiny Triton tiles: many column blocks per row (not resident), several row tiles per
    DIST stats program and several programs. resident: DIST holds whole rows (C <= 64)."""
    import kdfast.triton.dist_loss as tdist
    import kdfast.triton.kd_loss as tkd

    monkeypatch.setattr(tkd, "TILE", {4: 16, 8: 16})
    monkeypatch.setattr(tdist, "STATS_TILE", {4: 16, 8: 16})
    monkeypatch.setattr(tdist, "GRAD_TILE", {4: 16, 8: 16})
    monkeypatch.setattr(tdist, "RESIDENT_TILE", {4: 64, 8: 64} if resident else {4: 0, 8: 0})
    monkeypatch.setattr(tdist, "n_programs", lambda *args: 3)


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --- tests shared by the op files (fixture ``logit_impl``: (op, backend)) --------------------


def test_float64_parity(logit_impl):
    op, backend = logit_impl
    require_backend(backend)
    for name, (s, t, mask) in inputs(torch.float64).items():
        for options in OPTIONS[op]:
            got = call(op, backend, s, t, mask, options)
            if got is None:
                continue
            want = call(op, "reference", s, t, mask, options)
            assert got[0].dtype == torch.float64
            where = (name, options)
            assert rel_error(got[0], want[0]) <= PARITY_LOSS, (where, rel_error(got[0], want[0]))
            for g, w in zip(got[1], want[1], strict=True):
                assert rel_error(g, w) <= PARITY_GRAD, (where, rel_error(g, w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_against_float64_truth(logit_impl, dtype):
    """semantics 7: the loss and its gradient (unit upstream gradient) within max(1e-5, 2x
    PyTorch's own error in that dtype) of the float64 truth; gradients also allow their
    final rounding to ``dtype``. With another upstream gradient w, the backward returns the
    saved ``dtype`` gradient times w, rounded once more to ``dtype`` (checked exactly: for
    gradients in half's subnormal range, as DIST's of extreme logits, that second rounding
    is what separates the result from the truth rounded once)."""
    op, backend = logit_impl
    require_backend(backend)
    for name, (s, t, mask) in inputs(dtype).items():
        for options in OPTIONS[op][:: 3 if op == "kd_loss" else 1]:
            if op == "kd_loss" and options["teacher_kind"] == "probs" and dtype != torch.float32:
                continue  # half probabilities underflow to 0: log 0 in the teacher gradient
            got = call(op, backend, s, t, mask, options, grad_teacher=False, unit=True)
            if got is None:
                continue
            torch_own = call(op, "reference", s, t, mask, options, False, unit=True)
            truth = call(op, "reference", s.double(), t.double(), mask, options, False, True)
            assert got[0].dtype == torch.float32 and got[1][0].dtype == dtype
            loss_tol = tolerance(dtype, "loss", rel_error(torch_own[0], truth[0]))
            assert rel_error(got[0], truth[0]) <= loss_tol, (name, options)
            own_error = rel_error(torch_own[1][0], truth[1][0])
            grad_tol = tolerance(dtype, "grad", own_error, rounded=True)
            assert rel_error(got[1][0], truth[1][0]) <= grad_tol, (name, options)
            scaled = call(op, backend, s, t, mask, options, grad_teacher=False)
            weights = torch.linspace(0.5, 1.5, got[0].numel(), dtype=got[0].dtype)
            if got[0].dim() == 1:
                weights = weights.reshape(-1, *[1] * (s.dim() - 1))
            want = (got[1][0] * weights.reshape(weights.shape or ())).to(dtype)
            torch.testing.assert_close(scaled[1][0], want, rtol=0, atol=0)


def test_gradcheck(logit_impl):
    op, backend = logit_impl
    require_backend(backend)
    s, t, mask = inputs(torch.float64, 4, 5)["masked"]
    fn = OPS[op]
    # interpreted Triton is slow: every teacher kind and reduction still appear (stride 5),
    # and gradcheck's fast mode checks a random projection of the Jacobian
    fast = SMALL and backend == "triton"
    for options in OPTIONS[op][:: (5 if fast else 2) if op == "kd_loss" else 1]:
        options = dict(options)
        if op == "kd_loss":
            t_in = teacher_as(t, options["teacher_kind"], options["temperature"])
            options["mask"] = mask
        elif op == "dist_loss":
            t_in, options["mask"] = t, mask
        else:
            t_in = t
        a = s.clone().requires_grad_(True)
        b = t_in.clone().requires_grad_(True)
        with kdfast.use_backend(backend):
            check = functools.partial(torch.autograd.gradcheck, fast_mode=fast)
            assert check(lambda x, y, o=options: fn(x, y, **o), (a, b))
            t_fixed = b.detach()
            assert check(lambda x, o=options, y=t_fixed: fn(x, y, **o), (a,))


def test_opcheck(logit_impl):
    op, backend = logit_impl
    require_backend(backend)
    custom_op = _dispatch._IMPLS[op][backend].fn.op
    s, t, mask = inputs(torch.float64, 6, 7)["masked"]
    for dtype in (torch.float64, torch.float32):
        for need_s, need_t, m in ((False, False, None), (True, False, mask), (True, True, None)):
            a = s.to(dtype).clone().requires_grad_(need_s)
            b = t.to(dtype).clone().requires_grad_(need_t)
            args = op_args(op, a, b, m, need_s, need_t)
            torch.library.opcheck(custom_op, args)
    if op == "kd_loss":
        for reduction in ("none", "mean", "sum"):
            a = s.clone().requires_grad_(True)
            args = (a, t, 1.0, 1.0, reduction, mask, "log_probs", True, False)
            torch.library.opcheck(custom_op, args)
    if op == "dist_loss":
        a = s.clone().requires_grad_(True)
        args = (a, t, 1.0, 1.0, 2.0, False, "sigmoid", None, True, False)
        torch.library.opcheck(custom_op, args)


def test_gradient_only_when_requested(logit_impl, monkeypatch):
    op, backend = logit_impl
    require_backend(backend)
    impl = _dispatch._IMPLS[op][backend]
    spy = Spy(impl.fn.op)
    if op == "dist_loss":
        from kdfast.ops.dist_loss import make_impl

        wrapped = make_impl(spy)
    else:
        from kdfast.ops.kd_loss import make_impls

        wrapped = make_impls(spy)[0 if op == "kd_loss" else 1]
    monkeypatch.setitem(_dispatch._IMPLS[op], backend, impl.__class__(wrapped, impl.devices))
    s, t, _ = inputs(torch.float32)["random"]
    s.requires_grad_(True)
    with kdfast.use_backend(backend):
        with torch.no_grad():
            OPS[op](s, t)
        OPS[op](s, t)  # detached teacher
        OPS[op](s.detach(), t)
        OPS[op](s, t.requires_grad_(True)).sum().backward()
    assert spy.calls == [
        (False, False, 0, 0),
        (True, False, s.numel(), 0),
        (False, False, 0, 0),
        (True, True, s.numel(), t.numel()),
    ]


def test_double_backward_raises(logit_impl):
    op, backend = logit_impl
    require_backend(backend)
    s, t, _ = inputs(torch.float64)["random"]
    s = s.clone().requires_grad_(True)
    with kdfast.use_backend(backend):
        (grad,) = torch.autograd.grad(OPS[op](s, t).sum(), s, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad.sum().backward()


def test_strided_expanded_and_nc_star_inputs(logit_impl):
    op, backend = logit_impl
    require_backend(backend)
    s, t, _ = inputs(torch.float64)["random"]
    cases = [
        (s.t().contiguous().t(), t[:, :].repeat(1, 2)[:, ::2]),  # column stride 2
        (s, t[:1].expand_as(t)),  # expanded teacher rows (row stride 0)
        (s.reshape(3, 4, 37).transpose(1, 2), t.reshape(3, 4, 37).transpose(1, 2)),  # (N, C, H)
    ]
    for a, b in cases:
        a = a.detach().requires_grad_(True)
        with kdfast.use_backend(backend):
            got = OPS[op](a, b)
        (g,) = torch.autograd.grad(got.sum(), a)
        a2 = a.detach().contiguous().requires_grad_(True)
        with kdfast.use_backend("reference"):
            want = OPS[op](a2, b.contiguous())
        (w,) = torch.autograd.grad(want.sum(), a2)
        assert rel_error(got, want) <= PARITY_LOSS and rel_error(g, w) <= PARITY_GRAD


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_identical_rows_against_float64_truth(logit_impl, dtype, request):
    """A constant class column (one row repeated over the batch) centres to the zero vector,
    so its DIST intra-class Pearson denominator is eps = 1e-8 and any rounding in its column
    mean reaches the student gradient times 1e8 (the reference's centring backward projects
    that constant out; a fused kernel must get the mean exact). Loss and student gradient
    against the float64 truth, inputs with their strides as given, semantics 7 tolerances as in
    test_low_precision_against_float64_truth. (Not the teacher gradient: a constant teacher
    column's is its student column / eps, and even the float64 reference's is off by the
    rounding of torch's column mean times 1e8.)"""
    op, backend = logit_impl
    if op == "dist_loss" and backend == "triton" and dtype != torch.float64:
        # a known failure: Triton's DIST stats kernel still takes a constant column's mean
        # with rounding (the cpp kernel's tile shift, not ported yet)
        reason = "Triton DIST: constant columns' means not exact"
        request.applymarker(pytest.mark.xfail(strict=True, reason=reason))
    require_backend(backend)
    low = dtype != torch.float64
    for name, (s, t, mask) in identical_row_cases(dtype).items():
        if name == "expanded_student" and dtype == torch.float16:
            continue  # its gradient, the teacher column / eps, exceeds half's range
        for options in OPTIONS[op]:
            if options.get("teacher_kind", "logits") != "logits":
                continue  # probabilities computed from the teacher are new, contiguous tensors
            if options.get("temperature") == 1.0:
                continue  # KD: the other temperature stands for both (time)
            if mask is not None:
                if op == "per_sample_kl":
                    continue
                options = {**options, "mask": mask}
            got = grads_as_given(op, backend, s, t, options)
            truth = grads_as_given(op, "reference", s.double(), t.double(), options)
            loss_tol, grad_tol = tolerance(dtype, "loss"), tolerance(dtype, "grad")
            if low:
                own = grads_as_given(op, "reference", s, t, options)
                loss_tol = tolerance(dtype, "loss", rel_error(own[0], truth[0]))
                grad_tol = tolerance(dtype, "grad", rel_error(own[1], truth[1]), rounded=True)
            where = (name, options)
            assert rel_error(got[0], truth[0]) <= loss_tol, (where, rel_error(got[0], truth[0]))
            assert rel_error(got[1], truth[1]) <= grad_tol, (where, rel_error(got[1], truth[1]))


def test_nc_star_gradcheck_and_opcheck(logit_impl):
    op, backend = logit_impl
    require_backend(backend)
    g = torch.Generator().manual_seed(4)
    s = torch.randn(2, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([True, False, True, True, True, False])
    option = {} if op == "per_sample_kl" else {"mask": mask}
    with kdfast.use_backend(backend):
        assert torch.autograd.gradcheck(lambda x, y: OPS[op](x, y, **option), (s, t))
    custom_op = _dispatch._IMPLS[op][backend].fn.op
    if _dispatch._IMPLS[op][backend].fn.layout != "rows":
        torch.library.opcheck(custom_op, op_args(op, s, t, option.get("mask"), True, True))
        if op == "kd_loss":
            args = (s, t.detach(), 1.0, 1.0, "none", mask, "logits", True, False)
            torch.library.opcheck(custom_op, args)


def test_mixed_dtypes_and_all_masked(logit_impl):
    op, backend = logit_impl
    if op == "per_sample_kl":
        pytest.skip("per_sample_kl takes no mask")
    require_backend(backend)
    s, t, _ = inputs(torch.float32)["random"]
    with kdfast.use_backend(backend):
        got = OPS[op](s.half(), t)
        none = torch.zeros(s.shape[0], dtype=torch.bool)
        assert torch.isnan(OPS[op](s, t, mask=none))
    with kdfast.use_backend("reference"):
        want = OPS[op](s.half(), t)
    assert got.dtype == torch.float32 and rel_error(got, want) <= tolerance(torch.float32)

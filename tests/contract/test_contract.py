"""The contract suite: every registered implementation x device x dtype x declared sample.

Each op declares its samples next to its registration (``kdfast/ops/<op>.py``, see
:mod:`kdfast.ops._samples`); this module needs no edit when an op is added. Devices: cpu
always; cuda whenever ``torch.cuda.is_available()``; Triton on CPU tensors under
``TRITON_INTERPRET=1``. For each implementation it checks

* float64 parity with the reference (loss 1e-9, gradients 1e-7, docs/semantics.md 7);
* half and float32 against the float64 truth on the same rounded inputs, with the one
  tolerance table (:func:`kdfast.testing.tolerance`);
* float64 gradcheck on the samples tagged "small";
* opcheck of every kdfast custom op the implementation calls, forward and backward;
* NaN propagation (a NaN input gives a NaN output wherever the reference's does);
* clear errors for the op's declared bad inputs.

Test ids read ``<op>-<device>-<backend>-<dtype>-<sample>``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import compiled_backends, contract_implementations, require_backend
from torch.utils._python_dispatch import TorchDispatchMode

import kdfast
from kdfast import _dispatch
from kdfast.ops._samples import CONTRACTS, DTYPES, build
from kdfast.testing import PARITY_GRAD, rel_error, tolerance

DTYPE_NAMES = {torch.float64: "float64", torch.float32: "float32", torch.bfloat16: "bfloat16",
               torch.float16: "float16"}  # fmt: skip
IMPLS = contract_implementations()


def _wanted(sample, dtype) -> bool:
    if dtype == torch.float64:
        return True
    if "float64_only" in sample.tags:
        return False
    return not ("float32_and_up" in sample.tags and dtype in (torch.float16, torch.bfloat16))


def _cases():
    for op, device, backend in IMPLS:
        for dtype in DTYPES:
            for sample in CONTRACTS[op].samples:
                if backend == "reference" or not _wanted(sample, dtype):
                    continue
                key = f"{backend}/{DTYPE_NAMES[dtype]}"
                gap = dict(sample.gaps).get(key) or dict(sample.gaps).get(f"{key}/{device}")
                yield pytest.param(
                    op, device, backend, dtype, sample,
                    id=f"{op}-{device}-{backend}-{DTYPE_NAMES[dtype]}-{sample.name}",
                    marks=[pytest.mark.xfail(strict=True, reason=gap)] if gap else [],
                )  # fmt: skip


def _run(op, backend, device, dtype, sample, grad=True):
    """(outputs, gradients of the declared grad_args) of the public function on
    ``backend``; the cotangent is 1 for a scalar output, else a fixed pattern in [0.5, 1.5]."""
    contract = CONTRACTS[op]
    args, kwargs = build(sample, device, dtype)
    args = list(args)
    inputs = []
    for i in contract.grad_args:
        if grad:
            args[i] = args[i].detach().requires_grad_(True)
        inputs.append(args[i])
    try:
        with kdfast.use_backend(backend):
            out = contract.function()(*args, **kwargs)
    except RuntimeError as exc:
        if "was forced but cannot run" in str(exc):
            pytest.skip(f"{backend} declares it cannot run this case: {exc}")
        raise
    outputs = out if isinstance(out, tuple) else (out,)
    if not grad:
        return outputs, ()
    total = 0
    for o in outputs:
        if o.dim() == 0:
            total = total + o
        else:
            w = torch.linspace(0.5, 1.5, o.numel(), dtype=torch.float64, device=o.device)
            total = total + (o * w.reshape(o.shape).to(o.dtype)).sum()
    grads = torch.autograd.grad(total, inputs)
    return outputs, grads


def _has_duplicate_rows(op, sample, dtype) -> bool:
    """Rounding to ``dtype`` can make RKD feature rows exactly equal (e.g. 1000 - x in
    bfloat16), where the kernels deliberately differ from the reference (semantics 1.5)."""
    if not op.startswith("rkd"):
        return False
    args, _ = build(sample, "cpu", dtype)
    return any(
        a.dim() == 2 and torch.unique(a.double(), dim=0).shape[0] < a.shape[0]
        for a in args
        if isinstance(a, torch.Tensor)
    )


@pytest.mark.parametrize("op,device,backend,dtype,sample", list(_cases()))
def test_parity(op, device, backend, dtype, sample):
    """float64: parity with the reference; lower precision: the float64 truth on the same
    rounded inputs, within max(table, 2x the reference's own error in that dtype)."""
    got, got_grads = _run(op, backend, device, dtype, sample)
    truth, truth_grads = _run(op, "reference", device, torch.float64, _rounded(sample, dtype))
    if dtype == torch.float64:
        own, own_grads = truth, truth_grads
    else:
        own, own_grads = _run(op, "reference", device, dtype, sample)
    for g, t, o in zip(got, truth, own, strict=True):
        assert g.dtype == o.dtype, f"output dtype {g.dtype}, reference {o.dtype}"
        tol = tolerance(dtype, "loss", rel_error(o, t))
        assert rel_error(g, t) <= tol, f"output: {rel_error(g, t):.3e} > {tol:.1e}"
    finite_only = "exact_duplicates" in sample.tags or _has_duplicate_rows(op, sample, dtype)
    for i, (g, t, o) in enumerate(zip(got_grads, truth_grads, own_grads, strict=True)):
        assert g.dtype == o.dtype and g.shape == o.shape, f"gradient {i}: {g.dtype} {g.shape}"
        first_only = "low_precision_first_grad_only" in sample.tags and dtype != torch.float64
        if finite_only or (first_only and i > 0):
            assert torch.isfinite(g).all(), f"gradient {i} is not finite"
            continue
        # rounded: below float64 the gradient's final rounding to dtype is allowed too
        tol = tolerance(dtype, "grad", rel_error(o, t), rounded=True)
        assert rel_error(g, t) <= tol, f"gradient {i}: {rel_error(g, t):.3e} > {tol:.1e}"


def _rounded(sample, dtype):
    """``sample`` whose float64 inputs are first rounded to ``dtype`` (the truth's inputs)."""
    import dataclasses

    def make(gen):
        args, kwargs = sample.make(gen)
        rnd = [a.to(dtype).double() if _floating(a) else a for a in args]
        return tuple(rnd), {
            k: v.to(dtype).double() if _floating(v) else v for k, v in kwargs.items()
        }

    return dataclasses.replace(sample, make=make)


def _floating(x) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()


def _small_cases():
    for op, device, backend in IMPLS:
        for sample in CONTRACTS[op].samples:
            if "small" in sample.tags:
                yield pytest.param(op, device, backend, sample,
                                   id=f"{op}-{device}-{backend}-{sample.name}")  # fmt: skip


@pytest.mark.parametrize("op,device,backend,sample", list(_small_cases()))
def test_gradcheck(op, device, backend, sample):
    contract = CONTRACTS[op]
    args, kwargs = build(sample, device, torch.float64)
    fn = contract.function()

    def call(*inputs):
        full = list(args)
        for i, x in zip(contract.grad_args, inputs, strict=True):
            full[i] = x
        return fn(*full, **kwargs)

    inputs = tuple(args[i].detach().requires_grad_(True) for i in contract.grad_args)
    fast = backend == "triton" and device == "cpu"  # the interpreter is slow
    with kdfast.use_backend(backend):
        try:
            call(*inputs)
        except RuntimeError as exc:
            if "was forced but cannot run" not in str(exc):
                raise
            pytest.skip(f"{backend} declares it cannot run this case: {exc}")
        assert torch.autograd.gradcheck(call, inputs, fast_mode=fast)


class _RecordKdfastOps(TorchDispatchMode):
    """Records every kdfast custom op called below autograd, with its arguments."""

    def __init__(self):
        super().__init__()
        self.calls = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "kdfast":
            self.calls.setdefault(func.name(), (func, args, kwargs))
        return func(*args, **kwargs)


def _impl_cases():
    for op, device, backend in IMPLS:
        yield pytest.param(op, device, backend, id=f"{op}-{device}-{backend}")


@pytest.mark.parametrize("op,device,backend", list(_impl_cases()))
def test_opcheck(op, device, backend):
    """opcheck of every kdfast custom op that the implementation calls, in float64 and
    float32: forward ops with inputs that require grad (their autograd registration is
    checked too), backward ops (once-differentiable by design) with detached inputs."""
    sample = CONTRACTS[op].samples[0]
    forward, backward = _RecordKdfastOps(), _RecordKdfastOps()
    for dtype in (torch.float64, torch.float32):
        args, kwargs = build(sample, device, dtype)
        args = [a.requires_grad_(True) if i in CONTRACTS[op].grad_args else a
                for i, a in enumerate(args)]  # fmt: skip
        with kdfast.use_backend(backend):
            with forward:
                out = CONTRACTS[op].function()(*args, **kwargs)
            outputs = out if isinstance(out, tuple) else (out,)
            with backward:
                sum(o.sum() for o in outputs).backward()
    if not forward.calls:
        assert backend == "reference", f"{op} on {backend} called no kdfast custom op"
        pytest.skip(f"the reference {op} is plain PyTorch: no custom op to check")
    for func, args, kwargs in forward.calls.values():
        torch.library.opcheck(func, args, kwargs)
    for name, (func, args, kwargs) in backward.calls.items():
        if name not in forward.calls:
            torch.library.opcheck(func, *_detached((args, kwargs)))


def _detached(value):
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(_detached(v) for v in value)
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value


@pytest.mark.parametrize("op,device,backend", list(_impl_cases()))
def test_nan_propagates(op, device, backend):
    """A NaN in the first input gives NaN outputs exactly where the reference's are NaN."""
    contract = CONTRACTS[op]
    sample = contract.samples[0]
    args, kwargs = build(sample, device, torch.float32)
    args = list(args)
    args[0] = args[0].clone()
    args[0].view(-1)[1] = float("nan")
    fn = contract.function()
    with kdfast.use_backend("reference"):
        want = fn(*args, **kwargs)
    with kdfast.use_backend(backend):
        got = fn(*args, **kwargs)
    want = want if isinstance(want, tuple) else (want,)
    got = got if isinstance(got, tuple) else (got,)
    assert any(w.isnan().any() for w in want), "the reference ignores the NaN: a useless case"
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g.isnan(), w.isnan())


@pytest.mark.parametrize("op,device,backend", list(_impl_cases()))
def test_second_derivative_is_right_or_refused(op, device, backend):
    """Differentiating a gradient either matches the reference's second derivative or raises
    the clear once-differentiable error (never a silently wrong value)."""
    contract = CONTRACTS[op]
    sample = next((s for s in contract.samples if "small" in s.tags), contract.samples[0])

    def hvp(name):
        args, kwargs = build(sample, device, torch.float64)
        args = list(args)
        x = args[contract.grad_args[0]] = args[contract.grad_args[0]].requires_grad_(True)
        with kdfast.use_backend(name):
            out = contract.function()(*args, **kwargs)
            outputs = out if isinstance(out, tuple) else (out,)
            (grad,) = torch.autograd.grad(sum(o.sum() for o in outputs), x, create_graph=True)
            (second,) = torch.autograd.grad((grad * grad).sum(), x)
        return second

    if backend == "reference":
        pytest.skip("the reference is the oracle of second derivatives")
    try:
        got = hvp(backend)
    except RuntimeError as exc:
        assert "double backward" in str(exc), exc
        return
    want = hvp("reference")
    if not torch.isfinite(want).all():
        pytest.skip(f"the reference's second derivative of {sample.name} is not finite")
    assert rel_error(got, want) <= PARITY_GRAD


def _bad_cases():
    for op, device, backend in IMPLS:
        for bad in CONTRACTS[op].bad_inputs:
            yield pytest.param(op, device, backend, bad, id=f"{op}-{device}-{backend}-{bad.name}")


@pytest.mark.parametrize("op,device,backend,bad", list(_bad_cases()))
def test_bad_input_raises_clearly(op, device, backend, bad):
    args, kwargs = bad.make()
    args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    with kdfast.use_backend(backend), pytest.raises(bad.error, match=bad.match):
        CONTRACTS[op].function()(*args, **kwargs)


def test_every_op_declares_a_contract():
    """An op without samples would go untested by this suite."""
    assert set(_dispatch.ops()) == set(CONTRACTS)


def test_every_compiled_backend_that_must_run_is_loaded():
    """Compiled implementations register only when their backend loads: a build that failed
    to load must fail here rather than shrink the suite."""
    for backend in compiled_backends("cpu"):
        require_backend(backend)

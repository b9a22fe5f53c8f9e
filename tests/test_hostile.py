"""Hostile inputs, over every public loss and every backend that runs it.

* NaN and +-Inf anywhere in either input reach the loss (semantics 0: never silently masked);
* empty batches, N below the minimum, mismatched batch sizes, rank < 2, integer / complex /
  bool dtypes and tensors on different devices raise ValueError / TypeError naming the
  argument;
* non-contiguous, transposed, expanded (stride 0) and channels-last inputs give the results
  (loss and gradients) of contiguous copies.
"""

from __future__ import annotations

import pytest
import torch
from conftest import require_backend
from public_api import NON_PAIR_OPS, OP_BACKENDS, PAIR_OPS, PUBLIC_OPS

import kdfast
from kdfast import _dispatch
from kdfast.testing import rel_error

N, C = 6, 5


def _pair(dtype=torch.float64, n=N, c=C, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, c, generator=g, dtype=dtype),
        torch.randn(n, c, generator=g, dtype=dtype),
    )


def _run(op: str, backend: str, s, t):
    require_backend(backend) if backend != "reference" else None
    with kdfast.use_backend(backend):
        return PUBLIC_OPS[op].call(s, t)


def test_every_pair_op_is_listed():
    """A new pair op (its contract's public function in kdfast.functional) must be added to
    tests/public_api.py's PUBLIC_OPS so these tests cover it; every dispatcher op declares a
    contract."""
    assert sorted(PUBLIC_OPS) == PAIR_OPS, "PUBLIC_OPS and the declared pair ops differ"
    for op in _dispatch.ops():
        assert op in PAIR_OPS or op in NON_PAIR_OPS, f"{op} declares no contract"


# ----------------------------------------------------------------------------- NaN / Inf


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("side", ["student", "teacher"])
@pytest.mark.parametrize("op,backend", OP_BACKENDS)
def test_non_finite_inputs_propagate(op, backend, side, value):
    s, t = _pair()
    (s if side == "student" else t)[2, 1] = value
    loss = _run(op, backend, s, t)
    if op == "dist_loss" and value == float("-inf"):
        # A -inf logit is a legitimate softmax input (probability exactly 0, what masked
        # classes use): DIST is then finite and equals its limit, not NaN.
        (s if side == "student" else t)[2, 1] = -1e4
        assert rel_error(loss, _run(op, backend, s, t)) <= 1e-12
        return
    assert not torch.isfinite(loss), f"{op}/{backend}: {side} {value} gave finite {loss}"


@pytest.mark.parametrize("op,backend", OP_BACKENDS)
def test_non_finite_gradient_propagates(op, backend):
    s, t = _pair()
    s[2, 1] = float("nan")
    s.requires_grad_(True)
    loss = _run(op, backend, s, t)
    (grad,) = torch.autograd.grad(loss, s)
    assert torch.isnan(grad).any(), f"{op}/{backend}: NaN input gave a NaN-free gradient"


@pytest.mark.parametrize("module", ["RKDLoss", "RKDDistanceLoss", "RKDAngleLoss", "DISTLoss"])
def test_loss_modules_propagate_nan(module):
    s, t = _pair()
    t[0, 0] = float("nan")
    assert torch.isnan(getattr(kdfast.losses, module)()(s, t))


def test_kd_module_and_linalg_propagate_nan():
    s, t = _pair()
    s[1, 1] = float("nan")
    assert torch.isnan(kdfast.losses.KDLoss(4.0)(s, t))
    a = torch.zeros(3, 3, dtype=torch.float64)
    a[0, 1] = float("inf")
    assert not torch.isfinite(kdfast.linalg.expm(a)).all()
    e = torch.zeros_like(a)
    e[2, 2] = float("nan")
    assert torch.isnan(kdfast.linalg.expm_frechet(torch.zeros_like(a), e)[1]).any()


# ---------------------------------------------------------------------- errors, by argument


def _bad_pairs(op: str):
    """(description, student, teacher, exception, message regex) that must be rejected."""
    spec = PUBLIC_OPS[op]
    s, t = _pair()
    n_min = spec.min_rows
    yield "empty batch", s[:0], t[:0], ValueError, r"student.*\(0, 5\)|\(0, 5\)"
    if n_min > 1:
        yield "N below minimum", s[: n_min - 1], t[: n_min - 1], ValueError, rf"at least {n_min}"
    yield "batch sizes differ", s, t[:-1], ValueError, r"\(6, 5\).*\(5, 5\)"
    yield "student rank 1", s[0], t, ValueError, r"student.*\(5,\)"
    yield "teacher rank 0", s, t[0, 0], ValueError, r"teacher.*\(\)"
    for dtype in (torch.int64, torch.int32, torch.bool, torch.complex64):
        yield f"student {dtype}", s.to(dtype), t, TypeError, rf"student.*{dtype}"
        yield f"teacher {dtype}", s, t.to(dtype), TypeError, rf"teacher.*{dtype}"
    yield "teacher on meta", s, t.to("meta"), ValueError, r"teacher.* on meta"
    yield "student on meta", s.to("meta"), t, ValueError, r"student.* on meta"
    yield "not a tensor", s.tolist(), t, TypeError, r"student.*list"
    if spec.same_width:
        yield "widths differ", s, t[:, :-1], ValueError, r"\(6, 5\).*\(6, 4\)"


@pytest.mark.parametrize("op", list(PUBLIC_OPS))
def test_bad_inputs_raise_naming_the_argument(op):
    for what, s, t, exc, pattern in _bad_pairs(op):
        with pytest.raises(exc, match=pattern):
            PUBLIC_OPS[op].call(s, t)
            pytest.fail(f"{op}: {what} was accepted")


def test_logit_mask_errors_name_the_mask():
    s, t = _pair()
    for fn in (kdfast.functional.kd_loss, kdfast.functional.dist_loss):
        with pytest.raises(TypeError, match="mask.*bool"):
            fn(s, t, mask=torch.ones(N))
        with pytest.raises(ValueError, match="mask.*6 entries.*\\(5,\\)"):
            fn(s, t, mask=torch.ones(N - 1, dtype=torch.bool))
        with pytest.raises(ValueError, match="mask.*meta"):
            fn(s, t, mask=torch.ones(N, dtype=torch.bool, device="meta"))


def test_linalg_errors_name_the_argument():
    a = torch.zeros(3, 3)
    with pytest.raises(TypeError, match="A.*torch.int64"):
        kdfast.linalg.expm(a.long())
    with pytest.raises(TypeError, match="A.*complex"):
        kdfast.linalg.expm(a.to(torch.complex64))
    with pytest.raises(ValueError, match="A.*\\(3,\\)"):
        kdfast.linalg.expm(a[0])
    with pytest.raises(ValueError, match="A.*\\(3, 2\\)"):
        kdfast.linalg.expm(a[:, :2])
    with pytest.raises(ValueError, match="E on meta"):
        kdfast.linalg.expm_frechet(a, a.to("meta"))
    with pytest.raises(TypeError, match="E.*torch.bool"):
        kdfast.linalg.expm_frechet(a, a.bool())


def test_module_errors_name_the_argument():
    s, t = _pair()
    with pytest.raises(TypeError, match="teacher.*torch.int64"):
        kdfast.losses.RKDLoss()(s, t.long())
    with pytest.raises(ValueError, match="at least 2"):
        kdfast.losses.RKDLoss(angle_weight=0)(s[:1], t[:1])
    with pytest.raises(ValueError, match="at least 3"):
        kdfast.losses.RKDLoss()(s[:2], t[:2])
    with pytest.raises(ValueError, match="teacher.* on meta"):
        kdfast.losses.DISTLoss()(s, t.to("meta"))
    with pytest.raises(TypeError, match="student_logits.*complex"):
        kdfast.losses.KDLoss()(s.to(torch.complex128), t)


# ------------------------------------------------------------------------------- layouts


def _layouts(op: str, leaf_s: torch.Tensor, leaf_t: torch.Tensor):
    """(name, student view, teacher view) of leaves that need not be contiguous views."""
    spec = PUBLIC_OPS[op]
    n, c = N, C
    yield "sliced", leaf_s[:n, : 2 * c : 2], leaf_t[:n, 1 : 2 * c : 2]
    yield "transposed", leaf_s[:c, :n].t(), leaf_t[:c, :n].t()
    # stride 0 along the features (every column equal) and along the batch (equal rows);
    # the second is a degenerate but valid RKD teacher (all distances at the clamp).
    yield "expanded features", leaf_s[:n, :1].expand(n, c), leaf_t[:n, :1].expand(n, c)
    yield "expanded batch", leaf_s[:n, :c], leaf_t[:1, :c].expand(n, c)
    if op != "vkd_loss":  # VkD takes (B, D) only
        shape = (n, c, 2, 3) if spec.logits else (n, 2, 2, 3)
        cl_s = leaf_s.flatten()[: torch.Size(shape).numel()].view(shape)
        cl_t = leaf_t.flatten()[: torch.Size(shape).numel()].view(shape)
        yield (
            "channels_last",
            cl_s.contiguous(memory_format=torch.channels_last),
            cl_t.contiguous(memory_format=torch.channels_last),
        )


@pytest.mark.parametrize("op,backend", OP_BACKENDS)
def test_layouts_match_contiguous(op, backend):
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float64, torch.float32):
        leaf_s = torch.randn(4 * N, 4 * C, generator=g, dtype=dtype).requires_grad_(True)
        leaf_t = torch.randn(4 * N, 4 * C, generator=g, dtype=dtype).requires_grad_(True)
        for name, s, t in _layouts(op, leaf_s, leaf_t):
            assert not (s.is_contiguous() and t.is_contiguous()), name
            got = _run(op, backend, s, t)
            got_grads = torch.autograd.grad(got, (leaf_s, leaf_t))
            want = _run(op, backend, s.contiguous(), t.contiguous())
            want_grads = torch.autograd.grad(want, (leaf_s, leaf_t))
            tol = 1e-12 if dtype == torch.float64 else 1e-6
            assert rel_error(got, want) <= tol, (name, dtype, rel_error(got, want))
            for a, b in zip(got_grads, want_grads, strict=True):
                assert rel_error(a, b) <= tol, (name, dtype, rel_error(a, b))

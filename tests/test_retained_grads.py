"""Gradients computed in the forward pass, differentiated more than once (retain_graph=True).

The compiled logit ops write their gradients in the forward pass and their backward hands
them out; while the graph is retained every backward call must return its own tensor:
scaling one result in place (gradient clipping, an optimiser) must change neither another
call's result nor what a later backward returns.
"""

from __future__ import annotations

import pytest
import torch
from conftest import NO_EXT

import kdfast
from kdfast import _dispatch
from kdfast import functional as F

OPS = {
    "kd_loss": lambda s, t: F.kd_loss(s, t, temperature=2.0),
    "dist_loss": lambda s, t: F.dist_loss(s, t),
    "jsd_loss": lambda s, t: F.jsd_loss(s, t, beta=0.3),
}

pytestmark = pytest.mark.skipif(NO_EXT, reason="KDFAST_NO_EXT=1: no compiled backend")


def inputs():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(6, 9, generator=g, dtype=torch.float64).requires_grad_()
    t = (2 * torch.randn(6, 9, generator=g, dtype=torch.float64)).requires_grad_()
    return s, t


def compiled_loss(op, s, t):
    assert _dispatch.BACKENDS["cpp"].unavailable is None, _dispatch.BACKENDS["cpp"].unavailable
    with kdfast.use_backend("cpp"):
        return OPS[op](s, t)


def reference_grads(op, s, t):
    with kdfast.use_backend("reference"):
        return torch.autograd.grad(OPS[op](s, t), (s, t))


@pytest.mark.parametrize("op", sorted(OPS))
def test_each_grad_call_returns_its_own_tensor(op):
    s, t = inputs()
    want = reference_grads(op, s, t)
    loss = compiled_loss(op, s, t)
    first = torch.autograd.grad(loss, (s, t), retain_graph=True)
    second = torch.autograd.grad(loss, (s, t), retain_graph=True)
    for a, b in zip(first, second, strict=True):
        assert a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
    first[0].mul_(3.0)  # e.g. clipping one result in place
    first[1].zero_()
    third = torch.autograd.grad(loss, (s, t))  # after in-place changes: no version error
    for a, b in zip(first, third, strict=True):
        assert a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
    for got in (second, third):
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("op", sorted(OPS))
def test_backward_twice_with_in_place_grad_changes_accumulates_correctly(op):
    s, t = inputs()
    want_s, _ = reference_grads(op, s, t)
    loss = compiled_loss(op, s, t)
    loss.backward(retain_graph=True)
    torch.testing.assert_close(s.grad, want_s, rtol=1e-10, atol=1e-12)
    s.grad.mul_(0.5)  # e.g. torch.nn.utils.clip_grad_norm_
    loss.backward()
    torch.testing.assert_close(s.grad, 1.5 * want_s, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("op", sorted(OPS))
def test_a_single_backward_still_hands_out_the_forward_gradient(op):
    """Without retain_graph the gradient written in the forward pass is handed out as it is
    (no multiply, no copy): the memory design that the gradient pool relies on."""
    s, t = inputs()
    loss = compiled_loss(op, s, t)
    written = loss.grad_fn.saved_tensors[0]  # (grad_student, grad_teacher, student, teacher)
    assert written.shape == s.shape
    ptr = written.untyped_storage().data_ptr()
    del written
    loss.backward()
    assert s.grad.untyped_storage().data_ptr() == ptr

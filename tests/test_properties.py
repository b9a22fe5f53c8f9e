"""Property tests (hypothesis) of the docs/semantics.md invariants, over every backend of
each op, and determinism.

Invariants: RKD distance and angle losses are invariant to scaling and translating either
set (semantics 1.2-1.3); DIST with softmax to adding a constant to a row of logits
(semantics 2); KD is
exactly 0 when student equals teacher (semantics 3); expm(A) expm(-A) = I (semantics 6); the VkD
projector is orthogonal (semantics 4); replay-buffer probabilities sum to 1 and FIFO overwriting
keeps the newest ``capacity`` samples without duplicates (semantics 5).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
import torch
from conftest import require_backend
from hypothesis import given, settings
from hypothesis import strategies as st
from public_api import OP_BACKENDS, PUBLIC_OPS

import kdfast
from kdfast import _dispatch
from kdfast.sampling import PrioritizedReplayBuffer
from kdfast.testing import rel_error

PROPERTY = settings(max_examples=20, deadline=None, derandomize=True)


def _backends(op):
    return [b for o, b in OP_BACKENDS if o == op]


def _randn(seed, *shape, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _with(backend, fn, *args):
    if backend != "reference":
        require_backend(backend)
    with kdfast.use_backend(backend):
        return fn(*args)


@PROPERTY
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(3, 9),
    ds=st.integers(1, 6),
    dt=st.integers(1, 6),
    scale_s=st.floats(1e-2, 1e2),
    scale_t=st.floats(1e-2, 1e2),
    shift=st.floats(-50, 50),
)
def test_rkd_scale_and_translation_invariance(seed, n, ds, dt, scale_s, scale_t, shift):
    s, t = _randn(seed, n, ds), _randn(seed + 1, n, dt)
    for op in ("rkd_distance", "rkd_angle"):
        for backend in _backends(op):
            fn = PUBLIC_OPS[op].call
            base = _with(backend, fn, s, t)
            moved = _with(backend, fn, scale_s * s + shift, scale_t * t - 2 * shift)
            # relative to the loss, with an absolute floor: a loss that is zero in exact
            # arithmetic (identical relations) comes out as rounding noise around 1e-32
            assert abs(float(moved - base)) <= 1e-9 * abs(float(base)) + 1e-15, (op, backend)


@PROPERTY
@given(
    seed=st.integers(0, 2**16),
    rows=st.integers(1, 8),
    classes=st.integers(2, 9),
    tau=st.floats(0.5, 8.0),
    magnitude=st.floats(0.0, 30.0),
)
def test_dist_softmax_row_shift_invariance(seed, rows, classes, tau, magnitude):
    zs, zt = _randn(seed, rows, classes), _randn(seed + 1, rows, classes)
    cs, ct = magnitude * _randn(seed + 2, rows, 1), magnitude * _randn(seed + 3, rows, 1)
    for backend in _backends("dist_loss"):
        fn = kdfast.functional.dist_loss
        base = _with(backend, fn, zs, zt, 1.0, 2.0, tau)
        shifted = _with(backend, fn, zs + cs, zt + ct, 1.0, 2.0, tau)
        assert rel_error(shifted, base) <= 1e-10, backend


@PROPERTY
@given(
    seed=st.integers(0, 2**16),
    rows=st.integers(1, 8),
    classes=st.integers(1, 9),
    temperature=st.floats(0.1, 10.0),
    scale=st.floats(0.0, 100.0),
    dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16]),
)
def test_kd_is_zero_for_identical_inputs(seed, rows, classes, temperature, scale, dtype):
    z = (scale * _randn(seed, rows, classes)).to(dtype)
    for backend in _backends("kd_loss"):
        for reduction in ("batchmean", "sum", "mean", "none"):
            loss = _with(backend, kdfast.functional.kd_loss, z, z.clone(), temperature, reduction)
            assert torch.all(loss == 0), (backend, reduction, loss)
    for backend in _backends("per_sample_kl"):
        kl = _with(backend, kdfast.functional.per_sample_kl, z, z.clone(), temperature)
        assert torch.all(kl == 0), backend


@PROPERTY
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(1, 8),
    norm=st.floats(0.0, 4.0),
    skew=st.booleans(),
    dtype=st.sampled_from([torch.float64, torch.float32]),
)
def test_expm_times_expm_of_negative_is_identity(seed, n, norm, skew, dtype):
    a = _randn(seed, n, n)
    a = a - a.T if skew else a
    a = norm * a / max(float(torch.linalg.matrix_norm(a, 2)), 1e-300)
    a = a.to(dtype)
    e, e_neg = kdfast.linalg.expm(a, skew=skew), kdfast.linalg.expm(-a, skew=skew)
    eye = torch.eye(n, dtype=dtype)
    u = torch.finfo(dtype).eps
    bound = (
        50
        * n
        * u
        * float(
            torch.linalg.matrix_norm(e.double(), 2) * torch.linalg.matrix_norm(e_neg.double(), 2)
        )
    )
    assert float((e @ e_neg - eye).abs().max()) <= bound
    assert float((e_neg @ e - eye).abs().max()) <= bound


@PROPERTY
@given(
    seed=st.integers(0, 2**16),
    d_in=st.integers(1, 9),
    d_out=st.integers(1, 9),
    scale=st.floats(0.0, 3.0),
    dtype=st.sampled_from([torch.float64, torch.float32]),
)
def test_projector_is_orthogonal(seed, d_in, d_out, scale, dtype):
    proj = kdfast.nn.OrthogonalProjector(d_in, d_out, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in proj.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=dtype))
    w = proj.weight.detach().double()  # (out, in)
    gram = w.T @ w if d_in <= d_out else w @ w.T
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert float((gram - torch.eye(min(d_in, d_out), dtype=torch.float64)).abs().max()) <= tol


@PROPERTY
@given(
    priorities=st.lists(st.floats(0.0, 1e6), min_size=1, max_size=40),
    alpha=st.floats(0.0, 2.0),
    eps=st.floats(1e-9, 1e-2),
)
def test_replay_probabilities_sum_to_one(priorities, alpha, eps):
    buf = PrioritizedReplayBuffer(capacity=64, alpha=alpha, eps=eps)
    buf.add(torch.zeros(len(priorities), 2), priorities=priorities)
    p = buf.probabilities()
    assert abs(float(p.sum()) - 1.0) <= 1e-12
    assert bool((p > 0).all())  # eps > 0 keeps every sample reachable
    if alpha == 0:
        assert torch.allclose(p, torch.full_like(p, 1 / len(priorities)), rtol=1e-12, atol=0)


@PROPERTY
@given(capacity=st.integers(1, 9), batches=st.lists(st.integers(1, 12), min_size=1, max_size=8))
def test_replay_fifo_overwrite_keeps_newest_without_duplicates(capacity, batches):
    buf = PrioritizedReplayBuffer(capacity=capacity)
    next_id = 0
    for size in batches:
        ids = torch.arange(next_id, next_id + size, dtype=torch.float64)
        buf.add(ids[:, None])
        next_id += size
        stored = buf.samples[:, 0].long().tolist()
        assert len(stored) == len(set(stored)) == min(next_id, capacity)
        assert set(stored) == set(range(max(0, next_id - capacity), next_id))


# --------------------------------------------------------------------------- determinism


def _fingerprint() -> str:
    """SHA-256 of every op's loss and gradients on fixed inputs, on every backend."""
    digest = hashlib.sha256()
    for op, backend in OP_BACKENDS:
        for dtype in (torch.float64, torch.float32, torch.bfloat16):
            s = _randn(11, 33, 17).to(dtype).requires_grad_(True)
            t = _randn(12, 33, 17).to(dtype).requires_grad_(True)
            with kdfast.use_backend(backend):
                loss = PUBLIC_OPS[op].call(s, t)
            grads = torch.autograd.grad(loss, (s, t))
            for x in (loss, *grads):
                digest.update(x.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    a = _randn(13, 3, 12, 12, dtype=torch.float32).requires_grad_(True)
    e = kdfast.linalg.expm(a)
    (ga,) = torch.autograd.grad(e.sum(), a)
    for x in (e, ga):
        digest.update(x.detach().numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("threads", [1, 2])
def test_deterministic_repeated_runs(threads):
    previous_threads = torch.get_num_threads()
    previous_mode = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        assert _fingerprint() == _fingerprint()
    finally:
        torch.use_deterministic_algorithms(previous_mode)
        torch.set_num_threads(previous_threads)


def test_deterministic_across_processes():
    """Two fresh processes with the same thread count produce bitwise-identical results."""
    here = os.path.dirname(__file__)
    code = (
        "import torch; torch.set_num_threads(2); torch.use_deterministic_algorithms(True);"
        "import test_properties as p; print(p._fingerprint())"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([here, *sys.path])}
    runs = [
        subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        ).stdout.split()[-1]
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


def test_nondeterministic_kernels_are_skipped_in_deterministic_mode():
    """A kernel registered nondeterministic=True (atomics) yields to a deterministic one."""
    op = "_test_determinism_op"
    _dispatch.implement(op, "reference", lambda x: "reference")
    _dispatch.implement(op, "cpp", lambda x: "atomic", nondeterministic=True)
    try:
        x = torch.zeros(1)
        expected = "atomic" if _dispatch.BACKENDS["cpp"].unavailable is None else "reference"
        assert _dispatch.call(op, x) == expected
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            assert _dispatch.call(op, x) == "reference"
            if expected == "atomic":
                with kdfast.use_backend("cpp"), pytest.raises(RuntimeError, match="atomics"):
                    _dispatch.call(op, x)
        finally:
            torch.use_deterministic_algorithms(previous)
    finally:
        del _dispatch._IMPLS[op]

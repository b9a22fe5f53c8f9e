"""RKD distance and angle kernels: worked examples, clustered-input accuracy, duplicates, NaN
and vertex ranges, beyond the contract tests of tests/contract, on every compiled
backend that runs here (the Triton ones under TRITON_INTERPRET=1, with N <= 12)."""

from __future__ import annotations

import pytest
import torch
from conftest import compiled_backends, require_backend
from public_api import public_function

import kdfast
from kdfast import functional
from kdfast.testing import PARITY_GRAD, PARITY_LOSS, rel_error, tolerance

F64 = torch.float64
T_EX = [[0.0, 0.0], [3.0, 4.0], [6.0, 0.0]]
S_EX = [[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]
S_DUP = [[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]]
BACKENDS = compiled_backends("cpu")
OPS = {op: public_function(op) for op in ("rkd_angle", "rkd_distance")}
SPEC_EXAMPLES = {
    ("rkd_angle", "ex"): 0.017579546567412015,
    ("rkd_angle", "dup"): 0.0592,
    ("rkd_distance", "ex"): 0.0279368329695255,
    ("rkd_distance", "dup"): 0.148437168544001,
}


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _clustered(n: int, d: int, spread: float, seed: int) -> torch.Tensor:
    """10 class clusters whose spread is ``spread`` of their separation (semantics 1.5)."""
    centres = _randn(10, d, seed=seed) * 10
    return centres[torch.arange(n) % 10] + spread * 10 * _randn(n, d, seed=seed + 1)


def _size(backend: str) -> int:
    return 12 if backend == "triton" else 40


def _loss_and_grads(fn, backend, s, t):
    s = s.detach().clone().requires_grad_(True)
    t = t.detach().clone().requires_grad_(True)
    with kdfast.use_backend(backend):
        loss = fn(s, t)
    return (loss, *torch.autograd.grad(loss, (s, t)))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_spec_examples(op, backend):
    require_backend(backend)
    t = torch.tensor(T_EX, dtype=F64)
    for key, rows in (("ex", S_EX), ("dup", S_DUP)):
        s = torch.tensor(rows, dtype=F64).requires_grad_(True)
        with kdfast.use_backend(backend):
            loss = OPS[op](s, t)
        assert abs(loss.item() - SPEC_EXAMPLES[op, key]) <= 1e-12 * SPEC_EXAMPLES[op, key]
        (grad,) = torch.autograd.grad(loss, s)
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize("spread", [1e-2, 1e-3])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_clustered_within_1e5_of_float64_truth(backend, op, spread):
    """semantics 1.5: a float32 Gram kernel without float64 cancellation-prone terms is off by
    tens of percent here; the truth is the float64 reference on the same rounded inputs."""
    require_backend(backend)
    n = _size(backend)
    s = _clustered(n, 24, spread, seed=3).float()
    t = _clustered(n, 16, spread, seed=5).float()
    loss, gs, gt = _loss_and_grads(OPS[op], backend, s, t)
    ref_loss, ref_gs, ref_gt = _loss_and_grads(OPS[op], "reference", s.double(), t.double())
    assert loss.dtype == torch.float32 and gs.dtype == torch.float32
    assert rel_error(loss, ref_loss) <= tolerance(torch.float32)
    assert rel_error(gs, ref_gs) <= tolerance(torch.float32, "grad")
    assert rel_error(gt, ref_gt) <= tolerance(torch.float32, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_clustered_beats_plain_float32_reference(backend):
    """A test that can fail: the float32 difference-based reference is itself close, so also
    check the kernel is no worse than 2x PyTorch's own float32 error, or 1e-5."""
    require_backend(backend)
    n = _size(backend)
    s = _clustered(n, 24, 1e-3, seed=7).float()
    t = _randn(n, 8, seed=8).float()
    with kdfast.use_backend(backend):
        got = functional.rkd_angle(s, t)
    with kdfast.use_backend("reference"):
        truth = functional.rkd_angle(s.double(), t.double())
        plain = functional.rkd_angle(s, t)
    assert rel_error(got, truth) <= max(1e-5, 2 * rel_error(plain, truth))


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicate_rows_reference_loss_finite_gradient(backend):
    require_backend(backend)
    n = _size(backend)
    s = _randn(n, 6, seed=11)
    s[2] = s[5]
    s[9] = s[5]
    t = _randn(n, 4, seed=12)
    t[1] = t[4]  # duplicates in the teacher too (its gradient is requested)
    for dtype in (F64, torch.float32):
        loss, gs, gt = _loss_and_grads(functional.rkd_angle, backend, s.to(dtype), t.to(dtype))
        with kdfast.use_backend("reference"):
            ref = functional.rkd_angle(s.to(dtype).double(), t.to(dtype).double())
        assert rel_error(loss, ref) <= (1e-12 if dtype == F64 else 1e-6)
        assert torch.isfinite(gs).all() and torch.isfinite(gt).all()
        assert gs.abs().max() < 1e3 and gt.abs().max() < 1e3  # not the reference's ~1e12


@pytest.mark.parametrize("backend", BACKENDS)
def test_rkd_loss_module_float64_parity(backend):
    require_backend(backend)
    n = _size(backend)
    s, t = _randn(n, 10, seed=21), _randn(n, 7, seed=22)
    module = kdfast.losses.RKDLoss(distance_weight=25.0, angle_weight=50.0)
    loss, gs, gt = _loss_and_grads(module, backend, s, t)
    ref_loss, ref_gs, ref_gt = _loss_and_grads(module, "reference", s, t)
    assert rel_error(loss, ref_loss) <= PARITY_LOSS
    assert rel_error(gs, ref_gs) <= PARITY_GRAD and rel_error(gt, ref_gt) <= PARITY_GRAD


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates(backend):
    require_backend(backend)
    s, t = _randn(5, 3, seed=31), _randn(5, 3, seed=32)
    s[1, 0] = float("nan")
    with kdfast.use_backend(backend):
        assert torch.isnan(functional.rkd_angle(s, t))


# rkd_angle_vertices: the share of the angle loss whose vertex lies in
# [start, stop), which gather=True evaluates per rank. The contract cases (reference
# parity on random/adversarial inputs, gradcheck, opcheck) are in tests/contract.


def _vertices(backend, s, t, start, stop):
    """Loss and (student, teacher) gradients of the vertex op on ``backend``."""
    s = s.detach().clone().requires_grad_(True)
    t = t.detach().clone().requires_grad_(True)
    with kdfast.use_backend(backend):
        loss = functional._call("rkd_angle_vertices", s, t, start, stop)
    return (loss, *torch.autograd.grad(loss, (s, t)))


def _vertex_inputs(n: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    clustered = _clustered(n, 16, 1e-3, seed=41)
    near = _randn(n, 6, seed=42)
    near[4] = near[1] + 1e-6
    dup = _randn(n, 6, seed=43)
    dup[2] = dup[7]
    return {
        "random": (_randn(n, 6, seed=44), _randn(n, 5, seed=45)),
        "clustered": (clustered, _randn(n, 5, seed=46)),
        "near_duplicates": (near, clustered[:, :7]),
        "duplicate_rows": (dup, _randn(n, 5, seed=47)),
    }


@pytest.mark.parametrize("backend", BACKENDS)
def test_vertex_ranges_match_reference(backend):
    """float64 parity with the reference vertex op on every kind of range."""
    require_backend(backend)
    n = _size(backend)
    for name, (s, t) in _vertex_inputs(n).items():
        for start, stop in ((0, 1), (n - 1, n), (2, 7), (0, n), (5, n - 2)):
            loss, gs, gt = _vertices(backend, s, t, start, stop)
            ref, ref_gs, ref_gt = _vertices("reference", s, t, start, stop)
            assert loss.dtype == F64 and gs.shape == s.shape and gt.shape == t.shape
            assert rel_error(loss, ref) <= PARITY_LOSS, (name, start, stop, rel_error(loss, ref))
            if name == "duplicate_rows":  # the reference's gradient there is ~1/eps (semantics 1.3)
                assert torch.isfinite(gs).all() and torch.isfinite(gt).all()
                continue
            assert rel_error(gs, ref_gs) <= PARITY_GRAD, (name, start, stop, rel_error(gs, ref_gs))
            assert rel_error(gt, ref_gt) <= PARITY_GRAD, (name, start, stop, rel_error(gt, ref_gt))


@pytest.mark.parametrize("backend", [*BACKENDS, "reference"])
def test_vertex_partition_sums_to_the_angle_loss(backend):
    """Summed over any partition of the vertices, loss and gradients are rkd_angle's."""
    require_backend(backend)
    n = _size(backend)
    s, t = _vertex_inputs(n)["clustered"]
    want = _loss_and_grads(functional.rkd_angle, backend, s, t)
    for cuts in ([0, n], [0, 1, n], [0, 3, 3, 8, n], [0, 0, n - 1, n, n], list(range(n + 1))):
        parts = [_vertices(backend, s, t, a, b) for a, b in zip(cuts, cuts[1:], strict=False)]
        for got, ref in zip(map(sum, zip(*parts, strict=True)), want, strict=True):
            assert rel_error(got, ref) <= 1e-12, (cuts, rel_error(got, ref))
    # each share is a real part of the loss, not the whole or nothing
    half = _vertices(backend, s, t, 0, n // 2)[0]
    assert 0 < half < want[0]


@pytest.mark.parametrize("backend", [*BACKENDS, "reference"])
def test_empty_vertex_range_is_zero(backend):
    require_backend(backend)
    s, t = _randn(6, 4, seed=51), _randn(6, 3, seed=52)
    for start in (0, 3, 6):
        loss, gs, gt = _vertices(backend, s, t, start, start)
        assert loss.dtype == F64 and loss.shape == ()
        assert loss.item() == 0.0
        assert gs.shape == s.shape and gt.shape == t.shape
        assert not gs.any() and not gt.any()
    f32 = _vertices(backend, s.float(), t.half(), 2, 2)[0]
    assert f32.dtype == torch.float32 and f32.item() == 0.0


@pytest.mark.parametrize("backend", [*BACKENDS, "reference"])
def test_bad_vertex_ranges_raise(backend):
    require_backend(backend)
    s, t = _randn(6, 4, seed=53), _randn(6, 3, seed=54)
    with kdfast.use_backend(backend):
        for start, stop in ((-1, 3), (4, 3), (0, 7), (7, 7), (-2, -1)):
            with pytest.raises(ValueError, match=r"0 <= start <= stop <= N = 6"):
                functional._call("rkd_angle_vertices", s, t, start, stop)
        # non-int bounds: the reference raises TypeError, the custom ops' schemas RuntimeError
        error = TypeError if backend == "reference" else RuntimeError
        for start, stop in ((1.0, 3), (0, 2.0)):
            with pytest.raises(error, match="must be an int|Expected a value of type 'int'"):
                functional._call("rkd_angle_vertices", s, t, start, stop)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vertex_op_gradcheck_teacher_and_one_sided(backend):
    """float64 gradcheck of the vertex op with both sides, and each side alone."""
    require_backend(backend)
    s = _randn(7, 4, seed=55).requires_grad_(True)
    t = _randn(7, 3, seed=56).requires_grad_(True)

    def fn(s, t):
        return functional._call("rkd_angle_vertices", s, t, 2, 5)

    with kdfast.use_backend(backend):
        assert torch.autograd.gradcheck(fn, (s, t))
        assert torch.autograd.gradcheck(fn, (s.detach(), t))
        assert torch.autograd.gradcheck(fn, (s, t.detach()))
        torch.library.opcheck(
            kdfast._dispatch._IMPLS["rkd_angle_vertices"][backend].fn, (s, t, 0, 0)
        )


def test_vertex_op_dispatches_to_a_kernel():
    """On CPU the vertex op (gather=True) runs a compiled kernel, not the reference: the
    first of the compiled backends that must run here (triton under TRITON_INTERPRET=1)."""
    if not BACKENDS:
        pytest.skip("no compiled backend in this run (KDFAST_NO_EXT=1, no triton)")
    for backend in BACKENDS:
        require_backend(backend)
    s, t = _randn(6, 4, seed=57), _randn(6, 3, seed=58)
    chosen, fn = kdfast._dispatch.select("rkd_angle_vertices", s, t, 0, 3)
    assert chosen == ("triton" if "triton" in BACKENDS else "cpp")
    assert fn is kdfast._dispatch._IMPLS["rkd_angle_vertices"][chosen].fn
    assert isinstance(fn, (torch._ops.OpOverload, torch._library.custom_ops.CustomOpDef))


@pytest.mark.parametrize("backend", BACKENDS)
def test_vertex_op_nan_propagates(backend):
    """A NaN row inside or outside the vertex range makes every non-empty share NaN (it
    takes part in the angles at every vertex), as in the reference."""
    require_backend(backend)
    for bad_row in (1, 4):
        s, t = _randn(6, 3, seed=61), _randn(6, 3, seed=62)
        s[bad_row, 0] = float("nan")
        with kdfast.use_backend(backend):
            assert torch.isnan(functional._call("rkd_angle_vertices", s, t, 0, 3))
            assert functional._call("rkd_angle_vertices", s, t, 2, 2) == 0

"""Contract tests over every (op, compiled backend) that runs here.

Each compiled implementation is compared with the reference (SPEC 7 error measures and
tolerances), passes float64 gradcheck through the public function, and its custom op
passes torch.library.opcheck. Ops register their sample inputs in CASES.
"""

from __future__ import annotations

import pytest
import torch
from conftest import compiled_backends, require_backend

import kdfast
from kdfast import _dispatch
from kdfast.testing import rel_error, tolerance


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rkd_cases(dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Random and adversarial (student, teacher) feature pairs (SPEC 1.5)."""
    g = _gen(0)
    n = 24
    centres = torch.randn(10, 16, generator=g, dtype=torch.float64) * 10
    labels = torch.arange(n) % 10
    clustered = centres[labels] + 1e-3 * 10 * torch.randn(n, 16, generator=g, dtype=torch.float64)
    teacher = torch.randn(n, 12, generator=g, dtype=torch.float64)
    random_s = torch.randn(n, 8, generator=g, dtype=torch.float64)
    duplicates = random_s.clone()
    duplicates[3] = duplicates[7]
    duplicates[11] = duplicates[7]
    near = random_s.clone()
    near[5] = near[6] + 1e-7
    cases = {
        "random": (random_s, teacher),
        "offset": (random_s + 100.0, teacher - 1000.0),
        "clustered": (clustered, teacher),
        "duplicate_rows": (duplicates, teacher),
        "near_duplicates": (near, teacher),
        "n2": (random_s[:2], teacher[:2]),
        "wide": (torch.randn(6, 300, generator=g, dtype=torch.float64), teacher[:6]),
    }
    return {k: (s.to(dtype), t.to(dtype)) for k, (s, t) in cases.items()}


def rkd_angle_cases(dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Random and adversarial pairs for the angle loss (N >= 3; N <= 12 for the Triton
    interpreter). Near duplicates differ by 1e-6: at 1e-7 a unit-scale pair is degenerate
    in float64 by the SPEC 1.5 rule (D2 <= 64 u (G_ii + G_jj)), where the duplicate case
    applies."""
    g = _gen(1)
    n = 12
    centres = torch.randn(10, 16, generator=g, dtype=torch.float64) * 10
    labels = torch.arange(n) % 10
    noise = torch.randn(n, 16, generator=g, dtype=torch.float64)
    teacher = torch.randn(n, 12, generator=g, dtype=torch.float64)
    random_s = torch.randn(n, 8, generator=g, dtype=torch.float64)
    duplicates = random_s.clone()
    duplicates[3] = duplicates[7]
    duplicates[11] = duplicates[7]
    near = random_s.clone()
    near[5] = near[6] + 1e-6
    cases = {
        "random": (random_s, teacher),
        "offset": (random_s + 100.0, teacher - 1000.0),
        # spread 1e-2 and 1e-3 of the separation (about 10 * sqrt(2) per coordinate)
        "clustered_1e-2": (centres[labels] + 1e-2 * 10 * noise, teacher),
        "clustered_1e-3": (centres[labels] + 1e-3 * 10 * noise, teacher),
        "teacher_clustered": (random_s, centres[labels, :12] + 1e-3 * 10 * noise[:, :12]),
        "duplicate_rows": (duplicates, teacher),
        "near_duplicates": (near, teacher),
        "n3": (random_s[:3], teacher[:3]),
        "wide": (torch.randn(5, 300, generator=g, dtype=torch.float64), teacher[:5]),
    }
    return {k: (s.to(dtype), t.to(dtype)) for k, (s, t) in cases.items()}


def has_duplicate_rows(x: torch.Tensor) -> bool:
    """Whether two rows of ``x`` are exactly equal."""
    return torch.unique(x.double(), dim=0).shape[0] < x.shape[0]


def vertex_range(s: torch.Tensor) -> tuple[int, int]:
    """A proper, non-empty vertex range of ``s``'s rows for the rkd_angle_vertices cases."""
    n = s.shape[0]
    return n // 3, n - 1


def rkd_angle_vertices(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The rkd_angle_vertices op (gather=True's per-rank share) on ``vertex_range(s)``."""
    return kdfast.functional._call("rkd_angle_vertices", s, t, *vertex_range(s))


#: op -> (public function, case generator)
CASES = {
    "rkd_distance": (kdfast.functional.rkd_distance, rkd_cases),
    "rkd_angle": (kdfast.functional.rkd_angle, rkd_angle_cases),
    "rkd_angle_vertices": (rkd_angle_vertices, rkd_angle_cases),
}
#: op -> the custom op's non-tensor arguments after (student, teacher)
EXTRA_ARGS = {"rkd_angle_vertices": vertex_range}

PAIRS = [
    (op, backend)
    for op in CASES
    for backend in compiled_backends("cpu")
    if backend in _dispatch._IMPLS.get(op, {})
]


def test_every_compiled_op_has_cases():
    """A compiled op without contract cases would go untested."""
    for op, impls in _dispatch._IMPLS.items():
        compiled = set(impls) - {"reference"}
        # the fused logit losses have their own contract suite: tests/test_logit_kernels.py
        covered_elsewhere = {"expm", "expm_frechet", "kd_loss", "per_sample_kl", "dist_loss"}
        if compiled and op not in covered_elsewhere:
            assert op in CASES, f"{op} has compiled backends {compiled} but no contract cases"


def _loss_and_grads(fn, backend, s, t):
    s = s.detach().clone().requires_grad_(True)
    t = t.detach().clone().requires_grad_(True)
    with kdfast.use_backend(backend):
        loss = fn(s, t)
    grad_s, grad_t = torch.autograd.grad(loss, (s, t))
    return loss, grad_s, grad_t


@pytest.mark.parametrize("op,backend", PAIRS)
def test_float64_parity_with_reference(op, backend):
    require_backend(backend)
    fn, make = CASES[op]
    for name, (s, t) in make(torch.float64).items():
        loss, gs, gt = _loss_and_grads(fn, backend, s, t)
        ref_loss, ref_gs, ref_gt = _loss_and_grads(fn, "reference", s, t)
        assert loss.dtype == torch.float64
        assert rel_error(loss, ref_loss) <= 1e-9, (name, rel_error(loss, ref_loss))
        if name == "duplicate_rows":
            # the reference's gradient at an exact duplicate is ~1/eps (SPEC 1.3); the
            # kernel treats the pair as degenerate (SPEC 1.5): only finiteness is shared.
            assert torch.isfinite(gs).all() and torch.isfinite(gt).all()
            continue
        assert rel_error(gs, ref_gs) <= 1e-7, (name, rel_error(gs, ref_gs))
        assert rel_error(gt, ref_gt) <= 1e-7, (name, rel_error(gt, ref_gt))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("op,backend", PAIRS)
def test_low_precision_against_float64_truth(op, backend, dtype):
    require_backend(backend)
    fn, make = CASES[op]
    for name, (s, t) in make(dtype).items():
        if dtype == torch.float16 and name == "offset":
            continue  # 1000 - x is not representable to any useful precision in float16
        loss, gs, gt = _loss_and_grads(fn, backend, s, t)
        truth_loss, truth_gs, truth_gt = _loss_and_grads(fn, "reference", s.double(), t.double())
        assert loss.dtype == torch.float32 and gs.dtype == dtype
        assert rel_error(loss, truth_loss) <= tolerance(dtype, "loss"), name
        # rounding to ``dtype`` can create exact duplicates (e.g. teacher - 1000 in bfloat16),
        # where the reference's gradient is ~1/eps (SPEC 1.3): only finiteness is shared
        if has_duplicate_rows(s) or has_duplicate_rows(t):
            assert torch.isfinite(gs).all() and torch.isfinite(gt).all(), name
        else:
            for got, want in ((gs, truth_gs), (gt, truth_gt)):
                # the kernel's float64 accumulation is exact up to the final rounding
                # of the gradient to ``dtype``
                rounding = torch.finfo(dtype).eps
                assert rel_error(got, want) <= max(tolerance(dtype, "grad"), rounding), name


@pytest.mark.parametrize("op,backend", PAIRS)
def test_gradcheck(op, backend):
    require_backend(backend)
    fn, make = CASES[op]
    s, t = make(torch.float64)["random"]
    s, t = s[:6, :4].clone().requires_grad_(True), t[:6, :3].clone().requires_grad_(True)
    with kdfast.use_backend(backend):
        assert torch.autograd.gradcheck(fn, (s, t))
        assert torch.autograd.gradcheck(fn, (s, t.detach()))


@pytest.mark.parametrize("op,backend", PAIRS)
def test_opcheck(op, backend):
    require_backend(backend)
    fn, make = CASES[op]
    custom_op = _dispatch._IMPLS[op][backend].fn
    extra = EXTRA_ARGS.get(op, lambda s: ())
    for name in ("random", "duplicate_rows"):
        s, t = make(torch.float64)[name]
        for args in ((s, t), (s.float().requires_grad_(True), t.float())):
            torch.library.opcheck(custom_op, (*args, *extra(args[0])))


@pytest.mark.parametrize("op,backend", PAIRS)
def test_non_contiguous_inputs(op, backend):
    require_backend(backend)
    fn, make = CASES[op]
    s, t = make(torch.float64)["random"]
    s_nc = s.t().contiguous().t()[:, ::2]
    t_nc = t.repeat(1, 2)[:, ::2]
    with kdfast.use_backend(backend):
        got = fn(s_nc, t_nc)
        want = fn(s_nc.contiguous(), t_nc.contiguous())
    assert rel_error(got, want) <= 1e-12


@pytest.mark.parametrize("op,backend", PAIRS)
def test_double_backward_raises(op, backend):
    require_backend(backend)
    fn, make = CASES[op]
    s, t = make(torch.float64)["random"]
    s = s.clone().requires_grad_(True)
    with kdfast.use_backend(backend):
        (grad,) = torch.autograd.grad(fn(s, t), s, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad.sum().backward()

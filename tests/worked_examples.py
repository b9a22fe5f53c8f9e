"""The docs/semantics.md worked examples, seeded random inputs and the reference-backend
fixture, shared by the per-op test files (tests/ops/) and the kernel-specific ones."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kdfast
from kdfast import linalg
from kdfast.testing import (
    EXPM_ORTHOGONALITY_FLOAT32,
    EXPM_TARGETS,
    rel_error,
    tolerance,
)

F64 = torch.float64

#: semantics 2 / 3 worked-example logits
ZS = [[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]]
ZT = [[3.0, 2.0, 1.0], [1.0, 0.0, 0.0]]

#: semantics 1 worked-example features: student, teacher, a student with a duplicate row
S_EX = [[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]
T_EX = [[0.0, 0.0], [3.0, 4.0], [6.0, 0.0]]
S_DUP = [[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]]
L_A_EX = 0.017579546567412015


@pytest.fixture
def reference_backend():
    """Run the test on the reference backend (test modules use it with autouse)."""
    with kdfast.use_backend("reference"):
        yield


def float64_bound(backend: str, reference_bound: float, kind: str = "loss") -> float:
    """Relative bound of a float64 result against a worked example or an independent
    oracle: ``reference_bound`` for the reference (it reproduces them to that many digits);
    for a compiled backend, its float64 parity with the reference (semantics 7) on top."""
    if backend == "reference":
        return reference_bound
    return reference_bound + tolerance(F64, kind)


def tensor(rows, dtype=F64) -> torch.Tensor:
    return torch.tensor(rows, dtype=dtype)


def randn(*shape, seed: int = 0, dtype=F64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def rand(*shape, seed: int = 0, dtype=F64, scale: float = 2.0) -> torch.Tensor:
    """scale * N(0, 1) drawn in float64, then cast to ``dtype`` (logits)."""
    return (scale * randn(*shape, seed=seed)).to(dtype)


def clustered(n: int, d: int, seed: int, clusters: int = 10, spread: float = 1e-3):
    """Rows around `clusters` unit-scale centres, spread 1e-3 of their separation
    (semantics 1.5)."""
    centres = randn(clusters, d, seed=seed)
    noise = randn(n, d, seed=seed + 1)
    return (centres[torch.arange(n) % clusters] + spread * noise).float()


def loss_and_grad(fn, s: torch.Tensor, t: torch.Tensor):
    """fn(s, t) and its gradient with respect to s."""
    s = s.detach().clone().requires_grad_(True)
    loss = fn(s, t)
    (grad,) = torch.autograd.grad(loss, s)
    return loss, grad


def teacher_as(t: torch.Tensor, kind: str, temperature: float) -> torch.Tensor:
    """The teacher logits re-expressed as ``kind`` ("logits", "probs", "log_probs") at
    temperature T."""
    if kind == "probs":
        return torch.softmax(t / temperature, dim=1)
    if kind == "log_probs":
        return torch.log_softmax(t / temperature, dim=1)
    return t


def check_expm_float32_against_float64(A: torch.Tensor, G: torch.Tensor, skew: bool) -> float:
    """semantics 6: ``linalg.expm`` of float32 ``A`` (n, n) and its gradient for the upstream
    gradient ``G``, against the same in float64: gradient within EXPM_TARGETS, result within
    the float32 tolerance, and orthogonal for ``skew``. Returns the gradient's error."""
    results = []
    for dtype in (torch.float32, torch.float64):
        a = A.to(dtype).detach().requires_grad_()
        X = linalg.expm(a, skew=skew)
        X.backward(G.to(dtype))
        results.append((X.detach(), a.grad))
    (X32, g32), (X64, g64) = results
    assert X32.dtype == torch.float32 and g32.dtype == torch.float32
    err = rel_error(g32, g64)
    assert err <= EXPM_TARGETS[torch.float32]
    assert rel_error(X32, X64) <= tolerance(torch.float32)
    if skew:
        eye = torch.eye(A.shape[-1])
        assert float((X32.mT @ X32 - eye).abs().max()) <= EXPM_ORTHOGONALITY_FLOAT32
    return err


# --- the official RKD code (lenscloth/RKD metric/utils.py and metric/loss.py), transcribed


def official_pdist(e: torch.Tensor, squared: bool = False, eps: float = 1e-12) -> torch.Tensor:
    """lenscloth/RKD metric/utils.py pdist, transcribed."""
    e_square = e.pow(2).sum(dim=1)
    prod = e @ e.t()
    res = (e_square.unsqueeze(1) + e_square.unsqueeze(0) - 2 * prod).clamp(min=eps)
    if not squared:
        res = res.sqrt()
    res = res.clone()
    res[range(len(e)), range(len(e))] = 0
    return res


def official_rkd_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """lenscloth/RKD metric/loss.py RkdDistance.forward, transcribed."""
    with torch.no_grad():
        t_d = official_pdist(teacher)
        t_d = t_d / t_d[t_d > 0].mean()
    d = official_pdist(student)
    d = d / d[d > 0].mean()
    return F.smooth_l1_loss(d, t_d)


def official_rkd_angle(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """lenscloth/RKD metric/loss.py RKdAngle.forward, transcribed."""
    with torch.no_grad():
        td = teacher.unsqueeze(0) - teacher.unsqueeze(1)
        norm_td = F.normalize(td, p=2, dim=2)
        t_angle = torch.bmm(norm_td, norm_td.transpose(1, 2)).view(-1)
    sd = student.unsqueeze(0) - student.unsqueeze(1)
    norm_sd = F.normalize(sd, p=2, dim=2)
    s_angle = torch.bmm(norm_sd, norm_sd.transpose(1, 2)).view(-1)
    return F.smooth_l1_loss(s_angle, t_angle)

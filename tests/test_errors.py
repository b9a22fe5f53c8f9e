"""Clear answers at the edges: empty matrices on every backend."""

from __future__ import annotations

import pytest
import torch
from conftest import NO_EXT

import kdfast
from kdfast import _dispatch, linalg


# ---------------------------------------------------------------- expm of 0 x 0 matrices
def backends() -> list[str]:
    return ["reference", *([] if NO_EXT else ["cpp"])]


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("shape", [(0, 0), (3, 0, 0), (2, 1, 0, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_expm_of_empty_matrices_is_empty(backend, shape, dtype):
    A = torch.zeros(shape, dtype=dtype, requires_grad=True)
    want = torch.float64 if dtype == torch.float64 else torch.float32
    with kdfast.use_backend(backend):
        assert _dispatch.select("expm", A.to(want), False)[0] == backend
        for skew in (False, True):
            X = linalg.expm(A, skew=skew)
            assert X.shape == shape and X.dtype == want
        X.sum().backward()
        assert A.grad.shape == shape
        E = torch.zeros(shape, dtype=dtype, requires_grad=True)
        X, L = linalg.expm_frechet(A, E)
        assert X.shape == L.shape == shape and X.dtype == L.dtype == want
        (X.sum() + L.sum()).backward()
        assert E.grad.shape == shape


@pytest.mark.skipif(NO_EXT, reason="KDFAST_NO_EXT=1: no compiled backend")
def test_expm_of_empty_matrices_on_the_fused_kernel(monkeypatch):
    from kdfast.ops import expm as expm_ops

    monkeypatch.setitem(expm_ops.SMALL_N, "cpu", expm_ops.FUSED_MAX_N)  # as on CUDA
    A = torch.zeros(4, 0, 0, requires_grad=True)
    with kdfast.use_backend("cpp"):
        X = linalg.expm(A)
        X.sum().backward()
        assert X.shape == A.grad.shape == (4, 0, 0)
        assert linalg.expm_frechet(A, A)[1].shape == (4, 0, 0)


def test_expm_of_empty_batches_still_works():
    for backend in backends():
        with kdfast.use_backend(backend):
            assert linalg.expm(torch.zeros(0, 3, 3)).shape == (0, 3, 3)

"""Clear answers at the edges: empty matrices on every backend, and why the extension is
missing when a checkout was never built."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import NO_EXT

import kdfast
from kdfast import _dispatch, linalg

PACKAGE = os.path.dirname(os.path.abspath(kdfast.__file__))


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


# ---------------------------------------------------------------- an unbuilt checkout
def copy_without_extension(tmp_path, source_checkout: bool) -> str:
    """A copy of the kdfast package with no compiled _C; with ``source_checkout`` the copy
    sits in a tree with setup.py and csrc/ like a git checkout."""
    root = tmp_path / ("checkout" if source_checkout else "site-packages")
    shutil.copytree(
        PACKAGE,
        root / "kdfast",
        ignore=shutil.ignore_patterns("_C*.so", "_C*.pyd", "__pycache__", "*.pyc"),
    )
    if source_checkout:
        (root / "setup.py").write_text("# a source checkout\n")
        (root / "csrc").mkdir()
    return str(root)


def run_python(root: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("KDFAST_NO_EXT", "KDFAST_BACKEND")}
    env["PYTHONPATH"] = root
    env["TRITON_INTERPRET"] = "0"
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, cwd=root, timeout=300
    )


def unavailable_reason_in(root: str) -> str:
    """What ``import kdfast`` from ``root`` records as the reason the extension is missing
    (never the misleading circular-import message)."""
    code = "import kdfast; from kdfast import _extension; print(_extension.unavailable_reason())"
    out = run_python(root, "-c", code)
    assert out.returncode == 0, out.stderr
    reason = out.stdout.strip()
    assert "circular import" not in reason and "partially initialized" not in reason
    return reason


def test_unbuilt_checkout_says_how_to_build(tmp_path):
    root = copy_without_extension(tmp_path, source_checkout=True)
    reason = unavailable_reason_in(root)
    assert "not built in this tree" in reason
    assert os.path.join(root, "kdfast") in reason
    assert "pip install --no-build-isolation -e ." in reason and "KDFAST_NO_EXT=1" in reason
    info = run_python(root, "-m", "kdfast.info")
    assert info.returncode == 0, info.stderr
    assert "C++ extension NOT LOADED" in info.stdout and "not built in this tree" in info.stdout
    assert "circular import" not in info.stdout


def test_installed_package_without_extension_says_so(tmp_path):
    root = copy_without_extension(tmp_path, source_checkout=False)
    reason = unavailable_reason_in(root)
    assert "without its C++ extension" in reason and "KDFAST_NO_EXT=1" in reason
    assert os.path.join(root, "kdfast") in reason


def test_a_broken_extension_keeps_the_import_error(tmp_path):
    root = copy_without_extension(tmp_path, source_checkout=True)
    (tmp_path / "checkout" / "kdfast" / "_C.py").write_text("raise ImportError('undefined sym')\n")
    reason = unavailable_reason_in(root)
    assert "kdfast._C not importable" in reason and "undefined sym" in reason

"""Loads the compiled extension ``kdfast._C``; records why not; never raises.

``import kdfast`` must work without the extension (pure-Python install, no compiler,
or an extension built against another torch). The dispatcher asks
:func:`unavailable_reason` / :func:`cuda_unavailable_reason` and falls back to the
reference; ``python -m kdfast.info`` prints the reasons.
"""

from __future__ import annotations

import os

import torch

_C = None
_reason: str | None = None


def _load() -> None:
    global _C, _reason
    if os.environ.get("KDFAST_NO_EXT") == "1":
        _reason = "KDFAST_NO_EXT=1 (pure-Python mode)"
        return
    try:
        from kdfast import _C as module  # registers the kdfast:: C++ ops
    except ImportError as exc:
        _reason = f"kdfast._C not importable: {exc}"
        return
    built = getattr(module, "torch_version", "unknown")
    if built.split("+")[0] != torch.__version__.split("+")[0]:
        _reason = (
            f"kdfast._C was built against torch {built}, but torch {torch.__version__} is "
            "installed: reinstall kdfast with pip install --no-build-isolation"
        )
        return
    _C = module


def unavailable_reason() -> str | None:
    """Why the C++ backend cannot run, or None if it can."""
    return _reason


def cuda_unavailable_reason() -> str | None:
    """Why the raw CUDA backend cannot run, or None if it can."""
    if _C is None:
        return _reason
    if not _C.built_with_cuda():
        return "kdfast._C was built without CUDA sources (CPU torch build or no nvcc)"
    return None


def build_info() -> dict:
    """What was compiled: C++, CUDA and for which architectures."""
    if _C is None:
        return {"cpp": False, "cuda": False, "cuda_archs": [], "reason": _reason}
    return {
        "cpp": True,
        "cuda": bool(_C.built_with_cuda()),
        "cuda_archs": list(_C.cuda_archs()),
        "torch_version": _C.torch_version,
        "reason": None,
    }


_load()

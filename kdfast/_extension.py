"""Loads the compiled extension ``kdfast._C``; records why not; never raises.

``import kdfast`` must work without the extension (pure-Python install, no compiler,
or an extension built against another torch). The dispatcher asks
:func:`unavailable_reason` / :func:`cuda_unavailable_reason` and falls back to the
reference; ``python -m kdfast.info`` prints the reasons.
"""

from __future__ import annotations

import importlib.machinery
import os
import sys

import torch

_C = None
_reason: str | None = None


def _load() -> None:
    global _C, _reason
    if os.environ.get("KDFAST_NO_EXT") == "1":
        _reason = "KDFAST_NO_EXT=1 (pure-Python mode)"
        return
    missing = _missing_reason()
    if missing is not None:
        _reason = missing
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


def _missing_reason() -> str | None:
    """Why there is no ``_C`` file to import, or None if one exists. (Importing a missing
    ``_C`` while ``kdfast`` is still initialising reports a "circular import", which misleads.)
    """
    package = os.path.dirname(os.path.abspath(__file__))
    # Only this package's own directories: an import hook (e.g. the editable install of
    # another checkout) may map kdfast._C to a different tree's build, which is not ours.
    search = list(getattr(sys.modules.get("kdfast"), "__path__", None) or [package])
    if importlib.machinery.PathFinder.find_spec("kdfast._C", search) is not None:
        return None
    root = os.path.dirname(package)
    if os.path.exists(os.path.join(root, "setup.py")) and os.path.isdir(os.path.join(root, "csrc")):
        return (
            f"the C++ extension is not built in this tree (no kdfast/_C*.so in {package}): run "
            f"`pip install --no-build-isolation -e .` in {root}, or set KDFAST_NO_EXT=1 for "
            "pure-Python mode"
        )
    return (
        f"kdfast was installed without its C++ extension (no _C*.so in {package}; no compiler "
        "at install time?): reinstall it with `pip install --no-build-isolation kdfast` where a "
        "C++ compiler is available, or set KDFAST_NO_EXT=1 for pure-Python mode"
    )


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
        "mkl_thread_local": bool(_C.mkl_thread_local()),
        "reason": None,
    }


_load()

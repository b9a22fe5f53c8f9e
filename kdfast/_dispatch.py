"""The one place that chooses a backend for an op.

Backends declare what they support as data (:data:`BACKENDS`); each op registers one
implementation per backend with :func:`implement`, optionally narrowing devices and dtypes
or adding a size limit. :func:`call` walks :data:`PRIORITY` and runs the first
implementation that can run for the inputs' device and dtypes. ``KDFAST_BACKEND=<name>``
(read at import) or :func:`set_backend` forces one backend for the whole process;
``with kdfast.use_backend(name):`` forces one in the current thread only (it overrides the
process-wide choice there); a forced backend that cannot run raises ``RuntimeError``
listing the reasons.

The choice is made in Python from the device and dtype, before any tracing: under
``torch.compile`` the chosen backend is baked into the graph (Dynamo guards on the forced
backend), so switching backends after compiling triggers a recompile.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from kdfast import _extension
from kdfast._validation import FLOAT_DTYPES

#: every floating dtype the public functions accept
HALF_AND_FLOAT = frozenset(FLOAT_DTYPES)


def _triton_status() -> tuple[str | None, frozenset[str]]:
    """(reason triton cannot run or None, devices it runs on)."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"triton not importable ({type(exc).__name__}: {exc})", frozenset()
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None, frozenset({"cpu", "cuda"})
    return None, frozenset({"cuda"})


@dataclass(frozen=True)
class Backend:
    """What a backend supports, as data. ``devices=None`` means any device."""

    name: str
    devices: frozenset[str] | None
    dtypes: frozenset[torch.dtype]
    unavailable: str | None  # why it cannot run at all in this process, or None
    description: str
    #: its kernels run only on a GPU, where no test here executes them: on CUDA devices the
    #: automatic choice takes an implementation only once a recorded GPU run passed it
    #: (:data:`GPU_RESULTS`); until then it is opt-in.
    needs_gpu_record: bool = False


def _make_backends() -> dict[str, Backend]:
    triton_reason, triton_devices = _triton_status()
    cuda_reason = _extension.cuda_unavailable_reason()
    return {
        "cuda": Backend(
            "cuda",
            frozenset({"cuda"}),
            HALF_AND_FLOAT,
            cuda_reason,
            "raw CUDA kernels (kdfast._C)",
            needs_gpu_record=True,
        ),
        "triton": Backend(
            "triton", triton_devices, HALF_AND_FLOAT, triton_reason, "Triton GPU kernels"
        ),
        "cpp": Backend(
            "cpp",
            frozenset({"cpu", "cuda"}),
            HALF_AND_FLOAT,
            _extension.unavailable_reason(),
            "compiled C++ (CPU kernels; device-generic ATen code)",
        ),
        "reference": Backend(
            "reference", None, HALF_AND_FLOAT, None, "plain differentiable PyTorch (the spec)"
        ),
    }


BACKENDS: dict[str, Backend] = _make_backends()
PRIORITY: tuple[str, ...] = ("cuda", "triton", "cpp", "reference")
#: device types that have kdfast kernels; elsewhere (mps, xpu, ROCm) the reference runs.
KERNEL_DEVICES = frozenset({"cpu", "cuda"})


@dataclass(frozen=True)
class Impl:
    """One op's implementation on one backend, with optional narrower capabilities."""

    fn: Callable
    devices: frozenset[str] | None = None
    dtypes: frozenset[torch.dtype] | None = None
    limit: Callable[..., str | None] | None = field(default=None, compare=False)
    #: uses atomics or another run-to-run varying reduction order (GPU kernels): rejected
    #: while ``torch.use_deterministic_algorithms(True)`` is on, so a deterministic backend
    #: (ultimately the reference) runs instead.
    nondeterministic: bool = False
    #: why this implementation runs only when its backend is forced (e.g. measured slower
    #: than the next backend); None: chosen automatically.
    opt_in: str | None = None
    #: like :attr:`Backend.needs_gpu_record`, for this implementation alone: a GPU kernel of a
    #: backend whose older kernels need no record (a new Triton kernel) is chosen
    #: automatically on CUDA devices only once a recorded GPU run passed it.
    needs_gpu_record: bool = False


#: results of the contract suite on real GPUs, written by tools/gpu_check.sh: a list of
#: runs, each naming the commit, GPU, driver, torch and Triton versions, and
#: ``results`` {"<op>/<backend>": "pass" | "fail"}.
GPU_RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_results.json")
NOT_RUN_ON_GPU = "not yet run on a GPU"


@functools.cache
def gpu_passed() -> frozenset[tuple[str, str]]:
    """(op, backend) pairs that passed the contract suite in a recorded GPU run and failed
    in none."""
    try:
        with open(GPU_RESULTS) as f:
            runs = json.load(f)["runs"]
    except (OSError, ValueError, KeyError, TypeError):
        return frozenset()
    passed, failed = set(), set()
    for run in runs:
        for key, outcome in run.get("results", {}).items():
            op, _, backend = key.partition("/")
            (passed if outcome == "pass" else failed).add((op, backend))
    return frozenset(passed - failed)


_IMPLS: dict[str, dict[str, Impl]] = {}
_forced: str | None = None  # process-wide: KDFAST_BACKEND or set_backend()
_UNSET = "<unset>"
#: use_backend's choice, local to a thread; .name is _UNSET where no with-block is active,
#: so the process-wide choice applies. A threading.local, not a ContextVar: torch.compile
#: reads and guards a thread-local's attribute, while torch 2.13's Dynamo cannot trace
#: ContextVar.get (fullgraph fails).
_thread_forced = threading.local()
_warned_devices: set[str] = set()


def implement(
    op: str,
    backend: str,
    fn: Callable,
    *,
    devices=None,
    dtypes=None,
    limit: Callable[..., str | None] | None = None,
    nondeterministic: bool = False,
    opt_in: str | None = None,
    needs_gpu_record: bool = False,
) -> None:
    """Register ``fn`` as ``op`` on ``backend``.

    ``limit(*args, **kwargs)`` may return a reason the inputs are out of range.
    ``nondeterministic=True`` marks a kernel whose results vary run to run (atomics): it is
    skipped under ``torch.use_deterministic_algorithms(True)``. ``opt_in="why"`` keeps the
    implementation out of the automatic choice: it runs only when its backend is forced.
    ``needs_gpu_record=True`` keeps it out of the automatic choice on CUDA devices until a
    recorded GPU run passed it (:data:`GPU_RESULTS`), as every implementation of a backend
    declared with ``Backend.needs_gpu_record``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known: {list(BACKENDS)}")
    _IMPLS.setdefault(op, {})[backend] = Impl(
        fn,
        None if devices is None else frozenset(devices),
        None if dtypes is None else frozenset(dtypes),
        limit,
        nondeterministic,
        opt_in,
        needs_gpu_record,
    )


def ops() -> list[str]:
    """Names of every registered op."""
    return sorted(_IMPLS)


def needs_gpu_record(op: str, backend: str) -> bool:
    """Whether ``op``'s ``backend`` implementation is automatic on CUDA only once a recorded
    GPU run passed it (its backend's rule, or its own)."""
    impl = _IMPLS.get(op, {}).get(backend)
    return BACKENDS[backend].needs_gpu_record or (impl is not None and impl.needs_gpu_record)


def implementations(op: str) -> dict[str, Impl]:
    """``op``'s implementations by backend name (a copy)."""
    return dict(_IMPLS.get(op, {}))


def _rejection(
    op: str, name: str, device: str, dtypes, args, kwargs, automatic: bool = True
) -> str | None:
    backend = BACKENDS[name]
    if backend.unavailable is not None:
        return backend.unavailable
    impl = _IMPLS.get(op, {}).get(name)
    if impl is None:
        return f"no {name} implementation of {op}"
    if torch.version.hip is not None and name != "reference" and device == "cuda":
        return "ROCm is not tested"
    for devs in (backend.devices, impl.devices):
        if devs is not None and device not in devs:
            return f"device {device!r} not supported (supports {sorted(devs)})"
    for dts in (backend.dtypes, impl.dtypes):
        bad = [d for d in dtypes if dts is not None and d not in dts]
        if bad:
            return f"dtype {bad[0]} not supported"
    if impl.nondeterministic and torch.are_deterministic_algorithms_enabled():
        return "nondeterministic (atomics) and torch.use_deterministic_algorithms(True) is on"
    if impl.limit is not None and args is not None:
        reason = impl.limit(*args, **kwargs)
        if reason is not None:
            return reason
    if automatic and impl.opt_in is not None:
        return f"opt-in only ({impl.opt_in}): force it with kdfast.use_backend({name!r})"
    if (
        automatic
        and device == "cuda"
        and (backend.needs_gpu_record or impl.needs_gpu_record)
        and (op, name) not in gpu_passed()
    ):
        return f"opt-in only ({NOT_RUN_ON_GPU}): force it with kdfast.use_backend({name!r})"
    return None


def explain(op: str, device: str, dtype: torch.dtype, args=None, kwargs=None):
    """[(backend, reason or None)] in priority order, for ``op`` on ``device``/``dtype``."""
    return [(name, _rejection(op, name, device, (dtype,), args, kwargs or {})) for name in PRIORITY]


def select(op: str, *args, **kwargs) -> tuple[str, Callable]:
    """(backend name, implementation) that will run ``op`` for these arguments."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    device = tensors[0].device.type if tensors else "cpu"
    dtypes = tuple({t.dtype for t in tensors if t.is_floating_point()})
    forced = forced_backend()
    if forced is not None:
        reason = _rejection(op, forced, device, dtypes, args, kwargs, automatic=False)
        if reason is not None:
            others = "; ".join(
                f"{n}: {r or 'ok'}" for n, r in explain(op, device, dtypes[0], args, kwargs)
            )
            raise RuntimeError(
                f"kdfast backend {forced!r} was forced but cannot run {op} on {device} "
                f"with dtypes {list(dtypes)}: {reason}. All backends: {others}"
            )
        return forced, _IMPLS[op][forced].fn
    if device not in KERNEL_DEVICES and device not in _warned_devices:
        _warned_devices.add(device)
        warnings.warn(
            f"kdfast has no kernels for device {device!r}; using the reference backend",
            stacklevel=3,
        )
    for name in PRIORITY:
        if _rejection(op, name, device, dtypes, args, kwargs) is None:
            return name, _IMPLS[op][name].fn
    raise RuntimeError(f"no kdfast backend can run {op} on {device}")  # reference always can


def runnable(op: str, backend: str, *args, **kwargs) -> Callable | None:
    """``op``'s implementation on ``backend`` when it can run these arguments (as if that
    backend were forced), else None: for an op that is an alternative to another op's choice
    (``rkd_loss`` runs where ``rkd_angle`` would run, :func:`kdfast.functional.rkd_loss`)."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    device = tensors[0].device.type if tensors else "cpu"
    dtypes = tuple({t.dtype for t in tensors if t.is_floating_point()})
    if _rejection(op, backend, device, dtypes, args, kwargs, automatic=False) is not None:
        return None
    return _IMPLS[op][backend].fn


def call(op: str, *args, **kwargs):
    """Run ``op`` on the first backend that can (or the forced one)."""
    return select(op, *args, **kwargs)[1](*args, **kwargs)


def forced_backend() -> str | None:
    """The backend forced in this thread: the innermost active :func:`use_backend` block's,
    else the process-wide one (``KDFAST_BACKEND`` or :func:`set_backend`); None: automatic."""
    local = getattr(_thread_forced, "name", _UNSET)
    return _forced if local == _UNSET else local


def _check_name(name: str | None) -> None:
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown kdfast backend {name!r}; choose from {list(BACKENDS)}")


def set_backend(name: str | None) -> None:
    """Force ``name`` for every op (``None``: automatic choice). Process-wide, like
    ``KDFAST_BACKEND``: every thread sees it, except inside its own :func:`use_backend`
    blocks, which take precedence there."""
    global _forced
    _check_name(name)
    _forced = name


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force backend ``name`` inside a ``with`` block (``None``: automatic choice).

    The choice is local to the thread that enters the block (a thread-local): other
    threads keep theirs, so overlapping blocks in several threads never leak into each
    other or outlive their blocks; a new thread starts from the process-wide choice
    (``KDFAST_BACKEND`` or :func:`set_backend`), not from its parent's block. The backend is
    picked when an op runs forward, in the calling thread: the backward of what ran there
    (which autograd may run on its own worker threads, e.g. for CUDA tensors) uses the
    implementation chosen in the forward. Under ``torch.compile`` the choice is read while
    tracing, in the compiling thread, and guarded: another backend forces a recompile.

    Example::

        with kdfast.use_backend("reference"):
            loss = kdfast.functional.rkd_angle(s, t)
    """
    _check_name(name)
    previous = getattr(_thread_forced, "name", _UNSET)
    _thread_forced.name = name
    try:
        yield
    finally:
        _thread_forced.name = previous


def _backend_from_environment() -> None:
    name = os.environ.get("KDFAST_BACKEND") or None
    if name is not None and name not in BACKENDS:
        warnings.warn(
            f"KDFAST_BACKEND={name!r} is not a kdfast backend ({list(BACKENDS)}); ignored",
            stacklevel=2,
        )
        name = None
    set_backend(name)


_backend_from_environment()

"""Shared fixtures: which backends must run here, and the report header.

Fixtures ``device`` (cpu; cuda when visible), ``dtype`` (the four floating dtypes) and
``backend`` (the reference and every compiled backend that runs the module's ``OP`` on CPU
here; the test runs with that backend forced). A test that parametrizes one of these names
itself overrides the fixture.

Compiled backends are never skipped silently: when the extension should have been built
(KDFAST_NO_EXT unset) but cannot be loaded, the tests that need it fail with the reason.
Triton tests run only under TRITON_INTERPRET=1 (a dedicated CI stage) or on a GPU.
"""

from __future__ import annotations

import os
import runpy
import sys

import pytest
import torch

import kdfast
from kdfast import _dispatch, _extension

NO_EXT = os.environ.get("KDFAST_NO_EXT") == "1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# tools/ (development tooling, not in the wheel) is imported from this checkout whatever the
# cwd (CI runs some tests from a venv against an installed kdfast): appended, so the kdfast
# already imported above, installed or not, stays the one under test.
if ROOT not in sys.path:
    sys.path.append(ROOT)


def pytest_report_header(config):
    build = _extension.build_info()
    return [
        f"kdfast {kdfast.__version__} from {os.path.dirname(kdfast.__file__)}",
        f"kdfast._C: {'loaded' if build['cpp'] else 'NOT loaded: ' + str(build['reason'])}; "
        f"CUDA sources: {build['cuda']}; torch {torch.__version__}",
    ]


def compiled_backends(device: str = "cpu", op: str | None = None) -> list[str]:
    """Compiled backends that must be tested on ``device`` in this run (of them, those that
    implement ``op``, when given: Triton under the interpreter has no expm, for example)."""
    names = []
    if not NO_EXT:
        names.append("cpp")
    triton = _dispatch.BACKENDS["triton"]
    if triton.unavailable is None and device in (triton.devices or ()):
        names.append("triton")
    if op is not None:
        names = [name for name in names if name in _dispatch.implementations(op)]
    return names


def backends_for(op: str, device: str = "cpu") -> list[str]:
    """The reference and every compiled backend that runs ``op`` on ``device`` in this run."""
    return ["reference", *compiled_backends(device, op)]


def contract_devices() -> list[str]:
    """cpu always; cuda whenever a CUDA device is visible (no flag needed)."""
    return ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def contract_implementations() -> list[tuple[str, str, str]]:
    """(op, device, backend) of every registered implementation that runs here: Triton on
    CPU tensors only under TRITON_INTERPRET=1, compiled backends unless KDFAST_NO_EXT=1."""
    found = []
    for op in _dispatch.ops():
        for device in contract_devices():
            for backend, impl in _dispatch.implementations(op).items():
                declared = _dispatch.BACKENDS[backend]
                if declared.unavailable is not None:
                    continue
                devices = impl.devices or declared.devices
                if devices is None or device in devices:
                    found.append((op, device, backend))
    return found


def require_backend(name: str) -> None:
    """Fail (not skip) when a backend that this run must test cannot run."""
    reason = _dispatch.BACKENDS[name].unavailable
    if reason is not None:
        pytest.fail(f"backend {name!r} must be tested in this run but is unavailable: {reason}")


#: the floating dtypes of the tolerance table (kdfast.testing.TOLERANCES), float64 first
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _parametrized_here(metafunc, name: str) -> bool:
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0]
        names = [n.strip() for n in names.split(",")] if isinstance(names, str) else names
        if name in names:
            return True
    return False


def pytest_generate_tests(metafunc):
    """``backend``: over backends_for(OP) of the test's module (``OP = "<op>"``)."""
    if "backend" in metafunc.fixturenames and not _parametrized_here(metafunc, "backend"):
        op = getattr(metafunc.module, "OP", None)
        if op is not None:
            metafunc.parametrize("backend", backends_for(op), indirect=True)


@pytest.fixture
def backend(request):
    """The test runs with ``request.param`` forced (a compiled backend that cannot run here
    fails the test, never skips it); parametrized per module over backends_for(OP)."""
    name = request.param
    if name != "reference":
        require_backend(name)
    with kdfast.use_backend(name):
        yield name


@pytest.fixture(params=contract_devices())
def device(request):
    return request.param


@pytest.fixture(params=DTYPES, ids=dtype_id)
def dtype(request):
    return request.param


@pytest.fixture(autouse=True)
def _restore_backend():
    """No test leaks a forced backend into the next one."""
    previous = _dispatch.forced_backend()
    yield
    _dispatch.set_backend(previous)


EXAMPLES = os.path.join(ROOT, "examples")


def example_main(script: str):
    """main() of examples/<script>; its dependencies (the ``examples`` extra) are skipped
    when missing, except under KDFAST_REQUIRE_EXAMPLES=1 (CI), where they must be present."""
    if os.environ.get("KDFAST_REQUIRE_EXAMPLES") == "1":
        import matplotlib  # noqa: F401
        import sklearn  # noqa: F401
    else:
        pytest.importorskip("sklearn")
        pytest.importorskip("matplotlib")
    return runpy.run_path(os.path.join(EXAMPLES, script))["main"]

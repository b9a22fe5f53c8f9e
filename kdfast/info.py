"""``python -m kdfast.info``: what was built and which backend runs each op.

Prints versions, whether the C++ extension and its CUDA sources were built (and if not,
why, loudly), whether Triton is importable, and for every op which backend the
dispatcher picks on CPU and on CUDA (float32 inputs), and why the others were passed over.

GPU readiness (kernel resources compiled ahead of time, occupancy, roofline floor) is
development tooling of the source checkout, not part of the package: ``python -m
tools.gpu.report`` from the checkout root.
"""

from __future__ import annotations

import argparse
import platform
import sys

import torch

import kdfast
from kdfast import _dispatch, _extension

DEVICES = ("cpu", "cuda")


def backend_table(dtype: torch.dtype = torch.float32) -> list[dict]:
    """One row per op: the chosen backend per device and the reasons others were skipped."""
    rows = []
    for op in _dispatch.ops():
        row = {"op": op}
        for device in DEVICES:
            verdicts = _dispatch.explain(op, device, dtype)
            chosen = next(name for name, reason in verdicts if reason is None)
            row[device] = chosen
            row[f"{device}_skipped"] = {n: r for n, r in verdicts if r is not None}
        rows.append(row)
    return rows


def _passed_over(row: dict) -> list[str]:
    """Why each backend ahead of the chosen one was skipped; a reason shared by both
    devices is printed once, unprefixed."""
    items = {}
    for dev in DEVICES:
        for name, reason in row[f"{dev}_skipped"].items():
            if _dispatch.PRIORITY.index(name) < _dispatch.PRIORITY.index(row[dev]):
                items.setdefault((name, reason), []).append(dev)
    return [
        f"{name}: {reason}" if len(devs) == len(DEVICES) else f"{devs[0]}/{name}: {reason}"
        for (name, reason), devs in items.items()
    ]


def _triton_version() -> str:
    try:
        import triton
    except Exception as exc:
        return f"not importable ({type(exc).__name__})"
    return triton.__version__


def report() -> str:
    build = _extension.build_info()
    lines = [
        f"kdfast {kdfast.__version__} ({kdfast.__file__.rsplit('/', 1)[0]})",
        f"python {platform.python_version()} on {platform.machine()}, {platform.system()}",
        f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'}; "
        f"CUDA devices: {torch.cuda.device_count() if torch.cuda.is_available() else 0}; "
        f"threads: {torch.get_num_threads()})",
        f"triton {_triton_version()}",
        "",
        "build:",
    ]
    if build["cpp"]:
        lines.append(f"  C++ extension kdfast._C: built against torch {build['torch_version']}")
        cuda = (
            "compiled for sm_" + ", sm_".join(a.replace(".", "") for a in build["cuda_archs"])
            if build["cuda"]
            else "not compiled (CPU torch build or no nvcc at build time)"
        )
        lines.append(f"  CUDA sources: {cuda}")
        blas = (
            "MKL on one thread per tile"
            if build["mkl_thread_local"]
            else "no MKL thread-local setting: the BLAS's own threading"
        )
        lines.append(
            f"  CPU passes: tiles shared by the calling thread and kdfast's helper threads, "
            f"up to {torch.get_num_threads()} threads; GEMMs in tiles: {blas}"
        )
    else:
        lines += [
            "  !!! C++ extension NOT LOADED: " + str(build["reason"]),
            "  !!! every op falls back to a slower backend (see below)",
        ]
    lines += ["", "backends (priority order):"]
    for name in _dispatch.PRIORITY:
        backend = _dispatch.BACKENDS[name]
        state = (
            "available" if backend.unavailable is None else f"unavailable: {backend.unavailable}"
        )
        lines.append(f"  {name:<10} {backend.description}; {state}")
    forced = _dispatch.forced_backend()
    lines += ["", f"forced backend: {forced or 'none (automatic)'}", ""]
    rows = backend_table()
    width = max(len(r["op"]) for r in rows) + 2
    lines.append(f"  {'op':<{width}}{'cpu':<12}{'cuda':<12}passed over (float32)")
    for row in rows:
        skipped = "; ".join(_passed_over(row))
        lines.append(f"  {row['op']:<{width}}{row['cpu']:<12}{row['cuda']:<12}{skipped}")
    lines += ["", *gpu_record_lines()]
    return "\n".join(lines)


def gpu_record_lines() -> list[str]:
    """Which GPU-only implementations a recorded GPU run has passed (chosen automatically on
    CUDA) and which are opt-in because no test has executed them on a GPU yet."""
    passed = _dispatch.gpu_passed()
    lines = [
        "GPU-only implementations (automatic on CUDA only after a recorded GPU run passed "
        "them; kdfast/gpu_results.json, written by tools/gpu_check.sh):"
    ]
    for op in _dispatch.ops():
        for name in _dispatch.implementations(op):
            if not _dispatch.needs_gpu_record(op, name):
                continue
            state = (
                "passed on a GPU"
                if (op, name) in passed
                else (f"opt-in ({_dispatch.NOT_RUN_ON_GPU}): kdfast.use_backend({name!r})")
            )
            lines.append(f"  {op}/{name}: {state}")
    if len(lines) == 1:
        lines.append("  none registered in this build (no CUDA sources compiled)")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdfast.info", description=__doc__)
    parser.parse_args(argv)
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m kdfast.info``: what was built and which backend runs each op.

Prints versions, whether the C++ extension and its CUDA sources were built (and if not,
why, loudly), whether Triton is importable, and for every op which backend the
dispatcher picks on CPU and on CUDA (float32 inputs), and why the others were passed over.

``--gpu`` adds a GPU readiness report computed without a GPU: every Triton kernel
configuration (``AOT_SPECS``) and every CUDA kernel (csrc/cuda/*.cu, source checkouts)
compiled for sm_80 and sm_90 with registers, spills, shared memory, block size and the
theoretical occupancy from the limits table of ``kdfast.occupancy``; and per benchmark
case and size the roofline floor on an H100 (``kdfast.bench.roofline``). All GPU figures
are estimates until a GPU measures them.
"""

from __future__ import annotations

import argparse
import os
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
            if not _dispatch.BACKENDS[name].needs_gpu_record:
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


def _kernel_line(kind: str, r, error: tuple[str, int, str] | None = None) -> str:
    """One kernel row: resources and theoretical occupancy, or the compile error."""
    from kdfast.occupancy import LIMITS, occupancy

    name, arch = (r.name, r.arch) if error is None else error[:2]
    head = f"  {kind:<7}{name:<44}sm_{arch}"
    if error is not None:
        return f"{head}  COMPILE ERROR: {error[2]}"
    if r.threads:
        occ = occupancy(r.arch, r.threads, r.registers, r.shared)
        where = LIMITS[r.arch].gpu.split()[0]
        occ_text = f"{occ.occupancy:6.1%} on {where} ({occ.blocks_per_sm} blk/SM, {occ.limiter})"
        block = str(r.threads)
    else:
        occ_text, block = "block size chosen at launch", "-"
    return f"{head}  {r.registers:>4} {r.spills:>6} {r.shared:>8} {block:>6}  {occ_text}"


def gpu_kernel_lines() -> list[str]:
    """Resource lines of every Triton spec and CUDA kernel for sm_80 and sm_90."""
    from kdfast.triton import aot

    lines = [
        "GPU kernels (compiled ahead of time here, no GPU; occupancy from the limits table):",
        f"  {'kind':<7}{'kernel[config]':<44}{'target':<7}{'regs':>5} {'spill':>6} "
        f"{'smem B':>8} {'block':>6}  theoretical occupancy",
    ]
    try:
        import triton  # noqa: F401

        specs = aot.all_specs()
    except ImportError as exc:
        specs = []
        lines.append(f"  triton: not importable ({exc}); Triton kernels not compiled")
    if not specs and len(lines) == 2:
        lines.append("  triton: no kernel module lists AOT_SPECS yet")
    for _, spec in specs:
        for arch in aot.TARGETS:
            try:
                lines.append(_kernel_line("triton", aot.compile_spec(spec, arch).resources))
            except Exception as exc:  # report, do not stop
                err = str(exc).strip().splitlines()[:1] or [type(exc).__name__]
                lines.append(_kernel_line("triton", None, (spec.name, arch, err[0][:80])))
    sources = aot.cuda_sources()
    if not sources:
        lines.append("  cuda: no csrc/cuda sources (not a source checkout)")
    elif aot.nvcc() is None:
        lines.append("  cuda: nvcc not found; CUDA kernels not compiled")
    for source in sources if aot.nvcc() else []:
        for arch in aot.TARGETS:
            try:
                found = aot.cuda_resources(source, arch)
            except Exception as exc:
                name = os.path.basename(source)
                lines.append(_kernel_line("cuda", None, (name, arch, type(exc).__name__)))
                continue
            lines += [_kernel_line("cuda", r) for r in found]
    return lines


def roofline_lines(dtype: torch.dtype = torch.float32) -> list[str]:
    """Roofline floor per benchmark case and size (forward+backward, H100 SXM)."""
    from kdfast.bench import roofline
    from kdfast.bench.cases import CASES

    gpu = roofline.H100_SXM
    lines = [
        f"roofline floor per call (forward+backward, {str(dtype).replace('torch.', '')}) on "
        f"{gpu['name']}: estimates, not measurements",
        f"  HBM {gpu['hbm_bytes_per_s'] / 1e12:.2f} TB/s; FP64 {gpu['fp64'] / 1e12:.0f} TF "
        f"(tensor {gpu['fp64_tensor'] / 1e12:.0f}); FP32 {gpu['fp32'] / 1e12:.0f} TF (no TF32); "
        f"FP16/BF16 tensor {gpu['fp16_tensor'] / 1e12:.0f} TF",
        f"  {'case':<14}{'size':<22}{'MB moved':>10}{'GFLOP mm':>11}{'GFLOP ew':>10}"
        f"{'mem us':>10}{'compute us':>12}{'floor us':>10}  bound",
    ]
    for case in CASES:
        if case.name not in roofline.FORMULAS:
            lines.append(f"  {case.name:<14}(no formula in kdfast.bench.roofline)")
            continue
        for size in roofline.benchmark_sizes(case):
            est = roofline.estimate(case.name, size, dtype)
            lines.append(
                f"  {case.name:<14}{str(size):<22}{est.bytes / 1e6:>10.3f}"
                f"{est.mm_flops / 1e9:>11.3f}{est.flops / 1e9:>10.3f}{est.memory_s * 1e6:>10.2f}"
                f"{est.compute_s * 1e6:>12.2f}{est.floor_s * 1e6:>10.2f}  {est.bound}"
            )
    return lines


def gpu_report() -> str:
    """The ``--gpu`` section: kernel resources and the roofline floor (estimates)."""
    return "\n".join(["", *gpu_kernel_lines(), "", *roofline_lines()])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdfast.info", description=__doc__)
    parser.add_argument(
        "--gpu",
        action="store_true",
        help="also compile every GPU kernel for sm_80/sm_90 and print resources, occupancy "
        "and the roofline floor (no GPU needed)",
    )
    args = parser.parse_args(argv)
    print(report())
    if args.gpu:
        print(gpu_report())
    return 0


if __name__ == "__main__":
    sys.exit(main())

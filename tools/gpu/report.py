"""``python -m tools.gpu.report`` (from the checkout root): GPU readiness computed without a
GPU.

Every Triton kernel configuration (``tools/gpu/specs/*.py``) and every CUDA kernel
(csrc/cuda/*.cu) compiled for sm_80 and sm_90 with registers, spills, shared memory, block
size and the theoretical occupancy from the limits table of ``tools.gpu.occupancy``; and per
benchmark case and size the roofline floor on an H100 (``kdfast.bench.roofline``). All GPU
figures are estimates until a GPU measures them. ``python -m kdfast.info`` says what was
built and which backend runs each op.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

import kdfast
from tools.gpu import aot, cuda
from tools.gpu.occupancy import LIMITS, occupancy


def _triton_version() -> str:
    try:
        import triton
    except Exception as exc:
        return f"not importable ({type(exc).__name__})"
    return triton.__version__


def header() -> str:
    """Which kdfast, torch and Triton the figures are for."""
    return (
        f"kdfast {kdfast.__version__} ({os.path.dirname(kdfast.__file__)}); "
        f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'}); "
        f"triton {_triton_version()}"
    )


def _kernel_line(kind: str, r, error: tuple[str, int, str] | None = None) -> str:
    """One kernel row: resources and theoretical occupancy, or the compile error."""
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
        lines.append("  triton: no kernel has a spec in tools/gpu/specs yet")
    for _, spec in specs:
        for arch in aot.TARGETS:
            try:
                lines.append(_kernel_line("triton", aot.compile_spec(spec, arch).resources))
            except Exception as exc:  # report, do not stop
                err = str(exc).strip().splitlines()[:1] or [type(exc).__name__]
                lines.append(_kernel_line("triton", None, (spec.name, arch, err[0][:80])))
    sources = cuda.cuda_sources()
    if not sources:
        lines.append("  cuda: no csrc/cuda sources (not a source checkout)")
    elif cuda.nvcc() is None:
        lines.append("  cuda: nvcc not found; CUDA kernels not compiled")
    for source in sources if cuda.nvcc() else []:
        for arch in aot.TARGETS:
            try:
                found = cuda.cuda_resources(source, arch)
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
    width = max(14, *(len(case.name) + 2 for case in CASES))
    lines = [
        f"roofline floor per call (forward+backward, {str(dtype).replace('torch.', '')}) on "
        f"{gpu['name']}: estimates, not measurements",
        f"  HBM {gpu['hbm_bytes_per_s'] / 1e12:.2f} TB/s; FP64 {gpu['fp64'] / 1e12:.0f} TF "
        f"(tensor {gpu['fp64_tensor'] / 1e12:.0f}); FP32 {gpu['fp32'] / 1e12:.0f} TF (no TF32); "
        f"FP16/BF16 tensor {gpu['fp16_tensor'] / 1e12:.0f} TF",
        f"  {'case':<{width}}{'size':<22}{'MB moved':>10}{'GFLOP mm':>11}{'GFLOP ew':>10}"
        f"{'mem us':>10}{'compute us':>12}{'floor us':>10}  bound",
    ]
    for case in CASES:
        if case.name not in roofline.FORMULAS:
            lines.append(f"  {case.name:<{width}}(no formula in kdfast.bench.roofline)")
            continue
        for size in roofline.benchmark_sizes(case):
            est = roofline.estimate(case.name, size, dtype)
            lines.append(
                f"  {case.name:<{width}}{str(size):<22}{est.bytes / 1e6:>10.3f}"
                f"{est.mm_flops / 1e9:>11.3f}{est.flops / 1e9:>10.3f}{est.memory_s * 1e6:>10.2f}"
                f"{est.compute_s * 1e6:>12.2f}{est.floor_s * 1e6:>10.2f}  {est.bound}"
            )
    return lines


def gpu_report() -> str:
    """Kernel resources and the roofline floor (estimates)."""
    return "\n".join(["", *gpu_kernel_lines(), "", *roofline_lines()])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.gpu.report", description=__doc__)
    parser.parse_args(argv)
    print(header())
    print(gpu_report())
    return 0


if __name__ == "__main__":
    sys.exit(main())

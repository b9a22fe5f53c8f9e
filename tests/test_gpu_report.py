"""GPU readiness without a GPU: CUDA sources compiled with ``nvcc -Xptxas -v`` for sm_80
and sm_90 within their spill budgets, the occupancy calculator, the ptxas log parser, the
roofline formulas and ``python -m tools.gpu.report`` (tools/gpu: development tooling of the
checkout, not in the wheel).

The CUDA tests need nvcc and a CUDA build of torch (its CUDA headers); they skip, saying
so, without them (the CPU-only torch stage). Each .cu is compiled once per arch per
session (a session temp dir caches the results).
"""

from __future__ import annotations

import os
import subprocess

import pytest
import torch

from kdfast.bench import roofline
from kdfast.bench.cases import CASES
from tools.gpu import aot, cuda, ptx, report
from tools.gpu.occupancy import LIMITS, occupancy

CUDA_READY = cuda.nvcc() is not None and torch.version.cuda is not None
needs_nvcc = pytest.mark.skipif(
    not CUDA_READY, reason="needs nvcc and a CUDA build of torch (CUDA headers)"
)
SOURCES = cuda.cuda_sources()


@pytest.fixture(scope="session")
def cuda_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("kdfast-aot-cuda"))


# ------------------------------------------------------------------ CUDA sources


@needs_nvcc
@pytest.mark.parametrize("arch", aot.TARGETS)
@pytest.mark.parametrize("source", SOURCES, ids=[os.path.basename(s) for s in SOURCES])
def test_cuda_source_compiles_within_spill_budget(source, arch, cuda_cache):
    kernels = cuda.cuda_resources(source, arch, cuda_cache)  # raises on a compile error
    assert kernels, f"{source}: no __global__ kernel found in the ptxas output"
    for r in kernels:
        assert r.arch == arch and 0 < r.registers <= LIMITS[arch].max_registers_per_thread
        budget = cuda.cuda_spill_budget(r.name)
        assert r.spills <= budget, f"{r.name} sm_{arch}: {r.spills} spill bytes > {budget}"
        if r.threads:
            assert occupancy(arch, r.threads, r.registers, r.shared).blocks_per_sm > 0


def test_cuda_sources_found_and_budgets_documented():
    if cuda.repo_root() is None:
        pytest.skip("not a source checkout (csrc/ is not installed)")
    assert any(s.endswith("rkd_distance.cu") for s in SOURCES)
    assert cuda.cuda_block_size(next(s for s in SOURCES if s.endswith("rkd_distance.cu"))) == 256
    for name, (budget, why) in cuda.CUDA_SPILL_BUDGETS.items():
        assert budget >= 0 and (budget == 0 or why), f"{name}: nonzero budget needs why"


SPILLING_CU = r"""
// 48 live doubles per thread under __launch_bounds__(1024, 2): at most 32 registers.
__global__ void __launch_bounds__(1024, 2) spiller(const double* x, double* y, int n) {
  double acc[48];
#pragma unroll
  for (int k = 0; k < 48; ++k) acc[k] = x[threadIdx.x + k * n];
  for (int it = 0; it < n; ++it) {
#pragma unroll
    for (int k = 0; k < 48; ++k) acc[k] = acc[k] * acc[(k + 7) % 48] + x[it];
  }
  double s = 0;
#pragma unroll
  for (int k = 0; k < 48; ++k) s += acc[k];
  y[threadIdx.x] = s;
}
"""


@needs_nvcc
def test_cuda_spills_are_detected(tmp_path):
    source = tmp_path / "spiller.cu"
    source.write_text(SPILLING_CU)
    (found,) = cuda.compile_cuda_source(str(source), 90, str(tmp_path))
    assert found.name == "spiller" and found.registers <= 32 and found.spills > 0
    assert (tmp_path / "spiller.cu.sm_90.cubin").exists()
    source.write_text("__global__ void broken( {}")
    with pytest.raises(subprocess.CalledProcessError):
        cuda.compile_cuda_source(str(source), 90, str(tmp_path))


# ------------------------------------------------------------------ ptxas log parsing

NVCC_LOG = """\
ptxas info    : 28 bytes gmem
ptxas info    : Compiling entry function '_ZN6kdfast3rkd11pair_kernelEPKdPdl' for 'sm_80'
ptxas info    : Function properties for _ZN6kdfast3rkd11pair_kernelEPKdPdl
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 20 registers, used 0 barriers, 380 bytes cmem[0]
ptxas info    : Compiling entry function 'tile' for 'sm_90a'
ptxas info    : Function properties for tile
    336 bytes stack frame, 344 bytes spill stores, 336 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 4096 bytes smem, 336 bytes cumulative stack
"""


def test_parse_ptxas_log():
    first, second = ptx.parse_ptxas_log(NVCC_LOG)
    assert (first.arch, first.registers, first.spills, first.shared) == (80, 20, 0, 0)
    assert (second.name, second.arch, second.registers) == ("tile", 90, 255)
    assert (second.spill_stores, second.spill_loads, second.stack) == (344, 336, 336)
    assert (second.shared, second.barriers, second.spills) == (4096, 1, 680)
    assert cuda.demangle([first.name, "_Z7spillerPKdPdi"]) == ["pair_kernel", "spiller"]
    assert cuda._unqualified(first.name) == "pair_kernel"
    assert cuda._unqualified("_Z7spillerPKdPdi") == "spiller"


# ------------------------------------------------------------------ occupancy


@pytest.mark.parametrize(
    "arch, threads, regs, shared, blocks, limiter",
    [
        (90, 256, 32, 0, 8, "warps"),  # 100%: 32 registers is the full-occupancy limit
        (90, 256, 33, 0, 6, "registers"),  # 33*32 -> 1280 per warp: 51 warps, 6 blocks
        (90, 256, 64, 0, 4, "registers"),  # 50%
        (90, 128, 128, 0, 4, "registers"),  # 16 warps: 25%
        (90, 128, 255, 0, 2, "registers"),  # 8192 per warp: 8 warps
        (90, 32, 96, 0, 20, "registers"),  # 3072 per warp: 5 warps in each of 4 partitions
        (90, 128, 16, 100 * 1024, 2, "shared"),  # (100 + 1 reserved) KiB of 228
        (80, 128, 16, 100 * 1024, 1, "shared"),  # of 164
        (80, 128, 16, 48 * 1024, 3, "shared"),  # 49 KiB blocks: 3 in 164
        (90, 32, 16, 0, 32, "blocks"),  # one warp per block: 32 blocks, 50%
    ],
)
def test_occupancy_table(arch, threads, regs, shared, blocks, limiter):
    occ = occupancy(arch, threads, regs, shared)
    assert (occ.blocks_per_sm, occ.limiter) == (blocks, limiter)
    assert occ.occupancy == blocks * (threads // 32) / 64


def test_occupancy_rejects_impossible_launches():
    assert occupancy(90, 128, 256, 0).blocks_per_sm == 0
    assert occupancy(90, 2048, 16, 0).limiter.startswith("cannot launch")
    assert occupancy(80, 128, 16, 200 * 1024).limiter.startswith("cannot launch")
    assert occupancy(90, 1024, 128, 0).limiter.startswith("cannot launch")  # 128K regs


# ------------------------------------------------------------------ roofline


def test_every_benchmark_case_has_a_roofline_formula():
    assert {c.name for c in CASES} <= set(roofline.FORMULAS)
    for case in CASES:
        for size in roofline.benchmark_sizes(case):
            for dtype in (torch.float64, torch.float32, torch.bfloat16):
                est = roofline.estimate(case.name, size, dtype)
                assert est.bytes > 0 and est.floor_s > 0 and est.bound in ("memory", "compute")


def test_roofline_figures():
    kd = roofline.estimate("kd", (4096, 32000), torch.float32)
    assert kd.bytes == 5 * 4096 * 32000 * 4 and kd.bound == "memory"
    assert kd.floor_s == pytest.approx(kd.bytes / 3.35e12)
    half = roofline.estimate("kd", (4096, 32000), torch.bfloat16)
    assert half.floor_s == pytest.approx(kd.floor_s / 2)
    rkd = roofline.estimate("rkd_distance", (1024, 2048, 2048), torch.float32)
    gemm = 2 * 1024**2 * 4096 * 2 + 2 * 1024**2 * 2048  # fwd + recomputed + gradient
    assert rkd.mm_flops == gemm and rkd.bound == "compute"
    assert rkd.compute_s == pytest.approx(gemm / 67e12 + rkd.flops / 34e12)
    assert roofline._squarings(32) == 1 and roofline._squarings(3024) == 4


# ------------------------------------------------------------------ python -m tools.gpu.report


def test_gpu_report(capsys, monkeypatch, cuda_cache):
    cached = cuda.cuda_resources
    monkeypatch.setattr(cuda, "cuda_resources", lambda s, a: cached(s, a, cuda_cache))
    assert report.main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("kdfast ") and "triton " in out  # what the figures are for
    assert "theoretical occupancy" in out and "estimates, not measurements" in out
    for case in CASES:
        assert f"  {case.name} " in out
    if CUDA_READY:
        # the CUDA kernel of csrc/cuda/rkd_distance.cu, once per target (a Triton kernel of
        # the same name is reported on "triton" lines)
        lines = [
            line
            for line in out.splitlines()
            if "pair_forward_kernel" in line and line.split()[0] == "cuda"
        ]
        assert len(lines) == 2
        assert all("on H100" in line or "on A100" in line for line in lines)


def test_benchmarks_readme_states_gpu_figures_as_estimates():
    root = cuda.repo_root()
    if root is None:
        pytest.skip("not a source checkout (benchmarks/README.md is not installed)")
    with open(os.path.join(root, "benchmarks", "README.md")) as f:
        text = f.read()
    section = text.split("## GPU estimates (not measured)", 1)[1].split("\n## ", 1)[0]
    assert "estimate" in section and "until a GPU measures" in section
    for case in CASES:
        assert f"| {case.name} |" in section, case.name


def test_runtime_package_imports_no_tooling():
    import ast

    import kdfast

    package = os.path.dirname(kdfast.__file__)
    for folder, _, files in os.walk(package):
        for name in (f for f in files if f.endswith(".py")):
            path = os.path.join(folder, name)
            with open(path) as f:
                tree = ast.parse(f.read(), path)
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    modules = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    modules = [node.module or ""]
                else:
                    continue
                assert not any(m == "tools" or m.startswith("tools.") for m in modules), (
                    f"{path} imports development tooling ({modules})"
                )

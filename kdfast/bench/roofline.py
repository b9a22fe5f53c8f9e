"""Roofline floor of each benchmark case on an H100: bytes moved and FLOPs per call.

One place for the per-op work formulas, keyed by the case names of ``kdfast.bench.cases``.
A "call" is what the benchmark times as "forward+backward" (the student's gradient; the
teacher needs none). Bytes are the compulsory HBM traffic only: inputs read and outputs
written once per pass (intermediates kept on chip, as a fully fused kernel would); the
backward pass re-reads its inputs. FLOPs are split into matrix-multiply FLOPs (2 per
multiply-add; tensor cores for fp16/bf16 and float64 (DMMA), CUDA cores for float32 since
kdfast never uses TF32) and elementwise FLOPs (exp, log, division counted as 1).

Every figure is an estimate, not a measurement: the floor is max(bytes / bandwidth,
FLOPs / rate), which assumes perfect overlap and peak rates; real kernels are slower.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

H100_SXM = {
    "name": "H100 SXM5 (dense peak, NVIDIA H100 datasheet)",
    "hbm_bytes_per_s": 3.35e12,  # HBM3
    "fp64": 34e12,  # CUDA cores
    "fp64_tensor": 67e12,  # DMMA
    "fp32": 67e12,  # CUDA cores (kdfast never uses TF32: 495e12 not applicable)
    "tf32_tensor": 495e12,
    "fp16_tensor": 990e12,  # bf16 alike, fp32 accumulation
}
"""H100 SXM5 peak rates (FLOP/s, dense, boost clock) and HBM3 bandwidth (bytes/s)."""

H200_SXM = {
    **H100_SXM,
    "name": "H200 SXM (H100's compute, HBM3e; NVIDIA H200 datasheet)",
    "hbm_bytes_per_s": 4.8e12,
}
"""H200 SXM: the H100's SMs and clocks with 141 GB of HBM3e at 4.8 TB/s."""


def gpu_peaks(name: str | None) -> dict:
    """The peak-rate table for a GPU by its device name (H100 when unknown)."""
    return H200_SXM if name and "H200" in name else H100_SXM


@dataclass(frozen=True)
class Work:
    """Work of one pass: compulsory bytes, matrix-multiply FLOPs, elementwise FLOPs."""

    bytes: float
    mm_flops: float = 0.0
    flops: float = 0.0

    def __add__(self, other: Work) -> Work:
        return Work(
            self.bytes + other.bytes, self.mm_flops + other.mm_flops, self.flops + other.flops
        )


def _logits(size, e, fwd_per_elem, bwd_per_elem):
    n = math.prod(size)
    return Work(2 * n * e, 0, fwd_per_elem * n), Work(3 * n * e, 0, bwd_per_elem * n)


def kd(size, e):
    """KDLoss (B, C): two temperature softmaxes and the KL per element."""
    return _logits(size, e, 12, 10)


def jsd(size, e):
    """JSDLoss (B, C): two temperature softmaxes, the mixture and its two KLs per element."""
    return _logits(size, e, 16, 14)


def dist(size, e):
    """DISTLoss (B, C) or per pixel (N, C, H, W): two softmaxes, row and column Pearson
    correlations."""
    return _logits(size, e, 20, 30)


def rkd_distance(size, e):
    """rkd_distance (N, Ds, Dt): Gram matrices (the backward recomputes them), pair math."""
    n, ds, dt = size
    fwd = Work(n * (ds + dt) * e, 2 * n * n * (ds + dt), 2 * 12 * n * n)
    bwd = Work(n * (2 * ds + dt) * e, 2 * n * n * (ds + dt) + 2 * n * n * ds, 2 * 20 * n * n)
    return fwd, bwd


def rkd_angle(size, e):
    """rkd_angle (N, Ds, Dt): Gram matrices (the backward recomputes them) and the streamed
    triple loop over N^3 triples."""
    n, ds, dt = size
    fwd = Work(n * (ds + dt) * e, 2 * n * n * (ds + dt), 20 * n**3)
    bwd = Work(n * (2 * ds + dt) * e, 2 * n * n * (ds + dt) + 2 * n * n * ds, 30 * n**3)
    return fwd, bwd


def rkd_angle_vertices(size, e):
    """rkd_angle_vertices (N, Ds, Dt, W): one rank's share of rkd_angle(gather=True), the
    vertices [0, N / W): the full Gram matrices, the triple loop over N^3 / W triples."""
    n, ds, dt, world = size
    fwd, bwd = rkd_angle((n, ds, dt), e)
    share = 1 / world
    return (
        Work(fwd.bytes, fwd.mm_flops, fwd.flops * share),
        Work(bwd.bytes, bwd.mm_flops, bwd.flops * share),
    )


def rkd(size, e):
    """RKDLoss (N, Ds, Dt): distance term plus the angle term over N^3 triples."""
    n = size[0]
    fwd, bwd = rkd_distance(size, e)
    return fwd + Work(0, 0, 20 * n**3), bwd + Work(0, 0, 30 * n**3)


def _squarings(n: int) -> int:
    """Squarings of Pade-13 scaling and squaring for the benchmark's skew A = (G - G^T)/sqrt(n):
    ||A||_1 ~ 1.13 sqrt(n) (G standard normal), theta_13 = 5.37."""
    return max(0, math.ceil(math.log2(1.13 * math.sqrt(n) / 5.37)))


def _expm_mm(batch: int, n: int) -> tuple[float, float]:
    """Matrix-multiply FLOPs of expm forward (6 products, the solve, the squarings) and of
    its Frechet-derivative backward (about 3x the forward: Al-Mohy and Higham 2009)."""
    fwd = batch * (2 * n**3 * (6 + _squarings(n)) + 8 / 3 * n**3)
    return fwd, 3 * fwd


def expm(size, e):
    """expm (batch, n) of skew-symmetric matrices."""
    batch, n = size
    fwd_mm, bwd_mm = _expm_mm(batch, n)
    return Work(2 * batch * n * n * e, fwd_mm), Work(3 * batch * n * n * e, bwd_mm)


def vkd(size, e):
    """VkDLoss (B, Ds, Dt): orthogonal projector exp(A) (n = max(Ds, Dt), float32
    parameters), the projection, standardisation and MSE."""
    b, ds, dt = size
    n = max(ds, dt)
    fwd_mm, bwd_mm = _expm_mm(1, n)
    fwd = Work(b * (ds + dt) * e + 4 * n * n, fwd_mm + 2 * b * ds * dt, 10 * b * dt)
    bwd = Work(b * (2 * ds + dt) * e + 8 * n * n, bwd_mm + 4 * b * ds * dt, 15 * b * dt)
    return fwd, bwd


def _fused_linear(per_elem_fwd, per_elem_bwd, passes=1):
    """``passes``: reads of the row chunks in the forward; "dist" makes 2 (its second pass
    recomputes both heads' logits, so each logit GEMM runs twice)."""

    def work(size, e):
        """Fused linear-head distillation (T, H, V): the two heads' logit GEMMs and the row
        math per logit (the logits stay in chunks); backward: the student's two GEMMs."""
        t, h, v = size
        io = (2 * t * h + 2 * v * h) * e
        fwd = Work(passes * io, passes * 2 * (2 * t * h * v), per_elem_fwd * t * v)
        bwd = Work(io + (t * h + v * h) * e, 2 * (2 * t * h * v), per_elem_bwd * t * v)
        return fwd, bwd

    return work


FORMULAS = {
    "fused_linear_kd": _fused_linear(12, 10),
    "fused_linear_jsd": _fused_linear(16, 14),
    "fused_linear_dist": _fused_linear(20, 30, passes=2),
    "kd": kd,
    "jsd": jsd,
    "dist": dist,
    "dist_seg": dist,
    "rkd_distance": rkd_distance,
    "rkd_angle": rkd_angle,
    "rkd_angle_vertices": rkd_angle_vertices,
    "rkd": rkd,
    "vkd": vkd,
    "expm": expm,
}
"""Case name -> (size, element bytes) -> (forward Work, backward Work)."""

MM_PRECISION = {
    "rkd_distance": torch.float64,
    "rkd_angle": torch.float64,
    "rkd_angle_vertices": torch.float64,
    "rkd": torch.float64,
}
"""Cases whose matrix products run in float64 whatever the input dtype (the float64 Gram
matrix of csrc/rkd_distance_op.cpp)."""

ELEMENTWISE_PRECISION = {
    "rkd_distance": torch.float64,
    "rkd_angle": torch.float64,
    "rkd_angle_vertices": torch.float64,
    "rkd": torch.float64,
}
"""Cases whose elementwise math runs in float64 whatever the input dtype (the pair
kernels of csrc/cuda/rkd_distance.cu); others compute in max(float32, input dtype)."""


@dataclass(frozen=True)
class Estimate:
    """Roofline floor of one call (forward + backward) of one case at one size."""

    case: str
    size: tuple[int, ...]
    dtype: torch.dtype
    bytes: float
    mm_flops: float
    flops: float
    memory_s: float
    compute_s: float

    @property
    def floor_s(self) -> float:
        """max(memory time, compute time): the roofline floor in seconds."""
        return max(self.memory_s, self.compute_s)

    @property
    def bound(self) -> str:
        """ "memory" or "compute": which roof sets the floor."""
        return "memory" if self.memory_s >= self.compute_s else "compute"


def _rates(mm_dtype: torch.dtype, gpu: dict) -> tuple[float, float]:
    """(matrix-multiply rate, elementwise rate) in FLOP/s for a compute dtype."""
    if mm_dtype == torch.float64:
        return gpu["fp64_tensor"], gpu["fp64"]
    if mm_dtype in (torch.float16, torch.bfloat16):
        return gpu["fp16_tensor"], gpu["fp32"]
    return gpu["fp32"], gpu["fp32"]


def estimate(case: str, size: tuple[int, ...], dtype: torch.dtype, gpu=H100_SXM) -> Estimate:
    """Roofline floor of ``case`` (a name of kdfast.bench.cases.CASES) at ``size``."""
    e = torch.empty((), dtype=dtype).element_size()
    fwd, bwd = FORMULAS[case](size, e)
    work = fwd + bwd
    mm_dtype = MM_PRECISION.get(case, dtype)
    mm_rate = _rates(mm_dtype, gpu)[0]
    ew_rate = _rates(ELEMENTWISE_PRECISION.get(case, dtype), gpu)[1]
    compute = work.mm_flops / mm_rate + work.flops / ew_rate
    return Estimate(
        case,
        tuple(size),
        dtype,
        work.bytes,
        work.mm_flops,
        work.flops,
        work.bytes / gpu["hbm_bytes_per_s"],
        compute,
    )


def benchmark_sizes(case) -> list[tuple[int, ...]]:
    """All sizes of a case over its suites, in suite order, without repeats."""
    sizes: list[tuple[int, ...]] = []
    for suite in ("smoke", "quick", "full"):
        for size in case.sizes.get(suite, []):
            if tuple(size) not in sizes:
                sizes.append(tuple(size))
    return sizes

"""Benchmark cases: what to run, at which sizes, and how much memory a baseline needs.

A case's ``setup(size, device, dtype)`` returns ``(forward, params)``: ``forward()`` computes
the loss through the public kdfast API (so the dispatcher picks the backend) and
``params`` are the tensors that receive gradients. The harness runs it as three
implementations: "kdfast" (automatic backend), "reference" (forced reference backend,
eager: the official formula) and "compiled" (``torch.compile`` of the reference).
A new loss or kernel adds its cases here; ``benchmarks/`` exposes the same cases to
pytest-benchmark.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import kdfast
from kdfast._validation import compute_dtype

GiB = 1 << 30


@dataclass(frozen=True)
class Case:
    """A benchmark case.

    Attributes:
        name: short id used on the command line and in JSON.
        title: what is measured, with the meaning of the size tuple.
        op: the dispatcher op whose backend is reported.
        sizes: size tuples per suite ("smoke", "quick", "full").
        setup: (size, device, dtype) -> (forward, params).
        reference_bytes: size -> estimated peak bytes of the eager reference, used to skip
            baselines predicted to exceed 60% of RAM (compiled assumed the same).
        truth_bytes: size -> estimated peak bytes of the error measurement when kdfast's own
            float64 run is the truth (float32 and float64 inputs and gradients); the error
            columns are skipped above 60% of RAM.
        baselines: further implementations measured in the same run, name -> setup of the
            same signature (e.g. another library's loss, or the GEMMs alone as a floor); a
            setup raising ImportError marks its baseline skipped.
    """

    name: str
    title: str
    op: str
    sizes: dict[str, list[tuple[int, ...]]]
    setup: Callable
    reference_bytes: Callable[[tuple[int, ...]], int] = field(default=lambda size: 0)
    truth_bytes: Callable[[tuple[int, ...]], int] = field(default=lambda size: 0)
    baselines: dict[str, Callable] = field(default_factory=dict)


def _randn(*shape, device, dtype, seed, grad=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    return x.requires_grad_(grad)


def _logit_pair(size, device, dtype):
    b, c = size
    s = _randn(b, c, device=device, dtype=dtype, seed=0, grad=True)
    t = _randn(b, c, device=device, dtype=dtype, seed=1)
    return s, t


def setup_dist_segmentation(size, device, dtype):
    """Per-pixel DIST on (N, C, H, W) logits, read in place as N * H * W rows (the
    segmentation recipe: no T^2 scaling)."""
    s = _randn(*size, device=device, dtype=dtype, seed=0, grad=True)
    t = _randn(*size, device=device, dtype=dtype, seed=1)
    loss = kdfast.losses.DISTLoss(temperature_squared=False)
    return (lambda: loss(s, t)), [s]


def _feature_pair(size, device, dtype):
    n, ds, dt = size
    s = _randn(n, ds, device=device, dtype=dtype, seed=0, grad=True)
    t = _randn(n, dt, device=device, dtype=dtype, seed=1)
    return s, t


def setup_kd(size, device, dtype):
    s, t = _logit_pair(size, device, dtype)
    loss = kdfast.losses.KDLoss(temperature=4.0)
    return (lambda: loss(s, t)), [s]


def setup_jsd(size, device, dtype):
    s, t = _logit_pair(size, device, dtype)
    loss = kdfast.losses.kd.JSDLoss(beta=0.5)
    return (lambda: loss(s, t)), [s]


def setup_dist(size, device, dtype):
    s, t = _logit_pair(size, device, dtype)
    loss = kdfast.losses.DISTLoss()
    return (lambda: loss(s, t)), [s]


def setup_rkd(size, device, dtype):
    s, t = _feature_pair(size, device, dtype)
    loss = kdfast.losses.RKDLoss()
    return (lambda: loss(s, t)), [s]


def setup_rkd_distance(size, device, dtype):
    s, t = _feature_pair(size, device, dtype)
    return (lambda: kdfast.functional.rkd_distance(s, t)), [s]


def setup_rkd_angle(size, device, dtype):
    s, t = _feature_pair(size, device, dtype)
    return (lambda: kdfast.functional.rkd_angle(s, t)), [s]


def setup_rkd_angle_vertices(size, device, dtype):
    """One rank's share of ``rkd_angle(gather=True)`` on W ranks: vertices [0, N / W)."""
    n, ds, dt, world = size
    s, t = _feature_pair((n, ds, dt), device, dtype)
    return (lambda: kdfast.functional._call("rkd_angle_vertices", s, t, 0, n // world)), [s]


def setup_vkd(size, device, dtype):
    b, ds, dt = size
    s, t = _feature_pair(size, device, dtype)
    loss = kdfast.losses.VkDLoss(ds, dt).to(device=device, dtype=compute_dtype(dtype))
    return (lambda: loss(s, t)), [s, *loss.parameters()]


def setup_expm(size, device, dtype):
    batch, n = size
    a = _randn(batch, n, n, device=device, dtype=dtype, seed=0) / n**0.5
    a = (a - a.mT).requires_grad_(True)
    return (lambda: kdfast.linalg.expm(a, skew=True)), [a]


def _lm_heads(size, device, dtype):
    """(xs, ws, xt, wt, labels) on (T, H, V): student and teacher heads of width H, labels
    with a tenth of the tokens ignored; the student's tensors require grad."""
    tokens, hidden, vocab = size
    xs = _randn(tokens, hidden, device=device, dtype=dtype, seed=0, grad=True)
    ws = (_randn(vocab, hidden, device=device, dtype=dtype, seed=1) / hidden**0.5).requires_grad_()
    xt = _randn(tokens, hidden, device=device, dtype=dtype, seed=2)
    wt = _randn(vocab, hidden, device=device, dtype=dtype, seed=3) / hidden**0.5
    labels = torch.randint(0, vocab, (tokens,), generator=torch.Generator().manual_seed(4))
    labels[::10] = -100
    return xs, ws, xt, wt, labels.to(device)


def _fused_linear(divergence: str, **options):
    """fused_linear_distill on (T, H, V) (:func:`_lm_heads`). The "reference"
    implementation materialises the logits."""

    def setup(size, device, dtype):
        xs, ws, xt, wt, labels = _lm_heads(size, device, dtype)

        def forward():
            return kdfast.functional.fused_linear_distill(
                xs, ws, xt, wt, divergence=divergence, labels=labels, **options
            )

        return forward, [xs, ws]

    return setup


class _FourGemms(torch.autograd.Function):
    """The floor of a fused linear-head loss: the two heads' logit GEMMs in the forward, the
    student's two gradient GEMMs (``dZ W``, ``dZ^T X``) in the backward, with a fixed dZ."""

    @staticmethod
    def forward(ctx, xs, ws, xt, wt):
        zs, zt = xs @ ws.T, xt @ wt.T
        ctx.save_for_backward(xs, ws, zs)
        return zs[0, 0] + zt[0, 0]

    @staticmethod
    def backward(ctx, grad):
        xs, ws, dz = ctx.saved_tensors
        return dz @ ws, dz.T @ xs, None, None


def setup_four_gemms(size, device, dtype):
    """Baseline "gemms": the four (T, H) x (H, V) GEMMs alone, unchunked."""
    xs, ws, xt, wt, _ = _lm_heads(size, device, dtype)
    return (lambda: _FourGemms.apply(xs, ws, xt, wt)), [xs, ws]


def setup_liger_jsd(beta: float, hard_loss_weight: float):
    """Baseline "liger": Liger-Kernel's LigerFusedLinearJSDLoss (chunked, torch.compile'd
    chunks; it runs on CPU too) with the case's options; ImportError where not installed."""

    def setup(size, device, dtype):
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        xs, ws, xt, wt, labels = _lm_heads(size, device, dtype)
        loss = LigerFusedLinearJSDLoss(
            weight_hard_loss=hard_loss_weight, weight_soft_loss=1.0, beta=beta
        )
        return (lambda: loss(xs, ws, xt, wt, labels)), [xs, ws]

    return setup


def _fused_linear_bytes(size):
    tokens, hidden, vocab = size
    return 8 * tokens * vocab * 4  # materialised logits, log-softmaxes and gradients


def _fused_linear_dist_bytes(size):
    tokens, hidden, vocab = size
    # logits, kept-row copies, softmaxes, row- and column-centred copies and their gradients
    return 14 * tokens * vocab * 4


def _logit_bytes(size):
    return 12 * math.prod(size) * 4  # about a dozen (B, C) float32 temporaries


def _logit_truth_bytes(size):
    return 3 * math.prod(size) * (4 + 8)  # inputs and gradient in float32 and in float64


def _rkd_bytes(size):
    n, ds, dt = size
    # difference tensors (N, N, D) and their normalised copies, angle tensors (N, N, N), x2 sides
    return 4 * (4 * n * n * (ds + dt) + 6 * n**3)


def _rkd_vertices_bytes(size):
    n, ds, dt, world = size
    rows = n // world
    # (rows, N, D) differences and normalised copies, (rows, N, N) angles, x2 sides
    return 4 * (2 * rows * n * (ds + dt) + 6 * rows * n * n)


CASES: list[Case] = [
    Case(
        "kd",
        "KDLoss T=4 (B, C)",
        "kd_loss",
        {
            "smoke": [(64, 100)],
            "quick": [(256, 1000), (1024, 32000)],
            "full": [(4096, 32000), (8192, 128000)],
        },
        setup_kd,
        _logit_bytes,
        _logit_truth_bytes,
    ),
    Case(
        "jsd",
        "JSDLoss beta=0.5 (B, C)",
        "jsd_loss",
        {
            "smoke": [(64, 100)],
            "quick": [(256, 1000), (1024, 32000)],
            "full": [(4096, 32000), (8192, 128000)],
        },
        setup_jsd,
        _logit_bytes,
        _logit_truth_bytes,
    ),
    Case(
        "dist",
        "DISTLoss (B, C)",
        "dist_loss",
        {
            "smoke": [(64, 100)],
            "quick": [(256, 1000), (1024, 32000)],
            "full": [(4096, 32000), (8192, 128000)],
        },
        setup_dist,
        _logit_bytes,
        _logit_truth_bytes,
    ),
    Case(
        "dist_seg",
        "DISTLoss per pixel, temperature_squared=False (N, C, H, W)",
        "dist_loss",
        {"smoke": [(2, 5, 8, 8)], "quick": [(8, 19, 256, 256)], "full": [(8, 19, 512, 1024)]},
        setup_dist_segmentation,
        _logit_bytes,
        _logit_truth_bytes,
    ),
    Case(
        "rkd_distance",
        "rkd_distance (N, Ds, Dt)",
        "rkd_distance",
        {"smoke": [(16, 32, 32)], "quick": [(128, 512, 512), (1024, 2048, 2048)], "full": []},
        setup_rkd_distance,
        lambda size: 4 * 4 * size[0] ** 2 * (size[1] + size[2]),
    ),
    Case(
        "rkd",
        "RKDLoss distance+angle (N, Ds, Dt)",
        "rkd_angle",
        {
            "smoke": [(16, 32, 32)],
            "quick": [(128, 512, 512), (256, 2048, 2048)],
            "full": [(1024, 2048, 2048), (4096, 4096, 4096)],
        },
        setup_rkd,
        _rkd_bytes,
    ),
    Case(
        "rkd_angle",
        "rkd_angle (N, Ds, Dt)",
        "rkd_angle",
        {"smoke": [(16, 32, 32)], "quick": [(128, 512, 512)], "full": [(256, 2048, 2048)]},
        setup_rkd_angle,
        _rkd_bytes,
    ),
    Case(
        "rkd_angle_vertices",
        "rkd_angle_vertices [0, N/W) (N, Ds, Dt, W)",
        "rkd_angle_vertices",
        {
            "smoke": [(16, 32, 32, 2)],
            "quick": [(384, 128, 128, 3), (768, 128, 128, 4)],
            "full": [(2048, 512, 512, 8)],
        },
        setup_rkd_angle_vertices,
        _rkd_vertices_bytes,
    ),
    Case(
        "vkd",
        "VkDLoss standardize (B, Ds, Dt)",
        "vkd_loss",
        {"smoke": [(16, 8, 24)], "quick": [(256, 192, 768)], "full": [(256, 384, 3024)]},
        setup_vkd,
    ),
    Case(
        "expm",
        "expm skew (batch, n)",
        "expm",
        {"smoke": [(4, 8)], "quick": [(1024, 32), (1, 256)], "full": [(1, 768), (1, 3024)]},
        setup_expm,
    ),
]

_GEMMS = {"gemms": setup_four_gemms}
for _name, _title, _divergence, _options, _baselines in (
    ("fused_linear_kd", "kl T=2", "kl", {"temperature": 2.0}, _GEMMS),
    # the target case: Liger's JSD with the hard loss off
    ("fused_linear_jsd", "jsd beta=0.5", "jsd", {"beta": 0.5},
     {**_GEMMS, "liger": setup_liger_jsd(0.5, 0.0)}),
    # two passes over the chunks, plain PyTorch ops (kdfast/_fused_linear_dist.py)
    ("fused_linear_dist", "dist T=1 + 0.5 CE", "dist", {"hard_loss_weight": 0.5}, _GEMMS),
):  # fmt: skip
    CASES.append(
        Case(
            _name,
            f"fused_linear_distill {_title} (T, H, V)",
            "fused_linear_distill",
            {
                "smoke": [(64, 32, 100)],
                "quick": [(1024, 512, 32000)],
                "full": [(4096, 2048, 128256)],
            },
            _fused_linear(_divergence, **_options),
            _fused_linear_dist_bytes if _divergence == "dist" else _fused_linear_bytes,
            lambda size: 0,
            _baselines,
        )
    )

BY_NAME = {case.name: case for case in CASES}

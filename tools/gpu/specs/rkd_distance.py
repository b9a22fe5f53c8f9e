"""Compile configurations of kdfast/triton/rkd_distance.py."""

from __future__ import annotations

from kdfast.triton.rkd_distance import BLOCK, pair_backward_kernel, pair_forward_kernel
from tools.gpu.aot import KernelSpec

_PAIR_SIGNATURE = {"g_ptr": "*fp64", "pair_dist_ptr": "*fp64", "n": "i32", "BLOCK": "constexpr"}
AOT_SPECS = [
    KernelSpec(
        pair_forward_kernel,
        _PAIR_SIGNATURE,
        {"BLOCK": BLOCK},
        label=f"fp64 BLOCK={BLOCK}",
    ),
    KernelSpec(
        pair_backward_kernel,
        {
            "g_ptr": "*fp64",
            "grad_pair_dist_ptr": "*fp64",
            "grad_d2_ptr": "*fp64",
            "n": "i32",
            "BLOCK": "constexpr",
        },
        {"BLOCK": BLOCK},
        label=f"fp64 BLOCK={BLOCK}",
    ),
]

"""Compile configurations of kdfast/triton/rkd_angle.py."""

from __future__ import annotations

from kdfast.triton.rkd_angle import (
    BLOCK_J,
    BLOCK_K,
    BLOCK_PAIR,
    column_kernel,
    pair_kernel,
    row_kernel,
)
from tools.gpu.aot import KernelSpec


def _sig(*names: str) -> dict[str, str]:
    return {name: "*fp64" for name in names}


AOT_SPECS = [
    KernelSpec(
        pair_kernel,
        {
            **_sig("g_ptr", "x_ptr", "r_ptr", "active_ptr", "fix_ptr"),
            "n": "i32",
            "dim": "i32",
            "BLOCK": "constexpr",
        },
        {"BLOCK": BLOCK_PAIR},
        label=f"fp64 BLOCK={BLOCK_PAIR}",
    ),
    *[
        KernelSpec(
            row_kernel,
            {
                **_sig("gs_ptr", "rs_ptr", "fs_ptr", "gt_ptr", "rt_ptr", "ft_ptr", "loss_ptr"),
                **_sig("ws_ptr", "ps_ptr", "wt_ptr", "pt_ptr"),
                "n": "i32",
                "start": "i32",
                "GRAD": "constexpr",
                "BLOCK_J": "constexpr",
                "BLOCK_K": "constexpr",
            },
            {"GRAD": grad, "BLOCK_J": BLOCK_J, "BLOCK_K": BLOCK_K},
            label=f"fp64 GRAD={grad} BLOCK_J={BLOCK_J} BLOCK_K={BLOCK_K}",
        )
        for grad in (False, True)
    ],
    KernelSpec(
        column_kernel,
        {
            **_sig("gs_ptr", "rs_ptr", "fs_ptr", "gt_ptr", "rt_ptr", "ft_ptr", "ms_ptr", "mt_ptr"),
            "n": "i32",
            "start": "i32",
            "stop": "i32",
            "BLOCK_J": "constexpr",
            "BLOCK_K": "constexpr",
        },
        {"BLOCK_J": BLOCK_J, "BLOCK_K": BLOCK_K},
        label=f"fp64 BLOCK_J={BLOCK_J} BLOCK_K={BLOCK_K}",
    ),
]

"""Compile configurations of kdfast/triton/dist_loss.py."""

from __future__ import annotations

from kdfast.triton.dist_loss import (
    MERGE_BLOCK,
    _warps,
    dist_grad_kernel,
    dist_merge_kernel,
    dist_stats_kernel,
    grad_blocks,
    stats_blocks,
)
from tools.gpu.aot import KernelSpec

_STRIDES = {"s_rs": "i64", "s_cs": "i64", "t_rs": "i64", "t_cs": "i64", "S": "i64"}


def _stats_spec(dtype: str, sigmoid: bool, n_cols: int, spatial: bool = False) -> KernelSpec:
    acc = "fp64" if dtype == "fp64" else "fp32"
    block_r, block_c, resident = stats_blocks(1 << 20, n_cols, 8 if acc == "fp64" else 4)
    signature = {
        "s_ptr": f"*{dtype}",
        "t_ptr": f"*{dtype}",
        "mask_ptr": "*i8",
        "params_ptr": f"*{acc}",
        "row_ptr": f"*{acc}",
        "col_ptr": f"*{acc}",
        "count_ptr": f"*{acc}",
        "n_rows": "i64",
        "n_cols": "i32",
        **_STRIDES,
    }
    constexprs = {"SIGMOID": sigmoid, "HAS_MASK": True, "RESIDENT": resident}
    constexprs |= {"SPATIAL": spatial, "BLOCK_R": block_r, "BLOCK_C": block_c}
    signature |= {k: "constexpr" for k in constexprs}
    label = f"{dtype} sigmoid={sigmoid} spatial={spatial} BLOCK_R={block_r} BLOCK_C={block_c}"
    return KernelSpec(
        dist_stats_kernel, signature, constexprs, num_warps=_warps(resident), label=label
    )


def _merge_spec(acc: str) -> KernelSpec:
    signature = {
        "col_ptr": f"*{acc}",
        "count_ptr": f"*{acc}",
        "coef_ptr": f"*{acc}",
        "rho_ptr": f"*{acc}",
        "n_cols": "i32",
        "n_groups": "i32",
        "BLOCK": "constexpr",
    }
    return KernelSpec(
        dist_merge_kernel, signature, {"BLOCK": MERGE_BLOCK}, label=f"{acc} BLOCK={MERGE_BLOCK}"
    )


def _grad_spec(dtype: str, sigmoid: bool, n_cols: int, spatial: bool = False) -> KernelSpec:
    acc = "fp64" if dtype == "fp64" else "fp32"
    block_r, block_c, resident = grad_blocks(1 << 20, n_cols, 8 if acc == "fp64" else 4)
    signature = {
        "s_ptr": f"*{dtype}",
        "t_ptr": f"*{dtype}",
        "mask_ptr": "*i8",
        "params_ptr": f"*{acc}",
        "row_ptr": f"*{acc}",
        "coef_ptr": f"*{acc}",
        "gs_ptr": f"*{dtype}",
        "gt_ptr": f"*{dtype}",
        "n_rows": "i64",
        "n_cols": "i32",
        **_STRIDES,
    }
    constexprs = {"SIGMOID": sigmoid, "HAS_MASK": True, "GRAD_S": True, "GRAD_T": True}
    constexprs |= {"RESIDENT": resident, "SPATIAL": spatial}
    constexprs |= {"BLOCK_R": block_r, "BLOCK_C": block_c}
    signature |= {k: "constexpr" for k in constexprs}
    label = f"{dtype} sigmoid={sigmoid} spatial={spatial} BLOCK_R={block_r} BLOCK_C={block_c}"
    return KernelSpec(
        dist_grad_kernel, signature, constexprs, num_warps=_warps(resident), label=label
    )


#: launch configurations: every dtype with softmax at ImageNet (RESIDENT), the widest
#: RESIDENT and LLM-vocabulary (chunked) widths, sigmoid in float32, (N, C, S) inputs,
#: the merge in both compute dtypes.
AOT_SPECS = (
    [
        make(dtype, False, n_cols)
        for make in (_stats_spec, _grad_spec)
        for dtype in ("fp16", "bf16", "fp32")
        for n_cols in (1000, 2048, 32000)
    ]
    + [
        make("fp64", False, n_cols)
        for make in (_stats_spec, _grad_spec)
        for n_cols in (1000, 32000)
    ]
    + [
        make("fp32", True, n_cols)
        for make in (_stats_spec, _grad_spec)
        for n_cols in (80, 1000, 32000)
    ]
    + [
        make("fp16", False, n_cols, spatial=True)
        for make in (_stats_spec, _grad_spec)
        for n_cols in (19, 32000)
    ]
    + [_merge_spec("fp32"), _merge_spec("fp64")]
)

"""Compile configurations of kdfast/triton/jsd_loss.py."""

from __future__ import annotations

from kdfast.triton.jsd_loss import FORWARD_KL, MIXTURE, REVERSE_KL, blocks, jsd_loss_kernel
from tools.gpu.aot import KernelSpec


def _spec(
    dtype: str,
    mode: int,
    grad_s: bool,
    grad_t: bool,
    n_cols: int,
    near: bool = False,
    spatial: bool = False,
) -> KernelSpec:
    acc = "fp64" if dtype == "fp64" else "fp32"
    block_r, block_c = blocks(n_cols, 8 if acc == "fp64" else 4)
    signature = {
        "s_ptr": f"*{dtype}",
        "t_ptr": f"*{dtype}",
        "mask_ptr": "*i8",
        "params_ptr": f"*{acc}",
        "row_loss_ptr": f"*{acc}",
        "gs_ptr": f"*{dtype}",
        "gt_ptr": f"*{dtype}",
        "n_rows": "i64",
        "n_cols": "i32",
        "s_rs": "i64",
        "s_cs": "i64",
        "t_rs": "i64",
        "t_cs": "i64",
        "S": "i64",
    }
    constexprs = {"MODE": mode, "NEAR": near, "HAS_MASK": True, "GRAD_S": grad_s}
    constexprs |= {"GRAD_T": grad_t, "SPATIAL": spatial, "BLOCK_R": block_r, "BLOCK_C": block_c}
    signature |= {k: "constexpr" for k in constexprs}
    return KernelSpec(
        jsd_loss_kernel,
        signature,
        constexprs,
        label=f"{dtype} mode={mode} near={near} grad_s={grad_s} grad_t={grad_t} "
        f"spatial={spatial} BLOCK_R={block_r} BLOCK_C={block_c}",
    )


#: the launch configurations: every dtype with the mixture (loss alone, the student's
#: gradient, both; tiles of 4 rows of 256 classes, and the one-row column blocks of a large
#: vocabulary), the mixture near the ends (its second log), both end points with both
#: gradients, (N, C, S) logits.
AOT_SPECS = [
    _spec(dtype, MIXTURE, grad_s, grad_t, n_cols)
    for dtype in ("fp16", "bf16", "fp32")
    for grad_s, grad_t in ((False, False), (True, False), (True, True))
    for n_cols in (256, 32000)
] + [
    _spec("fp64", MIXTURE, True, True, 32000),
    *(_spec(dtype, MIXTURE, True, True, 32000, near=True) for dtype in ("bf16", "fp32", "fp64")),
    *(
        _spec(d, mode, True, True, 32000)
        for d in ("bf16", "fp32")
        for mode in (FORWARD_KL, REVERSE_KL)
    ),
    *(_spec("fp16", MIXTURE, True, True, n_cols, spatial=True) for n_cols in (19, 32000)),
]

"""Compile configurations of kdfast/triton/kd_loss.py."""

from __future__ import annotations

from kdfast.triton.kd_loss import blocks, kd_loss_kernel
from tools.gpu.aot import KernelSpec


def _spec(
    dtype: str,
    kind: int,
    grad: bool,
    n_cols: int,
    warps: int = 4,
    spatial: bool = False,
    teacher_grad: bool | None = None,
) -> KernelSpec:
    """grad: the student's gradient; teacher_grad: the teacher's (default: as grad)."""
    teacher_grad = grad if teacher_grad is None else teacher_grad
    acc = "fp64" if dtype == "fp64" else "fp32"
    block_r, block_c = blocks(n_cols, 8 if acc == "fp64" else 4)
    signature = {
        "s_ptr": f"*{dtype}",
        "t_ptr": f"*{dtype}",
        "mask_ptr": "*i8",
        "params_ptr": f"*{acc}",
        "row_kl_ptr": f"*{acc}",
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
    constexprs = {"KIND": kind, "HAS_MASK": True, "GRAD_S": grad, "GRAD_T": teacher_grad}
    constexprs["SPATIAL"] = spatial
    constexprs |= {"BLOCK_R": block_r, "BLOCK_C": block_c}
    signature |= {k: "constexpr" for k in constexprs}
    return KernelSpec(
        kd_loss_kernel,
        signature,
        constexprs,
        num_warps=warps,
        label=f"{dtype} kind={kind} grad={grad} teacher_grad={teacher_grad} spatial={spatial} "
        f"BLOCK_R={block_r} BLOCK_C={block_c}",
    )


#: the launch configurations: every dtype, teacher logits with no gradient, the student's
#: alone (the usual case: pass 2 writes it) and both (ImageNet-sized and large-vocabulary
#: column blocks), the other teacher kinds.
AOT_SPECS = [
    _spec(dtype, 0, grad, n_cols, teacher_grad=teacher_grad)
    for dtype in ("fp16", "bf16", "fp32")
    for grad, teacher_grad in ((False, False), (True, False), (True, True))
    for n_cols in (1000, 32000)
] + [
    *(_spec(dtype, kind, True, 32000) for dtype, kind in (("fp64", 0), ("fp32", 1), ("fp32", 2))),
    *(_spec("fp32", kind, True, 32000, teacher_grad=False) for kind in (1, 2)),
    *(_spec("fp16", 0, True, n_cols, spatial=True) for n_cols in (19, 32000)),
]

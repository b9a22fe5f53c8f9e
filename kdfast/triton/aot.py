"""Ahead-of-time compile specifications of kdfast's Triton kernels.

Every Triton kernel module (``kdfast/triton/<op>.py``) lists, in ``AOT_SPECS``, each
``@triton.jit`` kernel with every configuration it can be launched with (dtypes, block
sizes, warps, stages, autotune candidates). ``tests/test_triton_aot.py`` compiles each
spec for sm_80 and sm_90 with ``triton.compile`` on a machine without a GPU and checks
registers and spills against ``spill_budget``; ``python -m kdfast.info --gpu`` reports them.
A kernel missing from ``AOT_SPECS`` fails that test.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class KernelSpec:
    """One compile configuration of one Triton kernel.

    Attributes:
        kernel: the ``@triton.jit`` function.
        signature: argument name -> Triton type ("*fp32", "*fp64", "*bf16", "i32", "i64",
            "fp32", ... ; "constexpr" for compile-time arguments).
        constexprs: compile-time argument name -> value.
        num_warps, num_stages: launch configuration.
        spill_budget: spill bytes allowed (0 unless ``why`` says otherwise).
        why: the reason a nonzero spill budget is acceptable.
        label: a short human-readable name of the configuration (e.g. "fp32 BLOCK=1024").
    """

    kernel: Any
    signature: dict[str, str]
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 2
    spill_budget: int = 0
    why: str = ""
    label: str = ""

"""Ahead-of-time compilation of every Triton kernel for sm_80 and sm_90 (no GPU needed).

Each ``AOT_SPECS`` entry of tools/gpu/specs/<op>.py (the kernels of kdfast/triton/<op>.py)
is compiled with ``triton.compile`` for both targets and must compile, stay within its spill
budget, keep 64-bit offsets where it declares them, use warpgroup MMA on sm_90 where its
fp16/bf16 ``tl.dot`` shapes allow and never use TF32. A @triton.jit kernel missing from its
spec module's ``AOT_SPECS`` fails ``test_every_kernel_has_aot_specs``. The checkers themselves are
tested on toy kernels defined here, so each check is shown to be able to fail.
Skips only when Triton is not importable.
"""

from __future__ import annotations

import types

import pytest

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from tools.gpu import aot  # noqa: E402
from tools.gpu.ptx import (  # noqa: E402
    mma_instructions,
    narrow_offsets,
    uses_tf32,
    uses_warpgroup_mma,
)


def _jit(fn):
    """A compiled-mode @triton.jit kernel, also under TRITON_INTERPRET=1."""
    return JITFunction(fn)


def _add32(x, y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y + offs, tl.load(x + offs, mask=mask) * 2, mask=mask)


def _add64(x, y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y + offs, tl.load(x + offs, mask=mask) * 2, mask=mask)


def _rows32(x, y, n_cols, stride, BLOCK: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    offs = tl.program_id(0) * stride + cols
    tl.store(y + offs, tl.load(x + offs, mask=cols < n_cols), mask=cols < n_cols)


def _rows64(x, y, n_cols, stride, BLOCK: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    offs = tl.program_id(0).to(tl.int64) * stride + cols
    tl.store(y + offs, tl.load(x + offs, mask=cols < n_cols), mask=cols < n_cols)


def _matmul(a, b, c, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr):
    rm = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    rn = tl.program_id(1).to(tl.int64) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, K, BK):
        x = tl.load(a + rm[:, None] * K + (k + rk)[None, :])
        y = tl.load(b + (k + rk)[:, None] * BN + rn[None, :])
        if IEEE:
            acc += tl.dot(x, y, input_precision="ieee")
        else:
            acc += tl.dot(x, y)
    tl.store(c + rm[:, None] * BN + rn[None, :], acc.to(c.dtype.element_ty))


def _double(v):
    return v * 2


def _double_inner(v):  # reached only through _double_outer
    return _double(v)


def _double_outer(v):
    return _double_inner(v)


def _orphan(v):  # called by no kernel
    return v


def _add64_nested(x, y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y + offs, _double_outer(tl.load(x + offs, mask=mask)), mask=mask)


add32, add64, matmul = _jit(_add32), _jit(_add64), _jit(_matmul)
double, double_inner, double_outer = _jit(_double), _jit(_double_inner), _jit(_double_outer)
orphan, add64_nested = _jit(_orphan), _jit(_add64_nested)
rows32, rows64 = _jit(_rows32), _jit(_rows64)
ADD_SIG = {"x": "*fp32", "y": "*fp32", "n": "i64", "BLOCK": "constexpr"}
ROWS_SIG = {"x": "*fp32", "y": "*fp32", "n_cols": "i32", "stride": "i32", "BLOCK": "constexpr"}


def _mm_spec(dtype, bm=64, bn=64, bk=32, warps=4, ieee=True):
    sig = {"a": f"*{dtype}", "b": f"*{dtype}", "c": f"*{dtype}", "K": "i32"}
    sig |= {"BM": "constexpr", "BN": "constexpr", "BK": "constexpr", "IEEE": "constexpr"}
    consts = {"BM": bm, "BN": bn, "BK": bk, "IEEE": ieee}
    return aot.KernelSpec(matmul, sig, consts, num_warps=warps, num_stages=3, label=dtype)


# ------------------------------------------------------------------ the package's kernels

MODULES = aot.kernel_modules()
SPECS = aot.all_specs()


def test_every_kernel_has_aot_specs():
    for module in MODULES:
        assert aot.uncovered_kernels(module) == [], (
            f"{module.__name__}: @triton.jit kernels missing from tools/gpu/specs AOT_SPECS"
        )
        assert aot.missing_autotune_configs(module) == [], (
            f"{module.__name__}: autotune candidates missing from tools/gpu/specs AOT_SPECS"
        )
        for spec in aot.specs_of(module):
            assert isinstance(spec, aot.KernelSpec), module.__name__
            kernel_module = aot.jit_function(spec.kernel).fn.__module__
            assert kernel_module == module.__name__, f"{spec.name} is a kernel of {kernel_module}"
            assert set(spec.constexprs) <= set(spec.signature), spec.name
            assert all(spec.signature[k] == "constexpr" for k in spec.constexprs), spec.name


@pytest.mark.parametrize("arch", aot.TARGETS)
@pytest.mark.parametrize(
    "module_spec", SPECS or [None], ids=[s.name for _, s in SPECS] or ["no-kernels-yet"]
)
def test_kernel_compiles_within_budgets(module_spec, arch):
    if module_spec is None:  # no module defines a kernel yet: nothing may be uncovered
        assert all(not aot.jit_kernels(m) for m in MODULES)
        return
    module, spec = module_spec
    compiled = aot.compile_spec(spec, arch)  # raises on a compile error
    r = compiled.resources
    assert spec.spill_budget == 0 or spec.why, f"{spec.name}: nonzero spill budget needs why"
    assert spec.wgmma is not False or spec.why, f"{spec.name}: wgmma=False needs why"
    assert r.spills <= spec.spill_budget, (
        f"{module}.{spec.name} sm_{arch}: {r.spills} spill bytes > budget {spec.spill_budget}"
        f"\n{compiled.ptxas_log}"
    )
    narrow = narrow_offsets(compiled.ptx, strict=spec.int64_offsets)
    assert narrow == [], f"{spec.name}: 32-bit offset arithmetic feeds addresses: {narrow}"
    if any(t in ("*fp32", "*fp64") for t in spec.signature.values()):
        assert not uses_tf32(compiled.sass()), f"{spec.name} uses TF32 (semantics 7)"
    if arch == 90 and spec.expects_wgmma():
        assert uses_warpgroup_mma(compiled.sass()), (
            f"{spec.name}: no warpgroup MMA on sm_90: {mma_instructions(compiled.sass())}"
        )


# ------------------------------------------------------------------ the checkers, on toys


def test_discovery_reports_a_kernel_without_specs():
    module = types.ModuleType(__name__)
    module.add64 = add64
    assert aot.uncovered_kernels(module) == ["add64"]  # no tools/gpu/specs module of its name
    assert aot.uncovered_kernels(module, [aot.KernelSpec(add64, ADD_SIG, {"BLOCK": 256})]) == []
    assert all(m.__name__.startswith("kdfast.triton.") for m in MODULES)
    # every spec module belongs to a kernel module (a renamed kernel file leaves none behind)
    assert set(aot.spec_module_names()) <= {m.__name__.rsplit(".", 1)[1] for m in MODULES}


def test_discovery_follows_helpers_called_through_helpers():
    module = types.ModuleType(__name__)
    module.add64_nested, module._orphan = add64_nested, orphan  # helpers under their own names
    module._double, module._double_inner, module._double_outer = double, double_inner, double_outer
    assert sorted(aot.uncovered_kernels(module)) == sorted(
        ["add64_nested", "_orphan", "_double", "_double_inner", "_double_outer"]
    )
    specs = [aot.KernelSpec(add64_nested, ADD_SIG, {"BLOCK": 256})]
    assert aot.uncovered_kernels(module, specs) == ["_orphan"]


def test_discovery_reports_missing_autotune_candidates():
    module = types.ModuleType(__name__)
    configs = [
        triton.Config({"BLOCK": b}, num_warps=w, num_stages=2) for b, w in [(256, 4), (1024, 8)]
    ]
    module.tuned = triton.autotune(configs=configs, key=["n"])(_jit(_add64))
    specs = [aot.KernelSpec(module.tuned, ADD_SIG, {"BLOCK": 256}, num_warps=4)]
    assert aot.uncovered_kernels(module, specs) == []
    (missing,) = aot.missing_autotune_configs(module, specs)
    assert missing.startswith("tuned:") and "1024" in missing
    specs.append(aot.KernelSpec(module.tuned, ADD_SIG, {"BLOCK": 1024}, num_warps=8))
    assert aot.missing_autotune_configs(module, specs) == []
    assert aot.compile_spec(specs[1], 90).resources.threads == 256


@pytest.mark.parametrize("arch", aot.TARGETS)
def test_compile_reports_resources(arch):
    spec = aot.KernelSpec(add64, ADD_SIG, {"BLOCK": 1024}, num_warps=4, label="fp32")
    compiled = aot.compile_spec(spec, arch)
    r = compiled.resources
    assert r.arch == arch and r.threads == 128 and r.name == "_add64[fp32]"
    assert 0 < r.registers <= 255 and r.spills == 0
    assert ".entry _add64" in compiled.ptx and compiled.cubin[:4] == b"\x7fELF"
    assert aot.compile_spec(spec, arch) is compiled  # cached


def test_compile_error_raises():
    spec = aot.KernelSpec(add64, ADD_SIG, {"BLOCK": 1000})  # arange needs a power of 2
    with pytest.raises(Exception, match="power of 2|arange"):
        aot.compile_spec(spec, 90)


def test_spills_are_measured():
    # a 128x128 fp16 tile accumulated by 4 warps needs more than 255 registers on sm_90
    compiled = aot.compile_spec(_mm_spec("fp16", 128, 128, 64, warps=4), 90)
    assert compiled.resources.spills > 0


@pytest.mark.parametrize("arch", aot.TARGETS)
def test_narrow_offsets_found_in_int32_indexing(arch):
    def ptx(kernel, sig):
        return aot.compile_spec(aot.KernelSpec(kernel, sig, {"BLOCK": 1024}), arch).ptx

    # 1-D flat offsets: pid * BLOCK + arange in int32 wraps (strict check, int64_offsets)
    assert narrow_offsets(ptx(add64, ADD_SIG), strict=True) == []
    assert narrow_offsets(ptx(add32, ADD_SIG)) == []
    found = narrow_offsets(ptx(add32, ADD_SIG), strict=True)
    assert found and all(line.startswith(("mul.wide", "cvt")) for line in found)
    # row * stride in int32 wraps whatever the grid (every spec)
    assert narrow_offsets(ptx(rows64, ROWS_SIG), strict=True) == []
    assert narrow_offsets(ptx(rows32, ROWS_SIG)) != []


def test_narrow_offsets_on_handwritten_ptx():
    ptx = """
    mov.u32 %r1, %ctaid.x;
    mov.u32 %r2, %tid.x;
    ld.param.u32 %r3, [k_param_2];
    mad.lo.s32 %r4, %r1, 1024, %r2;
    mul.wide.s32 %rd3, %r4, 4;
    add.s64 %rd4, %rd1, %rd3;
    ld.global.b32 { %r5 }, [ %rd4 + 0 ];
    mul.wide.u32 %rd5, %r1, 4096;
    cvt.u64.u32 %rd6, %r2;
    add.s64 %rd7, %rd5, %rd6;
    add.s64 %rd8, %rd2, %rd7;
    st.global.b32 [ %rd8 + 0 ], { %r5 };
    mul.lo.s32 %r6, %r1, %r3;
    add.s32 %r7, %r6, %r2;
    cvt.s64.s32 %rd9, %r7;
    shl.b64 %rd10, %rd9, 2;
    add.s64 %rd11, %rd2, %rd10;
    st.global.b32 [ %rd11 + 0 ], { %r5 };
    """
    assert narrow_offsets(ptx) == ["cvt.s64.s32 %rd9, %r7;"]
    strict = narrow_offsets(ptx, strict=True)
    assert strict == ["mul.wide.s32 %rd3, %r4, 4;", "cvt.s64.s32 %rd9, %r7;"]


def test_warpgroup_mma_and_tf32_checkers():
    half = aot.compile_spec(_mm_spec("fp16"), 90)
    assert half.resources.spills == 0
    assert uses_warpgroup_mma(half.sass()) and not uses_tf32(half.sass())
    assert _mm_spec("fp16").expects_wgmma() and not _mm_spec("fp32").expects_wgmma()
    ampere = aot.compile_spec(_mm_spec("bf16"), 80)
    assert not uses_warpgroup_mma(ampere.sass())
    assert any(op.startswith("HMMA") for op in mma_instructions(ampere.sass()))
    ieee = aot.compile_spec(_mm_spec("fp32", ieee=True), 90)
    assert not uses_tf32(ieee.sass()) and not mma_instructions(ieee.sass())
    tf32 = aot.compile_spec(_mm_spec("fp32", ieee=False), 90)
    assert uses_tf32(tf32.sass())

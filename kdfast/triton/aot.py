"""Ahead-of-time compilation of kdfast's GPU kernels, without a GPU.

Every Triton kernel module (``kdfast/triton/<op>.py``) lists, in ``AOT_SPECS``, each
``@triton.jit`` kernel with every configuration it can be launched with (dtypes, block
sizes, warps, stages, autotune candidates). ``tests/test_triton_aot.py`` compiles each
spec for sm_80 and sm_90 with ``triton.compile`` on a machine without a GPU and checks
registers and spills against ``spill_budget``; ``python -m kdfast.info --gpu`` reports them.
A kernel missing from ``AOT_SPECS`` fails that test.

The CUDA sources (``csrc/cuda/*.cu``) are compiled to cubins with ``nvcc -Xptxas -v`` for
the same targets (``compile_cuda_source``); their spill budgets are ``CUDA_SPILL_BUDGETS``.

Tools: ptxas, cuobjdump and nvdisasm of the Triton wheel (triton/backends/nvidia/bin).
This module imports Triton only inside the functions that compile Triton kernels, so
``KernelSpec`` and the CUDA and PTX/SASS helpers import without Triton.
"""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

TARGETS = (80, 90)
"""Compute capabilities every GPU kernel is compiled for."""

CUDA_SPILL_BUDGETS: dict[str, tuple[int, str]] = {}
"""CUDA kernel name (unqualified) -> (spill bytes allowed, why). Absent: 0 bytes."""


@dataclass(frozen=True)
class KernelSpec:
    """One compile configuration of one Triton kernel.

    Attributes:
        kernel: the ``@triton.jit`` function (or an autotuner/heuristics wrapping it).
        signature: argument name -> Triton type ("*fp32", "*fp64", "*bf16", "i32", "i64",
            "fp32", ... ; "constexpr" for compile-time arguments).
        constexprs: compile-time argument name -> value.
        num_warps, num_stages: launch configuration.
        spill_budget: spill bytes allowed (0 unless ``why`` says otherwise).
        why: the reason a nonzero spill budget is acceptable.
        label: a short human-readable name of the configuration (e.g. "fp32 BLOCK=1024").
        int64_offsets: the kernel's flat offsets may exceed 2**31 (e.g. a 1-D grid over
            numel elements), so no 32-bit index arithmetic on program ids may feed an
            address: the AOT test checks the PTX with ``narrow_offsets(ptx, strict=True)``.
            Every spec gets the non-strict check (no int32 ``row * stride``).
        wgmma: whether sm_90 code must use warpgroup MMA (HGMMA); None: required exactly
            when the kernel calls ``tl.dot``, a pointer argument is fp16/bf16 and
            num_warps is a multiple of 4 (set False, with ``why``, for tiles too small).
    """

    kernel: Any
    signature: dict[str, str]
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 2
    spill_budget: int = 0
    why: str = ""
    label: str = ""
    int64_offsets: bool = False
    wgmma: bool | None = None

    @property
    def name(self) -> str:
        """Kernel name and label, e.g. "rkd_gram[fp32 BLOCK=64]"."""
        return f"{jit_function(self.kernel).__name__}[{self.label or self.num_warps}]"

    def expects_wgmma(self) -> bool:
        """Whether sm_90 code must contain warpgroup MMA (see ``wgmma``)."""
        if self.wgmma is not None:
            return self.wgmma
        half = any(t in ("*fp16", "*bf16") for t in self.signature.values())
        return half and self.num_warps % 4 == 0 and "tl.dot(" in kernel_source(self.kernel)


@dataclass(frozen=True)
class Resources:
    """Resource use of one compiled kernel, as ptxas reports it (bytes unless stated).

    Attributes:
        name: the kernel (function) name.
        arch: compute capability (80, 90).
        registers: registers per thread.
        spill_stores, spill_loads: spill bytes written and read per thread.
        stack: stack frame per thread.
        shared: shared memory per block (static from ptxas plus Triton's dynamic).
        barriers: named barriers used.
        threads: threads per block (CUDA kernels: the source's ``kThreads``, else 0).
    """

    name: str
    arch: int
    registers: int
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    shared: int = 0
    barriers: int = 0
    threads: int = 0

    @property
    def spills(self) -> int:
        """Spill bytes (stores plus loads) per thread."""
        return self.spill_stores + self.spill_loads


@dataclass(frozen=True)
class Compiled:
    """A kernel compiled for one target: resources, PTX and cubin."""

    resources: Resources
    ptx: str
    cubin: bytes
    ptxas_log: str

    def sass(self) -> str:
        """The SASS of the cubin (nvdisasm)."""
        return disassemble(self.cubin)


# ----------------------------------------------------------------------------- tools


def tool(name: str) -> str:
    """Path of a CUDA binary tool: the Triton wheel's copy, else the one on PATH."""
    try:
        import triton

        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if os.path.exists(path):
            return path
    except ImportError:
        pass
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found (neither in the Triton wheel nor on PATH)")
    return found


def disassemble(cubin: bytes) -> str:
    """SASS text of a cubin (nvdisasm; cuobjdump -sass if nvdisasm fails)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        run = subprocess.run([tool("nvdisasm"), f.name], capture_output=True, text=True)
        if run.returncode == 0:
            return run.stdout
        run = subprocess.run(
            [tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True
        )
        return run.stdout


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+)a?'")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:, used (\d+) barriers)?(?:, (\d+) bytes smem)?")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(log: str) -> list[Resources]:
    """Per-kernel resources from ``ptxas -v`` output (as nvcc -Xptxas -v prints it too).

    Names are returned as printed (mangled for C++ kernels); ``arch`` from "sm_90(a)".
    """
    out: list[Resources] = []
    current: dict[str, Any] | None = None
    for line in log.splitlines():
        entry = _ENTRY.search(line)
        if entry:
            if current:
                out.append(Resources(**current))
            current = {"name": entry.group(1), "arch": int(entry.group(2)[3:]), "registers": 0}
            continue
        if current is None:
            continue
        spill = _SPILL.search(line)
        if spill:
            current["stack"], current["spill_stores"], current["spill_loads"] = (
                int(g) for g in spill.groups()
            )
        used = _USED.search(line)
        if used:
            current["registers"] = int(used.group(1))
            current["barriers"] = int(used.group(2) or 0)
            smem = _SMEM.search(line)
            current["shared"] = int(smem.group(1)) if smem else 0
    if current:
        out.append(Resources(**current))
    return out


# ----------------------------------------------------------------------------- Triton


_COMPILED_COPIES: dict[int, tuple[Any, Any]] = {}


def _compiled_copy(interpreted: Any) -> Any:
    """A compiled-mode ``JITFunction`` of a TRITON_INTERPRET=1 kernel.

    Under the interpreter ``@triton.jit`` builds interpreter functions, which
    ``triton.compile`` cannot take. The copy shares the function's code and sees, in a copy
    of its globals, compiled copies of the interpreter functions it calls. Memoized, so a
    kernel and its copy keep one identity.
    """
    import types

    from triton.runtime.jit import JITFunction

    key = id(interpreted)
    if key not in _COMPILED_COPIES:
        fn = interpreted.fn
        scope = dict(fn.__globals__)
        copy = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
        copy.__qualname__, copy.__doc__ = fn.__qualname__, fn.__doc__
        jit = JITFunction(copy, **interpreted.kwargs)
        _COMPILED_COPIES[key] = (interpreted, jit)  # keeps the key's object alive
        for name, value in fn.__globals__.items():
            if type(value).__name__ == "InterpretedFunction":
                scope[name] = _compiled_copy(value)
    return _COMPILED_COPIES[key][1]


def jit_function(kernel: Any) -> Any:
    """The ``JITFunction`` inside an autotuner/heuristics wrapper (or the kernel itself);
    under TRITON_INTERPRET=1 a compiled-mode copy of the interpreter function."""
    from triton.runtime.jit import JITFunction

    while not isinstance(kernel, JITFunction) and hasattr(kernel, "fn"):
        if type(kernel).__name__ == "InterpretedFunction":
            return _compiled_copy(kernel)
        kernel = kernel.fn
    if not isinstance(kernel, JITFunction):
        raise TypeError(f"not a @triton.jit kernel: {kernel!r}")
    return kernel


def kernel_source(kernel: Any) -> str:
    """Python source of a Triton kernel."""
    return inspect.getsource(jit_function(kernel).fn)


def _ptxas_resources(ptx: str, arch: int) -> tuple[dict[str, int], str]:
    """Run the Triton wheel's ptxas -v on PTX with Triton's own flags; parse its log."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2"]
        cmd += [f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", src + ".o"]
        run = subprocess.run(cmd, capture_output=True, text=True, check=True)
    log = run.stdout + run.stderr
    parsed = parse_ptxas_log(log)
    if len(parsed) != 1:
        raise RuntimeError(f"expected one kernel in the ptxas log, got {len(parsed)}:\n{log}")
    r = parsed[0]
    fields = {"registers": r.registers, "spill_stores": r.spill_stores}
    fields |= {"spill_loads": r.spill_loads, "stack": r.stack, "shared": r.shared}
    fields["barriers"] = r.barriers
    return fields, log


_CACHE: dict[tuple, Compiled] = {}


def _cache_key(spec: KernelSpec, arch: int) -> tuple:
    constexprs = tuple(sorted((k, repr(v)) for k, v in spec.constexprs.items()))
    signature = tuple(spec.signature.items())
    return (
        id(jit_function(spec.kernel)),
        signature,
        constexprs,
        spec.num_warps,
        spec.num_stages,
        arch,
    )


def compile_spec(spec: KernelSpec, arch: int) -> Compiled:
    """Compile ``spec`` for compute capability ``arch`` (80 or 90): resources, PTX, cubin.

    Cached per process. Raises Triton's compile error (or ptxas's) when the kernel does
    not compile. Shared memory is Triton's dynamic allocation plus ptxas's static figure.
    """
    key = _cache_key(spec, arch)
    if key in _CACHE:
        return _CACHE[key]
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = jit_function(spec.kernel)
    src = ASTSource(fn=fn, signature=dict(spec.signature), constexprs=dict(spec.constexprs))
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    ptx = kernel.asm["ptx"]
    fields, log = _ptxas_resources(ptx, arch)
    fields["shared"] += kernel.metadata.shared
    resources = Resources(name=spec.name, arch=arch, threads=spec.num_warps * 32, **fields)
    _CACHE[key] = Compiled(resources, ptx, kernel.asm["cubin"], log)
    return _CACHE[key]


def kernel_modules() -> list[Any]:
    """Every Triton kernel module under kdfast/triton/ (imported; needs Triton)."""
    import kdfast.triton as package

    names = [
        m.name
        for m in pkgutil.iter_modules(package.__path__)
        if m.name != "aot" and not m.name.startswith("_")
    ]
    return [importlib.import_module(f"{package.__name__}.{name}") for name in sorted(names)]


def jit_kernels(module: Any) -> dict[str, Any]:
    """The @triton.jit kernels a module defines (wrappers unwrapped), by name."""
    from triton.runtime.jit import JITFunction

    found = {}
    for name, obj in vars(module).items():
        try:
            fn = jit_function(obj)
        except TypeError:
            continue
        if isinstance(fn, JITFunction) and fn.fn.__module__ == module.__name__:
            found[name] = fn
    return found


def uncovered_kernels(module: Any) -> list[str]:
    """Kernels of ``module`` that no entry of its ``AOT_SPECS`` compiles.

    A @triton.jit function called only from other kernels (a device helper) is compiled
    inside them; it counts as covered when a covered kernel's source calls it, directly or
    through other covered helpers.
    """
    specs = getattr(module, "AOT_SPECS", [])
    kernels = jit_kernels(module)
    covered = {id(jit_function(s.kernel)) for s in specs}
    sources = " ".join(kernel_source(s.kernel) for s in specs)
    reached: set[str] = set()
    grew = True
    while grew:  # helpers called by covered code are covered; their calls too
        grew = False
        for name, fn in kernels.items():
            if name in reached or id(fn) in covered:
                continue
            if re.search(rf"\b{re.escape(name)}\(", sources):
                reached.add(name)
                sources += " " + kernel_source(fn)
                grew = True
    return [name for name, fn in kernels.items() if id(fn) not in covered and name not in reached]


def missing_autotune_configs(module: Any) -> list[str]:
    """Autotune candidates of ``module``'s ``@triton.autotune`` kernels that no spec
    compiles (same kernel, num_warps, num_stages, and the config's kwargs in constexprs)."""
    specs = getattr(module, "AOT_SPECS", [])
    missing = []
    for name, obj in vars(module).items():
        configs = getattr(obj, "configs", None)
        if configs is None or not hasattr(obj, "fn"):
            continue
        try:
            fn = jit_function(obj)
        except TypeError:
            continue
        if fn.fn.__module__ != module.__name__:
            continue
        for cfg in configs:
            if not any(
                jit_function(s.kernel) is fn
                and s.num_warps == cfg.num_warps
                and s.num_stages == cfg.num_stages
                and all(s.constexprs.get(k) == v for k, v in cfg.kwargs.items())
                for s in specs
            ):
                missing.append(f"{name}: {cfg}")
    return missing


def all_specs() -> list[tuple[str, KernelSpec]]:
    """(module name, spec) for every spec of every kernel module."""
    return [(m.__name__, s) for m in kernel_modules() for s in getattr(m, "AOT_SPECS", [])]


# ----------------------------------------------------------------------------- SASS checks

_MMA = re.compile(r"\b((?:HGMMA|HMMA|DMMA|IMMA|QGMMA|IGMMA|BGMMA)\.[A-Z0-9.x]*)")


def mma_instructions(sass: str) -> Counter:
    """Tensor-core instructions in SASS text, counted by opcode with modifiers."""
    return Counter(_MMA.findall(sass))


def uses_warpgroup_mma(sass: str) -> bool:
    """Whether SASS uses Hopper warpgroup MMA (HGMMA/QGMMA/IGMMA: PTX wgmma)."""
    return any(op.split(".")[0].endswith("GMMA") for op in mma_instructions(sass))


def uses_tf32(sass: str) -> bool:
    """Whether SASS contains a TF32 tensor-core instruction (forbidden: SPEC 7)."""
    return any("TF32" in op for op in mma_instructions(sass))


# ----------------------------------------------------------------------------- PTX checks

_INSTR = re.compile(r"^\s*(?:@!?%\w+\s+)?([a-z][\w.]*)\s+(.*?);\s*$")
_REG = re.compile(r"%[a-z]+\d+|%(?:ctaid|nctaid|tid|ntid)\.[xyz]")
_GLOBAL_MEM = re.compile(r"^(?:ld|st|atom|red|cp\.async[\w.]*|prefetch)\.(?:\w+\.)*?global\b")
_WIDEN = re.compile(r"^(?:cvt\.[su]64\.[su](?:32|16|8)|mul\.wide\.[su]32)\b")
_UNBOUNDED_SOURCE = re.compile(r"%(?:n?ctaid)\.[xyz]")


def _ptx_defs(ptx: str) -> dict[str, list[tuple[str, list[str], str]]]:
    """Register -> defining instructions (opcode, source registers, line)."""
    defs: dict[str, list[tuple[str, list[str], str]]] = {}
    for line in ptx.splitlines():
        m = _INSTR.match(line)
        if not m or m.group(1).startswith(("st.", "red.", "bra", "ret", "bar")):
            continue
        regs = _REG.findall(m.group(2))
        if not regs:
            continue
        defs.setdefault(regs[0], []).append((m.group(1), regs[1:], line.strip()))
    return defs


_PRODUCT32 = re.compile(r"^(?:mul\.lo|mad\.lo|mul24\.lo|mad24\.lo)\.[su]32$|^shl\.b32$")


def _derived(defs: dict, seeds: set[str], start: Any) -> set[str]:
    """Registers whose definitions reach a seed register or satisfy ``start`` (fixpoint)."""
    found = set(seeds)
    changed = True
    while changed:
        changed = False
        for reg, reg_defs in defs.items():
            if reg not in found and any(
                start(op, srcs) or any(s in found for s in srcs) for op, srcs, _ in reg_defs
            ):
                found.add(reg)
                changed = True
    return found


def narrow_offsets(ptx: str, strict: bool = False) -> list[str]:
    """PTX instructions that widen a 32-bit index which may have wrapped past 2**31.

    Each global address is traced back through its 64-bit arithmetic to the points where a
    32-bit register is widened (``cvt.s64.s32``, ``mul.wide.s32``, ...). Flagged:

    * always: a 32-bit product (``mul.lo``/``mad.lo``/``shl`` by a register) of a kernel
      argument (a size or stride) or of two program-id-derived values, or arithmetic on
      one: ``row * stride`` or ``i * n`` in int32, the classic overflow;
    * ``strict`` (kernels declaring ``int64_offsets``: flat offsets beyond 2**31): also
      any 32-bit arithmetic on a program id, e.g. ``pid * BLOCK + arange`` in int32.

    Widening a raw program id or argument, and 32-bit indices of thread ids and constants,
    are safe. Returns the offending widening instructions (empty: the offsets are 64-bit).
    A multi-dimensional kernel's per-dimension index ``pid * BLOCK + arange`` is bounded
    by its int32 extent and passes the non-strict check.
    """
    defs = _ptx_defs(ptx)
    narrow = re.compile(r"%r\d+")
    params = _derived(defs, set(), lambda op, srcs: op.startswith("ld.param"))
    grid = _derived(defs, set(), lambda op, srcs: any(_UNBOUNDED_SOURCE.fullmatch(s) for s in srcs))

    def is_product(op: str, srcs: list[str]) -> bool:
        if not _PRODUCT32.match(op):
            return False
        factors = [s for s in srcs[:2] if narrow.fullmatch(s)]
        return any(f in params for f in factors) or (
            len(factors) == 2 and all(f in grid for f in factors)
        )

    products = _derived(defs, set(), is_product)

    def arithmetic(reg: str, seen: frozenset = frozenset()) -> bool:
        """Defined by arithmetic (not only by moves/loads of a raw value)."""
        for op, srcs, _ in defs.get(reg, []):
            if op.startswith("mov"):
                if srcs and srcs[0] not in seen and arithmetic(srcs[0], seen | {reg}):
                    return True
            elif not op.startswith(("ld.", "cvt")):
                return True
        return False

    def flagged(reg: str) -> bool:
        if reg in products:
            return True
        return strict and (reg in grid or reg in params) and arithmetic(reg)

    found: list[str] = []
    seen: set[str] = set()

    def trace(reg: str) -> None:
        if reg in seen:
            return
        seen.add(reg)
        for opcode, srcs, line in defs.get(reg, []):
            if _WIDEN.match(opcode):
                if any(narrow.fullmatch(s) and flagged(s) for s in srcs[:2]):
                    found.append(line)
            elif not opcode.startswith(("ld.param", "ld.global", "ld.shared")):
                for src in srcs:
                    trace(src)

    for line in ptx.splitlines():
        m = _INSTR.match(line)
        if m and _GLOBAL_MEM.match(m.group(1)):
            for addr in re.findall(r"\[\s*(%rd\d+)", m.group(2)):
                trace(addr)
    return found


# ----------------------------------------------------------------------------- CUDA


def repo_root() -> str | None:
    """The source checkout around the package (has csrc/), or None (installed wheel)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return root if os.path.isdir(os.path.join(root, "csrc", "cuda")) else None


def cuda_sources() -> list[str]:
    """csrc/cuda/*.cu of the source checkout (empty when not a checkout)."""
    root = repo_root()
    if root is None:
        return []
    folder = os.path.join(root, "csrc", "cuda")
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".cu"))


def nvcc() -> str | None:
    """The nvcc the build would use (CUDA_HOME/bin/nvcc, else PATH), or None."""
    home = os.environ.get("CUDA_HOME")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _pip_cuda_include_dirs() -> list[str]:
    """As setup.py's pip_cuda_include_dirs: headers of torch's pip CUDA libraries."""
    import glob

    try:
        import nvidia
    except ImportError:
        return []
    dirs: list[str] = []
    for root in nvidia.__path__:
        dirs += sorted(glob.glob(os.path.join(root, "*", "include")))
    return [d for d in dirs if glob.glob(os.path.join(d, "cusparse*.h"))]


def nvcc_command(source: str, arch: int, output: str) -> list[str]:
    """nvcc device-only compile of one .cu to a cubin, with the build's flags."""
    import logging

    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils import cpp_extension

    includes = cpp_extension.include_paths(device_type="cuda") + _pip_cuda_include_dirs()
    root = repo_root() or os.path.dirname(os.path.dirname(source))
    cmd = [nvcc() or "nvcc", "--cubin", f"-arch=sm_{arch}", "-O3", "-std=c++20", "-DWITH_CUDA"]
    cmd += ["-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C"]
    cmd += list(cpp_extension.COMMON_NVCC_FLAGS) + ["-Xptxas", "-v", "-w"]
    cmd += [f"-I{d}" for d in [*includes, os.path.join(root, "csrc")]]
    return cmd + ["-o", output, source]


def _unqualified(mangled: str) -> str:
    """Last name of an Itanium-mangled ``_ZN<len><id>...E`` or ``_Z<len><id>`` name."""
    m = re.match(r"_ZN?((?:\d+)(?:.*))", mangled)
    if not m:
        return mangled
    rest, name = m.group(1), mangled
    while rest and rest[0].isdigit():
        digits = re.match(r"\d+", rest).group(0)
        size = int(digits)
        name, rest = rest[len(digits) : len(digits) + size], rest[len(digits) + size :]
        if not mangled.startswith("_ZN"):
            break
    return name


def demangle(names: list[str]) -> list[str]:
    """Unqualified function names of mangled C++ kernel names (c++filt, else a parser of
    plain nested names)."""
    filt = shutil.which("c++filt") or shutil.which("cu++filt")
    if filt is None:
        return [_unqualified(n) for n in names]
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True)
    short = []
    for original, full in zip(names, out.stdout.splitlines(), strict=False):
        m = re.search(r"([A-Za-z_]\w*)(?:<.*>)?\(", full)
        short.append(m.group(1) if m else _unqualified(original))
    return short


def compile_cuda_source(source: str, arch: int, out_dir: str) -> list[Resources]:
    """Compile one .cu for ``arch`` with ``nvcc -Xptxas -v``; resources per kernel.

    The cubin and log are written to ``out_dir``. Raises CalledProcessError (with nvcc's
    output) on a compile error.
    """
    base = os.path.join(out_dir, f"{os.path.basename(source)}.sm_{arch}")
    run = subprocess.run(
        nvcc_command(source, arch, base + ".cubin"), capture_output=True, text=True
    )
    log = run.stdout + run.stderr
    with open(base + ".log", "w") as f:
        f.write(log)
    if run.returncode != 0:
        raise subprocess.CalledProcessError(run.returncode, run.args, run.stdout, run.stderr)
    parsed = parse_ptxas_log(log)
    names = demangle([r.name for r in parsed])
    return [
        Resources(**{**r.__dict__, "name": name}) for r, name in zip(parsed, names, strict=True)
    ]


def cuda_spill_budget(kernel: str) -> int:
    """Spill bytes allowed for a CUDA kernel (``CUDA_SPILL_BUDGETS``; 0 by default)."""
    return CUDA_SPILL_BUDGETS.get(kernel, (0, ""))[0]


def cuda_block_size(source: str) -> int | None:
    """The block size a .cu launches with, from its ``constexpr int kThreads = N;``."""
    with open(source) as f:
        m = re.search(r"constexpr\s+int\s+kThreads\s*=\s*(\d+)", f.read())
    return int(m.group(1)) if m else None


def cuda_resources(source: str, arch: int, cache_dir: str | None = None) -> list[Resources]:
    """``compile_cuda_source`` cached in ``cache_dir`` (default: a kdfast-aot folder in
    the temp dir) by a hash of csrc/ and the nvcc command; threads from ``kThreads``."""
    import hashlib
    import json

    root = repo_root() or os.path.dirname(os.path.dirname(source))
    digest = hashlib.sha256(" ".join(nvcc_command(source, arch, "-")).encode())
    for folder, _, files in sorted(os.walk(os.path.join(root, "csrc"))):
        for name in sorted(files):
            with open(os.path.join(folder, name), "rb") as f:
                digest.update(name.encode() + f.read())
    cache_dir = cache_dir or os.path.join(tempfile.gettempdir(), f"kdfast-aot-{os.getuid()}")
    out_dir = os.path.join(cache_dir, digest.hexdigest()[:16])
    cached = os.path.join(out_dir, f"{os.path.basename(source)}.sm_{arch}.json")
    if os.path.exists(cached):
        with open(cached) as f:
            return [Resources(**r) for r in json.load(f)]
    os.makedirs(out_dir, exist_ok=True)
    threads = cuda_block_size(source) or 0
    found = [
        Resources(**{**r.__dict__, "threads": threads})
        for r in compile_cuda_source(source, arch, out_dir)
    ]
    with open(cached, "w") as f:
        json.dump([r.__dict__ for r in found], f)
    return found

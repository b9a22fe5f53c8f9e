"""Ahead-of-time compilation of kdfast's Triton kernels, without a GPU.

For every Triton kernel module ``kdfast/triton/<op>.py``, ``tools/gpu/specs/<op>.py`` lists
in ``AOT_SPECS`` each ``@triton.jit`` kernel with every configuration it can be launched
with (dtypes, block sizes, warps, stages, autotune candidates). ``tests/kernels/test_triton_aot.py``
compiles each spec for sm_80 and sm_90 with ``triton.compile`` on a machine without a GPU
and checks registers and spills against ``spill_budget``; ``python -m tools.gpu.report``
reports them. A kernel missing from its ``AOT_SPECS`` fails that test.

This module imports Triton only inside the functions that compile or discover Triton
kernels, so ``KernelSpec`` imports without Triton. CUDA sources: ``tools.gpu.cuda``;
ptxas logs, PTX and SASS checks: ``tools.gpu.ptx``.
"""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Any

from tools.gpu.ptx import Resources, disassemble, parse_ptxas_log

TARGETS = (80, 90)
"""Compute capabilities every GPU kernel is compiled for."""

SPEC_PACKAGE = "tools.gpu.specs"
"""Where the ``AOT_SPECS`` of ``kdfast.triton.<op>`` live: ``tools.gpu.specs.<op>``."""


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
class Compiled:
    """A kernel compiled for one target: resources, PTX and cubin."""

    resources: Resources
    ptx: str
    cubin: bytes
    ptxas_log: str

    def sass(self) -> str:
        """The SASS of the cubin (nvdisasm)."""
        return disassemble(self.cubin)


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

    names = [m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_")]
    return [importlib.import_module(f"{package.__name__}.{name}") for name in sorted(names)]


def spec_module_names() -> list[str]:
    """The ``<op>`` of every ``tools/gpu/specs/<op>.py`` (not imported)."""
    package = importlib.import_module(SPEC_PACKAGE)
    return sorted(m.name for m in pkgutil.iter_modules(package.__path__))


def specs_of(module: Any) -> list[KernelSpec]:
    """The ``AOT_SPECS`` of kernel module ``kdfast.triton.<op>`` (from
    ``tools.gpu.specs.<op>``); empty when no spec module has its name."""
    name = module.__name__.rsplit(".", 1)[-1]
    if name not in spec_module_names():
        return []
    return list(importlib.import_module(f"{SPEC_PACKAGE}.{name}").AOT_SPECS)


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


def uncovered_kernels(module: Any, specs: list[KernelSpec] | None = None) -> list[str]:
    """Kernels of ``module`` that no spec compiles (``specs``, default ``specs_of(module)``).

    A @triton.jit function called only from other kernels (a device helper) is compiled
    inside them; it counts as covered when a covered kernel's source calls it, directly or
    through other covered helpers.
    """
    specs = specs_of(module) if specs is None else specs
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


def missing_autotune_configs(module: Any, specs: list[KernelSpec] | None = None) -> list[str]:
    """Autotune candidates of ``module``'s ``@triton.autotune`` kernels that no spec
    compiles (same kernel, num_warps, num_stages, and the config's kwargs in constexprs);
    ``specs`` default ``specs_of(module)``."""
    specs = specs_of(module) if specs is None else specs
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
    """(kernel module name, spec) for every spec of every kernel module."""
    return [(m.__name__, s) for m in kernel_modules() for s in specs_of(m)]

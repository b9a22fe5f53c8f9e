"""What ptxas and the disassemblers say about a compiled kernel, parsed.

* ``parse_ptxas_log``: per-kernel ``Resources`` (registers, spills, shared memory) from
  ``ptxas -v`` output (also as ``nvcc -Xptxas -v`` prints it);
* SASS checks: tensor-core instructions (warpgroup MMA on sm_90, no TF32: semantics 7);
* PTX checks: ``narrow_offsets``, 32-bit index arithmetic feeding global addresses.

Tools: ptxas, cuobjdump and nvdisasm of the Triton wheel (triton/backends/nvidia/bin), else
the ones on PATH. Imports without Triton.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass
from typing import Any


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


# ----------------------------------------------------------------------------- SASS checks

_MMA = re.compile(r"\b((?:HGMMA|HMMA|DMMA|IMMA|QGMMA|IGMMA|BGMMA)\.[A-Z0-9.x]*)")


def mma_instructions(sass: str) -> Counter:
    """Tensor-core instructions in SASS text, counted by opcode with modifiers."""
    return Counter(_MMA.findall(sass))


def uses_warpgroup_mma(sass: str) -> bool:
    """Whether SASS uses Hopper warpgroup MMA (HGMMA/QGMMA/IGMMA: PTX wgmma)."""
    return any(op.split(".")[0].endswith("GMMA") for op in mma_instructions(sass))


def uses_tf32(sass: str) -> bool:
    """Whether SASS contains a TF32 tensor-core instruction (forbidden: semantics 7)."""
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

"""Theoretical occupancy of a GPU kernel from a table of per-SM limits (no GPU needed).

The figures follow NVIDIA's occupancy calculator (the algorithm of the toolkit's
``cuda_occupancy.h``): registers are allocated per warp in units of 256 within each of the
SM's 4 sub-partitions, shared memory per block in units of 128 bytes plus 1 KiB reserved by
the system per block, and a block's residency is limited by registers, shared memory,
warps and blocks per SM. Sources: CUDA C++ Programming Guide, "Compute Capabilities" table
(Technical Specifications per Compute Capability, 8.0 and 9.0), the NVIDIA A100 and
H100 (Hopper) tuning guides, and ``cudaDevAttrReservedSharedMemoryPerBlock`` (1 KiB on
both). Values are the architecture's; the SM counts are those of A100 SXM4 and H100 SXM5.
"""

from __future__ import annotations

from dataclasses import dataclass

KiB = 1024


@dataclass(frozen=True)
class SMLimits:
    """Per-SM and per-block limits of one compute capability.

    Attributes:
        name: the target name ("sm_90").
        gpu: the product the SM count refers to.
        sm_count: SMs on that product.
        registers_per_sm: 32-bit registers in the register file of one SM.
        max_registers_per_thread: the most a thread may use.
        max_registers_per_block: the most one block may use.
        register_unit: register allocation unit per warp.
        sub_partitions: SM sub-partitions (register file split evenly between them).
        shared_per_sm: shared memory of one SM at the largest carve-out, bytes.
        max_shared_per_block: the most one block may use (opt-in), bytes.
        reserved_shared_per_block: shared memory the system reserves per block, bytes.
        shared_unit: shared-memory allocation unit, bytes.
        max_warps_per_sm, max_blocks_per_sm, max_threads_per_block: residency limits.
        warp_size: threads per warp.
    """

    name: str
    gpu: str
    sm_count: int
    registers_per_sm: int = 64 * KiB
    max_registers_per_thread: int = 255
    max_registers_per_block: int = 64 * KiB
    register_unit: int = 256
    sub_partitions: int = 4
    shared_per_sm: int = 228 * KiB
    max_shared_per_block: int = 227 * KiB
    reserved_shared_per_block: int = 1 * KiB
    shared_unit: int = 128
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    max_threads_per_block: int = 1024
    warp_size: int = 32


LIMITS: dict[int, SMLimits] = {
    80: SMLimits(
        "sm_80", "A100 SXM4", 108, shared_per_sm=164 * KiB, max_shared_per_block=163 * KiB
    ),
    90: SMLimits("sm_90", "H100 SXM5", 132),
}


@dataclass(frozen=True)
class Occupancy:
    """Resident blocks and warps per SM and what limits them.

    Attributes:
        blocks_per_sm: resident blocks per SM (0: the kernel cannot launch).
        warps_per_sm: resident warps per SM.
        occupancy: warps_per_sm / max_warps_per_sm.
        limiter: "warps", "blocks", "registers" or "shared" (the first binding one), or
            "cannot launch: <why>".
        by: blocks per SM allowed by each limit.
    """

    blocks_per_sm: int
    warps_per_sm: int
    occupancy: float
    limiter: str
    by: dict[str, int]


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def occupancy(
    arch: int, threads_per_block: int, registers_per_thread: int, shared_per_block: int
) -> Occupancy:
    """Theoretical occupancy of a kernel on compute capability ``arch`` (80 or 90).

    Args:
        arch: compute capability times ten (a key of ``LIMITS``).
        threads_per_block: block size (Triton: num_warps * 32).
        registers_per_thread: registers per thread reported by ptxas.
        shared_per_block: static plus dynamic shared memory of one block, bytes (the
            1 KiB the system reserves per block is added here).
    """
    lim = LIMITS[arch]
    warps = -(-threads_per_block // lim.warp_size)
    regs_per_warp = _round_up(max(registers_per_thread, 1) * lim.warp_size, lim.register_unit)
    shared = _round_up(shared_per_block + lim.reserved_shared_per_block, lim.shared_unit)
    invalid = None
    if threads_per_block < 1 or threads_per_block > lim.max_threads_per_block:
        invalid = f"block of {threads_per_block} threads exceeds {lim.max_threads_per_block}"
    elif registers_per_thread > lim.max_registers_per_thread:
        invalid = f"{registers_per_thread} registers/thread exceed {lim.max_registers_per_thread}"
    elif regs_per_warp * _round_up(warps, lim.sub_partitions) > lim.max_registers_per_block:
        invalid = f"{regs_per_warp * warps} registers/block exceed {lim.max_registers_per_block}"
    elif shared_per_block > lim.max_shared_per_block:
        invalid = f"{shared_per_block} B shared/block exceed {lim.max_shared_per_block}"
    by = {  # on a tie the first binding limit is named
        "warps": lim.max_warps_per_sm // warps,
        "blocks": lim.max_blocks_per_sm,
        "registers": (lim.registers_per_sm // lim.sub_partitions // regs_per_warp)
        * lim.sub_partitions
        // warps,
        "shared": lim.shared_per_sm // shared,
    }
    if invalid is not None:
        return Occupancy(0, 0, 0.0, f"cannot launch: {invalid}", by)
    limiter = min(by, key=lambda k: (by[k], list(by).index(k)))
    blocks = by[limiter]
    return Occupancy(blocks, blocks * warps, blocks * warps / lim.max_warps_per_sm, limiter, by)

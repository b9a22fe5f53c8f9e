"""Triton fused DIST (semantics 2) and the custom op ``kdfast::dist_loss_triton``.

Same contract as ``kdfast::dist_loss_cpp`` (:mod:`kdfast.ops.dist_loss`): ``(loss,
grad_student, grad_teacher)``, the gradients written in the forward pass only when the flags
ask for them, empty (0,) tensors otherwise; once-differentiable. Inputs: (rows, C) with any
strides, or contiguous (N, C, S) read in place as N * S rows (r = n * S + s).

Why three kernels: every intra-class gradient needs column statistics that exist only after
all rows are read. ``dist_stats_kernel`` (G programs, each owning every G-th row tile)
writes per-row values to a (rows, 10) buffer and merges its tiles' column moments
(Chan-Golub-LeVeque); ``dist_merge_kernel`` merges the G programs' moments in order
(deterministic, no atomics); ``dist_grad_kernel`` writes the gradients. Rows that fit
RESIDENT_TILE stay in registers (one read per kernel); wider rows are read in column
blocks, each second sweep from the last block back so the most recently read part is
re-read from L2. Read counts and their budget: docs/semantics.md section 2. Per-element
math: kdfast/triton/_dist_math.py (as csrc/dist_loss.h). Launchers accept CPU tensors
(TRITON_INTERPRET=1). Import only when triton is importable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kdfast._constants import DIST_ACTIVATIONS
from kdfast._validation import check_choice, compute_dtype
from kdfast.triton._dist_math import activate, dloss_dy, merge_moments, pearson
from kdfast.triton._layout import grad_offsets, last_block, logit_layout, logit_ptrs, mask_flags

#: row-stat fields of the (rows, ROW_FIELDS) buffer
MAX_S, INV_SUM_S, MAX_T, INV_SUM_T, MEAN_S, MEAN_T, INV_D, K_A, K_B, RHO = range(10)
ROW_FIELDS = 10
#: column fields (G x 5 x C moments; 5 x C coefficients: means, inv_d, k_a, k_b)
COL_FIELDS = 5
#: elements per tile of the stats and gradient kernels
STATS_TILE = {4: 1024, 8: 512}
GRAD_TILE = {4: 1024, 8: 512}
#: elements per input of a RESIDENT tile (whole rows held in registers)
RESIDENT_TILE = {4: 2048, 8: 1024}
RESIDENT_WARPS = 8
MERGE_BLOCK = 256
#: bytes allowed for the per-program column moments
COLUMN_BUDGET = 256 * 2**20


@triton.jit
def _load(ptr, offs_r, cols, ok, rs, cs, S, SPATIAL: tl.constexpr):
    """A (BLOCK_R, BLOCK_C) tile of logits in their own dtype (0 where not ok)."""
    return tl.load(logit_ptrs(ptr, offs_r, cols, rs, cs, S, SPATIAL), mask=ok, other=0.0)


@triton.jit
def _pair(
    s_ptr, t_ptr, zs_tile, zt_tile, offs_r, row_ok, c0, n_cols,
    s_rs, s_cs, t_rs, t_cs, S, SPATIAL: tl.constexpr, RESIDENT: tl.constexpr,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    """(cols, col_ok, ok, zs, zt) of the column block at c0: the resident tiles (the row's
    only block), or the block loaded from memory."""
    cols = c0 + tl.arange(0, BLOCK_C)
    col_ok = cols < n_cols
    ok = row_ok[:, None] & col_ok[None, :]
    if RESIDENT:
        zs = zs_tile
        zt = zt_tile
    else:
        zs = _load(s_ptr, offs_r, cols, ok, s_rs, s_cs, S, SPATIAL)
        zt = _load(t_ptr, offs_r, cols, ok, t_rs, t_cs, S, SPATIAL)
    return cols, col_ok, ok, zs, zt


@triton.jit
def _load_moments(fields, n64, ok):
    """The 5 column-moment rows (means, second moments, co-moment) stored n64 apart."""
    return (
        tl.load(fields, mask=ok, other=0.0),
        tl.load(fields + n64, mask=ok, other=0.0),
        tl.load(fields + 2 * n64, mask=ok, other=0.0),
        tl.load(fields + 3 * n64, mask=ok, other=0.0),
        tl.load(fields + 4 * n64, mask=ok, other=0.0),
    )


@triton.jit
def _resident_tiles(
    s_ptr, t_ptr, offs_r, row_ok, n_cols, s_rs, s_cs, t_rs, t_cs, S,
    SPATIAL: tl.constexpr, RESIDENT: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """The (zs, zt) row tiles, read once, when rows are resident; 0.0 placeholders else."""
    zs_tile = 0.0
    zt_tile = 0.0
    if RESIDENT:
        cols, col_ok, ok, zs_tile, zt_tile = _pair(
            s_ptr, t_ptr, 0.0, 0.0, offs_r, row_ok, 0, n_cols,
            s_rs, s_cs, t_rs, t_cs, S, SPATIAL, False, BLOCK_C,
        )  # fmt: skip
    return zs_tile, zt_tile


@triton.jit
def dist_stats_kernel(
    s_ptr, t_ptr, mask_ptr, params_ptr, row_ptr, col_ptr, count_ptr, n_rows, n_cols,
    s_rs, s_cs, t_rs, t_cs, S, SIGMOID: tl.constexpr, HAS_MASK: tl.constexpr,
    RESIDENT: tl.constexpr, SPATIAL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Pass 1: per-row values into row (rows, 10) and this program's column moments into
    col[program] (5, C) (zero-initialised), its kept-row count into count[program].
    params = [1 / T, C] in the compute dtype (that of row, col, count). RESIDENT: C <= BLOCK_C,
    each tile read once, column moments in registers."""
    ACC = row_ptr.dtype.element_ty
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    inv_temperature = tl.load(params_ptr)
    n_f = tl.load(params_ptr + 1)
    n64 = pid.to(tl.int64) * 0 + n_cols  # 64-bit field offsets
    col_base = col_ptr + pid.to(tl.int64) * 5 * n64
    na = tl.sum(tl.zeros((BLOCK_R,), ACC), axis=0)
    if RESIDENT:  # this program's column moments
        acc_mean_s = tl.zeros((BLOCK_C,), ACC)
        acc_mean_t = tl.zeros((BLOCK_C,), ACC)
        acc_m2s = tl.zeros((BLOCK_C,), ACC)
        acc_m2t = tl.zeros((BLOCK_C,), ACC)
        acc_cst = tl.zeros((BLOCK_C,), ACC)
    n_tiles = tl.cdiv(n_rows, BLOCK_R)
    for tile in range(pid, n_tiles, n_programs):
        offs_r = (tl.zeros((BLOCK_R,), tl.int64) + tile) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = offs_r < n_rows
        keep = row_ok
        if HAS_MASK:
            keep = keep & (tl.load(mask_ptr + offs_r, mask=row_ok, other=0) != 0)
        zs_tile, zt_tile = _resident_tiles(
            s_ptr, t_ptr, offs_r, row_ok, n_cols, s_rs, s_cs, t_rs, t_cs, S,
            SPATIAL, RESIDENT, BLOCK_C,
        )  # fmt: skip
        # sweep 1 (softmax only; sigmoid needs no row statistic for y): online max / sum
        max_s = tl.zeros((BLOCK_R,), ACC)  # sigmoid: unused max 0, 1 / sum 1
        max_t = tl.zeros((BLOCK_R,), ACC)
        sum_s = tl.full((BLOCK_R,), 1.0, ACC)
        sum_t = tl.full((BLOCK_R,), 1.0, ACC)
        if not SIGMOID:
            max_s = tl.full((BLOCK_R,), float("-inf"), ACC)
            max_t = tl.full((BLOCK_R,), float("-inf"), ACC)
            sum_s = tl.zeros((BLOCK_R,), ACC)
            sum_t = tl.zeros((BLOCK_R,), ACC)
            for c0 in range(0, n_cols, BLOCK_C):
                cols, col_ok, ok, zs, zt = _pair(
                    s_ptr, t_ptr, zs_tile, zt_tile, offs_r, row_ok, c0, n_cols,
                    s_rs, s_cs, t_rs, t_cs, S, SPATIAL, RESIDENT, BLOCK_C,
                )  # fmt: skip
                u = tl.where(col_ok[None, :], zs.to(ACC) * inv_temperature, float("-inf"))
                v = tl.where(col_ok[None, :], zt.to(ACC) * inv_temperature, float("-inf"))
                new_s = tl.maximum(max_s, tl.max(u, axis=1))
                new_t = tl.maximum(max_t, tl.max(v, axis=1))
                sum_s = sum_s * tl.exp(max_s - new_s) + tl.sum(tl.exp(u - new_s[:, None]), 1)
                sum_t = sum_t * tl.exp(max_t - new_t) + tl.sum(tl.exp(v - new_t[:, None]), 1)
                max_s = new_s
                max_t = new_t
        inv_sum_s = 1.0 / sum_s
        inv_sum_t = 1.0 / sum_t
        shift = tl.zeros((BLOCK_R,), ACC) + 1.0 / n_f
        # sweep 2: y, the row terms and the tile's column moments. Row terms: softmax, sums
        # of y - 1 / C; sigmoid, the row moments of y merged over the column blocks.
        nb = tl.sum(keep.to(ACC), axis=0)
        nb_safe = tl.where(nb > 0.0, nb, 1.0)
        sd_s = tl.zeros((BLOCK_R,), ACC)
        sd_t = tl.zeros((BLOCK_R,), ACC)
        sdd_s = tl.zeros((BLOCK_R,), ACC)
        sdd_t = tl.zeros((BLOCK_R,), ACC)
        sdd_st = tl.zeros((BLOCK_R,), ACC)
        seen = tl.sum(tl.zeros((BLOCK_R,), ACC), axis=0)
        last = last_block(n_cols, BLOCK_C, RESIDENT)
        for i in range(0, n_cols, BLOCK_C):
            c0 = last - i  # last block first: it is the one sweep 1 read most recently
            cols, col_ok, ok, zs, zt = _pair(
                s_ptr, t_ptr, zs_tile, zt_tile, offs_r, row_ok, c0, n_cols,
                s_rs, s_cs, t_rs, t_cs, S, SPATIAL, RESIDENT, BLOCK_C,
            )  # fmt: skip
            ys = activate(zs.to(ACC), inv_temperature, max_s, inv_sum_s, SIGMOID)
            yt = activate(zt.to(ACC), inv_temperature, max_t, inv_sum_t, SIGMOID)
            if SIGMOID:  # sd_*: row means, sdd_*: centred second moments and co-moment
                width = tl.sum(col_ok.to(ACC), axis=0)
                r_mean_s = tl.sum(tl.where(ok, ys, 0.0), axis=1) / width
                r_mean_t = tl.sum(tl.where(ok, yt, 0.0), axis=1) / width
                ds = tl.where(ok, ys - r_mean_s[:, None], 0.0)
                dt = tl.where(ok, yt - r_mean_t[:, None], 0.0)
                if RESIDENT:  # the row's only block
                    sd_s = r_mean_s
                    sd_t = r_mean_t
                    sdd_s = tl.sum(ds * ds, axis=1)
                    sdd_t = tl.sum(dt * dt, axis=1)
                    sdd_st = tl.sum(ds * dt, axis=1)
                else:
                    sd_s, sd_t, sdd_s, sdd_t, sdd_st = merge_moments(
                        seen, width, sd_s, sd_t, sdd_s, sdd_t, sdd_st, r_mean_s, r_mean_t,
                        tl.sum(ds * ds, axis=1), tl.sum(dt * dt, axis=1),
                        tl.sum(ds * dt, axis=1),
                    )  # fmt: skip
                    seen += width
            else:
                ds = tl.where(ok, ys - shift[:, None], 0.0)
                dt = tl.where(ok, yt - shift[:, None], 0.0)
                sd_s += tl.sum(ds, axis=1)
                sd_t += tl.sum(dt, axis=1)
                sdd_s += tl.sum(ds * ds, axis=1)
                sdd_t += tl.sum(dt * dt, axis=1)
                sdd_st += tl.sum(ds * dt, axis=1)
            # column moments of the tile's kept rows, merged into this program's
            kept = keep[:, None] & col_ok[None, :]
            ys = tl.where(kept, ys, 0.0)
            yt = tl.where(kept, yt, 0.0)
            b_mean_s = tl.sum(ys, axis=0) / nb_safe
            b_mean_t = tl.sum(yt, axis=0) / nb_safe
            cs = tl.where(kept, ys - b_mean_s[None, :], 0.0)
            ct = tl.where(kept, yt - b_mean_t[None, :], 0.0)
            b_m2s = tl.sum(cs * cs, axis=0)
            b_m2t = tl.sum(ct * ct, axis=0)
            b_cst = tl.sum(cs * ct, axis=0)
            if RESIDENT:
                acc_mean_s, acc_mean_t, acc_m2s, acc_m2t, acc_cst = merge_moments(
                    na, nb, acc_mean_s, acc_mean_t, acc_m2s, acc_m2t, acc_cst,
                    b_mean_s, b_mean_t, b_m2s, b_m2t, b_cst,
                )  # fmt: skip
            else:
                fields = col_base + cols
                mean_s, mean_t, m2s, m2t, cst = merge_moments(
                    na, nb, *_load_moments(fields, n64, col_ok),
                    b_mean_s, b_mean_t, b_m2s, b_m2t, b_cst,
                )  # fmt: skip
                tl.store(fields, mean_s, mask=col_ok)
                tl.store(fields + n64, mean_t, mask=col_ok)
                tl.store(fields + 2 * n64, m2s, mask=col_ok)
                tl.store(fields + 3 * n64, m2t, mask=col_ok)
                tl.store(fields + 4 * n64, cst, mask=col_ok)
                # The next tile reloads these moments, possibly in other threads (replicated
                # layouts store once): make the stores visible to the whole program.
                tl.debug_barrier()
        na += nb
        if SIGMOID:
            row_mean_s = sd_s
            row_mean_t = sd_t
            saa = sdd_s
            sbb = sdd_t
            sab = sdd_st
        else:
            row_mean_s = shift + sd_s / n_f
            row_mean_t = shift + sd_t / n_f
            saa = tl.maximum(sdd_s - sd_s * sd_s / n_f, 0.0)
            sbb = tl.maximum(sdd_t - sd_t * sd_t / n_f, 0.0)
            sab = sdd_st - sd_s * sd_t / n_f
        rho, inv_d, k_a, k_b = pearson(saa, sbb, sab)
        out = row_ptr + offs_r * 10
        tl.store(out + 0, max_s, mask=row_ok)
        tl.store(out + 1, inv_sum_s, mask=row_ok)
        tl.store(out + 2, max_t, mask=row_ok)
        tl.store(out + 3, inv_sum_t, mask=row_ok)
        tl.store(out + 4, row_mean_s, mask=row_ok)
        tl.store(out + 5, row_mean_t, mask=row_ok)
        tl.store(out + 6, inv_d, mask=row_ok)
        tl.store(out + 7, k_a, mask=row_ok)
        tl.store(out + 8, k_b, mask=row_ok)
        tl.store(out + 9, tl.where(keep, rho, 0.0), mask=row_ok)
    if RESIDENT:
        cols = tl.arange(0, BLOCK_C)
        col_ok = cols < n_cols
        fields = col_base + cols
        tl.store(fields, acc_mean_s, mask=col_ok)
        tl.store(fields + n64, acc_mean_t, mask=col_ok)
        tl.store(fields + 2 * n64, acc_m2s, mask=col_ok)
        tl.store(fields + 3 * n64, acc_m2t, mask=col_ok)
        tl.store(fields + 4 * n64, acc_cst, mask=col_ok)
    tl.store(count_ptr + pid, na)


@triton.jit
def dist_merge_kernel(col_ptr, count_ptr, coef_ptr, rho_ptr, n_cols, n_groups, BLOCK: tl.constexpr):
    """Pass 1b: merge the n_groups programs' column moments col (n_groups, 5, C) in order;
    coef (5, C) = column means of ys and yt, 1 / D, k_a, k_b; rho (C,) per column."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_cols
    n64 = tl.program_id(0).to(tl.int64) * 0 + n_cols  # 64-bit field offsets
    mean_s = tl.load(col_ptr + cols, mask=ok, other=0.0)
    mean_t = tl.load(col_ptr + n64 + cols, mask=ok, other=0.0)
    m2s = tl.load(col_ptr + 2 * n64 + cols, mask=ok, other=0.0)
    m2t = tl.load(col_ptr + 3 * n64 + cols, mask=ok, other=0.0)
    cst = tl.load(col_ptr + 4 * n64 + cols, mask=ok, other=0.0)
    na = tl.load(count_ptr)
    fields = col_ptr + cols
    for g in range(1, n_groups):
        fields += 5 * n64
        nb = tl.load(count_ptr + g)
        mean_s, mean_t, m2s, m2t, cst = merge_moments(
            na, nb, mean_s, mean_t, m2s, m2t, cst, *_load_moments(fields, n64, ok)
        )
        na += nb
    rho, inv_d, k_a, k_b = pearson(m2s, m2t, cst)
    tl.store(coef_ptr + cols, mean_s, mask=ok)
    tl.store(coef_ptr + n64 + cols, mean_t, mask=ok)
    tl.store(coef_ptr + 2 * n64 + cols, inv_d, mask=ok)
    tl.store(coef_ptr + 3 * n64 + cols, k_a, mask=ok)
    tl.store(coef_ptr + 4 * n64 + cols, k_b, mask=ok)
    tl.store(rho_ptr + cols, rho, mask=ok)


@triton.jit
def dist_grad_kernel(
    s_ptr, t_ptr, mask_ptr, params_ptr, row_ptr, coef_ptr, gs_ptr, gt_ptr, n_rows, n_cols,
    s_rs, s_cs, t_rs, t_cs, S, SIGMOID: tl.constexpr, HAS_MASK: tl.constexpr,
    GRAD_S: tl.constexpr, GRAD_T: tl.constexpr, RESIDENT: tl.constexpr, SPATIAL: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Passes 2 and 3: dL/dzs, dL/dzt into gs, gt (contiguous, the inputs' layout: (rows, C)
    or (N, C, S); zero for masked rows). params = [1 / T, dL/drho_row = -beta s / kept,
    dL/drho_col = -gamma s / C]. RESIDENT: C <= BLOCK_C, each tile read once."""
    ACC = row_ptr.dtype.element_ty
    offs_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = offs_r < n_rows
    keep = row_ok
    if HAS_MASK:
        keep = keep & (tl.load(mask_ptr + offs_r, mask=row_ok, other=0) != 0)
    n64 = tl.program_id(0).to(tl.int64) * 0 + n_cols  # 64-bit coefficient offsets
    inv_temperature = tl.load(params_ptr)
    w_row = tl.load(params_ptr + 1)
    w_col = tl.load(params_ptr + 2)
    row = row_ptr + tl.where(row_ok, offs_r, 0) * 10
    max_s = tl.load(row + 0)
    inv_sum_s = tl.load(row + 1)
    max_t = tl.load(row + 2)
    inv_sum_t = tl.load(row + 3)
    zs_tile, zt_tile = _resident_tiles(
        s_ptr, t_ptr, offs_r, row_ok, n_cols, s_rs, s_cs, t_rs, t_cs, S, SPATIAL, RESIDENT, BLOCK_C
    )
    dot_s = tl.zeros((BLOCK_R,), ACC)
    dot_t = tl.zeros((BLOCK_R,), ACC)
    if not SIGMOID:
        for c0 in range(0, n_cols, BLOCK_C):
            cols, col_ok, ok, zs, zt = _pair(
                s_ptr, t_ptr, zs_tile, zt_tile, offs_r, row_ok, c0, n_cols,
                s_rs, s_cs, t_rs, t_cs, S, SPATIAL, RESIDENT, BLOCK_C,
            )  # fmt: skip
            ys = activate(zs.to(ACC), inv_temperature, max_s, inv_sum_s, SIGMOID)
            yt = activate(zt.to(ACC), inv_temperature, max_t, inv_sum_t, SIGMOID)
            if GRAD_S:
                g = dloss_dy(ys, yt, cols, ok, row, coef_ptr, n64, w_row, w_col, True)
                dot_s += tl.sum(g * ys, axis=1)
            if GRAD_T:
                g = dloss_dy(ys, yt, cols, ok, row, coef_ptr, n64, w_row, w_col, False)
                dot_t += tl.sum(g * yt, axis=1)
    last = last_block(n_cols, BLOCK_C, RESIDENT)
    for i in range(0, n_cols, BLOCK_C):
        c0 = last - i  # last block first: it is the one the <g, y> sweep read most recently
        cols, col_ok, ok, zs, zt = _pair(
            s_ptr, t_ptr, zs_tile, zt_tile, offs_r, row_ok, c0, n_cols,
            s_rs, s_cs, t_rs, t_cs, S, SPATIAL, RESIDENT, BLOCK_C,
        )  # fmt: skip
        ys = activate(zs.to(ACC), inv_temperature, max_s, inv_sum_s, SIGMOID)
        yt = activate(zt.to(ACC), inv_temperature, max_t, inv_sum_t, SIGMOID)
        out = grad_offsets(offs_r, cols, n_cols, S, SPATIAL)
        if GRAD_S:
            g = dloss_dy(ys, yt, cols, ok, row, coef_ptr, n64, w_row, w_col, True)
            if SIGMOID:
                g = g * ys * (1.0 - ys) * inv_temperature
            else:
                g = ys * (g - dot_s[:, None]) * inv_temperature
            g = tl.where(keep[:, None], g, 0.0)
            tl.store(gs_ptr + out, g.to(gs_ptr.dtype.element_ty), mask=ok)
        if GRAD_T:
            g = dloss_dy(ys, yt, cols, ok, row, coef_ptr, n64, w_row, w_col, False)
            if SIGMOID:
                g = g * yt * (1.0 - yt) * inv_temperature
            else:
                g = yt * (g - dot_t[:, None]) * inv_temperature
            g = tl.where(keep[:, None], g, 0.0)
            tl.store(gt_ptr + out, g.to(gt_ptr.dtype.element_ty), mask=ok)


def _resident_rows(n_rows: int, n_cols: int, elem: int) -> int:
    """BLOCK_R of a RESIDENT tile (whole rows, padded to a power of two), 0 when a row does
    not fit RESIDENT_TILE."""
    width = triton.next_power_of_2(n_cols)
    if width > RESIDENT_TILE[elem]:
        return 0
    return max(1, min(16, RESIDENT_TILE[elem] // width, triton.next_power_of_2(n_rows)))


def stats_blocks(n_rows: int, n_cols: int, elem: int) -> tuple[int, int, bool]:
    """(BLOCK_R, BLOCK_C, RESIDENT) of the stats kernel: whole rows when they fit, else tall
    tiles (up to 16 rows), so that the column moments are read and written once per 16
    rows."""
    block_r = _resident_rows(n_rows, n_cols, elem)
    if block_r:
        return block_r, triton.next_power_of_2(n_cols), True
    block_r = min(16, triton.next_power_of_2(n_rows))
    return block_r, min(triton.next_power_of_2(n_cols), STATS_TILE[elem] // block_r), False


def grad_blocks(n_rows: int, n_cols: int, elem: int) -> tuple[int, int, bool]:
    """(BLOCK_R, BLOCK_C, RESIDENT) of the gradient kernel (``elem``-byte compute floats):
    whole rows when they fit, else wide column blocks, rows to fill a tile."""
    block_r = _resident_rows(n_rows, n_cols, elem)
    if block_r:
        return block_r, triton.next_power_of_2(n_cols), True
    block_c = min(triton.next_power_of_2(n_cols), GRAD_TILE[elem])
    return max(1, min(16, GRAD_TILE[elem] // block_c)), block_c, False


def n_programs(n_rows: int, n_cols: int, block_r: int, elem: int, device) -> int:
    """Programs of the stats kernel: enough to fill the GPU (4 per SM), at most one per
    tile, and their column moments within COLUMN_BUDGET."""
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 2
    budget = max(1, COLUMN_BUDGET // (COL_FIELDS * n_cols * elem))
    return max(1, min(triton.cdiv(n_rows, block_r), target, budget))


def _warps(resident: bool) -> int:
    return RESIDENT_WARPS if resident else 4


def dist_loss_triton(
    student: Tensor,
    teacher: Tensor,
    beta: float,
    gamma: float,
    temperature: float,
    temperature_squared: bool,
    activation: str,
    mask: Tensor | None,
    compute_grad_student: bool,
    compute_grad_teacher: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Fused DIST with Triton (schema of ``kdfast::dist_loss_cpp``).

    Args:
        student, teacher: (rows, C) logits with any strides, or contiguous (N, C, S) read
            as rows = N * S (row r = n * S + s); any floating dtypes.
        beta, gamma: weights of the inter and intra terms; temperature: T > 0;
        temperature_squared: scale both terms by T^2. activation: "softmax" or "sigmoid".
        mask: optional bool (rows,) of kept rows (row order r = n * S + s).
        compute_grad_student, compute_grad_teacher: write that gradient.

    Returns:
        (loss: () in promote_types(student, teacher, float32), grad_student of student's
        shape and dtype or (0,), grad_teacher likewise).
    """
    rows, n_cols, n_spatial, strides = logit_layout("dist_loss_triton", student, teacher)
    check_choice("activation", activation, DIST_ACTIVATIONS)  # a direct torch.ops call's
    acc = dtype = compute_dtype(student, teacher)  # float32 or float64: also the accumulator
    device = student.device
    sigmoid = activation == "sigmoid"
    flags = mask_flags(mask, rows, device)
    if mask is None:
        kept = torch.tensor(float(rows), dtype=torch.float64, device=device)
    else:
        kept = mask.sum().to(torch.float64)
    scale = temperature * temperature if temperature_squared else 1.0
    options = dict(SPATIAL=n_spatial > 1, SIGMOID=sigmoid, HAS_MASK=mask is not None)

    elem = 8 if acc == torch.float64 else 4
    block_r, block_c, resident = stats_blocks(rows, n_cols, elem)
    groups = n_programs(rows, n_cols, block_r, elem, device)
    row_stats = torch.empty(rows, ROW_FIELDS, dtype=acc, device=device)
    col = torch.zeros(groups, COL_FIELDS, n_cols, dtype=acc, device=device)
    count = torch.empty(groups, dtype=acc, device=device)
    params = torch.tensor([1.0 / temperature, float(n_cols)], dtype=acc, device=device)
    dist_stats_kernel[(groups,)](
        student, teacher, flags, params, row_stats, col, count, rows, n_cols, *strides, n_spatial,
        RESIDENT=resident, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=_warps(resident),
        **options,
    )  # fmt: skip
    coef = torch.empty(COL_FIELDS, n_cols, dtype=acc, device=device)
    rho_col = torch.empty(n_cols, dtype=acc, device=device)
    dist_merge_kernel[(triton.cdiv(n_cols, MERGE_BLOCK),)](
        col, count, coef, rho_col, n_cols, groups, BLOCK=MERGE_BLOCK
    )
    del col
    rho_rows = row_stats[:, RHO].to(torch.float64).sum()
    rho_cols = rho_col.to(torch.float64).sum()
    loss = beta * scale * (1.0 - rho_rows / kept) + gamma * scale * (1.0 - rho_cols / n_cols)
    grad_s = student.new_empty(student.shape if compute_grad_student else (0,))
    grad_t = teacher.new_empty(teacher.shape if compute_grad_teacher else (0,))
    if compute_grad_student or compute_grad_teacher:
        w_row = -beta * scale / kept
        w_col = w_row.new_tensor(-gamma * scale / n_cols)
        weights = torch.stack([w_row.new_tensor(1.0 / temperature), w_row, w_col]).to(acc)
        block_r, block_c, resident = grad_blocks(rows, n_cols, elem)
        dist_grad_kernel[(triton.cdiv(rows, block_r),)](
            student, teacher, flags, weights, row_stats, coef, grad_s, grad_t, rows, n_cols,
            *strides, n_spatial, GRAD_S=compute_grad_student, GRAD_T=compute_grad_teacher,
            RESIDENT=resident, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=_warps(resident),
            **options,
        )  # fmt: skip
    return loss.to(dtype), grad_s, grad_t

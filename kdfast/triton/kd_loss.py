"""Triton fused softmax + KL (semantics 3) and the custom op ``kdfast::kd_loss_triton``: Hinton
KD (every reduction, mask, teacher given as logits, probs or log-probs), per-sample KL and
the DeiT soft term (``kd_loss(..., reduction="mean")``).

Same contract as ``kdfast::kd_loss_cpp`` (:mod:`kdfast.ops.kd_loss`): the op returns
``(loss, grad_student, grad_teacher)``, the gradients (for a unit upstream gradient; per row
for reduction "none") written in the forward pass only when the flags ask for them, empty
(0,) tensors otherwise; once-differentiable.

One kernel, programs over tiles of BLOCK_R rows, looping over column blocks of BLOCK_C (any
C up to 262144 and beyond): pass 1 the online max / sum of exp of each side (for a teacher
given as probs or log-probs, with a student gradient alone: sum(pt)), pass 2 the row KL and
sum(pt), and with a student gradient alone its write, pass 3 (only with a teacher gradient,
which needs a row sum of pass 2) the gradient writes. The gradient of teacher logits is
pt ((d - d_top) + a) / T with d = zt - zs, d_top its value at the teacher's top class and
a = sum_j pt_j (d_top - d_j), summed in pass 2 (not pt (log pt - log ps - KL), see
csrc/kd_loss.h); pass 1 then reads the teacher first, finding its top class, and takes the
student's logit there as it reads the student. Reads of each input per call (counted under
the interpreter by tests/kernels/test_logit_kernels.py): 2, also with a student gradient; 3 with a
teacher gradient; a teacher given as probs or log-probs is not read in pass 1 unless the
student's gradient alone is asked for. Pass 2 runs from the last column block back to the
first, so that what pass 1 read last (the likeliest still in L2) is re-read first. Inputs are
read in place: (rows, C) with any row and column strides (no copies for expanded rows or
mixed dtypes), or contiguous (N, C, S) as N * S rows r = n * S + s (SPATIAL; gradients of
the input's shape, reduction "none" (N * S,) in row order); half inputs are computed in
float32 registers, float64 inputs in float64; per-row values are the only temporaries.
Row offsets are 64-bit. The reduction's weight (which depends on the number of kept rows)
is a device scalar: no host sync.
Launchers accept CPU tensors (TRITON_INTERPRET=1). Import only when triton is importable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kdfast._constants import KD_REDUCTIONS, KD_TEACHER_KINDS
from kdfast._validation import check_choice, compute_dtype
from kdfast.triton._layout import grad_offsets, last_block, logit_layout, logit_ptrs, mask_flags

#: elements per tile (BLOCK_R * BLOCK_C) for float32 / float64 compute: a tile and its
#: temporaries stay in registers (no spills, tests/kernels/test_triton_aot.py).
TILE = {4: 2048, 8: 1024}


@triton.jit
def _row_lse(
    x_ptr,
    offs_r,
    row_ok,
    rs,
    cs,
    S,
    n_cols,
    scale,
    top,
    SPATIAL: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ACC: tl.constexpr,
    KIND: tl.constexpr,
    TOP: tl.constexpr = 0,
):
    """Pass 1 over one side of the tile: (max, sum of exp(x * scale - max), top, x_top) of
    each row (KIND 0: logits); for a teacher given as probs (KIND 1) or log-probs (KIND 2),
    (0, sum(pt), ...), sum(pt) summed as pass 2 sums it. TOP 1: top = the first column
    holding the max of the row (-1 for a row of -inf or NaN), x_top = x there (unscaled);
    TOP 2: x_top = the unscaled x at the given column top of each row; TOP 0: top, x_top
    unused."""
    m = tl.full(offs_r.shape, float("-inf"), ACC)
    if KIND != 0:
        m = tl.zeros(offs_r.shape, ACC)
    total = tl.zeros(offs_r.shape, ACC)
    if TOP == 1:
        top = tl.full(offs_r.shape, -1, tl.int32)
        x_top = tl.full(offs_r.shape, float("-inf"), ACC)
    else:
        x_top = tl.zeros(offs_r.shape, ACC)
    for c0 in range(0, n_cols, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = cols < n_cols
        ok = row_ok[:, None] & col_ok[None, :]
        raw = tl.load(logit_ptrs(x_ptr, offs_r, cols, rs, cs, S, SPATIAL), mask=ok, other=1.0)
        raw = raw.to(ACC)
        if TOP == 1:
            block_max, block_top = tl.max(
                tl.where(col_ok[None, :], raw, float("-inf")), axis=1, return_indices=True
            )
            top = tl.where(block_max > x_top, c0 + block_top, top)
            x_top = tl.maximum(x_top, block_max)
        elif TOP == 2:
            x_top += tl.sum(tl.where(cols[None, :] == top[:, None], raw, 0.0), axis=1)
        x = raw * scale
        if KIND == 0:
            x = tl.where(col_ok[None, :], x, float("-inf"))
            m_new = tl.maximum(m, tl.max(x, axis=1))
            total = total * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
            m = m_new
        else:
            pt = x if KIND == 1 else tl.exp(x)
            total += tl.sum(tl.where(ok, pt, 0.0), axis=1)
    return m, total, top, x_top


@triton.jit
def _teacher_terms(v, max_t, log_sum_t, inv_sum_t, KIND: tl.constexpr):
    """(pt, log pt) from the teacher tile v (logits / T, probs or log-probs)."""
    if KIND == 0:
        log_pt = (v - max_t[:, None]) - log_sum_t[:, None]
        pt = tl.exp(v - max_t[:, None]) * inv_sum_t[:, None]
    elif KIND == 1:
        pt = v
        log_pt = tl.log(v)
    else:
        log_pt = v
        pt = tl.exp(v)
    return pt, log_pt


@triton.jit
def kd_loss_kernel(
    s_ptr,
    t_ptr,
    mask_ptr,
    params_ptr,
    row_kl_ptr,
    gs_ptr,
    gt_ptr,
    n_rows,
    n_cols,
    s_rs,
    s_cs,
    t_rs,
    t_cs,
    S,
    KIND: tl.constexpr,
    HAS_MASK: tl.constexpr,
    GRAD_S: tl.constexpr,
    GRAD_T: tl.constexpr,
    SPATIAL: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Per-row KL(pt || ps) into row_kl (0 for masked rows) and, when requested, the
    gradients (scaled by params[0] = loss_scale * reduction weight) into gs / gt,
    contiguous in the inputs' layout; params[1] = 1 / T. params and row_kl have the compute
    dtype (float64 for float64 inputs, else float32). s, t: (rows, C) logits with strides
    (s_rs, s_cs), (t_rs, t_cs), or with SPATIAL contiguous (N, C, S) (rows r = n * S + s,
    rs = C * S, cs = S); the teacher holds logits (KIND 0), probs (1) or log-probs (2)."""
    ACC = row_kl_ptr.dtype.element_ty
    offs_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = offs_r < n_rows
    inv_t = tl.load(params_ptr + 1)
    teacher_scale = inv_t if KIND == 0 else 1.0
    if GRAD_T and KIND == 0:
        # the teacher first: its top class (pass 2), then the student's logit there
        max_t, sum_t, top, d_top = _row_lse(
            t_ptr, offs_r, row_ok, t_rs, t_cs, S, n_cols, inv_t, -1, SPATIAL, BLOCK_C, ACC, 0, 1
        )
        max_s, sum_s, _, zs_top = _row_lse(
            s_ptr, offs_r, row_ok, s_rs, s_cs, S, n_cols, inv_t, top, SPATIAL, BLOCK_C, ACC, 0, 2
        )
        d_top -= zs_top
    else:
        max_s, sum_s, _, _ = _row_lse(
            s_ptr, offs_r, row_ok, s_rs, s_cs, S, n_cols, inv_t, -1, SPATIAL, BLOCK_C, ACC, 0
        )
    log_sum_s = tl.log(sum_s)
    inv_sum_s = 1.0 / sum_s
    if KIND == 0:
        if not GRAD_T:
            max_t, sum_t, _, _ = _row_lse(
                t_ptr, offs_r, row_ok, t_rs, t_cs, S, n_cols, inv_t, -1, SPATIAL, BLOCK_C, ACC, 0
            )
    else:
        max_t = tl.zeros(offs_r.shape, ACC)
        sum_t = tl.full(offs_r.shape, 1.0, ACC)
    log_sum_t = tl.log(sum_t)
    inv_sum_t = 1.0 / sum_t
    keep = row_ok
    if HAS_MASK:
        keep = keep & (tl.load(mask_ptr + offs_r, mask=row_ok, other=0) != 0)
    scale = tl.load(params_ptr)
    coef_s = scale * inv_t
    coef_t = scale * teacher_scale
    # The student's gradient needs sum(pt) (1 up to rounding for teacher logits; the given
    # probs or log-probs need not be normalised) and the teacher's needs the row KL: without
    # a teacher gradient, sum(pt) is taken before pass 2 and pass 2 writes the gradient.
    if KIND == 0:
        sum_pt_first = sum_t * inv_sum_t
    elif GRAD_S and not GRAD_T:
        _, sum_pt_first, _, _ = _row_lse(
            t_ptr, offs_r, row_ok, t_rs, t_cs, S, n_cols, 1.0, -1, SPATIAL, BLOCK_C, ACC, KIND
        )
    else:
        sum_pt_first = tl.zeros((BLOCK_R,), ACC)  # unused
    ps_scale = sum_pt_first * inv_sum_s
    # pass 2: KL and sum(pt) per row (and the student's gradient, see above); from the last
    # column block back to the first, so that what pass 1 read last is re-read first
    kl = tl.zeros((BLOCK_R,), ACC)
    sum_pt = tl.zeros((BLOCK_R,), ACC)
    # teacher logits with their gradient (pass 3): a = sum_j pt_j (d_top - d_j), d = zt - zs
    # as read (a difference of two loaded values: no product to contract into an FMA, so
    # every pass rounds it alike, and the top class's own term is exactly 0)
    a = tl.zeros((BLOCK_R,), ACC)
    last = last_block(n_cols, BLOCK_C, False)
    for i in range(0, n_cols, BLOCK_C):
        cols = (last - i) + tl.arange(0, BLOCK_C)
        ok = row_ok[:, None] & (cols < n_cols)[None, :]
        u = tl.load(logit_ptrs(s_ptr, offs_r, cols, s_rs, s_cs, S, SPATIAL), mask=ok, other=0.0)
        v = tl.load(logit_ptrs(t_ptr, offs_r, cols, t_rs, t_cs, S, SPATIAL), mask=ok, other=1.0)
        u = u.to(ACC)
        v = v.to(ACC)
        shifted_s = u * inv_t - max_s[:, None]
        log_ps = shifted_s - log_sum_s[:, None]
        pt, log_pt = _teacher_terms(v * teacher_scale, max_t, log_sum_t, inv_sum_t, KIND)
        if KIND == 1:
            term = tl.where(pt == 0.0, 0.0, pt * log_pt) - pt * log_ps
        else:
            term = pt * (log_pt - log_ps)
        kl += tl.sum(tl.where(ok, term, 0.0), axis=1)
        sum_pt += tl.sum(tl.where(ok, pt, 0.0), axis=1)
        if GRAD_T and KIND == 0:
            a += tl.sum(tl.where(ok, pt * (d_top[:, None] - (v - u)), 0.0), axis=1)
        if GRAD_S and not GRAD_T:
            gs = (tl.exp(shifted_s) * ps_scale[:, None] - pt) * coef_s
            gs = tl.where(keep[:, None], gs, 0.0)
            out = grad_offsets(offs_r, cols, n_cols, S, SPATIAL)
            tl.store(gs_ptr + out, gs.to(gs_ptr.dtype.element_ty), mask=ok)
    tl.store(row_kl_ptr + offs_r, tl.where(keep, kl, 0.0), mask=row_ok)
    if GRAD_T:
        # pass 3: the gradient writes (zeros for masked rows)
        ps_scale = sum_pt * inv_sum_s
        for c0 in range(0, n_cols, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            ok = row_ok[:, None] & (cols < n_cols)[None, :]
            zs = tl.load(
                logit_ptrs(s_ptr, offs_r, cols, s_rs, s_cs, S, SPATIAL), mask=ok, other=0.0
            )
            zs = zs.to(ACC)
            u = zs * inv_t
            zt = tl.load(
                logit_ptrs(t_ptr, offs_r, cols, t_rs, t_cs, S, SPATIAL), mask=ok, other=1.0
            )
            zt = zt.to(ACC)
            pt, log_pt = _teacher_terms(zt * teacher_scale, max_t, log_sum_t, inv_sum_t, KIND)
            out = grad_offsets(offs_r, cols, n_cols, S, SPATIAL)
            if GRAD_T:
                log_ps = (u - max_s[:, None]) - log_sum_s[:, None]
                if KIND == 0:
                    # pt (w - sum_j pt_j w_j) with w = (zt - zs) / T (log pt - log ps up to a
                    # constant) as pt ((d - d_top) + a) / T, not pt (log pt - log ps - KL): at
                    # a top class holding nearly all the mass, log pt - log ps and KL agree far
                    # below float32's resolution of their size (csrc/kd_loss.h)
                    gt = pt * (((zt - zs) - d_top[:, None]) + a[:, None]) * inv_t
                elif KIND == 2:
                    gt = pt * (log_pt - log_ps + 1.0)
                else:
                    gt = log_pt + 1.0 - log_ps
                gt = tl.where(keep[:, None], gt * coef_t, 0.0)
                tl.store(gt_ptr + out, gt.to(gt_ptr.dtype.element_ty), mask=ok)
            # after the teacher's: in this order zs and zt are dead before gs is formed, and
            # the fp32 (2, 1024) tile fits in registers on sm_80 (spills the other way round)
            if GRAD_S:
                gs = (tl.exp(u - max_s[:, None]) * ps_scale[:, None] - pt) * coef_s
                gs = tl.where(keep[:, None], gs, 0.0)
                tl.store(gs_ptr + out, gs.to(gs_ptr.dtype.element_ty), mask=ok)


def blocks(n_cols: int, elem: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C) for rows of n_cols classes computed in ``elem``-byte floats: a
    column block of up to a tile, and as many rows as fill the tile (at most 16)."""
    block_c = min(triton.next_power_of_2(n_cols), TILE[elem])
    return max(1, min(16, TILE[elem] // block_c)), block_c


def kd_loss_triton(
    student: Tensor,
    teacher: Tensor,
    temperature: float,
    loss_scale: float,
    reduction: str,
    mask: Tensor | None,
    teacher_kind: str,
    compute_grad_student: bool,
    compute_grad_teacher: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Fused softmax + KL with Triton (schema of ``kdfast::kd_loss_cpp``).

    Args:
        student, teacher: (rows, C) logits with any strides, or contiguous (N, C, S) read
            as rows = N * S (row r = n * S + s); teacher: logits, probs or log-probs at
            temperature T, per ``teacher_kind``; any floating dtypes.
        temperature: T > 0. loss_scale: factor of the KL (T^2 for kd_loss, 1 for
            per_sample_kl).
        reduction: "batchmean", "sum", "mean" or "none". mask: optional bool (rows,) (row
            order r = n * S + s).
        compute_grad_student, compute_grad_teacher: write that gradient.

    Returns:
        (loss: () or (rows,) in promote_types(student, teacher, float32), grad_student of
        student's shape and dtype or (0,), grad_teacher likewise).
    """
    rows, n_cols, n_spatial, strides = logit_layout("kd_loss_triton", student, teacher)
    # options of a direct torch.ops call: an unknown one would run as another (C++ checks too)
    check_choice("reduction", reduction, KD_REDUCTIONS)
    check_choice("teacher_kind", teacher_kind, KD_TEACHER_KINDS)
    acc = dtype = compute_dtype(student, teacher)  # float32 or float64: also the accumulator
    device = student.device
    if mask is None:
        kept = torch.tensor(float(rows), dtype=torch.float64, device=device)
    else:
        kept = mask.sum().to(torch.float64)
    if reduction == "batchmean":
        scale64 = loss_scale / kept
    elif reduction == "mean":
        scale64 = loss_scale / (kept * n_cols)
    else:
        scale64 = torch.tensor(loss_scale, dtype=torch.float64, device=device)
    grad_s = student.new_empty(student.shape if compute_grad_student else (0,))
    grad_t = teacher.new_empty(teacher.shape if compute_grad_teacher else (0,))
    row_kl = torch.empty(rows, dtype=acc, device=device)
    block_r, block_c = blocks(n_cols, 8 if acc == torch.float64 else 4)
    kd_loss_kernel[(triton.cdiv(rows, block_r),)](
        student,
        teacher,
        mask_flags(mask, rows, device),
        torch.stack([scale64, scale64.new_tensor(1.0 / temperature)]).to(acc),
        row_kl,
        grad_s,
        grad_t,
        rows,
        n_cols,
        *strides,
        n_spatial,
        KIND=KD_TEACHER_KINDS.index(teacher_kind),
        HAS_MASK=mask is not None,
        GRAD_S=compute_grad_student,
        GRAD_T=compute_grad_teacher,
        SPATIAL=n_spatial > 1,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
    )
    if reduction == "none":
        loss = (row_kl.to(torch.float64) * loss_scale).to(dtype)
    else:
        loss = (row_kl.to(torch.float64).sum() * scale64).to(dtype)
    return loss, grad_s, grad_t

"""Triton generalised Jensen-Shannon divergence over logits (semantics 3.1,
:mod:`kdfast.reference.jsd_loss`) and the custom op ``kdfast::jsd_loss_triton``.

Same contract as ``kdfast::jsd_loss_cpp`` (csrc/cpu/jsd_loss.cpp, :mod:`kdfast.ops.jsd_loss`):
the op returns ``(loss, grad_student, grad_teacher)``, the gradients (for a unit upstream
gradient; per row for reduction "none") written in the forward pass only when the flags ask
for them, empty (0,) tensors otherwise; once-differentiable.

Per row, with u = zs / T, v = zt / T, log ps = u - lse(u), log pt = v - lse(v), the formulas
of csrc/cpu/jsd_loss.cpp:

* 0 < beta < 1 (MIXTURE): m = beta pt + (1 - beta) ps, ds = log ps - log m, dt = log pt -
  log m, J = beta KL_t + (1 - beta) KL_s with KL_s = sum ps ds, KL_t = sum pt dt;
  T dJ/dzs = (1 - beta) ps (ds - KL_s), T dJ/dzt = beta pt (dt - KL_t).
* beta = 0 (FORWARD_KL): J = KL(pt || ps) = sum pt d, d = log pt - log ps;
  T dJ/dzs = ps sum(pt) - pt, T dJ/dzt = pt (d - J - sum(pt) + 1).
* beta = 1 (REVERSE_KL): the same with the sides swapped.

log pt - log ps is taken as (v - u) + (lse(u) - lse(v)): a difference of logits, not of two
log-probabilities of magnitude |log p|. log m is taken relative to the larger side A from
that difference delta alone (:func:`_log_ratios`): with x = -|delta|, m / p_A = 1 + w_b
expm1(x), whose log keeps its relative accuracy near ps = pt (where the loss is second order
in ds, dt) through Goldberg's log1p identity; near the ends (min(beta, 1 - beta) < 1/16) the
other side's d_B = x + d_A cancels where |d_B| < log 2 and is taken as -log1p(g) there.

One kernel, programs over tiles of BLOCK_R rows, looping over column blocks of BLOCK_C (any
C): pass 1 the online max / sum of exp of each side; pass 2 (from the last column block back
to the first, re-reading first what pass 1 read last) the row sums KL_s, KL_t, sum(ps),
sum(pt); pass 3, only when a gradient is asked for (it needs the row sums), the gradient
writes (zeros for masked rows). Reads of each input per call: 2, 3 with a gradient. Inputs
are read in place: (rows, C) with any row and column strides, or contiguous (N, C, S) as
N * S rows r = n * S + s (SPATIAL; gradients of the input's shape, reduction "none" (N * S,)
in row order); half inputs are computed in float32 registers, float64 inputs in float64.
Row offsets are 64-bit. The reduction's weight (which depends on the number of kept rows) is
a device scalar: no host sync. Launchers accept CPU tensors (TRITON_INTERPRET=1). Import
only when triton is importable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kdfast._constants import KD_REDUCTIONS
from kdfast._validation import check_choice, check_positive, check_unit_interval, compute_dtype
from kdfast.triton._layout import grad_offsets, last_block, logit_layout, logit_ptrs, mask_flags

#: elements per tile (BLOCK_R * BLOCK_C) for float32 / float64 compute: a tile and the
#: per-element temporaries of log m stay in registers (no spills,
#: tests/kernels/test_triton_aot.py).
TILE = {4: 1024, 8: 512}
#: the kernel's MODE: 0 < beta < 1, beta = 0, beta = 1
MIXTURE, FORWARD_KL, REVERSE_KL = 0, 1, 2
#: min(beta, 1 - beta) below which d_B is taken as -log1p(g) (csrc/cpu/jsd_loss.cpp)
NEAR_ENDS = 1.0 / 16


@triton.jit
def _row_lse(
    x_ptr,
    offs_r,
    row_ok,
    rs,
    cs,
    S,
    n_cols,
    inv_t,
    SPATIAL: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ACC: tl.constexpr,
):
    """Pass 1 over one side of the tile: (max, sum of exp(x / T - max)) of each row."""
    m = tl.full(offs_r.shape, float("-inf"), ACC)
    total = tl.zeros(offs_r.shape, ACC)
    for c0 in range(0, n_cols, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = cols < n_cols
        ok = row_ok[:, None] & col_ok[None, :]
        x = tl.load(logit_ptrs(x_ptr, offs_r, cols, rs, cs, S, SPATIAL), mask=ok, other=0.0)
        x = tl.where(col_ok[None, :], x.to(ACC) * inv_t, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=1))
        total = total * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
        m = m_new
    return m, total


@triton.jit
def _log_near_one(y, z):
    """log(y) for y = 1 + z with the relative accuracy of log1p(z), y and z computed
    separately (Goldberg: log(y) * z / (y - 1) cancels the rounding of y near 1)."""
    d = y - 1.0
    return tl.where(d == 0.0, z, tl.log(y) * (z / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def _expm1_neg(x, ex):
    """expm1(x) for x <= 0 given ex = exp(x): Kahan's (ex - 1) x / log(ex) above -0.5 (as
    accurate as exp and log themselves, where ex - 1 cancels), ex - 1 below."""
    kahan = (x > -0.5) & (ex != 1.0)
    ratio = (ex - 1.0) / tl.log(tl.where(kahan, ex, 0.5))
    return tl.where(kahan, ratio * x, tl.where(ex == 1.0, x, ex - 1.0))


@triton.jit
def _log_ratios(delta, w, w1, NEAR: tl.constexpr):
    """(ds, dt) = (log ps - log m, log pt - log m) from delta = log pt - log ps, for
    m = w pt + w1 ps (w, w1 > 0). A NaN or infinite delta gives NaN, as the reference."""
    pos = delta > 0.0
    x = tl.where(pos, -delta, delta)  # -|delta|: log of p_B / p_A, B the smaller side
    ex = tl.exp(x)
    wa = tl.where(pos, w, w1)
    wb = tl.where(pos, w1, w)
    em = _expm1_neg(x, ex)
    d_a = -_log_near_one(wa + wb * ex, wb * em)  # -log(m / p_A) = -log(1 + wb expm1(x))
    d_b = x + d_a
    if NEAR:
        # g = m / p_B - 1 = wa (e^-x - 1); below 1, d_B = -log1p(g) (d_B would cancel)
        g = tl.where(ex > 0.0, -wa * em / tl.where(ex > 0.0, ex, 1.0), 2.0)
        d_b = tl.where(g < 1.0, -_log_near_one(1.0 + g, g), d_b)
    return tl.where(pos, d_b, d_a), tl.where(pos, d_a, d_b)


@triton.jit
def _tile_terms(
    s_ptr,
    t_ptr,
    offs_r,
    cols,
    ok,
    s_rs,
    s_cs,
    t_rs,
    t_cs,
    S,
    inv_t,
    max_s,
    inv_sum_s,
    max_t,
    inv_sum_t,
    dlse,
    w,
    w1,
    SPATIAL: tl.constexpr,
    MODE: tl.constexpr,
    NEAR: tl.constexpr,
    ACC: tl.constexpr,
):
    """(ps, pt, ds, dt) of a tile, computed alike in passes 2 and 3. MIXTURE: ds, dt as in
    :func:`_log_ratios`; FORWARD_KL: dt = log pt - log ps (ds unused); REVERSE_KL: ds =
    log ps - log pt (dt unused)."""
    u = tl.load(logit_ptrs(s_ptr, offs_r, cols, s_rs, s_cs, S, SPATIAL), mask=ok, other=0.0)
    v = tl.load(logit_ptrs(t_ptr, offs_r, cols, t_rs, t_cs, S, SPATIAL), mask=ok, other=0.0)
    u = u.to(ACC) * inv_t
    v = v.to(ACC) * inv_t
    ps = tl.exp(u - max_s[:, None]) * inv_sum_s[:, None]
    pt = tl.exp(v - max_t[:, None]) * inv_sum_t[:, None]
    if MODE == 0:
        ds, dt = _log_ratios((v - u) + dlse[:, None], w, w1, NEAR)
    elif MODE == 1:
        dt = (v - u) + dlse[:, None]
        ds = dt
    else:
        ds = (u - v) - dlse[:, None]
        dt = ds
    return ps, pt, ds, dt


@triton.jit
def jsd_loss_kernel(
    s_ptr,
    t_ptr,
    mask_ptr,
    params_ptr,
    row_loss_ptr,
    gs_ptr,
    gt_ptr,
    n_rows,
    n_cols,
    s_rs,
    s_cs,
    t_rs,
    t_cs,
    S,
    MODE: tl.constexpr,
    NEAR: tl.constexpr,
    HAS_MASK: tl.constexpr,
    GRAD_S: tl.constexpr,
    GRAD_T: tl.constexpr,
    SPATIAL: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Per-row divergence into row_loss (0 for masked rows) and, when requested, the
    gradients (scaled by params[0] = the reduction's weight, / T) into gs / gt, contiguous in
    the inputs' layout. params (compute dtype, as row_loss: float64 for float64 inputs, else
    float32): [weight, 1 / T, beta, 1 - beta, w, w1] with w, w1 = beta, 1 - beta clamped to
    the smallest normal (a beta that rounds to 0 keeps m > 0). s, t: (rows, C) logits with
    strides (s_rs, s_cs), (t_rs, t_cs), or with SPATIAL contiguous (N, C, S) (rows
    r = n * S + s, rs = C * S, cs = S)."""
    ACC = row_loss_ptr.dtype.element_ty
    offs_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = offs_r < n_rows
    inv_t = tl.load(params_ptr + 1)
    w = tl.load(params_ptr + 4)
    w1 = tl.load(params_ptr + 5)
    max_s, sum_s = _row_lse(
        s_ptr, offs_r, row_ok, s_rs, s_cs, S, n_cols, inv_t, SPATIAL, BLOCK_C, ACC
    )
    max_t, sum_t = _row_lse(
        t_ptr, offs_r, row_ok, t_rs, t_cs, S, n_cols, inv_t, SPATIAL, BLOCK_C, ACC
    )
    inv_sum_s = 1.0 / sum_s
    inv_sum_t = 1.0 / sum_t
    dlse = (max_s + tl.log(sum_s)) - (max_t + tl.log(sum_t))
    keep = row_ok
    if HAS_MASK:
        keep = keep & (tl.load(mask_ptr + offs_r, mask=row_ok, other=0) != 0)
    # pass 2: the row sums, from the last column block back to the first
    kl_s = tl.zeros((BLOCK_R,), ACC)
    kl_t = tl.zeros((BLOCK_R,), ACC)
    p_s = tl.zeros((BLOCK_R,), ACC)
    p_t = tl.zeros((BLOCK_R,), ACC)
    last = last_block(n_cols, BLOCK_C, False)
    for i in range(0, n_cols, BLOCK_C):
        cols = (last - i) + tl.arange(0, BLOCK_C)
        ok = row_ok[:, None] & (cols < n_cols)[None, :]
        ps, pt, ds, dt = _tile_terms(
            s_ptr,
            t_ptr,
            offs_r,
            cols,
            ok,
            s_rs,
            s_cs,
            t_rs,
            t_cs,
            S,
            inv_t,
            max_s,
            inv_sum_s,
            max_t,
            inv_sum_t,
            dlse,
            w,
            w1,
            SPATIAL,
            MODE,
            NEAR,
            ACC,
        )
        if MODE != 1:
            kl_s += tl.sum(tl.where(ok, ps * ds, 0.0), axis=1)
            p_s += tl.sum(tl.where(ok, ps, 0.0), axis=1)
        if MODE != 2:
            kl_t += tl.sum(tl.where(ok, pt * dt, 0.0), axis=1)
            p_t += tl.sum(tl.where(ok, pt, 0.0), axis=1)
    if MODE == 0:
        row = tl.load(params_ptr + 2) * kl_t + tl.load(params_ptr + 3) * kl_s
    elif MODE == 1:
        row = kl_t
    else:
        row = kl_s
    tl.store(row_loss_ptr + offs_r, tl.where(keep, row, 0.0), mask=row_ok)
    if GRAD_S or GRAD_T:
        # pass 3: the gradient writes; coef = weight / T
        coef = tl.load(params_ptr) * inv_t
        if MODE == 0:
            coef_s = coef * tl.load(params_ptr + 3)
            coef_t = coef * tl.load(params_ptr + 2)
        else:
            coef_s = coef
            coef_t = coef
        for c0 in range(0, n_cols, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            ok = row_ok[:, None] & (cols < n_cols)[None, :]
            ps, pt, ds, dt = _tile_terms(
                s_ptr,
                t_ptr,
                offs_r,
                cols,
                ok,
                s_rs,
                s_cs,
                t_rs,
                t_cs,
                S,
                inv_t,
                max_s,
                inv_sum_s,
                max_t,
                inv_sum_t,
                dlse,
                w,
                w1,
                SPATIAL,
                MODE,
                NEAR,
                ACC,
            )
            out = grad_offsets(offs_r, cols, n_cols, S, SPATIAL)
            if GRAD_S:
                if MODE == 0:
                    gs = ps * (ds - kl_s[:, None])
                elif MODE == 1:  # ps is Q of KL(pt || ps)
                    gs = ps * p_t[:, None] - pt
                else:  # ps is P of KL(ps || pt)
                    gs = ps * (ds - (kl_s + p_s - 1.0)[:, None])
                gs = tl.where(keep[:, None], gs * coef_s, 0.0)
                tl.store(gs_ptr + out, gs.to(gs_ptr.dtype.element_ty), mask=ok)
            if GRAD_T:
                if MODE == 0:
                    gt = pt * (dt - kl_t[:, None])
                elif MODE == 1:
                    gt = pt * (dt - (kl_t + p_t - 1.0)[:, None])
                else:
                    gt = pt * p_s[:, None] - ps
                gt = tl.where(keep[:, None], gt * coef_t, 0.0)
                tl.store(gt_ptr + out, gt.to(gt_ptr.dtype.element_ty), mask=ok)


def blocks(n_cols: int, elem: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C) for rows of n_cols classes computed in ``elem``-byte floats: a
    column block of up to a tile, and as many rows as fill the tile (at most 16)."""
    block_c = min(triton.next_power_of_2(n_cols), TILE[elem])
    return max(1, min(16, TILE[elem] // block_c)), block_c


def mode_of(beta: float) -> tuple[int, bool]:
    """(MODE, NEAR) of the kernel for ``beta``."""
    if beta == 0.0:
        return FORWARD_KL, False
    if beta == 1.0:
        return REVERSE_KL, False
    return MIXTURE, min(beta, 1.0 - beta) < NEAR_ENDS


def jsd_loss_triton(
    student: Tensor,
    teacher: Tensor,
    beta: float,
    temperature: float,
    reduction: str,
    mask: Tensor | None,
    compute_grad_student: bool,
    compute_grad_teacher: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Generalised JSD with Triton (schema of ``kdfast::jsd_loss_cpp``).

    Args:
        student, teacher: (rows, C) logits with any strides, or contiguous (N, C, S) read
            as rows = N * S (row r = n * S + s); any floating dtypes.
        beta: in [0, 1], the teacher's weight in the mixture (0: KL(pt || ps), 1:
            KL(ps || pt)). temperature: T > 0, finite (no T^2 factor).
        reduction: "batchmean", "sum", "mean" or "none". mask: optional bool (rows,) (row
            order r = n * S + s).
        compute_grad_student, compute_grad_teacher: write that gradient.

    Returns:
        (loss: () or (rows,) in promote_types(student, teacher, float32), grad_student of
        student's shape and dtype or (0,), grad_teacher likewise).
    """
    rows, n_cols, n_spatial, strides = logit_layout("jsd_loss_triton", student, teacher)
    # options of a direct torch.ops call: what the cpp op checks too
    check_unit_interval("beta", beta)
    check_positive("temperature", temperature, finite=True)
    check_choice("reduction", reduction, KD_REDUCTIONS)
    if mask is not None and (mask.dtype != torch.bool or mask.numel() != rows):
        raise ValueError(
            f"jsd_loss_triton: mask must be bool with one entry per row ({rows}), got "
            f"{mask.dtype} {tuple(mask.shape)}"
        )
    acc = dtype = compute_dtype(student, teacher)  # float32 or float64: also the accumulator
    device = student.device
    if mask is None:
        kept = torch.tensor(float(rows), dtype=torch.float64, device=device)
    else:
        kept = mask.sum().to(torch.float64)
    if reduction == "batchmean":
        weight64 = 1.0 / kept
    elif reduction == "mean":
        weight64 = 1.0 / (kept * n_cols)
    else:
        weight64 = torch.tensor(1.0, dtype=torch.float64, device=device)
    values = [1.0 / temperature, beta, 1.0 - beta, beta, 1.0 - beta]
    params = torch.cat([weight64.reshape(1), weight64.new_tensor(values)]).to(acc)
    params[4:].clamp_(min=torch.finfo(acc).tiny)
    grad_s = student.new_empty(student.shape if compute_grad_student else (0,))
    grad_t = teacher.new_empty(teacher.shape if compute_grad_teacher else (0,))
    row_loss = torch.empty(rows, dtype=acc, device=device)
    block_r, block_c = blocks(n_cols, 8 if acc == torch.float64 else 4)
    mode, near = mode_of(beta)
    jsd_loss_kernel[(triton.cdiv(rows, block_r),)](
        student,
        teacher,
        mask_flags(mask, rows, device),
        params,
        row_loss,
        grad_s,
        grad_t,
        rows,
        n_cols,
        *strides,
        n_spatial,
        MODE=mode,
        NEAR=near,
        HAS_MASK=mask is not None,
        GRAD_S=compute_grad_student,
        GRAD_T=compute_grad_teacher,
        SPATIAL=n_spatial > 1,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
    )
    if reduction == "none":
        loss = row_loss.to(dtype)
    else:
        loss = (row_loss.to(torch.float64).sum() * weight64).to(dtype)
    return loss, grad_s, grad_t

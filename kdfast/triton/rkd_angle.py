"""Triton passes of the RKD angle loss (semantics 1.3, 1.5) and the custom ops
``kdfast::rkd_angle_triton`` (all vertices) and ``kdfast::rkd_angle_vertices_triton`` (the
share of the loss whose vertex i lies in [start, stop): the ``rkd_angle_vertices`` op of
``gather=True``).

The launcher centres the rows and forms G with a float64 GEMM through torch for every
input dtype (semantics 1.5: never TF32). The kernels work in float64 (csrc/rkd_angle.h has the
derivation):

* ``pair_kernel``, tiles (i-block, j-block): r_ij = 1 / max(||x_j - x_i||, 1e-12), 0 for
  j = i and degenerate pairs, and whether the gradient flows through the norm;
* ``row_kernel``, programs (i, j-block) for the vertices i in [start, stop), streaming
  k-blocks: per (i, j) the loss partial sum over k, or w_ij = sum_k g r_ij r_ik and
  p_ij = sum_k g A_ijk of both sides;
* ``column_kernel``, tiles (j-block, k-block) streaming i over [start, stop):
  m_jk = sum_i g r_ij r_ik.

g = SmoothL1'(A^s - A^t) for the unit upstream gradient (the launcher scales by grad / N^3),
-g on the teacher side. Every output has one writer: no atomics, deterministic. Launchers
accept CPU tensors (TRITON_INTERPRET=1). Import only when triton is importable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kdfast._validation import check_vertex_range, compute_dtype
from kdfast.triton import _rkd_exact
from kdfast.triton.rkd_distance import centred_gram

#: semantics 1.5: a pair is degenerate when D2 <= 64 u (G_ii + G_jj), u = 2^-53 (float64).
DEGENERATE = tl.constexpr(64.0 * 2.0**-53)
#: F.normalize's floor of the norm.
MIN_NORM = tl.constexpr(1e-12)
#: Near pairs, D2 <= 1e-5 (G_ii + G_jj), get D2 from the rows (csrc/rkd_angle.h).
NEAR = tl.constexpr(1e-5)
BLOCK_PAIR = 32
BLOCK_J = 32
BLOCK_K = 32


@triton.jit
def pair_kernel(g_ptr, x_ptr, r_ptr, active_ptr, fix_ptr, n, dim, BLOCK: tl.constexpr):
    """From G and the centred rows x (N x dim): r[i, j], active[i, j] (1.0 where the
    gradient flows through the norm) and fix[i, j] = D2_ij - (G_ii + G_jj - 2 G_ij), nonzero
    only for near pairs, whose D2 is recomputed from the rows (csrc/rkd_angle.h)."""
    offs_i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs_j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask_i = offs_i < n
    mask_j = offs_j < n
    mask = mask_i[:, None] & mask_j[None, :]
    rows_i = offs_i.to(tl.int64)
    rows_j = offs_j.to(tl.int64)
    g_ii = tl.load(g_ptr + rows_i * n + offs_i, mask=mask_i, other=0.0)
    g_jj = tl.load(g_ptr + rows_j * n + offs_j, mask=mask_j, other=0.0)
    offsets = rows_i[:, None] * n + offs_j[None, :]
    g_ij = tl.load(g_ptr + offsets, mask=mask, other=0.0)
    diag_sum = g_ii[:, None] + g_jj[None, :]
    gram_d2 = diag_sum - 2.0 * g_ij
    off_diagonal = offs_i[:, None] != offs_j[None, :]
    near = off_diagonal & mask & (gram_d2 <= diag_sum * tl.full(diag_sum.shape, NEAR, tl.float64))
    d2 = gram_d2
    if tl.max(near.to(tl.int32)) > 0:
        exact = tl.zeros((BLOCK, BLOCK), tl.float64)
        for d in range(0, dim):
            x_i = tl.load(x_ptr + rows_i * dim + d, mask=mask_i, other=0.0)
            x_j = tl.load(x_ptr + rows_j * dim + d, mask=mask_j, other=0.0)
            v = x_j[None, :] - x_i[:, None]
            exact += v * v
        d2 = tl.where(near, exact, gram_d2)
    is_nan = d2 != d2
    degenerate = (d2 <= diag_sum * DEGENERATE) | (~off_diagonal)
    min_norm = tl.full(d2.shape, MIN_NORM, tl.float64)
    norm = tl.sqrt(tl.where(degenerate | is_nan, 1.0, d2))
    flows = (~degenerate) & (~is_nan) & (norm > min_norm)
    r = tl.where(flows, 1.0 / norm, 1.0 / min_norm)
    r = tl.where(degenerate & ~is_nan, 0.0, r)
    r = tl.where(is_nan, d2, r)
    tl.store(r_ptr + offsets, r, mask=mask)
    tl.store(active_ptr + offsets, tl.where(flows, 1.0, 0.0).to(tl.float64), mask=mask)
    tl.store(fix_ptr + offsets, tl.where(off_diagonal, d2 - gram_d2, 0.0), mask=mask)


@triton.jit
def _cosines(g_ptr, r_ptr, fix_ptr, n, i, offs_j, offs_k, mask_j, mask_k, g_jk):
    """A_ijk tile (j x k) of one side from its G tile g_jk = G[offs_j, offs_k]."""
    row = tl.cast(i, tl.int64) * n
    g_ii = tl.load(g_ptr + row + i)
    g_ij = tl.load(g_ptr + row + offs_j, mask=mask_j, other=0.0)
    g_ik = tl.load(g_ptr + row + offs_k, mask=mask_k, other=0.0)
    r_ij = tl.load(r_ptr + row + offs_j, mask=mask_j, other=0.0)
    r_ik = tl.load(r_ptr + row + offs_k, mask=mask_k, other=0.0)
    fix_ij = tl.load(fix_ptr + row + offs_j, mask=mask_j, other=0.0)
    fix = tl.where(offs_j[:, None] == offs_k[None, :], fix_ij[:, None], 0.0)
    cos = (((g_jk - g_ij[:, None]) - (g_ik[None, :] - g_ii)) + fix) * r_ij[:, None] * r_ik[None, :]
    return cos, r_ij, r_ik


@triton.jit
def _clamp_unit(d):
    """SmoothL1' (beta = 1) = clamp(d, -1, 1), NaN-propagating."""
    return tl.where(d > 1.0, 1.0, tl.where(d < -1.0, -1.0, d))


@triton.jit
def row_kernel(
    gs_ptr, rs_ptr, fs_ptr, gt_ptr, rt_ptr, ft_ptr, loss_ptr, ws_ptr, ps_ptr, wt_ptr, pt_ptr, n,
    start, GRAD: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Program (i - start, j-block): the loss sums over k (GRAD false; stored in row
    i - start of loss) or w and p of both sides (row i)."""
    i = start + tl.program_id(0)
    offs_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    mask_j = offs_j < n
    loss = tl.zeros((BLOCK_J,), tl.float64)
    ws = tl.zeros((BLOCK_J,), tl.float64)
    ps = tl.zeros((BLOCK_J,), tl.float64)
    wt = tl.zeros((BLOCK_J,), tl.float64)
    pt = tl.zeros((BLOCK_J,), tl.float64)
    for k0 in range(0, n, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < n
        tile = offs_j.to(tl.int64)[:, None] * n + offs_k[None, :]
        mask = mask_j[:, None] & mask_k[None, :]
        gs_jk = tl.load(gs_ptr + tile, mask=mask, other=0.0)
        gt_jk = tl.load(gt_ptr + tile, mask=mask, other=0.0)
        cs, rs_ij, rs_ik = _cosines(
            gs_ptr, rs_ptr, fs_ptr, n, i, offs_j, offs_k, mask_j, mask_k, gs_jk
        )
        ct, rt_ij, rt_ik = _cosines(
            gt_ptr, rt_ptr, ft_ptr, n, i, offs_j, offs_k, mask_j, mask_k, gt_jk
        )
        d = cs - ct
        if GRAD:
            g = _clamp_unit(d)
            ws += tl.sum(g * rs_ik[None, :], axis=1) * rs_ij
            ps += tl.sum(g * cs, axis=1)
            wt -= tl.sum(g * rt_ik[None, :], axis=1) * rt_ij
            pt -= tl.sum(g * ct, axis=1)
        else:
            a = tl.abs(d)
            loss += tl.sum(tl.where(a < 1.0, 0.5 * d * d, a - 0.5), axis=1)
    if GRAD:
        out = tl.cast(i, tl.int64) * n + offs_j
        tl.store(ws_ptr + out, ws, mask=mask_j)
        tl.store(ps_ptr + out, ps, mask=mask_j)
        tl.store(wt_ptr + out, wt, mask=mask_j)
        tl.store(pt_ptr + out, pt, mask=mask_j)
    else:
        tl.store(loss_ptr + tl.cast(tl.program_id(0), tl.int64) * n + offs_j, loss, mask=mask_j)


@triton.jit
def column_kernel(
    gs_ptr, rs_ptr, fs_ptr, gt_ptr, rt_ptr, ft_ptr, ms_ptr, mt_ptr, n, start, stop,
    BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Tile (j-block, k-block): m[j, k] = sum over i in [start, stop) of g r_ij r_ik of both
    sides (-g: teacher)."""
    offs_j = tl.program_id(0) * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_j = offs_j < n
    mask_k = offs_k < n
    mask = mask_j[:, None] & mask_k[None, :]
    tile = offs_j.to(tl.int64)[:, None] * n + offs_k[None, :]
    gs_jk = tl.load(gs_ptr + tile, mask=mask, other=0.0)
    gt_jk = tl.load(gt_ptr + tile, mask=mask, other=0.0)
    ms = tl.zeros((BLOCK_J, BLOCK_K), tl.float64)
    mt = tl.zeros((BLOCK_J, BLOCK_K), tl.float64)
    for i in range(start, stop):
        cs, rs_ij, rs_ik = _cosines(
            gs_ptr, rs_ptr, fs_ptr, n, i, offs_j, offs_k, mask_j, mask_k, gs_jk
        )
        ct, rt_ij, rt_ik = _cosines(
            gt_ptr, rt_ptr, ft_ptr, n, i, offs_j, offs_k, mask_j, mask_k, gt_jk
        )
        g = _clamp_unit(cs - ct)
        ms += g * rs_ij[:, None] * rs_ik[None, :]
        mt -= g * rt_ij[:, None] * rt_ik[None, :]
    tl.store(ms_ptr + tile, ms, mask=mask)
    tl.store(mt_ptr + tile, mt, mask=mask)


def _take_exact_vertices(gs, rs, active_s, gt, rt, active_t, start: int, stop: int) -> Tensor:
    """The vertices with a near pair on either side (:mod:`kdfast.triton._rkd_exact`):
    their rows of r and active are zeroed on both sides (every A_ijk = 0 on both sides: the
    kernels give them no loss and no gradient) and the exact pass adds theirs. Returns
    those in [start, stop)."""
    idx = _rkd_exact.near_vertices(gs, gt)
    if idx.numel():
        for m in (rs, active_s, rt, active_t):
            m[idx] = 0.0
    return idx[(idx >= start) & (idx < stop)]


def _side(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(centred rows, G, r, active, fix) of one side, all float64."""
    centred, gram = centred_gram(x)
    centred = centred.contiguous()
    n, dim = centred.shape
    r, active, fix = (torch.empty_like(gram) for _ in range(3))
    grid = (triton.cdiv(n, BLOCK_PAIR), triton.cdiv(n, BLOCK_PAIR))
    pair_kernel[grid](gram, centred, r, active, fix, n, dim, BLOCK=BLOCK_PAIR)
    return centred, gram, r, active, fix


def _forward(student: Tensor, teacher: Tensor, start: int, stop: int) -> Tensor:
    """sum over i in [start, stop), all j, k of SmoothL1(A^s_ijk - A^t_ijk), / N^3: a scalar
    in promote_types(student, teacher, float32)."""
    n = student.shape[0]
    check_vertex_range(start, stop, n)
    dtype = compute_dtype(student, teacher)
    if start == stop:
        return student.new_zeros((), dtype=dtype)
    _, gs, rs, active_s, fs = _side(student)
    _, gt, rt, active_t, ft = _side(teacher)
    exact = _take_exact_vertices(gs, rs, active_s, gt, rt, active_t, start, stop)
    partial = gs.new_empty((stop - start, n))
    row_kernel[(stop - start, triton.cdiv(n, BLOCK_J))](
        gs, rs, fs, gt, rt, ft, partial, partial, partial, partial, partial, n, start,
        GRAD=False, BLOCK_J=BLOCK_J, BLOCK_K=BLOCK_K,
    )  # fmt: skip
    total = partial.sum()
    if exact.numel():
        x64 = (student.to(torch.float64), teacher.to(torch.float64))
        total = total + _rkd_exact.exact_vertex_loss(*x64, exact)
    return (total / float(n) ** 3).to(dtype)


def rkd_angle_triton(student: Tensor, teacher: Tensor) -> Tensor:
    """RKD angle loss (semantics 1.3) with Triton kernels: scalar in
    promote_types(student, teacher, float32). student (N, Ds), teacher (N, Dt), N >= 3."""
    return _forward(student, teacher, 0, student.shape[0])


def rkd_angle_vertices_triton(student: Tensor, teacher: Tensor, start: int, stop: int) -> Tensor:
    """The share of the RKD angle loss whose vertex i lies in [start, stop)
    (:func:`kdfast.reference.rkd_angle.rkd_angle_vertices`), with Triton kernels: scalar in
    promote_types(student, teacher, float32). student (N, Ds), teacher (N, Dt);
    0 <= start <= stop <= N (ValueError otherwise; an empty range gives 0)."""
    return _forward(student, teacher, start, stop)


def _side_backward(centred, r, active, m, w, p, exact, scale: Tensor, dtype) -> Tensor:
    """dL/dX of one side from its accumulators (csrc/rkd_angle.h) plus ``exact`` (the
    exact vertices' unscaled gradient, or None)."""
    grad_gram = m - 2.0 * w
    h = -(r * r) * p * active
    grad_gram = grad_gram - 2.0 * h
    grad_gram.diagonal().add_(w.sum(1) + h.sum(1) + h.sum(0))
    grad_centred = (grad_gram + grad_gram.T) @ centred
    grad_centred = grad_centred - grad_centred.mean(dim=0, keepdim=True)
    if exact is not None:
        grad_centred = grad_centred + exact
    return (grad_centred * scale).to(dtype)


def _backward(
    grad: Tensor,
    student: Tensor,
    teacher: Tensor,
    start: int,
    stop: int,
    student_grad: bool,
    teacher_grad: bool,
) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`_forward` with respect to every row (empty (0,): not needed)."""
    n = student.shape[0]
    check_vertex_range(start, stop, n)
    if start == stop or not (student_grad or teacher_grad):
        return (
            torch.zeros_like(student, memory_format=torch.contiguous_format)
            if student_grad
            else student.new_empty((0,)),
            torch.zeros_like(teacher, memory_format=torch.contiguous_format)
            if teacher_grad
            else teacher.new_empty((0,)),
        )
    xs, gs, rs, active_s, fs = _side(student)
    xt, gt, rt, active_t, ft = _side(teacher)
    exact = _take_exact_vertices(gs, rs, active_s, gt, rt, active_t, start, stop)
    exact_s = exact_t = None
    if exact.numel():
        x64s, x64t = student.to(torch.float64), teacher.to(torch.float64)
        exact_s = torch.zeros_like(x64s) if student_grad else None
        exact_t = torch.zeros_like(x64t) if teacher_grad else None
        _rkd_exact.exact_vertex_backward(x64s, x64t, exact, exact_s, exact_t)
    # w and p: the row kernel writes the rows i in [start, stop) only
    ws, ps, wt, pt = (torch.zeros_like(gs) for _ in range(4))
    ms, mt = torch.empty_like(gs), torch.empty_like(gs)
    row_kernel[(stop - start, triton.cdiv(n, BLOCK_J))](
        gs, rs, fs, gt, rt, ft, ws, ws, ps, wt, pt, n, start,
        GRAD=True, BLOCK_J=BLOCK_J, BLOCK_K=BLOCK_K,
    )  # fmt: skip
    column_kernel[(triton.cdiv(n, BLOCK_J), triton.cdiv(n, BLOCK_K))](
        gs, rs, fs, gt, rt, ft, ms, mt, n, start, stop, BLOCK_J=BLOCK_J, BLOCK_K=BLOCK_K
    )
    scale = grad.to(torch.float64) / float(n) ** 3
    grad_s = (
        _side_backward(xs, rs, active_s, ms, ws, ps, exact_s, scale, student.dtype)
        if student_grad
        else student.new_empty((0,))
    )
    grad_t = (
        _side_backward(xt, rt, active_t, mt, wt, pt, exact_t, scale, teacher.dtype)
        if teacher_grad
        else teacher.new_empty((0,))
    )
    return grad_s, grad_t


def rkd_angle_triton_backward(
    grad: Tensor, student: Tensor, teacher: Tensor, student_grad: bool, teacher_grad: bool
) -> tuple[Tensor, Tensor]:
    """(dL/dstudent, dL/dteacher); an empty (0,) tensor for a side that needs none."""
    return _backward(grad, student, teacher, 0, student.shape[0], student_grad, teacher_grad)


def rkd_angle_vertices_triton_backward(
    grad: Tensor,
    student: Tensor,
    teacher: Tensor,
    start: int,
    stop: int,
    student_grad: bool,
    teacher_grad: bool,
) -> tuple[Tensor, Tensor]:
    """Gradients of ``rkd_angle_vertices_triton`` with respect to every row of student and
    teacher; an empty (0,) tensor for a side that needs none."""
    return _backward(grad, student, teacher, start, stop, student_grad, teacher_grad)

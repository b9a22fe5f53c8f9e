"""Helpers shared by the Triton logit kernels (kd_loss, dist_loss): the mask flags, the
(rows, C) or (N, C, S) logit layouts (semantics 0: class dim 1, rows r = n * S + s, no permuted
copy) and the element offsets of either."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


def mask_flags(mask: Tensor | None, rows: int, device) -> Tensor:
    """The bool (rows,) mask as contiguous int8 kept-row flags (a 1-element dummy, unread
    under HAS_MASK=False, when there is none)."""
    if mask is None:
        return torch.ones(1, dtype=torch.int8, device=device)
    return mask.reshape(rows).contiguous().view(torch.int8)


def logit_layout(
    name: str, student: Tensor, teacher: Tensor
) -> tuple[int, int, int, tuple[int, int, int, int]]:
    """(rows, C, S, (s_rs, s_cs, t_rs, t_cs)) of equal-shaped logits: 2-D (rows, C) with
    any strides (S = 1), or 3-D contiguous (N, C, S), rows = N * S, row r = n * S + s at
    n * C * S + c * S + s (row stride C * S, class stride S; a 3-D input with S = 1 is read
    as the 2-D (N, C)). Raises ValueError naming ``name`` otherwise."""
    if student.dim() not in (2, 3) or student.shape != teacher.shape:
        raise ValueError(
            f"{name}: expected equal 2-D (rows, C) or 3-D (N, C, S) shapes, got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    if student.dim() == 2:
        rows, n_cols = student.shape
        return rows, n_cols, 1, (*student.stride(), *teacher.stride())
    if not (student.is_contiguous() and teacher.is_contiguous()):
        raise ValueError(f"{name}: 3-D (N, C, S) student and teacher must be contiguous")
    n, n_cols, s = student.shape
    strides = (n_cols * s, s) if s > 1 else (n_cols, 1)
    return n * s, n_cols, s, strides * 2


@triton.jit
def logit_ptrs(ptr, offs_r, cols, rs, cs, S, SPATIAL: tl.constexpr):
    """(BLOCK_R, BLOCK_C) pointers to the logits of rows offs_r (int64) and columns cols:
    ptr + r * rs + c * cs, or with SPATIAL (a contiguous (N, C, S) input, S > 1, rs = C * S,
    cs = S) ptr + (r // S) * rs + r % S + c * cs. The row part is added to the pointer
    first (loop-invariant across column blocks)."""
    if SPATIAL:
        # r - n * S in int64, not r % S: LLVM's 32-bit fast path of the division computes
        # that remainder with a 32-bit product, which tests/kernels/test_triton_aot.py flags.
        n = offs_r // S
        row = n * rs + (offs_r - n * S)
    else:
        row = offs_r * rs
    return ptr + row[:, None] + cols.to(tl.int64)[None, :] * cs


@triton.jit
def grad_offsets(offs_r, cols, n_cols, S, SPATIAL: tl.constexpr):
    """Offsets of a contiguous gradient in the input's layout: (rows, C), or with SPATIAL
    (N, C, S)."""
    if SPATIAL:
        row = (offs_r // S) * (n_cols * S) + offs_r % S
        return row[:, None] + cols.to(tl.int64)[None, :] * S
    return offs_r[:, None] * n_cols + cols.to(tl.int64)[None, :]


@triton.jit
def last_block(n_cols, BLOCK_C: tl.constexpr, ONE_BLOCK: tl.constexpr):
    """Where the last column block of a row starts: a second sweep over a tile runs from it
    back to the first (``c0 = last - i``), re-reading first what the first sweep read last
    (the likeliest still in L2). ONE_BLOCK: the row is a single block (0, known at compile
    time)."""
    last = 0
    if not ONE_BLOCK:
        last = (tl.cdiv(n_cols, BLOCK_C) - 1) * BLOCK_C
    return last

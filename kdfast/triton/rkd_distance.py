"""Triton per-pair passes of the RKD distance loss (semantics 1.2, 1.5) and their launchers
(registered as ``kdfast::rkd_distance_triton`` by :mod:`kdfast.ops.rkd_distance`).

The launcher centres the rows and forms the Gram matrix G with a float64 GEMM through
torch for every input dtype (semantics 1.5: never TF32); the kernels work on tiles of pairs
(i-block, j-block) of G in float64: distances D_ij with the clamp and the degenerate-pair
rule, and dL/dD2 in the backward. Near pairs, whose Gram D2 cancels, are then resolved
from direct differences (:mod:`kdfast.triton._rkd_exact`). Launchers accept CPU tensors
(TRITON_INTERPRET=1). Import only when triton is importable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kdfast._validation import compute_dtype
from kdfast.triton import _rkd_exact

#: semantics 1.5: a pair is degenerate when D2 <= 64 u (G_ii + G_jj), u = 2^-53 (float64).
DEGENERATE = tl.constexpr(64.0 * 2.0**-53)
#: Distances are clamped below at sqrt(1e-12) = 1e-6 (semantics 1.1).
MIN_D2 = tl.constexpr(1e-12)
BLOCK = 32


@triton.jit
def _pair_distance(g_ptr, n, offs_i, offs_j):
    """(distance tile, active tile) of pairs (offs_i, offs_j); active: the gradient flows."""
    mask_i = offs_i < n
    mask_j = offs_j < n
    mask = mask_i[:, None] & mask_j[None, :]
    g_ii = tl.load(g_ptr + offs_i.to(tl.int64) * n + offs_i, mask=mask_i, other=0.0)
    g_jj = tl.load(g_ptr + offs_j.to(tl.int64) * n + offs_j, mask=mask_j, other=0.0)
    g_ij = tl.load(g_ptr + offs_i.to(tl.int64)[:, None] * n + offs_j[None, :], mask=mask, other=0.0)
    diag_sum = g_ii[:, None] + g_jj[None, :]
    d2 = diag_sum - 2.0 * g_ij
    degenerate = d2 <= diag_sum * DEGENERATE
    min_d2 = tl.full(d2.shape, MIN_D2, tl.float64)
    active = (d2 != d2) | ((~degenerate) & (d2 > min_d2))
    pair_dist = tl.sqrt(tl.where(active, d2, min_d2))
    off_diagonal = offs_i[:, None] != offs_j[None, :]
    return tl.where(off_diagonal, pair_dist, 0.0), active & off_diagonal, mask


@triton.jit
def pair_forward_kernel(g_ptr, pair_dist_ptr, n, BLOCK: tl.constexpr):
    """pair_dist[i, j] = clamped distance from G (float64, N x N contiguous); 0 on the diagonal."""
    offs_i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs_j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    pair_dist, active, mask = _pair_distance(g_ptr, n, offs_i, offs_j)
    tl.store(
        pair_dist_ptr + offs_i.to(tl.int64)[:, None] * n + offs_j[None, :], pair_dist, mask=mask
    )


@triton.jit
def pair_backward_kernel(g_ptr, grad_pair_dist_ptr, grad_d2_ptr, n, BLOCK: tl.constexpr):
    """grad_d2[i, j] = dL/dD2_ij = dL/dD_ij / (2 D_ij) where the gradient flows, else 0."""
    offs_i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs_j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    pair_dist, active, mask = _pair_distance(g_ptr, n, offs_i, offs_j)
    offsets = offs_i.to(tl.int64)[:, None] * n + offs_j[None, :]
    grad_pair_dist = tl.load(grad_pair_dist_ptr + offsets, mask=mask, other=0.0)
    safe = tl.where(active, pair_dist, 1.0)
    tl.store(grad_d2_ptr + offsets, tl.where(active, grad_pair_dist / (2.0 * safe), 0.0), mask=mask)


def _grid(n: int) -> tuple[int, int]:
    return (triton.cdiv(n, BLOCK), triton.cdiv(n, BLOCK))


def centred_gram(x: Tensor) -> tuple[Tensor, Tensor]:
    """(centred rows, G = Xc Xc^T), both float64 (N x D, N x N contiguous)."""
    x64 = x.to(torch.float64)
    centred = x64 - x64.mean(dim=0, keepdim=True)
    return centred, (centred @ centred.T).contiguous()


def pair_distances(gram: Tensor) -> Tensor:
    """(N, N) float64 clamped distances from the Gram matrix (Triton kernel)."""
    n = gram.shape[0]
    pair_dist = torch.empty_like(gram)
    pair_forward_kernel[_grid(n)](gram, pair_dist, n, BLOCK=BLOCK)
    return pair_dist


def _side(x: Tensor):
    """(centred rows, G, distances, their off-diagonal mean, near pairs): the near pairs'
    distances come from direct differences (:mod:`kdfast.triton._rkd_exact`)."""
    centred, gram = centred_gram(x)
    pair_dist = pair_distances(gram)
    near = _rkd_exact.resolve_near_distances(x.to(torch.float64), gram, pair_dist)
    n = x.shape[0]
    return centred, gram, pair_dist, pair_dist.sum() / (n * (n - 1)), near


def _smooth_l1_parts(s: Tensor, t: Tensor):
    _, _, pair_dist_s, mean_s, _ = _side(s)
    _, _, pair_dist_t, mean_t, _ = _side(t)
    return pair_dist_s / mean_s - pair_dist_t / mean_t


def rkd_distance_triton(student: Tensor, teacher: Tensor) -> Tensor:
    """RKD distance loss (semantics 1.2) with Triton pair kernels: scalar in
    promote_types(student, teacher, float32). student (N, Ds), teacher (N, Dt), N >= 2."""
    diff = _smooth_l1_parts(student, teacher)
    loss = torch.nn.functional.smooth_l1_loss(diff, torch.zeros_like(diff), beta=1.0)
    return loss.to(compute_dtype(student, teacher))


def _side_backward(x: Tensor, grad_psi: Tensor) -> Tensor:
    centred, gram, pair_dist, mean, near = _side(x)
    n = x.shape[0]
    through_mean = (grad_psi * pair_dist).sum() / (mean * mean * (n * (n - 1)))
    grad_pair_dist = grad_psi / mean - through_mean
    grad_pair_dist.fill_diagonal_(0.0)
    grad_d2 = torch.empty_like(grad_pair_dist)
    pair_backward_kernel[_grid(n)](gram, grad_pair_dist.contiguous(), grad_d2, n, BLOCK=BLOCK)
    if near is not None:
        rows, near_grad = _rkd_exact.near_distance_backward(
            near, pair_dist, grad_pair_dist, grad_d2
        )
    grad_centred = 4.0 * (grad_d2.sum(1, keepdim=True) * centred - grad_d2 @ centred)
    if near is not None:
        grad_centred.index_add_(0, rows, near_grad)
    return (grad_centred - grad_centred.mean(dim=0, keepdim=True)).to(x.dtype)


def rkd_distance_triton_backward(
    grad: Tensor, student: Tensor, teacher: Tensor, student_grad: bool, teacher_grad: bool
) -> tuple[Tensor, Tensor]:
    """(dL/dstudent, dL/dteacher); an empty (0,) tensor for a side that needs none."""
    n = student.shape[0]
    diff = _smooth_l1_parts(student, teacher)
    grad_psi = diff.clamp(-1.0, 1.0) * (grad.to(torch.float64) / (n * n))
    grad_s = _side_backward(student, grad_psi) if student_grad else student.new_empty((0,))
    grad_t = _side_backward(teacher, -grad_psi) if teacher_grad else teacher.new_empty((0,))
    return grad_s, grad_t

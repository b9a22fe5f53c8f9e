"""Near pairs of the RKD ops resolved from direct differences (semantics 1.5): the torch
twin of csrc/rkd_exact.cpp, used by the Triton launchers.

The Gram expansion G_ii + G_jj - 2 G_ij of D2_ij cancels: its error is about
4 u (G_ii + G_jj). A pair with D2_ij <= EXACT_PAIR_FACTOR (G_ii + G_jj) is "near": its D2
and difference vector come from the direct float64 differences of the uncentred rows (exact
for float32 and half inputs, and by Sterbenz for float64 near pairs): O(D) per near pair
(distance), O(N^2 D) per vertex with a near pair (angle). Near pairs are rare (usually
none); the common path pays an O(N^2) elementwise test. Only an exact duplicate (direct
D2 == 0) is degenerate.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: D2_ij <= 1e-8 (G_ii + G_jj): the Gram D2 would be more than ~4e-8 off.
EXACT_PAIR_FACTOR = 1e-8
#: F.normalize's floor of the norm; the distance clamp of D2.
MIN_NORM = 1e-12
MIN_D2 = 1e-12
#: (F, N, D) elements of differences per batch of exact vertices.
_EXACT_ELEMENTS = 1 << 23


def near_pairs(gram: Tensor) -> Tensor:
    """(N, N) bool: off-diagonal pairs whose Gram D2 is near (symmetric)."""
    diag = gram.diagonal()
    diag_sum = diag[:, None] + diag[None, :]
    near = (diag_sum - 2.0 * gram) <= EXACT_PAIR_FACTOR * diag_sum
    near = near | near.T
    near.fill_diagonal_(False)
    return near


def near_vertices(gram_s: Tensor, gram_t: Tensor) -> Tensor:
    """(F,) int64: the rows with a near pair on either side."""
    return (near_pairs(gram_s) | near_pairs(gram_t)).any(1).nonzero().squeeze(1)


def resolve_near_distances(x64: Tensor, gram: Tensor, dist: Tensor):
    """Overwrites dist[i, j] of the near pairs with the direct distance (clamped at 1e-6);
    returns (i, j, x_i - x_j, active) of the ordered near pairs, or None when there are none."""
    pairs = near_pairs(gram).nonzero()
    if pairs.shape[0] == 0:
        return None
    i, j = pairs[:, 0], pairs[:, 1]
    diff = x64[i] - x64[j]
    d2 = (diff * diff).sum(1)
    dist[i, j] = d2.clamp_min(MIN_D2).sqrt()
    return i, j, diff, (d2 > MIN_D2) | (d2 != d2)


def near_distance_backward(near, dist: Tensor, grad_dist: Tensor, grad_d2: Tensor):
    """Takes the near pairs out of grad_d2 (the Gram GEMM) and returns their direct
    gradient rows (row index, value) to add: 2 h (x_i - x_j) to row i, its negative to j."""
    i, j, diff, active = near
    d = dist[i, j]
    h = torch.where(active, grad_dist[i, j] / (2.0 * d), torch.zeros_like(d))
    grad_d2[i, j] = 0.0
    rows = 2.0 * h[:, None] * diff
    return torch.cat([i, j]), torch.cat([rows, -rows])


def _vertex_side(x: Tensor, idx: Tensor):
    """diff[f, k] = x_k - x_i, r, active and the cosines a[f, j, k] of the vertices idx."""
    diff = x[None, :, :] - x[idx][:, None, :]
    d2 = (diff * diff).sum(2)
    norm = d2.sqrt()
    r = torch.where(d2 == 0, torch.zeros_like(d2), 1.0 / norm.clamp_min(MIN_NORM))
    active = (norm > MIN_NORM).to(x.dtype)
    a = torch.bmm(diff, diff.transpose(1, 2)) * r[:, :, None] * r[:, None, :]
    return diff, r, active, a


def _batches(xs: Tensor, xt: Tensor, idx: Tensor):
    per_vertex = xs.shape[0] * max(xs.shape[1], xt.shape[1], 1)
    step = max(1, _EXACT_ELEMENTS // per_vertex)
    return idx.split(step)


def exact_vertex_loss(xs: Tensor, xt: Tensor, idx: Tensor) -> Tensor:
    """Sum over the vertices idx, all j, k of SmoothL1(A^s_ijk - A^t_ijk) (float64 scalar)
    from the direct differences of the uncentred float64 rows."""
    total = xs.new_zeros(())
    for part in _batches(xs, xt, idx):
        d = _vertex_side(xs, part)[3] - _vertex_side(xt, part)[3]
        a = d.abs()
        total = total + torch.where(a < 1.0, 0.5 * d * d, a - 0.5).sum()
    return total


def _vertex_side_backward(side, g: Tensor, idx: Tensor, grad: Tensor) -> None:
    diff, r, active, a = side
    m = g * r[:, :, None] * r[:, None, :]
    ga = g * a
    h = -0.5 * r * r * (ga.sum(1) + ga.sum(2)) * active
    d_diff = torch.bmm(m + m.transpose(1, 2), diff) + 2.0 * h[:, :, None] * diff
    grad.add_(d_diff.sum(0))
    grad.index_add_(0, idx, -d_diff.sum(1))


def exact_vertex_backward(xs, xt, idx, grad_s, grad_t) -> None:
    """Adds the gradient (unit upstream) of :func:`exact_vertex_loss` into grad_s / grad_t
    (None: not needed)."""
    for part in _batches(xs, xt, idx):
        s, t = _vertex_side(xs, part), _vertex_side(xt, part)
        g = (s[3] - t[3]).clamp(-1.0, 1.0)
        if grad_s is not None:
            _vertex_side_backward(s, g, part, grad_s)
        if grad_t is not None:
            _vertex_side_backward(t, -g, part, grad_t)

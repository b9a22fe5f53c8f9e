"""Relational losses over the global batch of a ``torch.distributed`` job.

RKD and DIST's intra-class term depend on the whole batch. With ``gather=True`` the losses
(:func:`kdfast.functional.rkd_distance`, ``rkd_angle``, ``dist_loss``, and their modules)
compute over the concatenation of every rank's local batch, in rank order, and every rank
returns the same global loss value.

Gradient convention (the DDP invariant): each collective's backward is the adjoint of its
forward (all-gather <-> reduce-scatter of the sum, all-reduce <-> all-reduce), so the
backward of rank r computes the gradient of sum_r L = world_size * L with respect to its
own inputs: **each rank's input gradient is world_size times the single-process gradient of
its slice**. DistributedDataParallel then averages parameter gradients over the ranks, so
after ``loss.backward()`` every parameter gradient equals that of one process running the
concatenated batch. (Without DDP, divide by the world size yourself.)

Data moved per call (N = global batch, D = feature width, C = classes, W = world size):
* RKD distance: all-gather of the (n_r, D) features (every rank then evaluates the N x N
  loss with its fastest backend); backward: all-reduce of an (N, D) gradient.
* RKD angle: the same all-gather, but each rank evaluates only the angles whose vertex
  lies in its own rows (the ``rkd_angle_vertices`` op, on the fused Gram-matrix kernels of
  the cpp, triton and cuda backends: O(N^2) memory): N^3 / W work per rank, then one
  scalar all-reduce.
* DIST: no logits move. The inter-class term is per row; the intra-class term needs the
  per-column moments, all-reduced in two rounds (counts and column sums, length 2C + 2;
  then the centred second moments and co-moment about the global means, length 3C, so no
  precision is lost to raw moments).

Unequal local batch sizes are supported (padding for the all-gather; local batches may be
empty); N limits apply to the global batch. Widths (D, C) must agree across ranks, else every
rank raises ValueError. Every rank must make the same calls in the same order (collectives),
with the same ``requires_grad`` on the teacher. When torch.distributed is not initialised,
``gather=True`` is the single-process loss.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["is_distributed", "world_size", "gather_rows", "all_reduce_sum", "shapes_of"]


def is_distributed(group=None) -> bool:
    """True when torch.distributed is initialised (gather=True then crosses processes)."""
    return dist.is_available() and dist.is_initialized()


def world_size(group=None) -> int:
    return dist.get_world_size(group) if is_distributed(group) else 1


def shapes_of(x: Tensor, *extra: int, group=None) -> list[list[int]]:
    """Every rank's [rows, *extra] (host ints): one small all-gather (a host sync)."""
    local = torch.tensor([x.shape[0], *extra], dtype=torch.int64, device=x.device)
    parts = [torch.empty_like(local) for _ in range(world_size(group))]
    dist.all_gather(parts, local, group=group)
    return [p.tolist() for p in parts]


class _GatherRows(torch.autograd.Function):
    """(n_r, D) on each rank -> (sum n_r, D) on every rank; backward sums and slices."""

    @staticmethod
    def forward(ctx, x: Tensor, counts: list[int], rank: int, group) -> Tensor:
        ctx.counts, ctx.rank, ctx.group = counts, rank, group
        width = x.shape[1]
        padded = x.new_zeros((max(counts), width))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded.contiguous(), group=group)
        return torch.cat([p[:n] for p, n in zip(parts, counts, strict=True)], 0)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)  # reduce-scatter as all-reduce + slice (gloo)
        start = sum(ctx.counts[: ctx.rank])
        return grad[start : start + ctx.counts[ctx.rank]], None, None, None


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        y = x.contiguous().clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def gather_rows(x: Tensor, counts: list[int], group=None) -> Tensor:
    """Concatenate every rank's rows (rank order); differentiable (see the module docs)."""
    if not is_distributed(group):
        return x
    return _GatherRows.apply(x, counts, dist.get_rank(group), group)


def all_reduce_sum(x: Tensor, group=None) -> Tensor:
    """Sum of ``x`` over the ranks, on every rank; differentiable (backward: all-reduce)."""
    if not is_distributed(group):
        return x
    return _AllReduceSum.apply(x, group)


def dist_loss_global(
    s: Tensor,
    t: Tensor,
    beta: float,
    gamma: float,
    temperature: float,
    temperature_squared: bool,
    activation: str,
    mask: Tensor | None,
    group=None,
) -> Tensor:
    """DIST (semantics 2) over the concatenated batch of every rank, from all-reduced moments.

    s, t: this rank's validated (rows, C) logits; mask: optional bool (rows,). Equal to
    :func:`kdfast.reference.dist_loss` on the concatenation (rank order), up to rounding.
    A rank may hold 0 rows.
    """
    from kdfast._validation import compute_dtype
    from kdfast.reference.dist_loss import COSINE_EPS, _pearson

    counts = shapes_of(s, s.shape[1], group=group)
    if len({c[1] for c in counts}) != 1:
        seen = ", ".join(f"rank {r}: {c}" for r, c in enumerate(counts))
        raise ValueError(
            f"dist_loss(gather=True): C must agree across ranks, got [rows, C] = {seen}"
        )
    if sum(c[0] for c in counts) == 0:
        raise ValueError("dist_loss(gather=True): the global batch is empty (0 rows on every rank)")
    dtype = compute_dtype(s, t)
    if activation == "sigmoid":
        ys, yt = torch.sigmoid(s.to(dtype) / temperature), torch.sigmoid(t.to(dtype) / temperature)
    else:
        ys, yt = (
            torch.softmax(s.to(dtype) / temperature, 1),
            torch.softmax(t.to(dtype) / temperature, 1),
        )
    keep = torch.ones(s.shape[0], dtype=torch.bool, device=s.device) if mask is None else mask
    # torch.where, not multiplication: NaN in padding rows must not leak in (as the reference)
    rho = torch.where(keep, _pearson(ys, yt, dim=1), 0.0)
    ys, yt = torch.where(keep[:, None], ys, 0.0), torch.where(keep[:, None], yt, 0.0)
    # round 1: sum of row correlations, kept rows, column sums (2C + 2 numbers)
    first = torch.cat([rho.sum()[None], keep.sum().to(dtype)[None], ys.sum(0), yt.sum(0)])
    first = all_reduce_sum(first, group)
    classes = s.shape[1]
    inter_sum, kept = first[0], first[1].detach()
    mean_s, mean_t = first[2 : 2 + classes] / kept, first[2 + classes :] / kept
    # round 2: co-moment and second moments about the global column means (3C numbers)
    a = torch.where(keep[:, None], ys - mean_s, 0.0)
    b = torch.where(keep[:, None], yt - mean_t, 0.0)
    second = all_reduce_sum(torch.cat([(a * b).sum(0), (a * a).sum(0), (b * b).sum(0)]), group)
    co, var_s, var_t = second[:classes], second[classes : 2 * classes], second[2 * classes :]
    intra = 1 - (co / (var_s.sqrt() * var_t.sqrt() + COSINE_EPS)).mean()
    inter = 1 - inter_sum / kept
    scale = temperature**2 if temperature_squared else 1.0
    return beta * scale * inter + gamma * scale * intra

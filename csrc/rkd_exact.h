// Near pairs of the RKD ops, resolved from direct differences (semantics 1.5). Device-generic
// ATen, shared by the cpu and cuda backends of rkd_distance and rkd_angle.
//
// The Gram expansion G_ii + G_jj - 2 G_ij of D2_ij cancels: its error is about
// 4 u (G_ii + G_jj). A pair with D2_ij <= kExactPairFactor (G_ii + G_jj) (an error above
// ~4e-8 of D2) is "near": its D2 and difference vector are taken from the direct float64
// differences of the uncentred rows (exact for float32 and half inputs; exact by Sterbenz for
// float64 near pairs), at O(D) per near pair (distance) or O(N^2 D) per vertex with a near
// pair (angle). Near pairs are rare (usually none): the common path only pays an O(N^2)
// elementwise test. Only an exact duplicate (direct D2 == 0) is degenerate.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace kdfast::rkd {

constexpr double kExactPairFactor = 1e-8;

// (N, N) bool: off-diagonal pairs whose Gram D2 is near (symmetric: (i, j) or (j, i)).
at::Tensor near_pairs(const at::Tensor& gram);

// (F,) int64 indices of the rows with a near pair on either side (student or teacher).
at::Tensor near_vertices(const at::Tensor& gram_s, const at::Tensor& gram_t);

// Sum over the vertices idx (F,) and all j, k of SmoothL1(A^s_ijk - A^t_ijk), from the direct
// differences of the uncentred float64 rows xs, xt (float64 scalar).
at::Tensor exact_vertex_loss(const at::Tensor& xs, const at::Tensor& xt, const at::Tensor& idx);

// Its gradient (unit upstream gradient) with respect to xs and xt, added into grad_s and
// grad_t (N x D float64, undefined: not needed).
void exact_vertex_backward(const at::Tensor& xs, const at::Tensor& xt, const at::Tensor& idx,
                           at::Tensor& grad_s, at::Tensor& grad_t);

}  // namespace kdfast::rkd

#include "rkd_exact.h"

#include <algorithm>

namespace kdfast::rkd {
namespace {

// F.normalize's floor of the norm.
constexpr double kMinNormExact = 1e-12;
// Vertices per batch of the exact pass: at most ~2^23 elements of (F, N, D) differences.
constexpr int64_t kExactElements = int64_t(1) << 23;

// One side of a batch of vertices i: diff[f, k] = x_k - x_i, r[f, k] = 1 / max(||diff||,
// 1e-12) (0 for an exact duplicate and k = i), active (the norm's gradient flows) and the
// cosines a[f, j, k] = <diff_j, diff_k> r_j r_k.
struct VertexSide {
  at::Tensor diff, r, active, a;
};

VertexSide vertex_side(const at::Tensor& x, const at::Tensor& idx) {
  VertexSide v;
  v.diff = x.unsqueeze(0) - x.index_select(0, idx).unsqueeze(1);
  const at::Tensor d2 = (v.diff * v.diff).sum(2);
  const at::Tensor norm = d2.sqrt();
  // NaN propagates: clamp_min and the division keep it, and d2 == 0 is false for NaN.
  v.r = at::where(d2 == 0, at::zeros_like(d2), 1.0 / norm.clamp_min(kMinNormExact));
  v.active = (norm > kMinNormExact).to(at::kDouble);
  v.a = at::bmm(v.diff, v.diff.transpose(1, 2)) * v.r.unsqueeze(2) * v.r.unsqueeze(1);
  return v;
}

at::Tensor smooth_l1_sum(const at::Tensor& d) {
  const at::Tensor abs = d.abs();
  return at::where(abs < 1.0, 0.5 * d * d, abs - 0.5).sum();
}

// dL/dx of one side for dL/dA = g (F, N, N), added into grad.
void vertex_side_backward(const VertexSide& v, const at::Tensor& g, const at::Tensor& idx,
                          at::Tensor& grad) {
  const at::Tensor m = g * v.r.unsqueeze(2) * v.r.unsqueeze(1);  // dL/dC
  const at::Tensor ga = g * v.a;
  // dL/dD2_k = -(r_k^2 / 2) (sum_j g_jk A_jk + sum_j g_kj A_kj) where the norm flows.
  const at::Tensor h = -0.5 * v.r * v.r * (ga.sum(1) + ga.sum(2)) * v.active;
  const at::Tensor d_diff =
      at::bmm(m + m.transpose(1, 2), v.diff) + 2.0 * h.unsqueeze(2) * v.diff;
  grad.add_(d_diff.sum(0));
  grad.index_add_(0, idx, -d_diff.sum(1));
}

int64_t batch_size(const at::Tensor& xs, const at::Tensor& xt) {
  const int64_t per_vertex = xs.size(0) * std::max(xs.size(1), xt.size(1));
  return std::max<int64_t>(1, kExactElements / std::max<int64_t>(1, per_vertex));
}

}  // namespace

at::Tensor near_pairs(const at::Tensor& gram) {
  const at::Tensor diag = gram.diagonal();
  const at::Tensor diag_sum = diag.unsqueeze(1) + diag.unsqueeze(0);
  at::Tensor near = (diag_sum - 2.0 * gram) <= kExactPairFactor * diag_sum;
  near = near.logical_or(near.t());
  near.fill_diagonal_(false);
  return near;
}

at::Tensor near_vertices(const at::Tensor& gram_s, const at::Tensor& gram_t) {
  const at::Tensor near = near_pairs(gram_s).logical_or_(near_pairs(gram_t));
  return near.any(1).nonzero().squeeze(1);
}

at::Tensor exact_vertex_loss(const at::Tensor& xs, const at::Tensor& xt, const at::Tensor& idx) {
  at::Tensor total = at::zeros({}, xs.options());
  const int64_t step = batch_size(xs, xt);
  for (int64_t f0 = 0; f0 < idx.size(0); f0 += step) {
    const at::Tensor part = idx.slice(0, f0, std::min(idx.size(0), f0 + step));
    total = total + smooth_l1_sum(vertex_side(xs, part).a - vertex_side(xt, part).a);
  }
  return total;
}

void exact_vertex_backward(const at::Tensor& xs, const at::Tensor& xt, const at::Tensor& idx,
                           at::Tensor& grad_s, at::Tensor& grad_t) {
  const int64_t step = batch_size(xs, xt);
  for (int64_t f0 = 0; f0 < idx.size(0); f0 += step) {
    const at::Tensor part = idx.slice(0, f0, std::min(idx.size(0), f0 + step));
    const VertexSide s = vertex_side(xs, part), t = vertex_side(xt, part);
    const at::Tensor g = (s.a - t.a).clamp(-1.0, 1.0);  // SmoothL1', NaN propagates
    if (grad_s.defined()) vertex_side_backward(s, g, part, grad_s);
    if (grad_t.defined()) vertex_side_backward(t, -g, part, grad_t);
  }
}

}  // namespace kdfast::rkd

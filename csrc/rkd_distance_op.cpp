#include "rkd_distance_op.h"

#include "rkd_exact.h"
#include "rkd_features.h"

namespace kdfast::rkd {
namespace {

// One side (student or teacher): centred rows, their float64 Gram matrix, the pair
// distances and their off-diagonal mean. float64 accumulation for every input dtype:
// products of float32 values are exact in float64 (semantics 1.5), and it is never TF32.
// Near pairs (csrc/rkd_exact.h), ordered (i, j) and (j, i): near_i, near_j, their direct
// differences x_i - x_j and whether the gradient flows (D2 above the clamp); their
// distances replace the kernel's.
struct Side {
  at::Tensor centred, gram, dist, mean;
  at::Tensor near_i, near_j, near_diff, near_active;
};

constexpr double kMinSquaredDistanceExact = 1e-12;

// x: the uncentred rows in any floating dtype (their float64 values are exact).
void resolve_near_pairs(const at::Tensor& x, Side& side) {
  const at::Tensor pairs = near_pairs(side.gram).nonzero();
  if (pairs.size(0) == 0) return;
  side.near_i = pairs.select(1, 0);
  side.near_j = pairs.select(1, 1);
  side.near_diff = x.index_select(0, side.near_i).to(at::kDouble) -
                   x.index_select(0, side.near_j).to(at::kDouble);
  const at::Tensor d2 = (side.near_diff * side.near_diff).sum(1);
  side.near_active = (d2 > kMinSquaredDistanceExact).logical_or_(d2 != d2);
  side.dist.index_put_({side.near_i, side.near_j}, d2.clamp_min(kMinSquaredDistanceExact).sqrt());
}

Side make_side(const at::Tensor& x, PairForward forward) {
  const int64_t n = x.size(0);
  const at::Tensor x64 = x.to(at::kDouble);
  Side side;
  side.centred = x64 - x64.mean(0, /*keepdim=*/true);
  side.gram = mm64(side.centred, side.centred.t());
  side.dist = at::empty_like(side.gram);
  forward(side.gram, side.dist);
  resolve_near_pairs(x64, side);
  side.mean = side.dist.sum() / static_cast<double>(n * (n - 1));
  return side;
}

// The side of features formed by the caller (the combined op, csrc/rkd_loss_op.h): the same
// pair pass and near pairs as make_side, on the caller's Gram matrix.
Side side_from(const RkdFeatures& f, PairForward forward) {
  const int64_t n = f.gram.size(0);
  Side side;
  side.centred = f.centred;
  side.gram = f.gram;
  side.dist = at::empty_like(side.gram);
  forward(side.gram, side.dist);
  resolve_near_pairs(f.x, side);
  side.mean = side.dist.sum() / static_cast<double>(n * (n - 1));
  return side;
}

at::ScalarType loss_dtype(const at::Tensor& s, const at::Tensor& t) {
  return at::promote_types(at::promote_types(s.scalar_type(), t.scalar_type()), at::kFloat);
}

// d(psi)/d(features) for one side, given g = dL/dpsi (N x N, symmetric).
at::Tensor side_backward(const Side& side, const at::Tensor& grad_psi, at::ScalarType dtype,
                         PairBackward backward) {
  const int64_t n = side.gram.size(0);
  // psi = D / mu with mu the off-diagonal mean: the gradient also flows through mu.
  const at::Tensor through_mean =
      (grad_psi * side.dist).sum() / (side.mean * side.mean * static_cast<double>(n * (n - 1)));
  at::Tensor grad_dist = grad_psi / side.mean - through_mean;
  grad_dist.fill_diagonal_(0);
  at::Tensor grad_d2 = at::empty_like(grad_dist);
  backward(side.gram, grad_dist.contiguous(), grad_d2);
  at::Tensor near_grad;
  if (side.near_i.defined()) {
    // Near pairs: h = dL/dD2 from the direct distance, out of the Gram GEMM.
    const at::Tensor d = side.dist.index({side.near_i, side.near_j});
    const at::Tensor h = at::where(side.near_active,
                                   grad_dist.index({side.near_i, side.near_j}) / (2.0 * d),
                                   at::zeros_like(d));
    grad_d2.index_put_({side.near_i, side.near_j}, 0.0);
    near_grad = 2.0 * h.unsqueeze(1) * side.near_diff;
  }
  // D2_ij = G_ii + G_jj - 2 G_ij and G = Xc Xc^T give dXc = 4 (rowsum(h) Xc - h Xc).
  at::Tensor grad_centred =
      4.0 * (grad_d2.sum(1, /*keepdim=*/true) * side.centred - mm64(grad_d2, side.centred));
  if (near_grad.defined()) {
    // D2_ij = ||x_i - x_j||^2 of each ordered near pair: 2 h (x_i - x_j) to row i, minus to j.
    grad_centred.index_add_(0, side.near_i, near_grad);
    grad_centred.index_add_(0, side.near_j, -near_grad);
  }
  return (grad_centred - grad_centred.mean(0, /*keepdim=*/true)).to(dtype);
}

}  // namespace

at::Tensor distance_loss(const at::Tensor& student, const at::Tensor& teacher,
                         PairForward forward) {
  const Side s = make_side(student, forward);
  const Side t = make_side(teacher, forward);
  const at::Tensor diff = s.dist / s.mean - t.dist / t.mean;
  const at::Tensor abs = diff.abs();
  const at::Tensor smooth_l1 = at::where(abs < 1.0, 0.5 * diff * diff, abs - 0.5);
  return smooth_l1.mean().to(loss_dtype(student, teacher));
}

std::tuple<at::Tensor, at::Tensor> distance_loss_backward(
    const at::Tensor& grad, const at::Tensor& student, const at::Tensor& teacher,
    bool student_grad, bool teacher_grad, PairForward forward, PairBackward backward) {
  const int64_t n = student.size(0);
  const Side s = make_side(student, forward);
  const Side t = make_side(teacher, forward);
  const at::Tensor diff = s.dist / s.mean - t.dist / t.mean;
  // SmoothL1 (beta = 1)' = clamp(x, -1, 1); the mean over N^2 entries.
  const at::Tensor grad_psi =
      diff.clamp(-1.0, 1.0) * (grad.to(at::kDouble) / static_cast<double>(n * n));
  at::Tensor grad_s = student_grad ? side_backward(s, grad_psi, student.scalar_type(), backward)
                                   : at::empty({0}, student.options());
  at::Tensor grad_t = teacher_grad ? side_backward(t, -grad_psi, teacher.scalar_type(), backward)
                                   : at::empty({0}, teacher.options());
  return {grad_s, grad_t};
}

at::Tensor distance_loss_from(const RkdFeatures& student, const RkdFeatures& teacher,
                              PairForward forward) {
  const Side s = side_from(student, forward);
  const Side t = side_from(teacher, forward);
  const at::Tensor diff = s.dist / s.mean - t.dist / t.mean;
  const at::Tensor abs = diff.abs();
  return at::where(abs < 1.0, 0.5 * diff * diff, abs - 0.5).mean();
}

std::tuple<at::Tensor, at::Tensor> distance_loss_backward_from(
    const at::Tensor& grad, const RkdFeatures& student, const RkdFeatures& teacher,
    bool student_grad, bool teacher_grad, PairForward forward, PairBackward backward) {
  const int64_t n = student.gram.size(0);
  const Side s = side_from(student, forward);
  const Side t = side_from(teacher, forward);
  const at::Tensor diff = s.dist / s.mean - t.dist / t.mean;
  const at::Tensor grad_psi =
      diff.clamp(-1.0, 1.0) * (grad.to(at::kDouble) / static_cast<double>(n * n));
  at::Tensor grad_s, grad_t;
  if (student_grad) grad_s = side_backward(s, grad_psi, at::kDouble, backward);
  if (teacher_grad) grad_t = side_backward(t, -grad_psi, at::kDouble, backward);
  return {grad_s, grad_t};
}

}  // namespace kdfast::rkd

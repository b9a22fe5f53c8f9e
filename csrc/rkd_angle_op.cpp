#include "rkd_angle_op.h"

#include "rkd_exact.h"
#include "rkd_features.h"

namespace kdfast::rkd {
namespace {

// One side: centred rows (float64 for every input dtype: products of float32 values are
// exact in float64, semantics 1.5; never TF32), their Gram matrix and the inverse pair norms.
struct AngleSide {
  at::Tensor x64, centred;
  AngleSideMatrices m;
};

AngleSide make_angle_side(const at::Tensor& x, const AngleKernels& kernels) {
  AngleSide side;
  side.x64 = x.to(at::kDouble).contiguous();
  side.centred = (side.x64 - side.x64.mean(0, /*keepdim=*/true)).contiguous();
  side.m.gram = mm64(side.centred, side.centred.t());
  side.m.inv_norm = at::empty_like(side.m.gram);
  side.m.norm_active = at::empty_like(side.m.gram);
  side.m.d2_fix = at::empty_like(side.m.gram);
  kernels.pairs(side.centred, side.m);
  return side;
}

// The side of features formed by the caller (the combined op, csrc/rkd_loss_op.h): its Gram
// matrix is shared, never written (the pair pass and the near vertices write only r,
// norm_active and d2_fix).
// Sets both sides' uncentred float64 rows (for the exact pass) when there are exact vertices.
void exact_rows(AngleSide& s, AngleSide& t, const RkdFeatures& student,
                const RkdFeatures& teacher, const at::Tensor& exact) {
  if (exact.size(0) == 0) return;
  s.x64 = student.x64();
  t.x64 = teacher.x64();
}

AngleSide angle_side_from(const RkdFeatures& f, const AngleKernels& kernels) {
  AngleSide side;  // x64 is formed only for exact vertices (see exact_rows)
  side.centred = f.centred;
  side.m.gram = f.gram;
  side.m.inv_norm = at::empty_like(side.m.gram);
  side.m.norm_active = at::empty_like(side.m.gram);
  side.m.d2_fix = at::empty_like(side.m.gram);
  kernels.pairs(side.centred, side.m);
  return side;
}

at::ScalarType angle_loss_dtype(const at::Tensor& s, const at::Tensor& t) {
  return at::promote_types(at::promote_types(s.scalar_type(), t.scalar_type()), at::kFloat);
}

// The vertices with a near pair on either side (csrc/rkd_exact.h): their rows of r and
// norm_active are zeroed on both sides, so the triple loops give them no loss and no gradient
// (every A_ijk = 0 on both sides), and the exact pass adds theirs. Returns those in
// [start, stop).
at::Tensor take_exact_vertices(AngleSide& s, AngleSide& t, int64_t start, int64_t stop) {
  at::Tensor idx = near_vertices(s.m.gram, t.m.gram);
  if (idx.size(0) == 0) return idx;
  for (AngleSide* side : {&s, &t}) {
    side->m.inv_norm.index_fill_(0, idx, 0.0);
    side->m.norm_active.index_fill_(0, idx, 0.0);
  }
  return idx.masked_select((idx >= start).logical_and_(idx < stop));
}

AngleGradAccumulators make_accumulators(const at::Tensor& gram, bool needed) {
  if (!needed) return {};
  return {at::zeros_like(gram), at::zeros_like(gram), at::zeros_like(gram)};
}

// dL/dX of one side from its accumulators (csrc/rkd_angle.h) plus `exact` (the exact
// vertices' gradient, unscaled; undefined: none), times the upstream gradient.
at::Tensor angle_side_backward(const AngleSide& side, const AngleGradAccumulators& acc,
                               const at::Tensor& exact, const at::Tensor& grad,
                               at::ScalarType dtype) {
  // Through the cosines' numerators: dG_jk += m, dG_ij -= 2 w, dG_ii += rowsum(w).
  at::Tensor grad_gram = acc.m - 2.0 * acc.w;
  // Through the norms: h_ij = dL/dD2_ij = -r_ij^2 p_ij (zero where clamped or degenerate);
  // D2_ij = G_ii + G_jj - 2 G_ij.
  const at::Tensor h = -(side.m.inv_norm * side.m.inv_norm) * acc.p * side.m.norm_active;
  grad_gram -= 2.0 * h;
  grad_gram.diagonal().add_(acc.w.sum(1) + h.sum(1) + h.sum(0));
  // G = Xc Xc^T: dXc = (dG + dG^T) Xc; then the centring backward.
  at::Tensor grad_centred = mm64(grad_gram + grad_gram.t(), side.centred);
  const double n = static_cast<double>(side.centred.size(0));
  grad_centred = grad_centred - grad_centred.mean(0, /*keepdim=*/true);
  if (exact.defined()) grad_centred += exact;
  grad_centred = grad_centred * (grad.to(at::kDouble) / (n * n * n));
  return grad_centred.to(dtype);
}

}  // namespace

void check_vertex_range(int64_t start, int64_t stop, int64_t n) {
  TORCH_CHECK_VALUE(0 <= start && start <= stop && stop <= n,
                    "rkd_angle_vertices: the vertex range [start, stop) must satisfy 0 <= start "
                    "<= stop <= N = ",
                    n, ", got start = ", start, ", stop = ", stop);
}

at::Tensor angle_loss(const at::Tensor& student, const at::Tensor& teacher,
                      const AngleKernels& kernels, int64_t start, int64_t stop) {
  const int64_t n = student.size(0);
  check_vertex_range(start, stop, n);
  const at::ScalarType dtype = angle_loss_dtype(student, teacher);
  if (start == stop) return at::zeros({}, student.options().dtype(dtype));
  AngleSide s = make_angle_side(student, kernels);
  AngleSide t = make_angle_side(teacher, kernels);
  const at::Tensor exact = take_exact_vertices(s, t, start, stop);
  at::Tensor total = kernels.forward(s.m, t.m, start, stop).sum();
  if (exact.size(0) > 0) total = total + exact_vertex_loss(s.x64, t.x64, exact);
  const double count = static_cast<double>(n) * static_cast<double>(n) * static_cast<double>(n);
  return (total / count).to(dtype);
}

std::tuple<at::Tensor, at::Tensor> angle_loss_backward(const at::Tensor& grad,
                                                       const at::Tensor& student,
                                                       const at::Tensor& teacher,
                                                       bool student_grad, bool teacher_grad,
                                                       const AngleKernels& kernels, int64_t start,
                                                       int64_t stop) {
  check_vertex_range(start, stop, student.size(0));
  if (!student_grad && !teacher_grad) {
    return {at::empty({0}, student.options()), at::empty({0}, teacher.options())};
  }
  if (start == stop) {
    return {student_grad ? at::zeros_like(student, at::MemoryFormat::Contiguous)
                         : at::empty({0}, student.options()),
            teacher_grad ? at::zeros_like(teacher, at::MemoryFormat::Contiguous)
                         : at::empty({0}, teacher.options())};
  }
  AngleSide s = make_angle_side(student, kernels);
  AngleSide t = make_angle_side(teacher, kernels);
  const at::Tensor exact = take_exact_vertices(s, t, start, stop);
  at::Tensor exact_s, exact_t;
  if (exact.size(0) > 0) {
    if (student_grad) exact_s = at::zeros_like(s.x64);
    if (teacher_grad) exact_t = at::zeros_like(t.x64);
    exact_vertex_backward(s.x64, t.x64, exact, exact_s, exact_t);
  }
  AngleGradAccumulators acc_s = make_accumulators(s.m.gram, student_grad);
  AngleGradAccumulators acc_t = make_accumulators(t.m.gram, teacher_grad);
  kernels.backward(s.m, t.m, acc_s, acc_t, start, stop);
  at::Tensor grad_s = student_grad
                          ? angle_side_backward(s, acc_s, exact_s, grad, student.scalar_type())
                          : at::empty({0}, student.options());
  at::Tensor grad_t = teacher_grad
                          ? angle_side_backward(t, acc_t, exact_t, grad, teacher.scalar_type())
                          : at::empty({0}, teacher.options());
  return {grad_s, grad_t};
}

at::Tensor angle_loss_from(const RkdFeatures& student, const RkdFeatures& teacher,
                           const AngleKernels& kernels) {
  const int64_t n = student.gram.size(0);
  AngleSide s = angle_side_from(student, kernels);
  AngleSide t = angle_side_from(teacher, kernels);
  const at::Tensor exact = take_exact_vertices(s, t, 0, n);
  exact_rows(s, t, student, teacher, exact);
  at::Tensor total = kernels.forward(s.m, t.m, 0, n).sum();
  if (exact.size(0) > 0) total = total + exact_vertex_loss(s.x64, t.x64, exact);
  const double count = static_cast<double>(n) * static_cast<double>(n) * static_cast<double>(n);
  return total / count;
}

std::tuple<at::Tensor, at::Tensor> angle_loss_backward_from(const at::Tensor& grad,
                                                            const RkdFeatures& student,
                                                            const RkdFeatures& teacher,
                                                            bool student_grad, bool teacher_grad,
                                                            const AngleKernels& kernels) {
  if (!student_grad && !teacher_grad) return {at::Tensor(), at::Tensor()};
  const int64_t n = student.gram.size(0);
  AngleSide s = angle_side_from(student, kernels);
  AngleSide t = angle_side_from(teacher, kernels);
  const at::Tensor exact = take_exact_vertices(s, t, 0, n);
  exact_rows(s, t, student, teacher, exact);
  at::Tensor exact_s, exact_t;
  if (exact.size(0) > 0) {
    if (student_grad) exact_s = at::zeros_like(s.x64);
    if (teacher_grad) exact_t = at::zeros_like(t.x64);
    exact_vertex_backward(s.x64, t.x64, exact, exact_s, exact_t);
  }
  AngleGradAccumulators acc_s = make_accumulators(s.m.gram, student_grad);
  AngleGradAccumulators acc_t = make_accumulators(t.m.gram, teacher_grad);
  kernels.backward(s.m, t.m, acc_s, acc_t, 0, n);
  at::Tensor grad_s, grad_t;
  if (student_grad) grad_s = angle_side_backward(s, acc_s, exact_s, grad, at::kDouble);
  if (teacher_grad) grad_t = angle_side_backward(t, acc_t, exact_t, grad, at::kDouble);
  return {grad_s, grad_t};
}

}  // namespace kdfast::rkd

#include "rkd_loss_op.h"

#include <cmath>

namespace kdfast::rkd {
namespace {

void check_args(const at::Tensor& student, const at::Tensor& teacher, double distance_weight,
                double angle_weight) {
  TORCH_CHECK_VALUE(std::isfinite(distance_weight) && distance_weight >= 0 &&
                        std::isfinite(angle_weight) && angle_weight >= 0,
                    "rkd_loss: the weights must be finite and >= 0, got distance_weight = ",
                    distance_weight, ", angle_weight = ", angle_weight);
  TORCH_CHECK_VALUE(student.dim() == 2 && teacher.dim() == 2 &&
                        student.size(0) == teacher.size(0),
                    "rkd_loss: student and teacher must be (N, Ds) and (N, Dt), got ",
                    student.sizes(), " and ", teacher.sizes());
  const int64_t min_rows = angle_weight != 0 ? 3 : 2;
  TORCH_CHECK_VALUE(student.size(0) >= min_rows, "rkd_loss needs at least ", min_rows,
                    " samples, got ", student.size(0));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> rkd_loss(const at::Tensor& student,
                                                        const at::Tensor& teacher,
                                                        double distance_weight,
                                                        double angle_weight, bool save_gram,
                                                        const RkdLossKernels& kernels) {
  check_args(student, teacher, distance_weight, angle_weight);
  const RkdFeatures s = rkd_features(student);
  const RkdFeatures t = rkd_features(teacher);
  at::Tensor total = at::zeros({}, s.gram.options());
  if (distance_weight != 0) {
    total = total + distance_weight * distance_loss_from(s, t, kernels.distance_forward);
  }
  if (angle_weight != 0) total = total + angle_weight * angle_loss_from(s, t, kernels.angle);
  const at::ScalarType dtype = at::promote_types(
      at::promote_types(student.scalar_type(), teacher.scalar_type()), at::kFloat);
  // distinct tensors: a custom op's outputs may not alias each other
  return {total.to(dtype), save_gram ? s.gram : at::empty({0}, s.gram.options()),
          save_gram ? t.gram : at::empty({0}, t.gram.options())};
}

std::tuple<at::Tensor, at::Tensor> rkd_loss_backward(
    const at::Tensor& grad, const at::Tensor& student, const at::Tensor& teacher,
    const at::Tensor& gram_s, const at::Tensor& gram_t, double distance_weight,
    double angle_weight, bool student_grad, bool teacher_grad, const RkdLossKernels& kernels) {
  check_args(student, teacher, distance_weight, angle_weight);
  at::Tensor grad_s, grad_t;
  if (student_grad || teacher_grad) {
    const RkdFeatures s = rkd_features(student, gram_s);
    const RkdFeatures t = rkd_features(teacher, gram_t);
    const at::Tensor grad64 = grad.to(at::kDouble);
    // Both terms' float64 gradients are summed, then rounded once to the input dtype.
    const auto add = [](at::Tensor& sum, const at::Tensor& term) {
      if (term.defined()) sum = sum.defined() ? sum + term : term;
    };
    if (distance_weight != 0) {
      auto [ds, dt] =
          distance_loss_backward_from(grad64 * distance_weight, s, t, student_grad,
                                      teacher_grad, kernels.distance_forward,
                                      kernels.distance_backward);
      add(grad_s, ds);
      add(grad_t, dt);
    }
    if (angle_weight != 0) {
      auto [as, at_] = angle_loss_backward_from(grad64 * angle_weight, s, t, student_grad,
                                                teacher_grad, kernels.angle);
      add(grad_s, as);
      add(grad_t, at_);
    }
  }
  const auto finish = [](const at::Tensor& g, const at::Tensor& x, bool needed) {
    if (!needed) return at::empty({0}, x.options());
    return g.defined() ? g.to(x.scalar_type()) : at::zeros_like(x, at::MemoryFormat::Contiguous);
  };
  return {finish(grad_s, student, student_grad), finish(grad_t, teacher, teacher_grad)};
}

}  // namespace kdfast::rkd

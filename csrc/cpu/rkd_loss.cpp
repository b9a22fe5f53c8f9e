// CPU registration of the combined RKD op (csrc/rkd_loss_op.h) on the CPU kernels of
// rkd_distance_cpp and rkd_angle_cpp.
#include <torch/library.h>

#include "../rkd_loss_op.h"
#include "rkd_cpu.h"
#include "tiles.h"

namespace kdfast::rkd {
namespace {

RkdLossKernels cpu_kernels() {
  return {cpu_distance_pair_forward(), cpu_distance_pair_backward(), cpu_angle_kernels()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cpu(const at::Tensor& student,
                                                           const at::Tensor& teacher,
                                                           double distance_weight,
                                                           double angle_weight, bool save_gram) {
  tiles::OpScope scope(glue_elements(student), angle_weight != 0.0 ? angle_work(student) : 0);
  return rkd_loss(student, teacher, distance_weight, angle_weight, save_gram, cpu_kernels());
}

std::tuple<at::Tensor, at::Tensor> backward_cpu(const at::Tensor& grad, const at::Tensor& student,
                                                const at::Tensor& teacher,
                                                const at::Tensor& gram_s, const at::Tensor& gram_t,
                                                double distance_weight, double angle_weight,
                                                bool student_grad, bool teacher_grad) {
  tiles::OpScope scope(glue_elements(student), angle_weight != 0.0 ? angle_work(student) : 0);
  return rkd_loss_backward(grad, student, teacher, gram_s, gram_t, distance_weight, angle_weight,
                           student_grad, teacher_grad, cpu_kernels());
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("rkd_loss_cpp", &forward_cpu);
  m.impl("rkd_loss_cpp_backward", &backward_cpu);
}

}  // namespace kdfast::rkd

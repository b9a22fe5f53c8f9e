// Test-only CPU ops that run the raw CUDA kernels of the RKD distance and angle ops
// (csrc/cuda/rkd_*_kernels.h) on the CPU grid driver, through the same launchers and op
// orchestration (csrc/rkd_*_op.h) as csrc/cuda/rkd_*.cu. `threads` overrides the threads
// per block (0: the CUDA launcher's). Not a backend: kdfast/_dispatch.py never picks them.
#include <torch/library.h>

#include "../cuda/rkd_angle_kernels.h"
#include "../cuda/rkd_distance_kernels.h"
#include "../rkd_angle_op.h"
#include "../rkd_distance_op.h"
#include "cuda_host.h"

namespace kdfast::rkd {
namespace {

using cuda_host::kernel;

struct DistanceGrid : cuda_host::HostGrid {
  static constexpr auto pair_forward = kernel("pair_forward_kernel", &pair_forward_body);
  static constexpr auto pair_backward = kernel("pair_backward_kernel", &pair_backward_body);
};

struct AngleGrid : cuda_host::HostGrid {
  static constexpr auto pairs = kernel("pairs_kernel", &pairs_body);
  static constexpr auto loss = kernel("loss_kernel", &loss_body);
  static constexpr auto row = kernel("row_kernel", &row_body);
  static constexpr auto column = kernel("column_kernel", &column_body);
};

cuda_host::Geometry geometry(int64_t threads) {
  TORCH_CHECK_VALUE(0 <= threads && threads <= 1024,
                    "cuda_host: threads must be in [0, 1024] (0: the CUDA launcher's), got ",
                    threads);
  return {threads, 0};
}

at::Tensor distance_forward(const at::Tensor& student, const at::Tensor& teacher,
                            int64_t threads) {
  const cuda_host::GeometryScope scope(geometry(threads));
  return distance_loss(student, teacher, launch_pair_forward<DistanceGrid>);
}

std::tuple<at::Tensor, at::Tensor> distance_backward(const at::Tensor& grad,
                                                     const at::Tensor& student,
                                                     const at::Tensor& teacher,
                                                     bool student_grad, bool teacher_grad,
                                                     int64_t threads) {
  const cuda_host::GeometryScope scope(geometry(threads));
  return distance_loss_backward(grad, student, teacher, student_grad, teacher_grad,
                                launch_pair_forward<DistanceGrid>,
                                launch_pair_backward<DistanceGrid>);
}

at::Tensor angle_forward(const at::Tensor& student, const at::Tensor& teacher, int64_t threads) {
  const cuda_host::GeometryScope scope(geometry(threads));
  return angle_loss(student, teacher, angle_kernels<AngleGrid>, 0, student.size(0));
}

std::tuple<at::Tensor, at::Tensor> angle_backward(const at::Tensor& grad,
                                                  const at::Tensor& student,
                                                  const at::Tensor& teacher, bool student_grad,
                                                  bool teacher_grad, int64_t threads) {
  const cuda_host::GeometryScope scope(geometry(threads));
  return angle_loss_backward(grad, student, teacher, student_grad, teacher_grad,
                             angle_kernels<AngleGrid>, 0, student.size(0));
}

at::Tensor vertices_forward(const at::Tensor& student, const at::Tensor& teacher, int64_t start,
                            int64_t stop, int64_t threads) {
  const cuda_host::GeometryScope scope(geometry(threads));
  return angle_loss(student, teacher, angle_kernels<AngleGrid>, start, stop);
}

std::tuple<at::Tensor, at::Tensor> vertices_backward(const at::Tensor& grad,
                                                     const at::Tensor& student,
                                                     const at::Tensor& teacher, int64_t start,
                                                     int64_t stop, bool student_grad,
                                                     bool teacher_grad, int64_t threads) {
  const cuda_host::GeometryScope scope(geometry(threads));
  return angle_loss_backward(grad, student, teacher, student_grad, teacher_grad,
                             angle_kernels<AngleGrid>, start, stop);
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("rkd_distance_cuda_host", &distance_forward);
  m.impl("rkd_distance_cuda_host_backward", &distance_backward);
  m.impl("rkd_angle_cuda_host", &angle_forward);
  m.impl("rkd_angle_cuda_host_backward", &angle_backward);
  m.impl("rkd_angle_vertices_cuda_host", &vertices_forward);
  m.impl("rkd_angle_vertices_cuda_host_backward", &vertices_backward);
}

}  // namespace kdfast::rkd

// CUDA passes of the RKD angle op: the __global__ wrappers around the bodies of
// csrc/cuda/rkd_angle_kernels.h (which the cuda_host tests run on CPU), and the CUDA
// registration.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../rkd_angle_op.h"
#include "launch.cuh"
#include "rkd_angle_kernels.h"

namespace kdfast::rkd {
namespace {

__global__ void pairs_kernel(const double* __restrict__ g, const double* __restrict__ x,
                             double* __restrict__ r, double* __restrict__ active,
                             double* __restrict__ fix, int64_t n, int64_t dim) {
  pairs_body(cuda::grid_pos(), g, x, r, active, fix, n, dim);
}

__global__ void loss_kernel(Sides v, double* __restrict__ out, int64_t n, int64_t start,
                            int64_t stop) {
  loss_body(cuda::grid_pos(), v, out, n, start, stop);
}

__global__ void row_kernel(Sides v, double* __restrict__ ws, double* __restrict__ ps,
                           double* __restrict__ wt, double* __restrict__ pt, int64_t n,
                           int64_t start, int64_t stop) {
  row_body(cuda::grid_pos(), v, ws, ps, wt, pt, n, start, stop);
}

__global__ void column_kernel(Sides v, double* __restrict__ ms, double* __restrict__ mt, int64_t n,
                              int64_t start, int64_t stop) {
  column_body(cuda::grid_pos(), v, ms, mt, n, start, stop);
}

struct Grid : cuda::CudaGrid {
  static constexpr auto pairs = &pairs_kernel;
  static constexpr auto loss = &loss_kernel;
  static constexpr auto row = &row_kernel;
  static constexpr auto column = &column_kernel;
};

at::Tensor forward_cuda(const at::Tensor& student, const at::Tensor& teacher) {
  const c10::cuda::CUDAGuard guard(student.device());
  return angle_loss(student, teacher, angle_kernels<Grid>, 0, student.size(0));
}

std::tuple<at::Tensor, at::Tensor> backward_cuda(const at::Tensor& grad,
                                                 const at::Tensor& student,
                                                 const at::Tensor& teacher, bool student_grad,
                                                 bool teacher_grad) {
  const c10::cuda::CUDAGuard guard(student.device());
  return angle_loss_backward(grad, student, teacher, student_grad, teacher_grad,
                             angle_kernels<Grid>, 0, student.size(0));
}

at::Tensor vertices_forward_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                 int64_t start, int64_t stop) {
  const c10::cuda::CUDAGuard guard(student.device());
  return angle_loss(student, teacher, angle_kernels<Grid>, start, stop);
}

std::tuple<at::Tensor, at::Tensor> vertices_backward_cuda(const at::Tensor& grad,
                                                          const at::Tensor& student,
                                                          const at::Tensor& teacher,
                                                          int64_t start, int64_t stop,
                                                          bool student_grad, bool teacher_grad) {
  const c10::cuda::CUDAGuard guard(student.device());
  return angle_loss_backward(grad, student, teacher, student_grad, teacher_grad,
                             angle_kernels<Grid>, start, stop);
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CUDA, m) {
  m.impl("rkd_angle_cuda", &forward_cuda);
  m.impl("rkd_angle_cuda_backward", &backward_cuda);
  m.impl("rkd_angle_vertices_cuda", &vertices_forward_cuda);
  m.impl("rkd_angle_vertices_cuda_backward", &vertices_backward_cuda);
}

}  // namespace kdfast::rkd

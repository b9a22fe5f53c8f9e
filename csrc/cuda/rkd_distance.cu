// CUDA per-pair passes of the RKD distance op: the __global__ wrappers around the bodies of
// csrc/cuda/rkd_distance_kernels.h (which the cuda_host tests run on CPU), and the CUDA
// registration.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../rkd_distance_op.h"
#include "launch.cuh"
#include "rkd_distance_kernels.h"

namespace kdfast::rkd {
namespace {

__global__ void pair_forward_kernel(const double* __restrict__ g, double* __restrict__ d,
                                    int64_t n) {
  pair_forward_body(cuda::grid_pos(), g, d, n);
}

__global__ void pair_backward_kernel(const double* __restrict__ g,
                                     const double* __restrict__ grad_dist,
                                     double* __restrict__ grad_d2, int64_t n) {
  pair_backward_body(cuda::grid_pos(), g, grad_dist, grad_d2, n);
}

struct Grid : cuda::CudaGrid {
  static constexpr auto pair_forward = &pair_forward_kernel;
  static constexpr auto pair_backward = &pair_backward_kernel;
};

at::Tensor forward_cuda(const at::Tensor& student, const at::Tensor& teacher) {
  const c10::cuda::CUDAGuard guard(student.device());
  return distance_loss(student, teacher, launch_pair_forward<Grid>);
}

std::tuple<at::Tensor, at::Tensor> backward_cuda(const at::Tensor& grad,
                                                 const at::Tensor& student,
                                                 const at::Tensor& teacher, bool student_grad,
                                                 bool teacher_grad) {
  const c10::cuda::CUDAGuard guard(student.device());
  return distance_loss_backward(grad, student, teacher, student_grad, teacher_grad,
                                launch_pair_forward<Grid>, launch_pair_backward<Grid>);
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CUDA, m) {
  m.impl("rkd_distance_cuda", &forward_cuda);
  m.impl("rkd_distance_cuda_backward", &backward_cuda);
}

}  // namespace kdfast::rkd

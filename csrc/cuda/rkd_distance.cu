// CUDA per-pair passes of the RKD distance op: only launch and indexing around
// csrc/rkd_distance.h (whose math the CPU tests cover), and the CUDA registration.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cfloat>

#include "../rkd_distance.h"
#include "../rkd_distance_op.h"

namespace kdfast::rkd {
namespace {

constexpr double kUnitRoundoff = DBL_EPSILON / 2;
constexpr int kThreads = 256;

__global__ void pair_forward_kernel(const double* __restrict__ g, double* __restrict__ d,
                                    int64_t n) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= n * n) return;
  const int64_t i = idx / n, j = idx % n;
  bool active = false;
  d[idx] = i == j ? 0.0
                  : pair_distance(g[i * n + i], g[j * n + j], g[idx], kUnitRoundoff, active);
}

__global__ void pair_backward_kernel(const double* __restrict__ g,
                                     const double* __restrict__ grad_dist,
                                     double* __restrict__ grad_d2, int64_t n) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= n * n) return;
  const int64_t i = idx / n, j = idx % n;
  if (i == j) {
    grad_d2[idx] = 0.0;
    return;
  }
  bool active = false;
  const double d = pair_distance(g[i * n + i], g[j * n + j], g[idx], kUnitRoundoff, active);
  grad_d2[idx] = pair_distance_backward(grad_dist[idx], d, active);
}

unsigned int blocks_for(int64_t n) {
  return static_cast<unsigned int>((n * n + kThreads - 1) / kThreads);
}

void pair_forward_cuda(const at::Tensor& gram, at::Tensor& dist) {
  const int64_t n = gram.size(0);
  if (n == 0) return;
  pair_forward_kernel<<<blocks_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      gram.const_data_ptr<double>(), dist.mutable_data_ptr<double>(), n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void pair_backward_cuda(const at::Tensor& gram, const at::Tensor& grad_dist,
                        at::Tensor& grad_d2) {
  const int64_t n = gram.size(0);
  if (n == 0) return;
  pair_backward_kernel<<<blocks_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      gram.const_data_ptr<double>(), grad_dist.const_data_ptr<double>(),
      grad_d2.mutable_data_ptr<double>(), n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor forward_cuda(const at::Tensor& student, const at::Tensor& teacher) {
  const c10::cuda::CUDAGuard guard(student.device());
  return distance_loss(student, teacher, pair_forward_cuda);
}

std::tuple<at::Tensor, at::Tensor> backward_cuda(const at::Tensor& grad,
                                                 const at::Tensor& student,
                                                 const at::Tensor& teacher, bool student_grad,
                                                 bool teacher_grad) {
  const c10::cuda::CUDAGuard guard(student.device());
  return distance_loss_backward(grad, student, teacher, student_grad, teacher_grad,
                                pair_forward_cuda, pair_backward_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CUDA, m) {
  m.impl("rkd_distance_cuda", &forward_cuda);
  m.impl("rkd_distance_cuda_backward", &backward_cuda);
}

}  // namespace kdfast::rkd

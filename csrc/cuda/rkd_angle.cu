// CUDA passes of the RKD angle op: only launch and indexing around csrc/rkd_angle.h (whose
// math the CPU tests cover), and the CUDA registration. One thread per pair streams the
// third index: (i, j) over k for the loss, w and p, for the vertices i in [start, stop);
// (j, k) over those i for m, so every output has one writer (no atomics, deterministic).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cfloat>

#include "../rkd_angle.h"
#include "../rkd_angle_op.h"

namespace kdfast::rkd {
namespace {

constexpr double kUnitRoundoff = DBL_EPSILON / 2;
constexpr int kThreads = 256;

__global__ void pairs_kernel(const double* __restrict__ g, const double* __restrict__ x,
                             double* __restrict__ r, double* __restrict__ active,
                             double* __restrict__ fix, int64_t n, int64_t dim) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= n * n) return;
  pair_entry(g, x, n, dim, idx / n, idx % n, kUnitRoundoff, r[idx], active[idx], fix[idx]);
}

struct Sides {
  const double* gs;
  const double* rs;
  const double* fs;
  const double* gt;
  const double* rt;
  const double* ft;
};

__device__ __forceinline__ void cosines(const Sides& v, int64_t n, int64_t i, int64_t j,
                                        int64_t k, double& cs, double& ct) {
  cs = triplet_cosine(v.gs[j * n + k], v.gs[i * n + j], v.gs[i * n + k], v.gs[i * n + i],
                      k == j ? v.fs[i * n + j] : 0.0, v.rs[i * n + j], v.rs[i * n + k]);
  ct = triplet_cosine(v.gt[j * n + k], v.gt[i * n + j], v.gt[i * n + k], v.gt[i * n + i],
                      k == j ? v.ft[i * n + j] : 0.0, v.rt[i * n + j], v.rt[i * n + k]);
}

// out[i - start, j] = sum_k SmoothL1(A^s_ijk - A^t_ijk) for the vertices i in [start, stop).
__global__ void loss_kernel(Sides v, double* __restrict__ out, int64_t n, int64_t start,
                            int64_t stop) {
  const int64_t local = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (local >= (stop - start) * n) return;
  const int64_t idx = start * n + local;
  const int64_t i = idx / n, j = idx % n;
  double acc = 0.0;
  if (v.rs[idx] != 0.0 || v.rt[idx] != 0.0) {
    for (int64_t k = 0; k < n; ++k) {
      double cs, ct;
      cosines(v, n, i, j, k, cs, ct);
      acc += smooth_l1(cs - ct);
    }
  }
  out[local] = acc;
}

// w[i, j] = sum_k g r_ij r_ik and p[i, j] = sum_k g A_ijk per side (null: not needed), for
// the vertices i in [start, stop) (the other rows are left as they are: zero).
__global__ void row_kernel(Sides v, double* __restrict__ ws, double* __restrict__ ps,
                           double* __restrict__ wt, double* __restrict__ pt, int64_t n,
                           int64_t start, int64_t stop) {
  const int64_t local = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (local >= (stop - start) * n) return;
  const int64_t idx = start * n + local;
  const int64_t i = idx / n, j = idx % n;
  double sws = 0.0, sps = 0.0, swt = 0.0, spt = 0.0;
  if (v.rs[idx] != 0.0 || v.rt[idx] != 0.0) {
    for (int64_t k = 0; k < n; ++k) {
      double cs, ct;
      cosines(v, n, i, j, k, cs, ct);
      const double g = smooth_l1_grad(cs - ct);
      sws += g * v.rs[idx] * v.rs[i * n + k];
      sps += g * cs;
      swt -= g * v.rt[idx] * v.rt[i * n + k];
      spt -= g * ct;
    }
  }
  if (ws != nullptr) {
    ws[idx] = sws;
    ps[idx] = sps;
  }
  if (wt != nullptr) {
    wt[idx] = swt;
    pt[idx] = spt;
  }
}

// m[j, k] = sum over i in [start, stop) of g r_ij r_ik per side.
__global__ void column_kernel(Sides v, double* __restrict__ ms, double* __restrict__ mt, int64_t n,
                              int64_t start, int64_t stop) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= n * n) return;
  const int64_t j = idx / n, k = idx % n;
  double sms = 0.0, smt = 0.0;
  for (int64_t i = start; i < stop; ++i) {
    if (v.rs[i * n + j] == 0.0 && v.rt[i * n + j] == 0.0) continue;
    double cs, ct;
    cosines(v, n, i, j, k, cs, ct);
    const double g = smooth_l1_grad(cs - ct);
    sms += g * v.rs[i * n + j] * v.rs[i * n + k];
    smt -= g * v.rt[i * n + j] * v.rt[i * n + k];
  }
  if (ms != nullptr) ms[idx] = sms;
  if (mt != nullptr) mt[idx] = smt;
}

// Blocks of kThreads covering `count` threads.
unsigned int blocks_for(int64_t count) {
  return static_cast<unsigned int>((count + kThreads - 1) / kThreads);
}

Sides sides(const AngleSideMatrices& s, const AngleSideMatrices& t) {
  return {s.gram.const_data_ptr<double>(), s.inv_norm.const_data_ptr<double>(),
          s.d2_fix.const_data_ptr<double>(), t.gram.const_data_ptr<double>(),
          t.inv_norm.const_data_ptr<double>(), t.d2_fix.const_data_ptr<double>()};
}

double* ptr_or_null(at::Tensor& x) { return x.defined() ? x.mutable_data_ptr<double>() : nullptr; }

void pairs_cuda(const at::Tensor& centred, AngleSideMatrices& side) {
  const int64_t n = side.gram.size(0);
  pairs_kernel<<<blocks_for(n * n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      side.gram.const_data_ptr<double>(), centred.const_data_ptr<double>(),
      side.inv_norm.mutable_data_ptr<double>(), side.norm_active.mutable_data_ptr<double>(),
      side.d2_fix.mutable_data_ptr<double>(), n, centred.size(1));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor triplet_forward_cuda(const AngleSideMatrices& student,
                                const AngleSideMatrices& teacher, int64_t start, int64_t stop) {
  const int64_t n = student.gram.size(0);
  at::Tensor partial = at::empty({stop - start, n}, student.gram.options());
  loss_kernel<<<blocks_for((stop - start) * n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      sides(student, teacher), partial.mutable_data_ptr<double>(), n, start, stop);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return partial;
}

void triplet_backward_cuda(const AngleSideMatrices& s, const AngleSideMatrices& t,
                           AngleGradAccumulators& student, AngleGradAccumulators& teacher,
                           int64_t start, int64_t stop) {
  const int64_t n = s.gram.size(0);
  const Sides v = sides(s, t);
  const auto stream = at::cuda::getCurrentCUDAStream();
  row_kernel<<<blocks_for((stop - start) * n), kThreads, 0, stream>>>(
      v, ptr_or_null(student.w), ptr_or_null(student.p), ptr_or_null(teacher.w),
      ptr_or_null(teacher.p), n, start, stop);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  column_kernel<<<blocks_for(n * n), kThreads, 0, stream>>>(v, ptr_or_null(student.m),
                                                            ptr_or_null(teacher.m), n, start, stop);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

constexpr AngleKernels kCudaKernels{pairs_cuda, triplet_forward_cuda, triplet_backward_cuda};

at::Tensor forward_cuda(const at::Tensor& student, const at::Tensor& teacher) {
  const c10::cuda::CUDAGuard guard(student.device());
  return angle_loss(student, teacher, kCudaKernels, 0, student.size(0));
}

std::tuple<at::Tensor, at::Tensor> backward_cuda(const at::Tensor& grad,
                                                 const at::Tensor& student,
                                                 const at::Tensor& teacher, bool student_grad,
                                                 bool teacher_grad) {
  const c10::cuda::CUDAGuard guard(student.device());
  return angle_loss_backward(grad, student, teacher, student_grad, teacher_grad, kCudaKernels, 0,
                             student.size(0));
}

at::Tensor vertices_forward_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                 int64_t start, int64_t stop) {
  const c10::cuda::CUDAGuard guard(student.device());
  return angle_loss(student, teacher, kCudaKernels, start, stop);
}

std::tuple<at::Tensor, at::Tensor> vertices_backward_cuda(const at::Tensor& grad,
                                                          const at::Tensor& student,
                                                          const at::Tensor& teacher,
                                                          int64_t start, int64_t stop,
                                                          bool student_grad, bool teacher_grad) {
  const c10::cuda::CUDAGuard guard(student.device());
  return angle_loss_backward(grad, student, teacher, student_grad, teacher_grad, kCudaKernels,
                             start, stop);
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CUDA, m) {
  m.impl("rkd_angle_cuda", &forward_cuda);
  m.impl("rkd_angle_cuda_backward", &backward_cuda);
  m.impl("rkd_angle_vertices_cuda", &vertices_forward_cuda);
  m.impl("rkd_angle_vertices_cuda_backward", &vertices_backward_cuda);
}

}  // namespace kdfast::rkd

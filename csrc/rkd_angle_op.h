// The RKD angle op on ATen (device-generic): centring, the float64 Gram GEMMs, the pair
// pass, the assembly of dL/dG and the GEMM back to the features. The streamed triple loops
// are device kernels (csrc/cpu/rkd_angle.cpp, csrc/cuda/rkd_angle.cu) handed in as
// functions. Nothing of size N^3 or N^2 D is stored.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "rkd_features.h"

namespace kdfast::rkd {

// One side's N x N float64 contiguous matrices: the Gram matrix of the centred rows; r_ij
// (csrc/rkd_angle.h), 0 on the diagonal; norm_active = 1.0 where the gradient flows through
// the norm, else 0.0; d2_fix = D2_ij - (G_ii + G_jj - 2 G_ij) for near pairs, else 0.
struct AngleSideMatrices {
  at::Tensor gram, inv_norm, norm_active, d2_fix;
};

// Fills inv_norm, norm_active and d2_fix from gram and the centred rows (N x D float64).
using AnglePairPass = void (*)(const at::Tensor& centred, AngleSideMatrices& side);

// The N x N float64 matrices of one side that the triple loop accumulates (csrc/rkd_angle.h),
// for g_ijk = SmoothL1'(A^s - A^t) (-g on the teacher; the caller applies grad / N^3):
//   m[j, k] = sum_i g r_ij r_ik,  w[i, j] = sum_k g r_ij r_ik,  p[i, j] = sum_k g A_ijk.
// Undefined tensors when the side needs no gradient.
struct AngleGradAccumulators {
  at::Tensor m, w, p;
};

// Partial sums (float64, any shape) of SmoothL1(A^s_ijk - A^t_ijk) over the triplets whose
// vertex i lies in [start, stop) (0 <= start < stop <= N; all j, k).
using AngleTripletForward = at::Tensor (*)(const AngleSideMatrices& student,
                                           const AngleSideMatrices& teacher, int64_t start,
                                           int64_t stop);
// Accumulates the sums above over the vertices i in [start, stop) only (rows i of w and p
// outside the range stay zero; m sums over those vertices).
using AngleTripletBackward = void (*)(const AngleSideMatrices& student,
                                      const AngleSideMatrices& teacher,
                                      AngleGradAccumulators& grad_student,
                                      AngleGradAccumulators& grad_teacher, int64_t start,
                                      int64_t stop);

struct AngleKernels {
  AnglePairPass pairs;
  AngleTripletForward forward;
  AngleTripletBackward backward;
};

// The loss sum over the triplets whose vertex i lies in [start, stop), divided by N^3
// (the whole loss for [0, N); summed over a partition of the vertices it is the loss):
// a scalar in promote_types(student, teacher, float32). An empty range gives 0. Raises
// ValueError unless 0 <= start <= stop <= N.
at::Tensor angle_loss(const at::Tensor& student, const at::Tensor& teacher,
                      const AngleKernels& kernels, int64_t start, int64_t stop);

// Gradients of angle_loss (same vertex range) with respect to every row of the inputs,
// times grad; an empty (0,) tensor for a side that needs none.
std::tuple<at::Tensor, at::Tensor> angle_loss_backward(const at::Tensor& grad,
                                                       const at::Tensor& student,
                                                       const at::Tensor& teacher,
                                                       bool student_grad, bool teacher_grad,
                                                       const AngleKernels& kernels, int64_t start,
                                                       int64_t stop);

// Raises ValueError (TORCH_CHECK_VALUE) unless 0 <= start <= stop <= n.
void check_vertex_range(int64_t start, int64_t stop, int64_t n);

// The whole angle loss (all vertices) and its gradients from features formed once by the
// caller (the combined RKD op, csrc/rkd_loss_op.h), in float64: the loss is a float64 scalar,
// the gradients float64 N x D (undefined for a side that needs none), times grad.
at::Tensor angle_loss_from(const RkdFeatures& student, const RkdFeatures& teacher,
                           const AngleKernels& kernels);

std::tuple<at::Tensor, at::Tensor> angle_loss_backward_from(const at::Tensor& grad,
                                                            const RkdFeatures& student,
                                                            const RkdFeatures& teacher,
                                                            bool student_grad, bool teacher_grad,
                                                            const AngleKernels& kernels);

}  // namespace kdfast::rkd

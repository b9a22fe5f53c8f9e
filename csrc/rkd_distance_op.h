// The RKD distance op on ATen (device-generic): centring, the float64 Gram GEMMs, the
// loss reductions and the GEMM back to the features. The per-pair passes are device
// kernels (csrc/cpu/rkd_distance.cpp, csrc/cuda/rkd_distance.cu) handed in as functions.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "rkd_features.h"

namespace kdfast::rkd {

// dist[i, j] = pair distance from the Gram matrix `gram` (N x N, float64, contiguous);
// dist[i, i] = 0.
using PairForward = void (*)(const at::Tensor& gram, at::Tensor& dist);
// grad_d2[i, j] = dL/dD2_ij from grad_dist = dL/dD_ij; zero on the diagonal.
using PairBackward = void (*)(const at::Tensor& gram, const at::Tensor& grad_dist,
                              at::Tensor& grad_d2);

at::Tensor distance_loss(const at::Tensor& student, const at::Tensor& teacher,
                         PairForward forward);

std::tuple<at::Tensor, at::Tensor> distance_loss_backward(
    const at::Tensor& grad, const at::Tensor& student, const at::Tensor& teacher,
    bool student_grad, bool teacher_grad, PairForward forward, PairBackward backward);

// The same loss and gradients from features formed once by the caller (the combined RKD op,
// csrc/rkd_loss_op.h), in float64: the loss is a float64 scalar, the gradients float64 N x D
// (undefined for a side that needs none), times grad (a scalar).
at::Tensor distance_loss_from(const RkdFeatures& student, const RkdFeatures& teacher,
                              PairForward forward);

std::tuple<at::Tensor, at::Tensor> distance_loss_backward_from(
    const at::Tensor& grad, const RkdFeatures& student, const RkdFeatures& teacher,
    bool student_grad, bool teacher_grad, PairForward forward, PairBackward backward);

}  // namespace kdfast::rkd

// The combined RKD op (RKDLoss with both terms, semantics 1.4) on ATen (device-generic):
// distance_weight * L_D + angle_weight * L_A with each side's centred float64 Gram matrix
// formed once (csrc/rkd_features.h) and shared by both terms. The forward can return the two
// Gram matrices (O(N^2) each) for the backward to reuse; then one training step forms each
// side's Gram matrix once (the separate ops form it four times: two terms, forward and
// backward). The per-pair and triple-loop passes are the device kernels of the two ops.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "rkd_angle_op.h"
#include "rkd_distance_op.h"

namespace kdfast::rkd {

struct RkdLossKernels {
  PairForward distance_forward;
  PairBackward distance_backward;
  AngleKernels angle;
};

// (loss, gram_s, gram_t): the loss a scalar in promote_types(student, teacher, float32),
// summed in float64; gram_* each side's N x N float64 Gram matrix when save_gram, else empty
// (0,) tensors. A term whose weight is 0 is skipped. Raises ValueError for N < 3 (N < 2 when
// angle_weight is 0) or negative / non-finite weights.
std::tuple<at::Tensor, at::Tensor, at::Tensor> rkd_loss(const at::Tensor& student,
                                                        const at::Tensor& teacher,
                                                        double distance_weight,
                                                        double angle_weight, bool save_gram,
                                                        const RkdLossKernels& kernels);

// Gradients of the loss times grad, in the inputs' dtypes (an empty (0,) tensor for a side
// that needs none). gram_s / gram_t: the forward's saved Gram matrices, or empty tensors
// (then they are formed again).
std::tuple<at::Tensor, at::Tensor> rkd_loss_backward(
    const at::Tensor& grad, const at::Tensor& student, const at::Tensor& teacher,
    const at::Tensor& gram_s, const at::Tensor& gram_t, double distance_weight,
    double angle_weight, bool student_grad, bool teacher_grad, const RkdLossKernels& kernels);

}  // namespace kdfast::rkd

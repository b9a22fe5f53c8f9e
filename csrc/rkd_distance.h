// Per-pair math of the RKD distance loss from a Gram matrix (semantics 1.1, 1.2, 1.5).
// Shared by csrc/cpu/rkd_distance.cpp and csrc/cuda/rkd_distance.cu.
#pragma once

#include <cmath>

#include "macros.h"

namespace kdfast::rkd {

// Distances are clamped below at sqrt(1e-12) = 1e-6 (semantics 1.1).
constexpr double kMinSquaredDistance = 1e-12;
// A pair is degenerate when D2 <= 64 u (G_ii + G_jj) (semantics 1.5). Every such pair is also
// near (csrc/rkd_exact.h) and the op replaces its distance with the direct one: overall only
// exact duplicates are degenerate.
constexpr double kDegenerateFactor = 64.0;

// Distance of the pair (i, j), i != j, from the entries of the centred Gram matrix.
// `active` is false when no gradient flows through the pair: clamped or degenerate
// (a degenerate pair's difference vector is treated as exactly zero). NaN propagates,
// to the distance and to the gradient.
template <typename acc_t>
KDFAST_HOST_DEVICE acc_t pair_distance(acc_t g_ii, acc_t g_jj, acc_t g_ij, acc_t unit_roundoff,
                                       bool& active) {
  const acc_t d2 = g_ii + g_jj - acc_t(2) * g_ij;
  const bool degenerate = d2 <= acc_t(kDegenerateFactor) * unit_roundoff * (g_ii + g_jj);
  const bool is_nan = d2 != d2;
  active = is_nan || (!degenerate && d2 > acc_t(kMinSquaredDistance));
  return active ? sqrt(d2) : sqrt(acc_t(kMinSquaredDistance));
}

// dL/dD2 of a pair from dL/dD: D = sqrt(D2), so dD/dD2 = 1 / (2 D); zero when inactive.
template <typename acc_t>
KDFAST_HOST_DEVICE acc_t pair_distance_backward(acc_t grad_distance, acc_t distance,
                                                bool active) {
  return active ? grad_distance / (acc_t(2) * distance) : acc_t(0);
}

}  // namespace kdfast::rkd

// Per-element math of the fused DIST loss (semantics 2), shared by csrc/cpu/dist_loss.cpp (and
// any device kernel).
//
// rho(a, b) = <a, b> / (|a| |b| + eps) on centred vectors a, b (a row across classes, or a
// column across kept rows). From the centred sums Saa = |a|^2, Sbb, Sab:
//   drho/da = b / D - k_a a,  k_a = Sab |b| / (|a| D^2)  (0 when |a| = 0, as torch's norm
//   backward),  D = |a| |b| + eps; symmetrically for b. Centring needs no extra term: both
//   pieces already have zero mean, provided the means are exact where it matters: a
//   constant column has |b| = 0 and D = eps, so its b must be exactly 0 (the CPU kernel's
//   column moments are exact for constant columns, csrc/cpu/dist_loss.cpp).
// Loss = beta s (1 - mean_rows rho) + gamma s (1 - mean_cols rho), s = temperature^2 or 1; the
// gradient with respect to y = act(z / temperature) goes through the softmax Jacobian
// dz = y (g - <g, y>) / temperature, or through the sigmoid's y (1 - y) / temperature.
#pragma once

#include <cmath>

#include "macros.h"

namespace kdfast::dist {

constexpr double kCosineEps = 1e-8;

template <typename acc_t>
struct Pearson {
  acc_t rho, inv_d, k_a, k_b;
};

template <typename acc_t>
KDFAST_HOST_DEVICE Pearson<acc_t> pearson(acc_t saa, acc_t sbb, acc_t sab) {
  const acc_t na = sqrt(saa), nb = sqrt(sbb);
  const acc_t d = na * nb + acc_t(kCosineEps);
  const acc_t inv_d = acc_t(1) / d;
  Pearson<acc_t> p;
  p.rho = sab * inv_d;
  p.inv_d = inv_d;
  p.k_a = na > acc_t(0) ? sab * nb / na * inv_d * inv_d : acc_t(0);
  p.k_b = nb > acc_t(0) ? sab * na / nb * inv_d * inv_d : acc_t(0);
  return p;
}

// Chan, Golub, LeVeque: merge (count nb, means, centred second moments and co-moment) of a
// block into (na, ...). Counts are per block (every column of a block has the same count).
template <typename acc_t>
KDFAST_HOST_DEVICE void merge_moments(acc_t na, acc_t nb, acc_t& mean_x, acc_t& mean_y,
                                      acc_t& m2x, acc_t& m2y, acc_t& cxy, acc_t b_mean_x,
                                      acc_t b_mean_y, acc_t b_m2x, acc_t b_m2y, acc_t b_cxy) {
  const acc_t n = na + nb;
  const acc_t dx = b_mean_x - mean_x, dy = b_mean_y - mean_y;
  const acc_t w = na * nb / n;
  mean_x += dx * (nb / n);
  mean_y += dy * (nb / n);
  m2x += b_m2x + dx * dx * w;
  m2y += b_m2y + dy * dy * w;
  cxy += b_cxy + dx * dy * w;
}

}  // namespace kdfast::dist

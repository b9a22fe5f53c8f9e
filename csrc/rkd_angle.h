// Per-pair and per-triplet math of the RKD angle loss from a Gram matrix (semantics 1.3, 1.5).
// Shared by csrc/cpu/rkd_angle.cpp and csrc/cuda/rkd_angle.cu.
//
// With G the Gram matrix of the centred rows and vertex i:
//   C_ijk = <x_j - x_i, x_k - x_i> = G_jk - G_ij - G_ik + G_ii,
//   D2_ij = ||x_j - x_i||^2 = G_ii + G_jj - 2 G_ij,
//   A_ijk = C_ijk r_ij r_ik with r_ij = 1 / max(sqrt(D2_ij), 1e-12) (F.normalize), and
//   r_ij = 0 for j = i and for a degenerate pair (its e_ij is exactly zero).
// For near pairs D2_ij (and C_ijj = D2_ij) come from the rows (kNearFactor); the gradient
// formulas below are unchanged (the same function of G, evaluated more accurately). Vertices
// with a closer pair (csrc/rkd_exact.h) have their rows of r zeroed by the op and are
// computed from direct differences instead; so the degenerate test below only ever meets
// pairs of such vertices, and only exact duplicates are degenerate overall.
// Loss: mean over N^3 triplets of SmoothL1(A^s - A^t). With g_ijk = dL/dA_ijk (symmetric
// in j, k) the gradient with respect to G (G_ab treated as independent entries) is
//   dG_jk += g r_ij r_ik,   dG_ij -= 2 sum_k g r_ij r_ik,   dG_ii += sum_jk g r_ij r_ik,
//   and through the norms h_ij = dL/dD2_ij = -r_ij^2 sum_k g_ijk A_ijk (zero when the norm
//   is clamped or the pair degenerate): dG_ii += h_ij, dG_jj += h_ij, dG_ij -= 2 h_ij.
#pragma once

#include <cmath>
#include <cstdint>

#include "macros.h"

namespace kdfast::rkd {

// F.normalize's floor of the norm.
constexpr double kMinNorm = 1e-12;
// A pair is degenerate when D2 <= 64 u (G_ii + G_jj) (semantics 1.5).
constexpr double kAngleDegenerateFactor = 64.0;
// A pair is near when D2 <= 1e-5 (G_ii + G_jj): the Gram expansion's D2 would carry a
// relative error of about 4 u / 1e-5, so its D2 is recomputed from the centred rows
// (O(D) per near pair). Elsewhere the Gram D2 is accurate to ~4e-11; the cosines'
// numerators need no correction (their error is ~u |G| / (|x_j - x_i| |x_k - x_i|)).
constexpr double kNearFactor = 1e-5;

template <typename acc_t>
KDFAST_HOST_DEVICE bool pair_is_near(acc_t d2, acc_t diag_sum) {
  return d2 <= acc_t(kNearFactor) * diag_sum;
}

// r_ij = 1 / max(||x_j - x_i||, 1e-12) of the pair (i, j), i != j, from its squared
// distance d2 and G_ii + G_jj; 0 for a degenerate pair. `norm_active` is true when the
// gradient flows through the norm (neither degenerate nor clamped). NaN propagates.
template <typename acc_t>
KDFAST_HOST_DEVICE acc_t pair_inverse_norm(acc_t d2, acc_t diag_sum, acc_t unit_roundoff,
                                           bool& norm_active) {
  norm_active = false;
  if (d2 != d2) return d2;
  if (d2 <= acc_t(kAngleDegenerateFactor) * unit_roundoff * diag_sum) return acc_t(0);
  const acc_t norm = sqrt(d2);
  if (norm > acc_t(kMinNorm)) {
    norm_active = true;
    return acc_t(1) / norm;
  }
  return acc_t(1) / acc_t(kMinNorm);
}

// A_ijk from G_jk, G_ij, G_ik, G_ii and the inverse norms r_ij, r_ik. `fix` is
// D2_ij - (G_ii + G_jj - 2 G_ij) for k = j of a near pair (so that C_ijj = D2_ij), else 0.
template <typename acc_t>
KDFAST_HOST_DEVICE acc_t triplet_cosine(acc_t g_jk, acc_t g_ij, acc_t g_ik, acc_t g_ii, acc_t fix,
                                        acc_t r_ij, acc_t r_ik) {
  return (((g_jk - g_ij) - (g_ik - g_ii)) + fix) * r_ij * r_ik;
}

// SmoothL1 with beta = 1.
template <typename acc_t>
KDFAST_HOST_DEVICE acc_t smooth_l1(acc_t d) {
  const acc_t a = fabs(d);
  return a < acc_t(1) ? acc_t(0.5) * d * d : a - acc_t(0.5);
}

// SmoothL1' = clamp(d, -1, 1) (NaN propagates).
template <typename acc_t>
KDFAST_HOST_DEVICE acc_t smooth_l1_grad(acc_t d) {
  return d > acc_t(1) ? acc_t(1) : (d < acc_t(-1) ? acc_t(-1) : d);
}

// Pair (i, j) of one side: r_ij (inverse norm), whether the gradient flows through it, and
// the D2 correction `fix` (D2 recomputed from the rows x (N x dim) for a near pair, where
// the Gram expansion cancels). g is the N x N centred Gram matrix, row-major.
template <typename acc_t>
KDFAST_HOST_DEVICE void pair_entry(const acc_t* g, const acc_t* x, int64_t n, int64_t dim,
                                   int64_t i, int64_t j, acc_t unit_roundoff, acc_t& r,
                                   acc_t& active, acc_t& fix) {
  const int64_t ij = i * n + j;
  const acc_t diag_sum = g[i * n + i] + g[j * n + j];
  const acc_t gram_d2 = diag_sum - acc_t(2) * g[ij];
  acc_t d2 = gram_d2;
  if (i != j && pair_is_near(gram_d2, diag_sum)) {
    d2 = acc_t(0);
    for (int64_t d = 0; d < dim; ++d) {
      const acc_t v = x[j * dim + d] - x[i * dim + d];
      d2 += v * v;
    }
  }
  bool flows = false;
  r = i == j ? acc_t(0) : pair_inverse_norm(d2, diag_sum, unit_roundoff, flows);
  active = flows ? acc_t(1) : acc_t(0);
  fix = i == j ? acc_t(0) : d2 - gram_d2;
}

}  // namespace kdfast::rkd

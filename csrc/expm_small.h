// The fused per-matrix exponential for small matrices (n <= kMaxN): norm estimates, degree
// and scaling choice, Pade evaluation with an LU with partial pivoting, squarings, and the
// joint Frechet derivative, exactly as kdfast/reference/expm.py does for one matrix.
//
// Host and device: every routine takes a Team, the threads that share one matrix. The CPU
// kernel (csrc/cpu/expm_small.cpp) runs it with SerialTeam, one matrix per task of
// at::parallel_for, so the CPU tests cover this math; the CUDA kernel
// (csrc/cuda/expm_small.cu) with the threads of one block. Scalar decisions (norms, m, s,
// pivots) are computed redundantly by every thread from shared data, so no broadcast is
// needed. Matrices live in a per-matrix workspace of kSlots n x n slots (L1/L2-resident).
#pragma once

#include <math.h>
#include <stdint.h>

#include "expm.h"
#include "macros.h"

namespace kdfast::expm::small {

constexpr int kMaxN = 32;  // the fused kernel's size limit (kdfast/ops/expm.py: SMALL_N)

enum Slot { kX, kP2, kP4, kP6, kP8, kP10, kU, kV, kW1, kW, kZ1, kR, kTmp, kTmp2, kF, kM2, kM4,
            kM6, kM8, kLu, kLv, kL, kLuf, kSlots };
constexpr int kScalars = kMaxN;  // column sums

KDFAST_HOST_DEVICE int64_t workspace_size(int n) {
  return static_cast<int64_t>(kSlots) * n * n + kScalars;
}

struct SerialTeam {
  KDFAST_HOST_DEVICE int64_t rank() const { return 0; }
  KDFAST_HOST_DEVICE int64_t size() const { return 1; }
  KDFAST_HOST_DEVICE void sync() const {}
};

// max that propagates NaN (as torch.maximum)
KDFAST_HOST_DEVICE double max_nan(double a, double b) { return (a > b || a != a) ? a : b; }
KDFAST_HOST_DEVICE double min_nan(double a, double b) { return (a < b || a != a) ? a : b; }
KDFAST_HOST_DEVICE bool finite(double x) { return x - x == 0.0; }

// C = A B (+ C when accumulate); C must not alias A or B.
template <typename T, typename Team>
KDFAST_HOST_DEVICE void matmul(const Team& team, int64_t n, const T* A, const T* B, T* C,
                               bool accumulate) {
  if (team.size() == 1) {  // i-k-j order: the inner loop vectorises
    for (int64_t i = 0; i < n; ++i) {
      T* c = C + i * n;
      if (!accumulate) {
        for (int64_t j = 0; j < n; ++j) c[j] = T(0);
      }
      for (int64_t k = 0; k < n; ++k) {
        const T a = A[i * n + k];
        const T* b = B + k * n;
        for (int64_t j = 0; j < n; ++j) c[j] += a * b[j];
      }
    }
  } else {
    for (int64_t idx = team.rank(); idx < n * n; idx += team.size()) {
      const int64_t i = idx / n, j = idx % n;
      T acc = accumulate ? C[idx] : T(0);
      for (int64_t k = 0; k < n; ++k) acc += A[i * n + k] * B[k * n + j];
      C[idx] = acc;
    }
  }
  team.sync();
}

// out (+)= sum_i coef[i] mats[i] + eye_coef I (count >= 1).
template <typename T, typename Team>
KDFAST_HOST_DEVICE void combine(const Team& team, int64_t n, T* out, int64_t count,
                                const T* const* mats, const double* coef, double eye_coef,
                                bool accumulate) {
  for (int64_t idx = team.rank(); idx < n * n; idx += team.size()) {
    T acc = T(coef[0]) * mats[0][idx];  // summed as the reference does, then added
    for (int64_t i = 1; i < count; ++i) acc += T(coef[i]) * mats[i][idx];
    if (idx % (n + 1) == 0) acc += T(eye_coef);
    out[idx] = accumulate ? out[idx] + acc : acc;
  }
  team.sync();
}

// X *= factor, `times` times (a power of two whose `times`-th power may overflow alone).
template <typename T, typename Team>
KDFAST_HOST_DEVICE void scale(const Team& team, int64_t n, T* X, T factor, int times) {
  for (int64_t idx = team.rank(); idx < n * n; idx += team.size()) {
    T x = X[idx];
    for (int64_t i = 0; i < times; ++i) x *= factor;
    X[idx] = x;
  }
  team.sync();
}

template <typename T, typename Team>
KDFAST_HOST_DEVICE double onenorm(const Team& team, int64_t n, const T* X, T* sums) {
  for (int64_t j = team.rank(); j < n; j += team.size()) {
    double acc = 0;
    for (int64_t i = 0; i < n; ++i) acc += X[i * n + j] < 0 ? -double(X[i * n + j]) : X[i * n + j];
    sums[j] = T(acc);
  }
  team.sync();
  double norm = 0;
  for (int64_t j = 0; j < n; ++j) norm = max_nan(double(sums[j]), norm);
  team.sync();  // sums is reused next
  return norm;
}

// Unclamped ell(A, m) of Al-Mohy-Higham 2009 for every degree index (see the reference):
// v = 1^T B^p with B = |A0| / ||A0||_1, in two vectors of the `vec` slot.
template <typename T, typename Team>
KDFAST_HOST_DEVICE void rounding_check(const Team& team, int64_t n, const T* A0, double t,
                                       double norm0, T* vec, bool is_double, double* ell) {
  const double inv = norm0 > 0 ? 1.0 / norm0 : 1.0;
  T* v = vec;
  T* w = vec + n;
  for (int64_t j = team.rank(); j < n; j += team.size()) v[j] = T(1);
  team.sync();
  const double log2_norm = t + log2(norm0);
  int64_t p = 0;
  for (int64_t i = 0; i < num_degrees(is_double); ++i) {
    const int m = degree(i);
    for (; p < 2 * m + 1; ++p) {
      for (int64_t j = team.rank(); j < n; j += team.size()) {
        T acc = 0;
        for (int64_t k = 0; k < n; ++k) {
          const T a = A0[k * n + j];
          acc += v[k] * (a < 0 ? -a : a) * T(inv);
        }
        w[j] = acc;
      }
      team.sync();
      T* swap = v;
      v = w;
      w = swap;
    }
    double vmax = 0;
    for (int64_t j = 0; j < n; ++j) vmax = max_nan(double(v[j]), vmax);
    const double log2_alpha = 2.0 * m * log2_norm + log2(vmax) - log2(error_coeff(i));
    ell[i] = ceil((log2_alpha - log2_unit_roundoff(is_double)) / (2.0 * m));
  }
  team.sync();
}

// In-place LU with partial pivoting of a (n x n); piv[k] = row swapped with k.
template <typename T, typename Team>
KDFAST_HOST_DEVICE void lu_factor(const Team& team, int64_t n, T* a, int64_t* piv) {
  for (int64_t k = 0; k < n; ++k) {
    int64_t p = k;
    T best = a[k * n + k] < 0 ? -a[k * n + k] : a[k * n + k];
    for (int64_t i = k + 1; i < n; ++i) {
      const T v = a[i * n + k] < 0 ? -a[i * n + k] : a[i * n + k];
      if (v > best) best = v, p = i;
    }
    piv[k] = p;
    // every thread must have read column k before one of them swaps its entries: a thread
    // that searched the swapped column would choose another pivot (and permutation)
    team.sync();
    if (p != k) {
      for (int64_t j = team.rank(); j < n; j += team.size()) {
        const T x = a[k * n + j];
        a[k * n + j] = a[p * n + j];
        a[p * n + j] = x;
      }
    }
    team.sync();
    const T pivot = a[k * n + k];
    for (int64_t i = k + 1 + team.rank(); i < n; i += team.size()) a[i * n + k] /= pivot;
    team.sync();
    const int64_t rest = n - k - 1;
    for (int64_t idx = team.rank(); idx < rest * rest; idx += team.size()) {
      const int64_t i = k + 1 + idx / rest, j = k + 1 + idx % rest;
      a[i * n + j] -= a[i * n + k] * a[k * n + j];
    }
    team.sync();
  }
}

// b <- (LU)^-1 P b for the n columns of b, one column per thread.
template <typename T, typename Team>
KDFAST_HOST_DEVICE void lu_solve(const Team& team, int64_t n, const T* a, const int64_t* piv,
                                T* b) {
  for (int64_t c = team.rank(); c < n; c += team.size()) {
    for (int64_t k = 0; k < n; ++k) {
      if (piv[k] != k) {
        const T x = b[k * n + c];
        b[k * n + c] = b[piv[k] * n + c];
        b[piv[k] * n + c] = x;
      }
    }
    for (int64_t i = 1; i < n; ++i) {
      T acc = b[i * n + c];
      for (int64_t k = 0; k < i; ++k) acc -= a[i * n + k] * b[k * n + c];
      b[i * n + c] = acc;
    }
    for (int64_t i = n - 1; i >= 0; --i) {
      T acc = b[i * n + c];
      for (int64_t k = i + 1; k < n; ++k) acc -= a[i * n + k] * b[k * n + c];
      b[i * n + c] = acc / a[i * n + i];
    }
  }
  team.sync();
}

// Per-matrix degree (returned) and scaling s from the estimates (reference: _choose).
KDFAST_HOST_DEVICE int choose(const double* log2_d, const double* excess, bool skew,
                              bool frechet, bool is_double, double& s) {
  const int degrees = num_degrees(is_double), top = degrees - 1;
  double eta[5];
  const double eta46 = max_nan(log2_d[4], log2_d[6]);
  for (int64_t i = 0; i < degrees; ++i) eta[i] = eta46;
  if (!skew) {
    const double eta68 = max_nan(log2_d[6], log2_d[8]);
    for (int64_t i = 2; i < degrees; ++i) eta[i] = eta68;
    if (is_double) eta[top] = min_nan(eta68, max_nan(log2_d[8], log2_d[10]));
  }
  s = max_nan(ceil(eta[top] - log2(threshold(is_double, frechet, top))), 0.0);
  if (excess) s = s + max_nan(excess[top] - s, 0.0);
  int m = degree(top);
  for (int64_t i = top - 1; i >= 0; --i) {
    const bool ok = eta[i] <= log2(threshold(is_double, frechet, i)) &&
                    (excess == nullptr || excess[i] <= 0);
    if (ok) m = degree(i), s = 0;
  }
  if (!finite(s)) s = 0;  // NaN/Inf input: no squarings, NaN out
  return m;
}

// exp(A) into R and, when E is given, L(A, E) into L; A, E, R, L contiguous n x n.
template <typename T, typename Team>
KDFAST_HOST_DEVICE void expm_one(const Team& team, int64_t n, bool skew, const T* A, const T* E,
                                 T* R_out, T* L_out, T* work) {
  const bool is_double = sizeof(T) == 8, frechet = E != nullptr;
  const int64_t nn = n * n;
  const auto slot = [&](int k) { return work + static_cast<int64_t>(k) * nn; };
  T* sums = slot(kSlots);
  T *X = slot(kX), *P[11] = {nullptr, nullptr, slot(kP2), nullptr, slot(kP4), nullptr,
                             slot(kP6), nullptr, slot(kP8), nullptr, slot(kP10)};
  for (int64_t idx = team.rank(); idx < nn; idx += team.size()) X[idx] = A[idx];
  team.sync();
  // A0 = 2^-t A with ||A0||_1 <= 1: its powers cannot overflow
  const double norm = onenorm(team, n, X, sums);
  double t = ceil(log2(norm));
  t = finite(t) ? max_nan(t, 0.0) : 0.0;
  scale(team, n, X, T(exp2(-t)), 1);
  matmul(team, n, X, X, P[2], false);
  matmul(team, n, P[2], P[2], P[4], false);
  matmul(team, n, P[4], P[2], P[6], false);
  if (!skew) matmul(team, n, P[4], P[4], P[8], false);
  if (!skew && is_double) matmul(team, n, P[4], P[6], P[10], false);
  double log2_d[11];
  for (int64_t p = 4; p <= 10; p += 2) {
    if (p == 10 && !(is_double && !skew)) continue;
    if (p == 8 && skew) continue;
    log2_d[p] = t + log2(onenorm(team, n, P[p], sums)) / p;
  }
  double excess[5];
  const bool check = !skew && !frechet;
  if (check) rounding_check(team, n, X, t, onenorm(team, n, X, sums), slot(kTmp), is_double,
                            excess);
  double s;
  const int64_t m = choose(log2_d, check ? excess : nullptr, skew, frechet, is_double, s);
  // X = 2^(t - s) A0 and its powers
  const T c = T(exp2(t - s));
  scale(team, n, X, c, 1);
  for (int64_t p = 2; p < (m < 13 ? m : 7); p += 2) {
    if (p == 8 && skew) {
      matmul(team, n, P[4], P[4], P[8], false);
    } else {
      scale(team, n, P[p], c, p);
    }
  }
  T *U = slot(kU), *V = slot(kV), *W = slot(kW), *R = slot(kR), *L = slot(kL);
  T *F = slot(kF), *Lu = slot(kLu), *Lv = slot(kLv), *Tmp = slot(kTmp), *Tmp2 = slot(kTmp2);
  T* M[9] = {nullptr, nullptr, slot(kM2), nullptr, slot(kM4), nullptr, slot(kM6), nullptr,
             slot(kM8)};
  if (frechet) {
    const T f = T(exp2(-s));
    for (int64_t idx = team.rank(); idx < nn; idx += team.size()) F[idx] = E[idx] * f;
    team.sync();
    matmul(team, n, X, F, M[2], false);
    matmul(team, n, F, X, M[2], true);
    for (int64_t p = 4; p < (m < 13 ? m : 7); p += 2) {
      matmul(team, n, P[p - 2], M[2], M[p], false);
      matmul(team, n, M[p - 2], P[2], M[p], true);
    }
  }
  const T* mats[6];
  double coef[6];
  const auto b = [&](int j) { return pade_coeff(m, j); };
  if (m == 13) {  // Higham 2005: U = X [A6 W1 + ...], V = A6 Z1 + ...
    T *W1 = slot(kW1), *Z1 = slot(kZ1);
    const T* even[3] = {P[6], P[4], P[2]};
    coef[0] = b(13), coef[1] = b(11), coef[2] = b(9);
    combine(team, n, W1, 3, even, coef, 0.0, false);
    matmul(team, n, P[6], W1, W, false);
    coef[0] = b(7), coef[1] = b(5), coef[2] = b(3);
    combine(team, n, W, 3, even, coef, b(1), true);
    matmul(team, n, X, W, U, false);
    coef[0] = b(12), coef[1] = b(10), coef[2] = b(8);
    combine(team, n, Z1, 3, even, coef, 0.0, false);
    matmul(team, n, P[6], Z1, V, false);
    coef[0] = b(6), coef[1] = b(4), coef[2] = b(2);
    combine(team, n, V, 3, even, coef, b(0), true);
    if (frechet) {
      const T* dev[3] = {M[6], M[4], M[2]};
      coef[0] = b(13), coef[1] = b(11), coef[2] = b(9);
      combine(team, n, Tmp, 3, dev, coef, 0.0, false);
      matmul(team, n, P[6], Tmp, Tmp2, false);
      matmul(team, n, M[6], W1, Tmp2, true);
      coef[0] = b(7), coef[1] = b(5), coef[2] = b(3);
      combine(team, n, Tmp2, 3, dev, coef, 0.0, true);
      matmul(team, n, X, Tmp2, Lu, false);
      matmul(team, n, F, W, Lu, true);
      coef[0] = b(12), coef[1] = b(10), coef[2] = b(8);
      combine(team, n, Tmp, 3, dev, coef, 0.0, false);
      matmul(team, n, P[6], Tmp, Lv, false);
      matmul(team, n, M[6], Z1, Lv, true);
      coef[0] = b(6), coef[1] = b(4), coef[2] = b(2);
      combine(team, n, Lv, 3, dev, coef, 0.0, true);
    }
  } else {  // U = X sum_{odd j} b_j X^(j-1), V = sum_{even j} b_j X^j
    int64_t count = 0;
    for (int64_t j = m; j >= 3; j -= 2) mats[count] = P[j - 1], coef[count++] = b(j);
    combine(team, n, W, count, mats, coef, b(1), false);
    matmul(team, n, X, W, U, false);
    count = 0;
    for (int64_t j = m - 1; j >= 2; j -= 2) mats[count] = P[j], coef[count++] = b(j);
    combine(team, n, V, count, mats, coef, b(0), false);
    if (frechet) {
      count = 0;
      for (int64_t j = m; j >= 3; j -= 2) mats[count] = M[j - 1], coef[count++] = b(j);
      combine(team, n, Tmp, count, mats, coef, 0.0, false);
      matmul(team, n, X, Tmp, Lu, false);
      matmul(team, n, F, W, Lu, true);
      count = 0;
      for (int64_t j = m - 1; j >= 2; j -= 2) mats[count] = M[j], coef[count++] = b(j);
      combine(team, n, Lv, count, mats, coef, 0.0, false);
    }
  }
  // r_m = (V - U)^-1 (V + U); its derivative from (V - U) R = V + U
  T* Luf = slot(kLuf);
  for (int64_t idx = team.rank(); idx < nn; idx += team.size()) {
    Luf[idx] = V[idx] - U[idx];
    R[idx] = V[idx] + U[idx];
  }
  team.sync();
  int64_t piv[kMaxN] = {};
  lu_factor(team, n, Luf, piv);
  lu_solve(team, n, Luf, piv, R);
  if (frechet) {
    for (int64_t idx = team.rank(); idx < nn; idx += team.size()) {
      Tmp[idx] = Lu[idx] - Lv[idx];
      L[idx] = Lu[idx] + Lv[idx];
    }
    team.sync();
    matmul(team, n, Tmp, R, L, true);
    lu_solve(team, n, Luf, piv, L);
  }
  for (int64_t k = 0; k < static_cast<int>(s); ++k) {  // s squarings
    matmul(team, n, R, R, Tmp, false);
    if (frechet) {
      matmul(team, n, R, L, Tmp2, false);
      matmul(team, n, L, R, Tmp2, true);
      T* swap = L;
      L = Tmp2;
      Tmp2 = swap;
    }
    T* swap = R;
    R = Tmp;
    Tmp = swap;
  }
  for (int64_t idx = team.rank(); idx < nn; idx += team.size()) {
    R_out[idx] = R[idx];
    if (frechet) L_out[idx] = L[idx];
  }
  team.sync();
}

}  // namespace kdfast::expm::small

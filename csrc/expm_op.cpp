// Batched Pade scaling and squaring on ATen (device-generic), a step-by-step port of
// kdfast/reference/expm.py. Each matrix gets its own degree m and scaling s: matrices are
// grouped by degree (one host synchronisation per call for the grouping, one for the
// number of squarings, none per matrix) and squared under a per-matrix mask.
#include "expm_op.h"

#include <array>
#include <cmath>
#include <optional>
#include <vector>

#include <torch/library.h>

#include "expm.h"

namespace kdfast::expm {
namespace {

using at::Tensor;
using Powers = std::array<Tensor, 14>;  // X^p at index p (undefined when absent)

Tensor onenorm(const Tensor& X) { return X.abs().sum(-2).amax(-1); }

// A0 = 2^-t A with integer t >= 0 and ||A0||_1 <= 1 (its powers cannot overflow).
std::pair<Tensor, Tensor> prescale(const Tensor& A) {
  Tensor t = at::log2(onenorm(A)).ceil().clamp_min(0);
  t = at::nan_to_num(t, 0.0, 0.0);  // NaN/Inf input: propagate, do not scale
  return {A * at::exp2(-t).unsqueeze(-1).unsqueeze(-1), t};
}

Powers estimate_powers(const Tensor& A0, bool skew, bool is_double) {
  Powers P;
  P[2] = at::matmul(A0, A0);
  P[4] = at::matmul(P[2], P[2]);
  P[6] = at::matmul(P[4], P[2]);
  if (!skew) {
    P[8] = at::matmul(P[4], P[4]);
    if (is_double) P[10] = at::matmul(P[4], P[6]);
  }
  return P;
}

// Unclamped ell(A, m) of Al-Mohy-Higham 2009 per degree index (see the reference).
std::vector<Tensor> rounding_check(const Tensor& A0, const Tensor& t, int degrees,
                                   bool is_double) {
  const Tensor norm = onenorm(A0);
  const Tensor B = A0.abs() / at::where(norm > 0, norm, 1.0).unsqueeze(-1).unsqueeze(-1);
  Tensor v = at::ones_like(A0.narrow(-2, 0, 1));
  const Tensor log2_norm = t + at::log2(norm);
  std::vector<Tensor> ell;
  int p = 0;
  for (int i = 0; i < degrees; ++i) {
    const int m = degree(i);
    for (; p < 2 * m + 1; ++p) v = at::matmul(v, B);
    const Tensor log2_alpha = 2.0 * m * log2_norm + at::log2(v.amax(-1).select(-1, 0)) -
                              std::log2(error_coeff(i));
    ell.push_back(at::ceil((log2_alpha - log2_unit_roundoff(is_double)) / (2.0 * m)));
  }
  return ell;
}

// Per-matrix degree m and scaling s as int64 (N,) tensors (Al-Mohy-Higham 2009, as SciPy).
std::pair<Tensor, Tensor> choose(const Tensor& A0, const Tensor& t, const Powers& P, bool skew,
                                 bool frechet, bool is_double) {
  const int degrees = num_degrees(is_double);
  const int top = degrees - 1;
  std::array<Tensor, 11> log2_d;
  for (int p = 2; p <= 10; p += 2) {
    if (P[p].defined()) log2_d[p] = t + at::log2(onenorm(P[p])) / static_cast<double>(p);
  }
  const Tensor eta46 = at::maximum(log2_d[4], log2_d[6]);
  std::vector<Tensor> eta(degrees, eta46);
  std::vector<Tensor> excess;
  if (!skew) {
    const Tensor eta68 = at::maximum(log2_d[6], log2_d[8]);
    for (int i = 2; i < degrees; ++i) eta[i] = eta68;
    // (d8, d10) is a valid pair only for m = 13 (its error series starts at x^27)
    if (is_double) eta[top] = at::minimum(eta68, at::maximum(log2_d[8], log2_d[10]));
    if (!frechet) excess = rounding_check(A0, t, degrees, is_double);
  }
  const auto log2_threshold = [&](int i) { return std::log2(threshold(is_double, frechet, i)); };
  // log2 eta = -inf for a zero (or nilpotent) matrix: s = 0
  Tensor s = at::ceil(eta[top] - log2_threshold(top)).clamp_min(0);
  if (!excess.empty()) s = s + (excess[top] - s).clamp_min(0);  // ell(2^-s A) = ell(A) - s
  Tensor m = at::full_like(s, degree(top));
  for (int i = top - 1; i >= 0; --i) {  // the smallest degree that suffices wins
    Tensor ok = eta[i] <= log2_threshold(i);
    if (!excess.empty()) ok = ok & (excess[i] <= 0);
    m = at::where(ok, static_cast<double>(degree(i)), m);
    s = at::where(ok, 0.0, s);
  }
  s = at::nan_to_num(s, 0.0, 0.0);  // NaN/Inf input: no squarings, NaN out
  return {m.to(at::kLong), s.to(at::kLong)};
}

// X * c^p with c = 2^log2_c per matrix, multiplying p times (c^p may overflow alone).
Tensor times_pow2(Tensor X, const Tensor& log2_c, int p) {
  const Tensor c = at::exp2(log2_c).unsqueeze(-1).unsqueeze(-1);
  for (int i = 0; i < p; ++i) X = X * c;
  return X;
}

// sum_j b_j P[j - shift] over j in js, skipping absent terms; P[0] = I is passed as `eye`.
Tensor comb(int m, const Powers& P, std::initializer_list<int> js, int shift) {
  Tensor out;
  for (int j : js) {
    const Tensor& term = P[j - shift];
    if (!term.defined()) continue;
    out = out.defined() ? out + pade_coeff(m, j) * term : pade_coeff(m, j) * term;
  }
  return out;
}

struct PadeTerms {
  Tensor U, V, Lu, Lv;
};

// U, V with r_m(X) = (V - U)^-1 (V + U); with a direction F also their derivatives.
// pw holds X^p for even p, pw[0] = I; the M_p of X^p follow the product rule.
PadeTerms pade_terms(int m, const Tensor& X, const Powers& pw, const std::optional<Tensor>& F) {
  Powers M;
  if (F) {
    M[2] = at::matmul(X, *F) + at::matmul(*F, X);
    for (int p = 4; p < (m < 13 ? m : 7); p += 2) {
      M[p] = at::matmul(pw[p - 2], M[2]) + at::matmul(M[p - 2], pw[2]);
    }
  }
  PadeTerms r;
  if (m == 13) {  // Higham 2005: 6 matmuls in all (3 for A2, A4, A6; 3 here)
    const Tensor& A6 = pw[6];
    const Tensor W1 = comb(m, pw, {13, 11, 9}, 7), Z1 = comb(m, pw, {12, 10, 8}, 6);
    const Tensor W = at::matmul(A6, W1) + comb(m, pw, {7, 5, 3, 1}, 1);
    r.U = at::matmul(X, W);
    r.V = at::matmul(A6, Z1) + comb(m, pw, {6, 4, 2, 0}, 0);
    if (!F) return r;
    const Tensor Lw = at::matmul(A6, comb(m, M, {13, 11, 9}, 7)) + at::matmul(M[6], W1) +
                      comb(m, M, {7, 5, 3, 1}, 1);
    r.Lu = at::matmul(X, Lw) + at::matmul(*F, W);
    r.Lv = at::matmul(A6, comb(m, M, {12, 10, 8}, 6)) + at::matmul(M[6], Z1) +
           comb(m, M, {6, 4, 2, 0}, 0);
    return r;
  }
  Tensor W, Lw, Lv;  // W = sum_{odd j} b_j X^(j-1), V = sum_{even j} b_j X^j
  for (int j = m; j >= 0; --j) {
    const int shift = j % 2;
    Tensor& acc = shift ? W : r.V;
    acc = acc.defined() ? acc + pade_coeff(m, j) * pw[j - shift]
                        : pade_coeff(m, j) * pw[j - shift];
    if (F && j - shift >= 2) {
      Tensor& lacc = shift ? Lw : Lv;
      lacc = lacc.defined() ? lacc + pade_coeff(m, j) * M[j - shift]
                            : pade_coeff(m, j) * M[j - shift];
    }
  }
  r.U = at::matmul(X, W);
  if (!F) return r;
  r.Lu = Lw.defined() ? at::matmul(X, Lw) + at::matmul(*F, W) : at::matmul(*F, W);
  r.Lv = Lv.defined() ? Lv : at::zeros_like(X);
  return r;
}

std::pair<Tensor, std::optional<Tensor>> scaling_and_squaring(const Tensor& A_in,
                                                              const std::optional<Tensor>& E_in,
                                                              bool skew) {
  TORCH_CHECK(A_in.dim() >= 2 && A_in.size(-1) == A_in.size(-2),
              "expm: A must be (..., n, n), got ", A_in.sizes());
  TORCH_CHECK(A_in.scalar_type() == at::kFloat || A_in.scalar_type() == at::kDouble,
              "expm: A must be float32 or float64, got ", A_in.scalar_type());
  const auto shape = A_in.sizes().vec();
  const int64_t n = A_in.size(-1);
  if (A_in.numel() == 0) {
    Tensor empty = A_in.clone(at::MemoryFormat::Contiguous);
    return {empty, E_in ? std::optional<Tensor>(empty.clone()) : std::nullopt};
  }
  const bool is_double = A_in.scalar_type() == at::kDouble;
  const bool frechet = E_in.has_value();
  auto [A0, t] = prescale(A_in.reshape({-1, n, n}));
  std::optional<Tensor> E;
  if (E_in) E = E_in->reshape({-1, n, n}).to(A_in.scalar_type());
  const Powers powers = estimate_powers(A0, skew, is_double);
  auto [m, s] = choose(A0, t, powers, skew, frechet, is_double);
  const Tensor log2_c = (t - s).to(A0.scalar_type());  // X = 2^-s A = 2^(t - s) A0
  const int64_t batch = A0.size(0);
  const Tensor m_cpu = m.cpu();  // host sync: the grouping by degree
  Tensor R = at::empty_like(A0);
  Tensor L = frechet ? at::empty_like(A0) : Tensor();
  for (int i = 0; i < num_degrees(is_double); ++i) {
    const int deg = degree(i);
    const Tensor idx_cpu = (m_cpu == deg).nonzero().select(1, 0);
    if (idx_cpu.numel() == 0) continue;
    const bool all = idx_cpu.numel() == batch;  // common case: no gather or scatter
    const Tensor idx = idx_cpu.to(A0.device());
    const auto take = [&](const Tensor& x) { return all ? x : x.index_select(0, idx); };
    const Tensor c = take(log2_c);
    Powers pw;
    pw[0] = at::eye(n, A0.options());
    for (int p = 2; p < (deg < 13 ? deg : 7); p += 2) {
      if (powers[p].defined()) pw[p] = times_pow2(take(powers[p]), c, p);
    }
    if (deg == 9 && !pw[8].defined()) pw[8] = at::matmul(pw[4], pw[4]);  // skew estimates
    const Tensor X = times_pow2(take(A0), c, 1);
    std::optional<Tensor> F;
    if (E) {
      F = take(*E) * at::exp2(-take(s).to(A0.scalar_type())).unsqueeze(-1).unsqueeze(-1);
    }
    const PadeTerms terms = pade_terms(deg, X, pw, F);
    const auto [LU, pivots, info] = at::linalg_lu_factor_ex(terms.V - terms.U);
    const Tensor Rg = at::linalg_lu_solve(LU, pivots, terms.V + terms.U);
    R = all ? Rg : R.index_copy(0, idx, Rg);
    if (E) {  // differentiate (V - U) R = V + U
      const Tensor Lg = at::linalg_lu_solve(
          LU, pivots, terms.Lu + terms.Lv + at::matmul(terms.Lu - terms.Lv, Rg));
      L = all ? Lg : L.index_copy(0, idx, Lg);
    }
  }
  const Tensor s_cpu = s.cpu();  // host sync: the number of squarings
  const int64_t s_max = s_cpu.max().item<int64_t>(), s_min = s_cpu.min().item<int64_t>();
  const Tensor s_dev = s.view({-1, 1, 1});
  for (int64_t k = 0; k < s_max; ++k) {
    if (k < s_min) {  // every matrix squares
      if (frechet) L = at::matmul(R, L) + at::matmul(L, R);
      R = at::matmul(R, R);
      continue;
    }
    const Tensor square = s_dev > k;  // matrices with s <= k are left as they are
    if (frechet) L = at::where(square, at::matmul(R, L) + at::matmul(L, R), L);
    R = at::where(square, at::matmul(R, R), R);
  }
  // contiguous like the fake kernel (lu_solve returns column-major results)
  return {R.reshape(shape).contiguous(),
          frechet ? std::optional<Tensor>(L.reshape(shape).contiguous()) : std::nullopt};
}

}  // namespace

at::Tensor expm(const at::Tensor& A, bool skew) {
  return scaling_and_squaring(A, std::nullopt, skew).first;
}

std::tuple<at::Tensor, at::Tensor> expm_frechet(const at::Tensor& A, const at::Tensor& E,
                                                bool skew) {
  TORCH_CHECK(E.sizes() == A.sizes(), "expm_frechet: E must have the shape of A, got A ",
              A.sizes(), " and E ", E.sizes());
  auto [R, L] = scaling_and_squaring(A, E, skew);
  return {R, *L};
}

}  // namespace kdfast::expm

// The ATen body is device-generic: the same functions serve both dispatch keys.
TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("expm_cpp", &kdfast::expm::expm);
  m.impl("expm_frechet_cpp", &kdfast::expm::expm_frechet);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(kdfast, CUDA, m) {
  m.impl("expm_cpp", &kdfast::expm::expm);
  m.impl("expm_frechet_cpp", &kdfast::expm::expm_frechet);
}
#endif

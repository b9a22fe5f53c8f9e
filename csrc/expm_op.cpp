// Batched Pade scaling and squaring on ATen (device-generic), a step-by-step port of
// kdfast/reference/expm.py. Each matrix gets its own degree m and scaling s: matrices are
// grouped by degree and squared under a per-matrix mask. Host synchronisations per call,
// none per matrix: one for (m, s), and the lazy power estimates (one or two checks that
// skip powers the degree choice cannot need). expm_save / expm_backward split the
// gradient: the forward keeps its powers and LU, the backward reuses them.
#include "expm_op.h"

#include <array>
#include <cmath>
#include <optional>
#include <vector>

#include <torch/library.h>

#include "cpu/tile_gemm.h"
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

// A0^p for the p the estimates need: {2, 4, 6}, plus 8 (and 10 for float64) unless skew.
// Lazily: ||A0^p||_1^(1/p) <= ||A0^2||_1^(1/2) for every even p, so when that bound already
// passes the degree-3 test (and its rounding check) for every matrix, every estimate does
// and the reference would pick m = 3, s = 0: only A0^2 is formed (one host sync).
Powers estimate_powers(const Tensor& A0, const Tensor& t, bool skew, bool frechet,
                       bool is_double, const std::vector<Tensor>& excess) {
  Powers P;
  P[2] = tiles::bmm(A0, A0);
  const double log2_theta3 = std::log2(threshold(is_double, frechet, 0));
  Tensor small = (t + at::log2(onenorm(P[2])) / 2.0) <= log2_theta3;
  if (!excess.empty()) small = small & (excess[0] <= 0);
  if (small.all().item<bool>()) return P;
  P[4] = tiles::bmm(P[2], P[2]);
  P[6] = tiles::bmm(P[4], P[2]);
  if (!skew) {
    P[8] = tiles::bmm(P[4], P[4]);
    // d_10 only enters eta_13 = min(max(d6, d8), max(d8, d10)): when max(d6, d8) already
    // passes theta_13 for every matrix, s = 0 whatever d_10 is, and A0^10 is not formed
    // (choose() then puts max(d6, d8) in its place: the same eta_13, the same s = 0).
    if (is_double) {
      const Tensor eta68 = t + at::maximum(at::log2(onenorm(P[6])) / 6.0,
                                           at::log2(onenorm(P[8])) / 8.0);
      const double log2_theta13 = std::log2(threshold(is_double, frechet, 4));
      if (!(eta68 <= log2_theta13).all().item<bool>()) P[10] = tiles::bmm(P[4], P[6]);
    }
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
// Powers absent after the lazy estimate_powers are bounded by d_2 (then m = 3 for all).
std::pair<Tensor, Tensor> choose(const Tensor& t, const Powers& P, bool skew, bool frechet,
                                 bool is_double, const std::vector<Tensor>& excess) {
  const int degrees = num_degrees(is_double);
  const int top = degrees - 1;
  std::array<Tensor, 11> log2_d;
  for (int p = 2; p <= 10; p += 2) {
    if (P[p].defined()) log2_d[p] = t + at::log2(onenorm(P[p])) / static_cast<double>(p);
  }
  if (!P[4].defined()) {  // lazy estimates: the bound d_2 stands for every d_p
    for (int p = 4; p <= 10; p += 2) log2_d[p] = log2_d[2];
  } else if (!P[10].defined() && P[8].defined()) {  // eta_13 = max(d6, d8) either way
    log2_d[10] = at::maximum(log2_d[6], log2_d[8]);
  }
  const Tensor eta46 = at::maximum(log2_d[4], log2_d[6]);
  std::vector<Tensor> eta(degrees, eta46);
  if (!skew) {
    const Tensor eta68 = at::maximum(log2_d[6], log2_d[8]);
    for (int i = 2; i < degrees; ++i) eta[i] = eta68;
    // (d8, d10) is a valid pair only for m = 13 (its error series starts at x^27)
    if (is_double) eta[top] = at::minimum(eta68, at::maximum(log2_d[8], log2_d[10]));
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

// X * c^p with c = 2^log2_c per matrix: one multiplication by 2^(p log2_c) when that
// factor is representable (`one_pass`, checked on the host), else p multiplications
// (c^p may overflow alone). Powers of two: both are exact. Written into `out` if given.
Tensor times_pow2(const Tensor& X, const Tensor& log2_c, int p, bool one_pass,
                  const Tensor& out = Tensor()) {
  if (one_pass) {
    const Tensor f = at::exp2(log2_c * static_cast<double>(p)).unsqueeze(-1).unsqueeze(-1);
    return out.defined() ? at::mul_out(const_cast<Tensor&>(out), X, f) : X * f;
  }
  const Tensor c = at::exp2(log2_c).unsqueeze(-1).unsqueeze(-1);
  Tensor Y = X;
  for (int i = 0; i < p; ++i) Y = Y * c;
  if (out.defined()) const_cast<Tensor&>(out).copy_(Y);
  return out.defined() ? out : Y;
}

// a b + c d for (N, n, n) batches, the second product accumulated by the GEMM.
Tensor mm2(const Tensor& a, const Tensor& b, const Tensor& c, const Tensor& d) {
  Tensor out = tiles::bmm(a, b);
  tiles::baddbmm_(out, c, d);
  return out;
}

// `out` (owned, or none) + sum_j b_j P[j - shift] over j in js, in that order, skipping
// absent terms; for the powers of X (not their derivatives M), P[0] = I is added on the
// diagonal last.
Tensor comb(int m, const Powers& P, const std::vector<int>& js, int shift, Tensor out = Tensor(),
            bool identity = true) {
  double eye = 0;
  for (int j : js) {
    const int p = j - shift;
    if (p == 0) {
      if (identity) eye += pade_coeff(m, j);
      continue;
    }
    if (!P[p].defined()) continue;
    if (out.defined()) {
      out.add_(P[p], pade_coeff(m, j));
    } else {
      out = P[p] * pade_coeff(m, j);
    }
  }
  if (eye != 0) out.diagonal(0, -2, -1).add_(eye);
  return out;
}

// j = from, from - 2, ..., down to `to`
std::vector<int> every_other(int from, int to) {
  std::vector<int> js;
  for (int j = from; j >= to; j -= 2) js.push_back(j);
  return js;
}

struct PadeTerms {
  Tensor U, V, W, Lu, Lv;  // W = U's right factor: U = X W
};

// U, V with r_m(X) = (V - U)^-1 (V + U); with a direction F also their derivatives.
// pw holds X^p for even p >= 2; the M_p of X^p follow the product rule. With
// values = false (the backward, from saved powers) U and V are skipped; for m = 13 the
// saved W is then passed in `W_saved` (it costs a matmul).
PadeTerms pade_terms(int m, const Tensor& X, const Powers& pw, const std::optional<Tensor>& F,
                     bool values = true, const Tensor& W_saved = Tensor()) {
  Powers M;
  if (F) {
    M[2] = mm2(X, *F, *F, X);
    for (int p = 4; p < (m < 13 ? m : 7); p += 2) M[p] = mm2(pw[p - 2], M[2], M[p - 2], pw[2]);
  }
  PadeTerms r;
  if (m == 13) {  // Higham 2005: 6 matmuls in all (3 for A2, A4, A6; 3 here)
    const Tensor& A6 = pw[6];
    const Tensor W1 = comb(m, pw, {13, 11, 9}, 7), Z1 = comb(m, pw, {12, 10, 8}, 6);
    r.W = values ? comb(m, pw, {7, 5, 3, 1}, 1, tiles::bmm(A6, W1)) : W_saved;
    if (values) {
      r.U = tiles::bmm(X, r.W);
      r.V = comb(m, pw, {6, 4, 2, 0}, 0, tiles::bmm(A6, Z1));
    }
    if (!F) return r;
    const Tensor Lw =
        comb(m, M, {7, 5, 3, 1}, 1, mm2(A6, comb(m, M, {13, 11, 9}, 7), M[6], W1), false);
    r.Lu = mm2(X, Lw, *F, r.W);
    r.Lv = comb(m, M, {6, 4, 2, 0}, 0, mm2(A6, comb(m, M, {12, 10, 8}, 6), M[6], Z1), false);
    return r;
  }
  // W = sum_{odd j} b_j X^(j-1), V = sum_{even j} b_j X^j
  r.W = comb(m, pw, every_other(m, 1), 1);
  if (values) {
    r.V = comb(m, pw, every_other(m - 1, 0), 0);
    r.U = tiles::bmm(X, r.W);
  }
  if (!F) return r;
  const Tensor Lw = comb(m, M, every_other(m, 3), 1, Tensor(), false);
  r.Lu = Lw.defined() ? mm2(X, Lw, *F, r.W) : tiles::bmm(*F, r.W);
  const Tensor Lv = comb(m, M, every_other(m - 1, 2), 0, Tensor(), false);
  r.Lv = Lv.defined() ? Lv : at::zeros_like(X);
  return r;
}

void check_input(const Tensor& A_in) {
  TORCH_CHECK(A_in.dim() >= 2 && A_in.size(-1) == A_in.size(-2),
              "expm: A must be (..., n, n), got ", A_in.sizes());
  TORCH_CHECK(A_in.scalar_type() == at::kFloat || A_in.scalar_type() == at::kDouble,
              "expm: A must be float32 or float64, got ", A_in.scalar_type());
}

// Slots of the saved power stack (N, slots, n, n): X = 2^-s A, X^2, X^4, X^6 and, in
// float64, X^8 (m = 9) or W (m = 13, U = X W). Entries a degree does not use are zero.
constexpr int kSavedSlots32 = 4, kSavedSlots64 = 5;

// What the forward keeps for the backward (expm_save_cpp): the powers, the LU of
// (V - U)^T (stored transposed: contiguous, LAPACK's column-major factor), r_m (before
// the squarings, transposed likewise), m and s.
struct Saved {
  Tensor pw, LUt, pivots, R0t, m, s;
};

// exp(A) (and L(A, E) when E is given), flattened to (N, n, n); fills `saved` when given
// (then the thresholds are the Frechet-safe l_m, as for E).
std::pair<Tensor, Tensor> scaling_and_squaring_flat(const Tensor& A_in,
                                                    const std::optional<Tensor>& E_in, bool skew,
                                                    Saved* saved) {
  const int64_t n = A_in.size(-1);
  const bool is_double = A_in.scalar_type() == at::kDouble;
  const bool frechet = E_in.has_value() || saved != nullptr;
  auto [A0, t] = prescale(A_in.reshape({-1, n, n}));
  std::optional<Tensor> E;
  if (E_in) E = E_in->reshape({-1, n, n}).to(A_in.scalar_type());
  const int degrees = num_degrees(is_double);
  std::vector<Tensor> excess;
  if (!skew && !frechet) excess = rounding_check(A0, t, degrees, is_double);
  const Powers powers = estimate_powers(A0, t, skew, frechet, is_double, excess);
  auto [m, s] = choose(t, powers, skew, frechet, is_double, excess);
  const Tensor log2_c = (t - s).to(A0.scalar_type());  // X = 2^-s A = 2^(t - s) A0
  const int64_t batch = A0.size(0);
  // one host sync: m (the grouping by degree), s (the squarings) and max |t - s|
  const Tensor host =
      at::cat({m, s, (t - s).abs().amax().reshape({1}).to(at::kLong)}).cpu();
  const Tensor m_cpu = host.narrow(0, 0, batch), s_cpu = host.narrow(0, batch, batch);
  // 2^(6 |t - s|) representable in float32 (and float64): scale each power in one pass
  const bool one_pass = host[2 * batch].item<int64_t>() <= 20;
  Tensor R = at::empty_like(A0);
  Tensor L = frechet && E ? at::empty_like(A0) : Tensor();
  const int slots = is_double ? kSavedSlots64 : kSavedSlots32;
  std::vector<bool> filled(slots, false);  // slots written for every matrix
  int groups = 0;
  for (int i = 0; i < degrees; ++i) groups += (m_cpu == degree(i)).any().item<bool>() ? 1 : 0;
  if (saved) {
    saved->pw = groups == 1 ? at::empty({batch, slots, n, n}, A0.options())
                            : at::zeros({batch, slots, n, n}, A0.options());
    saved->LUt = at::empty_like(A0);
    saved->pivots = at::empty({batch, n}, A0.options().dtype(at::kInt));
    saved->m = m;
    saved->s = s;
  }
  for (int i = 0; i < degrees; ++i) {
    const int deg = degree(i);
    const Tensor idx_cpu = (m_cpu == deg).nonzero().select(1, 0);
    if (idx_cpu.numel() == 0) continue;
    const bool all = idx_cpu.numel() == batch;  // common case: no gather or scatter
    const Tensor idx = idx_cpu.to(A0.device());
    const auto take = [&](const Tensor& x) { return all ? x : x.index_select(0, idx); };
    // with a single group the scaled powers are written straight into the saved stack
    const auto slot = [&](int k) {
      if (!saved || !all) return Tensor();
      filled[k] = true;
      return saved->pw.select(1, k);
    };
    const Tensor c = take(log2_c);
    Powers pw;
    for (int p = 2; p < (deg < 13 ? deg : 7); p += 2) {
      if (powers[p].defined()) pw[p] = times_pow2(take(powers[p]), c, p, one_pass, slot(p / 2));
    }
    if (deg == 9 && !pw[8].defined()) {  // skew estimates
      pw[8] = tiles::bmm(pw[4], pw[4]);
    }
    const Tensor X = times_pow2(take(A0), c, 1, one_pass, slot(0));
    std::optional<Tensor> F;
    if (E) {
      F = take(*E) * at::exp2(-take(s).to(A0.scalar_type())).unsqueeze(-1).unsqueeze(-1);
    }
    const PadeTerms terms = pade_terms(deg, X, pw, F);
    // LU of (V - U)^T and transposed solves: faster than the plain ones on CPU LAPACK
    const auto [LU, pivots, info] = at::linalg_lu_factor_ex((terms.V - terms.U).mT());
    const Tensor Rg = at::linalg_lu_solve(LU, pivots, terms.V + terms.U, true, true);
    R = all ? Rg : R.index_copy(0, idx, Rg);
    if (E) {  // differentiate (V - U) R = V + U
      Tensor rhs = terms.Lu + terms.Lv;
      tiles::baddbmm_(rhs, terms.Lu - terms.Lv, Rg);
      const Tensor Lg = at::linalg_lu_solve(LU, pivots, rhs, true, true);
      L = all ? Lg : L.index_copy(0, idx, Lg);
    }
    if (saved) {
      const auto put = [&](const Tensor& dst, const Tensor& src) {
        if (all) {
          if (!dst.is_same(src)) dst.copy_(src);
        } else {
          dst.index_copy_(0, idx, src);
        }
      };
      const auto put_slot = [&](int k, const Tensor& src) {
        if (all && filled[k]) return;  // written in place
        if (all) filled[k] = true;
        put(saved->pw.select(1, k), src);
      };
      put_slot(0, X);
      for (int p = 2; p <= 6; p += 2) {
        if (pw[p].defined()) put_slot(p / 2, pw[p]);
      }
      if (deg == 9) put_slot(4, pw[8]);
      if (deg == 13) put_slot(4, terms.W);
      put(saved->LUt, LU.mT());
      put(saved->pivots, pivots);
    }
  }
  if (saved && groups == 1) {  // slots this degree does not use: zero (never read)
    for (int k = 0; k < slots; ++k) {
      if (!filled[k]) saved->pw.select(1, k).zero_();
    }
  }
  // r_m transposed: contiguous when lu_solve's column-major result is used as is
  if (saved) saved->R0t = R.mT().contiguous();
  const int64_t s_max = s_cpu.max().item<int64_t>(), s_min = s_cpu.min().item<int64_t>();
  const Tensor s_dev = s.view({-1, 1, 1});
  for (int64_t k = 0; k < s_max; ++k) {
    if (k < s_min) {  // every matrix squares
      if (L.defined()) L = mm2(R, L, L, R);
      R = tiles::bmm(R, R);
      continue;
    }
    const Tensor square = s_dev > k;  // matrices with s <= k are left as they are
    if (L.defined()) L = at::where(square, mm2(R, L, L, R), L);
    R = at::where(square, tiles::bmm(R, R), R);
  }
  return {R, L};
}

std::pair<Tensor, std::optional<Tensor>> scaling_and_squaring(const Tensor& A_in,
                                                              const std::optional<Tensor>& E_in,
                                                              bool skew) {
  check_input(A_in);
  const auto shape = A_in.sizes().vec();
  if (A_in.numel() == 0) {
    Tensor empty = A_in.clone(at::MemoryFormat::Contiguous);
    return {empty, E_in ? std::optional<Tensor>(empty.clone()) : std::nullopt};
  }
  auto [R, L] = scaling_and_squaring_flat(A_in, E_in, skew, nullptr);
  // contiguous like the fake kernel (lu_solve returns column-major results)
  return {R.reshape(shape).contiguous(),
          E_in ? std::optional<Tensor>(L.reshape(shape).contiguous()) : std::nullopt};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
expm_save(const at::Tensor& A, bool skew) {
  check_input(A);
  const int64_t n = A.size(-1), batch = n == 0 ? 0 : A.numel() / (n * n);
  if (A.numel() == 0) {
    const auto opts = A.options();
    return {A.clone(at::MemoryFormat::Contiguous),
            at::zeros({batch, A.scalar_type() == at::kDouble ? kSavedSlots64 : kSavedSlots32,
                       n, n},
                      opts),
            at::empty({batch, n, n}, opts),
            at::empty({batch, n}, opts.dtype(at::kInt)),
            at::empty({batch, n, n}, opts),
            at::empty({batch}, opts.dtype(at::kLong)),
            at::empty({batch}, opts.dtype(at::kLong))};
  }
  // a skew batch computed in float64 (skew_compute_type): the exponential from there, the
  // saved state (for the float32 backward) from the float32 pass
  const bool upcast = skew && skew_compute_type(A) != A.scalar_type();
  Saved sv;
  auto [R, L] = scaling_and_squaring_flat(A, std::nullopt, skew, &sv);
  Tensor X = upcast ? expm(A.to(at::kDouble), skew).to(A.scalar_type()) : R.reshape(A.sizes());
  return {X.contiguous(), sv.pw, sv.LUt, sv.pivots, sv.R0t, sv.m, sv.s};
}

at::Tensor expm_backward(const at::Tensor& grad, const at::Tensor& pw, const at::Tensor& LUt,
                         const at::Tensor& pivots, const at::Tensor& R0t, const at::Tensor& m,
                         const at::Tensor& s) {
  // grad_A = L(A^T, G) = L(A, G^T)^T: the forward's own powers and LU serve direction G^T
  const int64_t n = pw.size(-1), batch = pw.size(0);
  TORCH_CHECK(grad.numel() == batch * n * n, "expm_backward: grad has ", grad.numel(),
              " elements, the saved state ", batch, " matrices of ", n, " x ", n);
  if (batch == 0 || n == 0) return at::zeros_like(grad, at::MemoryFormat::Contiguous);
  const bool is_double = pw.scalar_type() == at::kDouble;
  const Tensor E = grad.reshape({-1, n, n}).to(pw.scalar_type()).mT();
  const Tensor host = at::cat({m, s}).cpu();  // host sync: the degrees and squarings
  const Tensor m_cpu = host.narrow(0, 0, batch), s_cpu = host.narrow(0, batch, batch);
  Tensor L = at::empty({batch, n, n}, pw.options());
  for (int i = 0; i < num_degrees(is_double); ++i) {
    const int deg = degree(i);
    const Tensor idx_cpu = (m_cpu == deg).nonzero().select(1, 0);
    if (idx_cpu.numel() == 0) continue;
    const bool all = idx_cpu.numel() == batch;
    const Tensor idx = idx_cpu.to(pw.device());
    const auto take = [&](const Tensor& x) { return all ? x : x.index_select(0, idx); };
    const Tensor P = take(pw);
    Powers pws;
    for (int p = 2; p < (deg < 13 ? deg : 7); p += 2) pws[p] = P.select(1, p / 2);
    if (deg == 9) pws[8] = P.select(1, 4);
    const Tensor X = P.select(1, 0);
    const Tensor F =
        take(E) * at::exp2(-take(s).to(pw.scalar_type())).unsqueeze(-1).unsqueeze(-1);
    const PadeTerms terms =
        pade_terms(deg, X, pws, F, false, deg == 13 ? P.select(1, 4) : Tensor());
    Tensor rhs = terms.Lu + terms.Lv;  // differentiate (V - U) R = V + U
    tiles::baddbmm_(rhs, terms.Lu - terms.Lv, take(R0t).mT());
    const Tensor Lg = at::linalg_lu_solve(take(LUt).mT(), take(pivots), rhs, true, true);
    L = all ? Lg : L.index_copy(0, idx, Lg);
  }
  // the squarings, recomputing the squares of r_m
  const int64_t s_max = s_cpu.max().item<int64_t>(), s_min = s_cpu.min().item<int64_t>();
  const Tensor s_dev = s.view({-1, 1, 1});
  Tensor R = R0t.mT();
  for (int64_t k = 0; k < s_max; ++k) {
    if (k < s_min) {
      L = mm2(R, L, L, R);
      if (k + 1 < s_max) R = tiles::bmm(R, R);
      continue;
    }
    const Tensor square = s_dev > k;
    L = at::where(square, mm2(R, L, L, R), L);
    if (k + 1 < s_max) R = at::where(square, tiles::bmm(R, R), R);
  }
  return L.mT().reshape(grad.sizes()).contiguous();
}

at::Tensor expm(const at::Tensor& A, bool skew) {
  if (skew && A.numel() > 0) {
    const at::ScalarType type = skew_compute_type(A);
    if (type != A.scalar_type()) return expm(A.to(type), skew).to(A.scalar_type());
  }
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
// On CPU the glue is serial (csrc/cpu/tiles.h, OpScope): one MKL/LAPACK thread per call, no
// OpenMP region for a busy machine to stall.
TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  using kdfast::tiles::serial_glue;
  m.impl("expm_cpp", serial_glue<&kdfast::expm::expm>);
  m.impl("expm_frechet_cpp", serial_glue<&kdfast::expm::expm_frechet>);
  m.impl("expm_save_cpp", serial_glue<&kdfast::expm::expm_save>);
  m.impl("expm_backward_cpp", serial_glue<&kdfast::expm::expm_backward>);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(kdfast, CUDA, m) {
  m.impl("expm_cpp", &kdfast::expm::expm);
  m.impl("expm_frechet_cpp", &kdfast::expm::expm_frechet);
  m.impl("expm_save_cpp", &kdfast::expm::expm_save);
  m.impl("expm_backward_cpp", &kdfast::expm::expm_backward);
}
#endif

// CPU generalised Jensen-Shannon divergence over logits (kdfast/reference/jsd_loss.py), its
// schema and its CPU registration. Per row: one read of each input into per-thread buffers,
// one exp per element and side, and for 0 < beta < 1 an exp and two logs per element for
// log m, in the first sweep; then the gradients (when the flags ask for them) in a second
// sweep over the buffers, which needs the row's KL. Rows run in parallel, tiles of rows
// claimed dynamically (csrc/cpu/tiles.h). Takes (rows, C) logits; kdfast/ops/jsd_loss.py
// passes (N, C, S) logits as a permuted copy.
//
// Per row, with u = zs / T, v = zt / T, log ps = u - lse(u), log pt = v - lse(v):
//   0 < beta < 1: m = beta pt + (1 - beta) ps, ds = log ps - log m, dt = log pt - log m,
//                 J = beta KL_t + (1 - beta) KL_s,  KL_s = sum ps ds,  KL_t = sum pt dt,
//                 T dJ/dzs = (1 - beta) ps (ds - KL_s),  T dJ/dzt = beta pt (dt - KL_t);
//   beta = 0:     J = KL(pt || ps) = sum pt d, d = log pt - log ps,
//                 T dJ/dzs = ps sum(pt) - pt,  T dJ/dzt = pt (d - J - sum(pt) + 1);
//   beta = 1:     the same with the sides swapped (J = KL(ps || pt)).
// sum(p) is kept where autograd of the reference keeps it (it differs from 1 by rounding).
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../kd_loss.h"
#include "logit_rows.h"
#include "tiles.h"

TORCH_LIBRARY_FRAGMENT(kdfast, m) {
  // The gradients are computed in the forward pass when the flags ask for them (set from
  // torch.is_grad_enabled() and requires_grad); empty tensors otherwise.
  m.def(
      "jsd_loss_cpp(Tensor student, Tensor teacher, float beta, float temperature, "
      "str reduction, Tensor? mask, bool compute_grad_student, bool compute_grad_teacher) "
      "-> (Tensor, Tensor, Tensor)");
}

namespace kdfast::jsd {
namespace {

using kd::Reduction;

// log for float32 (Cephes logf polynomial, about 1 ulp), written so that loops over it
// vectorise like rows::exp_approx: no branches, no calls. Subnormals are scaled by 2^25
// first; 0 gives -inf, negatives NaN, +inf +inf, NaN propagates.
KDFAST_INLINE float log_approx(float x) {
  const bool tiny = x < std::numeric_limits<float>::min();
  const int32_t bits = rows::bit_cast<int32_t>(tiny ? x * 33554432.0f : x);
  float e = static_cast<float>(((bits >> 23) & 0xff) - 126) - (tiny ? 25.0f : 0.0f);
  float f = rows::bit_cast<float>((bits & 0x007fffff) | 0x3f000000);  // in [0.5, 1)
  const bool low = f < 0.707106781186547524f;
  e = low ? e - 1.0f : e;
  f = low ? f + f - 1.0f : f - 1.0f;
  const float z = f * f;
  float p = 7.0376836292e-2f;
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  float y = p * f * z + e * -2.12194440e-4f - 0.5f * z;
  y = (f + y) + e * 0.693359375f;
  constexpr float kInf = std::numeric_limits<float>::infinity();
  y = x == 0.0f ? -kInf : y;
  y = x < 0.0f ? std::numeric_limits<float>::quiet_NaN() : y;
  y = x == kInf ? kInf : y;
  return x != x ? x : y;
}
KDFAST_INLINE double log_approx(double x) { return std::log(x); }

// expm1(x) for x <= 0 given e = exp(x): the Taylor polynomial to degree 8 above -0.5
// (relative error < 2e-8 there, where e - 1 cancels), e - 1 below.
KDFAST_INLINE float expm1_neg(float x, float e) {
  float p = 1.0f / 40320.0f;
  p = p * x + 1.0f / 5040.0f;
  p = p * x + 1.0f / 720.0f;
  p = p * x + 1.0f / 120.0f;
  p = p * x + 1.0f / 24.0f;
  p = p * x + 1.0f / 6.0f;
  p = p * x + 0.5f;
  p = p * x + 1.0f;
  return x > -0.5f ? p * x : e - 1.0f;
}
KDFAST_INLINE double expm1_neg(double x, double) { return std::expm1(x); }

// log(y) for y = 1 + z with the relative accuracy of log1p(z), y and z computed separately
// (Goldberg: log(y) * z / (y - 1) cancels the rounding of y near 1; y = 1 gives z).
template <typename acc_t>
KDFAST_INLINE acc_t log_near_one(acc_t y, acc_t z) {
  const acc_t d = y - acc_t(1);
  return d == acc_t(0) ? z : log_approx(y) * (z / d);
}

enum class Mode { kMixture, kForwardKL, kReverseKL };  // 0 < beta < 1, beta = 0, beta = 1

template <typename acc_t>
struct Params {
  Mode mode;
  double beta;     // the mixture weight (kMixture)
  bool near_ends;  // kMixture with beta within 1/16 of 0 or 1 (mixture_block)
  acc_t coef;      // the row's weight in the loss / T
};

// One block [b, e) of the kMixture sweep: ds, dt into u, v, ps, pt into ps, pt; returns
// their sums sum ps ds, sum pt dt in kl_s, kl_t. w = beta, w1 = 1 - beta (> 0).
//
// log m is taken relative to the larger side A, from delta = log pt - log ps alone: with
// x = -|delta| <= 0, m / p_A = w_a + w_b e^x = 1 + w_b expm1(x) in (0, 1] (w_a, w_b the
// weights of A and of the other side B): no overflow, no underflow of m, and log_near_one
// keeps the relative accuracy of d_A near p_s = p_t, where the loss is second order in ds,
// dt (log m from m and log p from the lse would leave an absolute error of an ulp of
// |log p| in each). d_B = x + d_A has a relative error below 32 eps for w_a >= 1/16; nearer
// the ends (kNearEnds) it cancels where |d_B| < log 2 and is taken as -log1p(g) there, g =
// m / p_B - 1 = w_a (e^-x - 1) (a second log per element). A -inf logit gives ds or dt =
// -inf and a term 0 * -inf = NaN, as the reference.
template <bool kNearEnds, typename acc_t>
KDFAST_INLINE void mixture_block(acc_t* u, acc_t* v, acc_t* ps, acc_t* pt, int64_t b,
                                 int64_t e, acc_t dlse, acc_t inv_s, acc_t inv_t, acc_t w,
                                 acc_t w1, acc_t& kl_s, acc_t& kl_t) {
  acc_t kls = 0, klt = 0;
#pragma omp simd reduction(+ : kls, klt)
  for (int64_t c = b; c < e; ++c) {
    const acc_t delta = (v[c] - u[c]) + dlse;
    const bool pos = delta > acc_t(0);
    const acc_t x = pos ? -delta : delta, ex = rows::exp_approx(x);
    const acc_t wa = pos ? w : w1, wb = pos ? w1 : w;
    const acc_t em = expm1_neg(x, ex);
    const acc_t d_a = -log_near_one(wa + wb * ex, wb * em);
    acc_t d_b = x + d_a;
    if constexpr (kNearEnds) {
      const acc_t g = -wa * em / ex;
      d_b = g < acc_t(1) ? -log_near_one(acc_t(1) + g, g) : d_b;
    }
    const acc_t ds = pos ? d_b : d_a, dt = pos ? d_a : d_b;
    const acc_t q_s = ps[c] * inv_s, q_t = pt[c] * inv_t;
    kls += q_s * ds;
    klt += q_t * dt;
    u[c] = ds, v[c] = dt, ps[c] = q_s, pt[c] = q_t;
  }
  kl_s = kls, kl_t = klt;
}

// One row on acc_t buffers. Entry: u = zs / T, v = zt / T. Returns the row's divergence;
// with gs / gt non-null, writes coef * T dJ/dz there (gs may be ps, gt may be pt: each
// output entry is written after the last read of its index). u, v, ps, pt are overwritten.
template <typename acc_t>
KDFAST_INLINE double jsd_row_impl(acc_t* u, acc_t* v, acc_t* ps, acc_t* pt, int64_t n,
                                  const Params<acc_t>& p, acc_t* gs, acc_t* gt) {
  const rows::Lse<acc_t> ls = rows::exp_row(u, n, ps);
  const rows::Lse<acc_t> lt = rows::exp_row(v, n, pt);
  const acc_t inv_s = acc_t(1.0 / ls.sum), inv_t = acc_t(1.0 / lt.sum);
  // log pt - log ps = (v - u) + dlse: the difference of logits, not of two log-probabilities
  // of magnitude |log p| (whose roundings would not cancel), as in kd_loss
  const acc_t dlse = static_cast<acc_t>(ls.lse() - lt.lse());
  // After the sweep: ps, pt the probabilities, u = ds and v = dt (kMixture); u = v = log pt
  // - log ps (kForwardKL) or log ps - log pt (kReverseKL). Sums in float64 across blocks.
  double kl_s = 0, kl_t = 0, sum_s = 0, sum_t = 0;
  for (int64_t b = 0; b < n; b += rows::kBlock) {
    const int64_t e = std::min(n, b + rows::kBlock);
    acc_t kls = 0, klt = 0, ss = 0, st = 0;
    if (p.mode == Mode::kMixture) {
      // clamped to the smallest normal: a beta that rounds to 0 in acc_t keeps m > 0
      const acc_t w = std::max(acc_t(p.beta), std::numeric_limits<acc_t>::min());
      const acc_t w1 = std::max(acc_t(1.0 - p.beta), std::numeric_limits<acc_t>::min());
      if (p.near_ends) {
        mixture_block<true>(u, v, ps, pt, b, e, dlse, inv_s, inv_t, w, w1, kls, klt);
      } else {
        mixture_block<false>(u, v, ps, pt, b, e, dlse, inv_s, inv_t, w, w1, kls, klt);
      }
    } else {
      const bool fwd = p.mode == Mode::kForwardKL;
#pragma omp simd reduction(+ : kls, ss, st)
      for (int64_t c = b; c < e; ++c) {
        const acc_t q_s = ps[c] * inv_s, q_t = pt[c] * inv_t;
        // kls: the KL of the mode, from its first distribution
        const acc_t d = fwd ? (v[c] - u[c]) + dlse : (u[c] - v[c]) - dlse;
        kls += (fwd ? q_t : q_s) * d;
        ss += q_s, st += q_t;
        u[c] = d, v[c] = d, ps[c] = q_s, pt[c] = q_t;
      }
    }
    kl_s += static_cast<double>(kls), kl_t += static_cast<double>(klt);
    sum_s += static_cast<double>(ss), sum_t += static_cast<double>(st);
  }
  const acc_t coef = p.coef;
  if (p.mode == Mode::kMixture) {
    if (gs != nullptr) {
      const acc_t k = static_cast<acc_t>(kl_s), cs = coef * acc_t(1.0 - p.beta);
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) gs[c] = cs * ps[c] * (u[c] - k);
    }
    if (gt != nullptr) {
      const acc_t k = static_cast<acc_t>(kl_t), ct = coef * acc_t(p.beta);
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) gt[c] = ct * pt[c] * (v[c] - k);
    }
    return p.beta * kl_t + (1.0 - p.beta) * kl_s;
  }
  // KL(P || Q): P the first distribution, d = log P - log Q; Q's gradient reads P, so it
  // is written first (P's gradient reads P and d only).
  const bool fwd = p.mode == Mode::kForwardKL;
  acc_t *prob_p = fwd ? pt : ps, *prob_q = fwd ? ps : pt, *d = fwd ? v : u;
  acc_t *grad_p = fwd ? gt : gs, *grad_q = fwd ? gs : gt;
  const double sum_p = fwd ? sum_t : sum_s;
  if (grad_q != nullptr) {
    const acc_t scale = coef * static_cast<acc_t>(sum_p);
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) grad_q[c] = prob_q[c] * scale - prob_p[c] * coef;
  }
  if (grad_p != nullptr) {
    const acc_t k = static_cast<acc_t>(kl_s + sum_p - 1.0);
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) grad_p[c] = coef * prob_p[c] * (d[c] - k);
  }
  return kl_s;
}

KDFAST_ROW_DISPATCH(double, jsd_row,
                    (float* u, float* v, float* ps, float* pt, int64_t n,
                     const Params<float>& p, float* gs, float* gt),
                    (u, v, ps, pt, n, p, gs, gt), jsd_row_impl)
double jsd_row(double* u, double* v, double* ps, double* pt, int64_t n, const Params<double>& p,
               double* gs, double* gt) {
  return jsd_row_impl(u, v, ps, pt, n, p, gs, gt);
}

struct Options {
  double beta, temperature, weight;
  bool grad_s, grad_t;
};

// Per-row divergence into row_loss (0 for masked rows); gradients (scaled for the
// reduction) into grad_s / grad_t. s and t share scalar_t and are (rows, C) with unit
// column stride (rows may be expanded: row stride 0).
template <typename scalar_t>
void jsd_rows(const at::Tensor& s, const at::Tensor& t, const bool* mask, const Options& o,
              std::vector<double>& row_loss, at::Tensor& grad_s, at::Tensor& grad_t) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = s.size(0), n = s.size(1);
  const auto sv = rows::row_view(s, s.const_data_ptr<scalar_t>());
  const auto tv = rows::row_view(t, t.const_data_ptr<scalar_t>());
  const auto gsv = rows::row_view(grad_s, o.grad_s ? grad_s.mutable_data_ptr<scalar_t>() : nullptr);
  const auto gtv = rows::row_view(grad_t, o.grad_t ? grad_t.mutable_data_ptr<scalar_t>() : nullptr);
  const Mode mode = o.beta == 0.0   ? Mode::kForwardKL
                    : o.beta == 1.0 ? Mode::kReverseKL
                                    : Mode::kMixture;
  const bool near_ends = std::min(o.beta, 1.0 - o.beta) < 1.0 / 16;
  const Params<acc_t> p{mode, o.beta, near_ends, acc_t(o.weight / o.temperature)};
  const acc_t inv_t = acc_t(1.0 / o.temperature);
  // float / double gradients are written in place (the outputs are contiguous); half ones
  // through the probability buffers
  constexpr bool direct = std::is_same_v<scalar_t, acc_t>;
  auto make_buffers = [&] { return std::vector<acc_t>(4 * n); };
  tiles::for_each_range_with(
      0, rows, tiles::row_tile(rows, rows::row_grain(n)), make_buffers,
      [&](std::vector<acc_t>& buffers, int64_t begin, int64_t end) {
    acc_t *u = buffers.data(), *v = u + n, *ps = v + n, *pt = ps + n;
    for (int64_t i = begin; i < end; ++i) {
      if (mask != nullptr && !mask[i]) {
        row_loss[i] = 0.0;
        if (o.grad_s) rows::zero_row(n, gsv.row(i), gsv.stride_c);
        if (o.grad_t) rows::zero_row(n, gtv.row(i), gtv.stride_c);
        continue;
      }
      rows::load_row(sv.row(i), n, sv.stride_c, inv_t, u);
      rows::load_row(tv.row(i), n, tv.stride_c, inv_t, v);
      acc_t* gs = !o.grad_s ? nullptr : direct ? reinterpret_cast<acc_t*>(gsv.row(i)) : ps;
      acc_t* gt = !o.grad_t ? nullptr : direct ? reinterpret_cast<acc_t*>(gtv.row(i)) : pt;
      row_loss[i] = jsd_row(u, v, ps, pt, n, p, gs, gt);
      if (o.grad_s && !direct) rows::store_row(ps, n, acc_t(1), gsv.row(i), gsv.stride_c);
      if (o.grad_t && !direct) rows::store_row(pt, n, acc_t(1), gtv.row(i), gtv.stride_c);
    }
  });
}

Reduction parse_reduction(const std::string& name) {
  if (name == "batchmean") return Reduction::kBatchMean;
  if (name == "sum") return Reduction::kSum;
  if (name == "mean") return Reduction::kMean;
  TORCH_CHECK_VALUE(name == "none",
                    "jsd_loss_cpp: reduction must be batchmean, sum, mean or none, got ", name);
  return Reduction::kNone;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> jsd_loss_cpu(
    const at::Tensor& student, const at::Tensor& teacher, double beta, double temperature,
    c10::string_view reduction_name, const std::optional<at::Tensor>& mask,
    bool compute_grad_student, bool compute_grad_teacher) {
  TORCH_CHECK_VALUE(student.dim() == 2 && student.sizes() == teacher.sizes(),
                    "jsd_loss_cpp: expected (rows, C) logits of one shape, got ",
                    student.sizes(), " and ", teacher.sizes());
  TORCH_CHECK_VALUE(beta >= 0.0 && beta <= 1.0, "jsd_loss_cpp: beta must be in [0, 1], got ",
                    beta);
  TORCH_CHECK_VALUE(temperature > 0.0 && std::isfinite(temperature),
                    "jsd_loss_cpp: temperature must be positive and finite, got ", temperature);
  const Reduction reduction = parse_reduction(std::string(reduction_name));
  const at::ScalarType dtype =
      at::promote_types(at::promote_types(student.scalar_type(), teacher.scalar_type()),
                        at::kFloat);
  // Mixed input dtypes compute on copies in the loss dtype.
  const bool mixed = student.scalar_type() != teacher.scalar_type();
  const at::Tensor s = rows::unit_column_stride(mixed ? student.to(dtype) : student);
  const at::Tensor t = rows::unit_column_stride(mixed ? teacher.to(dtype) : teacher);
  const int64_t rows = s.size(0), n = s.size(1);
  at::Tensor mask_c;
  int64_t kept = rows;
  if (mask.has_value()) {
    TORCH_CHECK_VALUE(mask->scalar_type() == at::kBool && mask->numel() == rows,
                      "jsd_loss_cpp: mask must be bool with one entry per row (", rows,
                      "), got ", mask->scalar_type(), " ", mask->sizes());
    mask_c = mask->contiguous();
    kept = mask_c.sum().item<int64_t>();
  }
  const Options o{beta, temperature, kd::row_weight(reduction, static_cast<double>(kept), n),
                  compute_grad_student, compute_grad_teacher};
  at::Tensor grad_s =
      rows::empty_output(o.grad_s ? s.sizes() : at::IntArrayRef{0}, s.options());
  at::Tensor grad_t =
      rows::empty_output(o.grad_t ? t.sizes() : at::IntArrayRef{0}, t.options());
  std::vector<double> row_loss(rows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "jsd_loss_cpp", [&] {
    jsd_rows<scalar_t>(s, t, mask.has_value() ? mask_c.const_data_ptr<bool>() : nullptr, o,
                       row_loss, grad_s, grad_t);
  });
  at::Tensor loss;
  if (reduction == Reduction::kNone) {
    loss = at::empty({rows}, s.options().dtype(at::kDouble));
    std::copy(row_loss.begin(), row_loss.end(), loss.mutable_data_ptr<double>());
    loss = loss.to(dtype);
  } else {
    double total = 0.0;
    for (int64_t i = 0; i < rows; ++i) total += row_loss[i];
    loss = at::scalar_tensor(o.weight * total, s.options().dtype(dtype));
  }
  if (mixed) {
    if (o.grad_s) grad_s = grad_s.to(student.scalar_type());
    if (o.grad_t) grad_t = grad_t.to(teacher.scalar_type());
  }
  return {loss, grad_s, grad_t};
}

}  // namespace

// Up to 512^2 logits the glue is serial and the passes go to the helpers (tiles::OpScope).
TORCH_LIBRARY_IMPL(kdfast, CPU, m) { m.impl("jsd_loss_cpp", tiles::serial_glue<&jsd_loss_cpu>); }

}  // namespace kdfast::jsd

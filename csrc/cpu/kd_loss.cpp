// CPU fused softmax + KL (semantics 3): one read of each input row, one exp per element and
// side, the gradient written in the same sweep when requested, per-thread row buffers only
// (no (rows, C) temporaries, also for half inputs). Rows run in parallel: tiles of rows
// claimed dynamically (csrc/cpu/tiles.h).
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../kd_loss.h"
#include "logit_rows.h"
#include "tiles.h"

namespace kdfast::kd {
namespace {

using rows::exp_approx;

// One row on acc_t buffers. Entry: u = zs / T; v = zt / T (logits) or the teacher values.
// Returns KL; on exit es = coef_s T dKL/dzs (if grad_s; es may be the output row) and
// et = T dKL/dzt (logits) or dKL/dzt (probs, log-probs) (if grad_t). u, v are overwritten.
template <typename acc_t>
KDFAST_INLINE acc_t kl_row_impl(acc_t* u, acc_t* v, acc_t* es, acc_t* et, int64_t n,
                                Teacher kind, bool grad_s, bool grad_t, acc_t coef_s) {
  const rows::Lse<acc_t> ls = rows::exp_row(u, n, es);
  // log p = (u - max) - log(sum): a float32 lse of extreme logits would be off by an ulp
  // of ~60.
  const double lse_s64 = ls.lse();
  const acc_t max_s = ls.max, log_sum_s = static_cast<acc_t>(std::log(ls.sum));
  acc_t kl = 0, sum_pt = 0;
  // After these loops: u = log ps, v = pt, et = log pt (except for teacher logits: see
  // pt_in_et, and with grad_t u = w = v - u, the log-ratio log pt - log ps up to a constant).
  bool pt_in_et = false;  // teacher logits without grad_t: et = exp(v - max_t), pt = et / sum
  acc_t inv_sum_t = 1;
  // teacher logits with grad_t: w at a top class of the teacher (the largest w among ties;
  // any tied class would do: tied classes share the mass, none holds nearly all of it)
  acc_t w_top = -std::numeric_limits<acc_t>::infinity();
  if (kind == Teacher::kLogits) {
    const rows::Lse<acc_t> lt = rows::exp_row(v, n, et);
    const double lse_t64 = lt.lse();
    const acc_t max_t = lt.max;
    inv_sum_t = acc_t(1.0 / lt.sum);
    pt_in_et = !grad_t;
    const acc_t dlse = static_cast<acc_t>(lse_s64 - lse_t64);
    // float64 across blocks: the terms cancel, rows can be long
    double kl_sum = 0.0, sum_pt64 = 0.0;
    for (int64_t b = 0; b < n; b += rows::kBlock) {
      const int64_t e = std::min(n, b + rows::kBlock);
      acc_t kl_part = 0, pt_part = 0;
      // Two explicit loops: with the store under `if (!pt_in_et)`, GCC unswitches the loop
      // and leaves the store-free copy scalar, a serial FMA chain.
      if (pt_in_et) {
#pragma omp simd reduction(+ : kl_part, pt_part)
        for (int64_t c = b; c < e; ++c) {
          const acc_t pt = et[c] * inv_sum_t;
          kl_part += pt * ((v[c] - u[c]) + dlse);
          pt_part += pt;
        }
      } else {
        acc_t w_top_part = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(+ : kl_part, pt_part) reduction(max : w_top_part)
        for (int64_t c = b; c < e; ++c) {
          const acc_t pt = et[c] * inv_sum_t, w = v[c] - u[c];
          kl_part += pt * (w + dlse);
          pt_part += pt;
          const acc_t w_if_top = v[c] == max_t ? w : -std::numeric_limits<acc_t>::infinity();
          w_top_part = w_if_top > w_top_part ? w_if_top : w_top_part;
          u[c] = w, v[c] = pt;
        }
        w_top = std::max(w_top, w_top_part);
      }
      kl_sum += static_cast<double>(kl_part), sum_pt64 += static_cast<double>(pt_part);
    }
    kl = static_cast<acc_t>(kl_sum), sum_pt = static_cast<acc_t>(sum_pt64);
  } else if (kind == Teacher::kLogProbs) {
#pragma omp simd reduction(+ : kl, sum_pt)
    for (int64_t c = 0; c < n; ++c) {
      const acc_t log_ps = (u[c] - max_s) - log_sum_s, log_pt = v[c];
      const acc_t pt = exp_approx(log_pt);
      kl += pt * (log_pt - log_ps);
      sum_pt += pt;
      u[c] = log_ps, v[c] = pt, et[c] = log_pt;
    }
  } else {
    for (int64_t c = 0; c < n; ++c) {
      const acc_t log_ps = (u[c] - max_s) - log_sum_s, pt = v[c], log_pt = std::log(pt);
      kl += kl_term(pt, log_pt, log_ps, kind);
      sum_pt += pt;
      u[c] = log_ps, et[c] = log_pt;
    }
  }
  if (grad_s) {
    const acc_t scale = static_cast<acc_t>(sum_pt / ls.sum) * coef_s;
    if (pt_in_et) {
      const acc_t pt_scale = inv_sum_t * coef_s;
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) es[c] = es[c] * scale - et[c] * pt_scale;
    } else {
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) es[c] = es[c] * scale - v[c] * coef_s;
    }
  }
  if (grad_t && kind == Teacher::kLogits) {
    // T dKL/dzt = pt ((w - w_top) + a), a = sum_j pt_j (w_top - w_j) (csrc/kd_loss.h): no
    // cancellation at a top class holding nearly all the mass (its own term of a is 0).
    double a = 0.0;
    for (int64_t b = 0; b < n; b += rows::kBlock) {
      const int64_t e = std::min(n, b + rows::kBlock);
      acc_t part = 0;
#pragma omp simd reduction(+ : part)
      for (int64_t c = b; c < e; ++c) part += v[c] * (w_top - u[c]);
      a += static_cast<double>(part);
    }
    const acc_t a_acc = static_cast<acc_t>(a);
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) et[c] = teacher_logit_grad(v[c], u[c], w_top, a_acc);
  } else if (grad_t) {
    for (int64_t c = 0; c < n; ++c) et[c] = teacher_grad(v[c], et[c], u[c], kind);
  }
  return kl;
}

KDFAST_ROW_DISPATCH(float, kl_row,
                    (float* u, float* v, float* es, float* et, int64_t n, Teacher kind,
                     bool grad_s, bool grad_t, float coef_s),
                    (u, v, es, et, n, kind, grad_s, grad_t, coef_s), kl_row_impl)
double kl_row(double* u, double* v, double* es, double* et, int64_t n, Teacher kind, bool grad_s,
              bool grad_t, double coef_s) {
  return kl_row_impl(u, v, es, et, n, kind, grad_s, grad_t, coef_s);
}

struct Options {
  double temperature, loss_scale, weight;
  Teacher kind;
  bool grad_s, grad_t;
};

// Per-row KL into row_kl (0 for masked rows); gradients (scaled for the reduction) into
// grad_s / grad_t. s and t share scalar_t; (rows, C) or (N, C, S) (rows::RowView).
template <typename scalar_t>
void kl_rows(const at::Tensor& s, const at::Tensor& t, const bool* mask, const Options& o,
             std::vector<double>& row_kl, at::Tensor& grad_s, at::Tensor& grad_t) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = rows::row_count(s), n = s.size(1);
  const auto sv = rows::row_view(s, s.const_data_ptr<scalar_t>());
  const auto tv = rows::row_view(t, t.const_data_ptr<scalar_t>());
  const auto gsv = rows::row_view(grad_s, o.grad_s ? grad_s.mutable_data_ptr<scalar_t>() : nullptr);
  const auto gtv = rows::row_view(grad_t, o.grad_t ? grad_t.mutable_data_ptr<scalar_t>() : nullptr);
  const acc_t inv_t = acc_t(1.0 / o.temperature);
  const acc_t teacher_scale = o.kind == Teacher::kLogits ? inv_t : acc_t(1);
  const acc_t coef_s = acc_t(o.loss_scale * o.weight / o.temperature);
  const acc_t coef_t = acc_t(o.loss_scale * o.weight) * teacher_scale;
  // float / double gradients with unit class stride are written in place (es is the output
  // row); otherwise through a buffer.
  const bool direct = std::is_same_v<scalar_t, acc_t> && gsv.stride_c == 1;
  // Rows are fetched in runs (rows::run_rows: up to kRunRows rows of one n for (N, C, S));
  // the first run is the longest.
  const int64_t run_cap = rows::run_rows(sv, 0, rows, n);
  auto make_buffers = [&] { return std::vector<acc_t>(4 * run_cap * n); };
  tiles::for_each_range_with(
      0, rows, tiles::row_tile(rows, rows::row_grain(n)), make_buffers,
      [&](std::vector<acc_t>& buffers, int64_t begin, int64_t end) {
    acc_t *u = buffers.data(), *v = u + run_cap * n, *es = v + run_cap * n,
          *et = es + run_cap * n;
    for (int64_t i0 = begin, run = 1; i0 < end; i0 += run) {
      run = rows::run_rows(sv, i0, end, n);
      const bool kept0 = mask == nullptr || mask[i0];
      if (run == 1 && !kept0) {
        row_kl[i0] = 0.0;
        if (o.grad_s) rows::zero_row(n, gsv.row(i0), gsv.stride_c);
        if (o.grad_t) rows::zero_row(n, gtv.row(i0), gtv.stride_c);
        continue;
      }
      rows::load_run(sv, i0, run, n, inv_t, u);
      rows::load_run(tv, i0, run, n, teacher_scale, v);
      for (int64_t k = 0; k < run; ++k) {
        const int64_t i = i0 + k;
        acc_t *es_k = es + k * n, *et_k = et + k * n;
        if (mask != nullptr && !mask[i]) {
          row_kl[i] = 0.0;
          std::fill_n(es_k, n, acc_t(0));
          std::fill_n(et_k, n, acc_t(0));
          continue;
        }
        // float / double (B, C) student gradients are written in place
        acc_t* es_row =
            direct && o.grad_s ? reinterpret_cast<acc_t*>(gsv.row(i)) : es_k;
        row_kl[i] = kl_row(u + k * n, v + k * n, es_row, et_k, n, o.kind, o.grad_s, o.grad_t,
                           coef_s);
      }
      if (o.grad_s && !direct) rows::store_run(es, i0, run, n, acc_t(1), gsv);
      if (o.grad_t) rows::store_run(et, i0, run, n, coef_t, gtv);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_loss_cpu(
    const at::Tensor& student, const at::Tensor& teacher, double temperature, double loss_scale,
    c10::string_view reduction_name, const std::optional<at::Tensor>& mask,
    c10::string_view teacher_kind, bool compute_grad_student, bool compute_grad_teacher) {
  rows::check_logit_shapes("kd_loss_cpp", student, teacher);
  const Reduction reduction = parse_reduction(std::string(reduction_name));
  const at::ScalarType dtype =
      at::promote_types(at::promote_types(student.scalar_type(), teacher.scalar_type()),
                        at::kFloat);
  // Mixed input dtypes compute on copies in the loss dtype (rare: the usual half/half and
  // float/float pairs read their inputs in place).
  const bool mixed = student.scalar_type() != teacher.scalar_type();
  const at::Tensor s = rows::unit_column_stride(mixed ? student.to(dtype) : student);
  const at::Tensor t = rows::unit_column_stride(mixed ? teacher.to(dtype) : teacher);
  const int64_t rows = rows::row_count(s), n = s.size(1);
  at::Tensor mask_c;
  int64_t kept = rows;
  if (mask.has_value()) {
    mask_c = mask->contiguous();
    kept = mask_c.sum().item<int64_t>();
  }
  Options o{temperature, loss_scale, row_weight(reduction, static_cast<double>(kept), n),
            parse_teacher(std::string(teacher_kind)), compute_grad_student,
            compute_grad_teacher};
  at::Tensor grad_s =
      rows::empty_output(o.grad_s ? s.sizes() : at::IntArrayRef{0}, s.options());
  at::Tensor grad_t =
      rows::empty_output(o.grad_t ? t.sizes() : at::IntArrayRef{0}, t.options());
  std::vector<double> row_kl(rows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "kd_loss_cpp", [&] {
    kl_rows<scalar_t>(s, t, mask.has_value() ? mask_c.const_data_ptr<bool>() : nullptr, o,
                      row_kl, grad_s, grad_t);
  });
  at::Tensor loss;
  if (reduction == Reduction::kNone) {
    loss = at::empty({rows}, s.options().dtype(at::kDouble));
    double* out = loss.mutable_data_ptr<double>();
    for (int64_t i = 0; i < rows; ++i) out[i] = loss_scale * row_kl[i];
    loss = loss.to(dtype);
  } else {
    double total = 0.0;
    for (int64_t i = 0; i < rows; ++i) total += row_kl[i];
    loss = at::scalar_tensor(loss_scale * o.weight * total, s.options().dtype(dtype));
  }
  if (mixed) {
    if (o.grad_s) grad_s = grad_s.to(student.scalar_type());
    if (o.grad_t) grad_t = grad_t.to(teacher.scalar_type());
  }
  return {loss, grad_s, grad_t};
}

}  // namespace

// Up to 512^2 logits the glue is serial and the passes go to the helpers (tiles::OpScope).
TORCH_LIBRARY_IMPL(kdfast, CPU, m) { m.impl("kd_loss_cpp", tiles::serial_glue<&kd_loss_cpu>); }

}  // namespace kdfast::kd

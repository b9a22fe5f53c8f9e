// CPU fused DIST (semantics 2) in the minimum passes: pass 1 reads each row once (row
// log-sum-exps, row correlation sums, column moments of 16-row tiles merged into per-block
// moments and the blocks merged with Chan-Golub-LeVeque); pass 2 reads each row once more and, from a per-thread row
// buffer, computes <g, y> and writes the gradient (passes 2 and 3 of semantics 2 share one
// read). 2 reads of each input, 1 write per gradient, no (rows, C) temporaries. Each pass is
// one parallel region whose threads claim blocks / tiles of rows dynamically
// (csrc/cpu/tiles.h).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../dist_loss.h"
#include "logit_rows.h"
#include "tiles.h"

namespace kdfast::dist {
namespace {

using rows::exp_approx;

// Per-row values kept between the passes.
// y = exp(z - max) * (1 / sum), bit-identical in both passes: the column centring
// y - mean_col is exactly 0 for B = 1 and must stay so (it is divided by eps = 1e-8); a
// float32 lse of extreme logits would also carry an error of 4e-6 into every y.
enum RowField { kMaxS, kMaxT, kInvSumS, kInvSumT, kMeanS, kMeanT, kSaa, kSbb, kSab, kRowFields };
// Per-column arrays: means, centred second moments, co-moment (then coefficients).
enum ColField { kColMeanS, kColMeanT, kColM2S, kColM2T, kColC, kColFields };

// y = softmax(u) or sigmoid(u); for softmax, max and 1 / sum into max_inv_sum[0], [2].
template <typename acc_t>
KDFAST_INLINE void activate(const acc_t* u, int64_t n, bool sigmoid, acc_t* y,
                            acc_t* max_inv_sum) {
  if (sigmoid) {
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) y[c] = acc_t(1) / (acc_t(1) + exp_approx(-u[c]));
    return;
  }
  const rows::Lse<acc_t> l = rows::exp_row(u, n, y);
  const acc_t inv_sum = static_cast<acc_t>(1.0 / l.sum);
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) y[c] *= inv_sum;
  max_inv_sum[0] = l.max;
  max_inv_sum[2] = inv_sum;
}

// Pass 1 on one row: activations into ys / yt and row statistics into `stats`.
template <typename acc_t>
KDFAST_INLINE void stats_row_impl(const acc_t* u, const acc_t* v, acc_t* ys, acc_t* yt,
                                  int64_t n, bool sigmoid, acc_t* stats) {
  activate(u, n, sigmoid, ys, stats + kMaxS);
  activate(v, n, sigmoid, yt, stats + kMaxT);
  // A constant row must get a = 0 exactly (its Pearson term divides by |a| |b| + 1e-8).
  // Softmax rows have mean 1 / n (a uniform row is exactly 1 / n in every entry; for other
  // rows the error of centring on 1 / n instead of the mean of the rounded y enters the
  // sums below only at second order). Sigmoid rows: float64 sums of acc_t values (exact).
  acc_t mean_s = static_cast<acc_t>(1.0 / double(n)), mean_t = mean_s;
  if (sigmoid) {
    double sum_s = 0, sum_t = 0;
#pragma omp simd reduction(+ : sum_s, sum_t)
    for (int64_t c = 0; c < n; ++c) sum_s += double(ys[c]), sum_t += double(yt[c]);
    mean_s = acc_t(sum_s / double(n)), mean_t = acc_t(sum_t / double(n));
  }
  // acc_t lane partials per block of columns, folded into float64 (as rows::exp_row).
  double saa = 0, sbb = 0, sab = 0;
  for (int64_t b0 = 0; b0 < n; b0 += rows::kBlock) {
    const int64_t e = std::min(n, b0 + rows::kBlock);
    acc_t paa = 0, pbb = 0, pab = 0;
#pragma omp simd reduction(+ : paa, pbb, pab)
    for (int64_t c = b0; c < e; ++c) {
      const acc_t a = ys[c] - mean_s, b = yt[c] - mean_t;
      paa += a * a, pbb += b * b, pab += a * b;
    }
    saa += double(paa), sbb += double(pbb), sab += double(pab);
  }
  stats[kMeanS] = mean_s, stats[kMeanT] = mean_t;
  stats[kSaa] = acc_t(saa), stats[kSbb] = acc_t(sbb), stats[kSab] = acc_t(sab);
}

KDFAST_ROW_DISPATCH(void, stats_row,
                    (const float* u, const float* v, float* ys, float* yt, int64_t n,
                     bool sigmoid, float* stats),
                    (u, v, ys, yt, n, sigmoid, stats), stats_row_impl)
void stats_row(const double* u, const double* v, double* ys, double* yt, int64_t n,
               bool sigmoid, double* stats) {
  stats_row_impl(u, v, ys, yt, n, sigmoid, stats);
}

// Rows per tile of pass 1: a tile's column moments are taken in acc_t and merged into the
// block's float64 moments by Chan et al., once per tile instead of a float64 Welford update
// per element.
constexpr int64_t kTileRows = 16;

// Merge the column moments of the m x n tile (ys, yt) into `col` (moments of `count` rows).
// `scratch` holds 5 n acc_t. The moments are taken of y_j - y_0 (the tile shifted by its
// first row), so a column equal in every row (one teacher row expanded or repeated over the
// batch; B = 1) gets that value as its mean and second moments of 0, exactly. Pass 2 needs
// this: such a column's Pearson denominator is eps = 1e-8, and its gradient term leaves out
// the centring projection (the pieces have zero column mean only if the mean is exact), so
// the rounding of a float32 sum of the rows in that mean would reach the gradient times 1e8.
template <typename acc_t>
KDFAST_INLINE void tile_moments_impl(const acc_t* ys, const acc_t* yt, int64_t m, int64_t n,
                                     double count, double* col, acc_t* scratch) {
  // ds, dt: means of the shifted columns
  acc_t *ds = scratch, *dt = ds + n, *m2s = dt + n, *m2t = m2s + n, *cst = m2t + n;
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) ds[c] = 0, dt[c] = 0;
  for (int64_t j = 1; j < m; ++j) {
    const acc_t *ys_j = ys + j * n, *yt_j = yt + j * n;
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) ds[c] += ys_j[c] - ys[c], dt[c] += yt_j[c] - yt[c];
  }
  const acc_t rows = static_cast<acc_t>(m);
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) {
    ds[c] /= rows, dt[c] /= rows;
    m2s[c] = 0, m2t[c] = 0, cst[c] = 0;
  }
  for (int64_t j = 0; j < m; ++j) {
    const acc_t *ys_j = ys + j * n, *yt_j = yt + j * n;
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) {
      const acc_t a = (ys_j[c] - ys[c]) - ds[c], b = (yt_j[c] - yt[c]) - dt[c];
      m2s[c] += a * a, m2t[c] += b * b, cst[c] += a * b;
    }
  }
  double *cms = col + kColMeanS * n, *cmt = col + kColMeanT * n, *cm2s = col + kColM2S * n,
         *cm2t = col + kColM2T * n, *ccst = col + kColC * n;
  if (count == 0.0) {
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) {
      cms[c] = double(ys[c]) + double(ds[c]), cmt[c] = double(yt[c]) + double(dt[c]);
      cm2s[c] = m2s[c], cm2t[c] = m2t[c], ccst[c] = cst[c];
    }
    return;
  }
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) {
    merge_moments(count, double(m), cms[c], cmt[c], cm2s[c], cm2t[c], ccst[c],
                  double(ys[c]) + double(ds[c]), double(yt[c]) + double(dt[c]),
                  double(m2s[c]), double(m2t[c]), double(cst[c]));
  }
}

KDFAST_ROW_DISPATCH(void, tile_moments,
                    (const float* ys, const float* yt, int64_t m, int64_t n, double count,
                     double* col, float* scratch),
                    (ys, yt, m, n, count, col, scratch), tile_moments_impl)
void tile_moments(const double* ys, const double* yt, int64_t m, int64_t n, double count,
                  double* col, double* scratch) {
  tile_moments_impl(ys, yt, m, n, count, col, scratch);
}

// Weights of the two terms in the gradient: d loss / d rho_row and d loss / d rho_col.
template <typename acc_t>
struct Weights {
  acc_t row, col, inv_temperature;
};

// Pass 2 on one row: y from the saved lse (a side whose z is null already has its y, as
// saved by pass 1), g = dL/dy, then dL/dz into gs / gt (per side, when requested). `col`
// holds the column means and the Pearson coefficients.
template <typename acc_t>
KDFAST_INLINE void grad_row_impl(const acc_t* u, const acc_t* v, acc_t* ys, acc_t* yt,
                                 acc_t* gs, acc_t* gt, int64_t n, bool sigmoid,
                                 const acc_t* stats, const acc_t* col, Weights<acc_t> w) {
  for (int side = 0; side < 2; ++side) {
    const acc_t* z = side == 0 ? u : v;
    acc_t* y = side == 0 ? ys : yt;
    if (z == nullptr) continue;
    const acc_t max = stats[side == 0 ? kMaxS : kMaxT];
    const acc_t inv_sum = stats[side == 0 ? kInvSumS : kInvSumT];
    if (sigmoid) {
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) y[c] = acc_t(1) / (acc_t(1) + exp_approx(-z[c]));
    } else {
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) y[c] = exp_approx<true>(z[c] - max) * inv_sum;
    }
  }
  const Pearson<acc_t> r = pearson(stats[kSaa], stats[kSbb], stats[kSab]);
  const acc_t mean_s = stats[kMeanS], mean_t = stats[kMeanT];
  const acc_t *ms = col + kColMeanS * n, *mt = col + kColMeanT * n;
  const acc_t *inv_d = col + kColM2S * n, *k_a = col + kColM2T * n, *k_b = col + kColC * n;
  for (int side = 0; side < 2; ++side) {
    acc_t* g = side == 0 ? gs : gt;
    if (g == nullptr) continue;
    const acc_t *y = side == 0 ? ys : yt, *other = side == 0 ? yt : ys;
    const acc_t *m_self = side == 0 ? ms : mt, *m_other = side == 0 ? mt : ms;
    const acc_t *k_col = side == 0 ? k_a : k_b;
    const acc_t mean_self = side == 0 ? mean_s : mean_t, mean_other = side == 0 ? mean_t : mean_s;
    const acc_t k_row = side == 0 ? r.k_a : r.k_b;
    double dot_sum = 0;
    for (int64_t b0 = 0; b0 < n; b0 += rows::kBlock) {
      const int64_t e = std::min(n, b0 + rows::kBlock);
      acc_t part = 0;
#pragma omp simd reduction(+ : part)
      for (int64_t c = b0; c < e; ++c) {
        const acc_t row_part = (other[c] - mean_other) * r.inv_d - k_row * (y[c] - mean_self);
        const acc_t col_part =
            (other[c] - m_other[c]) * inv_d[c] - k_col[c] * (y[c] - m_self[c]);
        g[c] = w.row * row_part + w.col * col_part;
        part += g[c] * y[c];
      }
      dot_sum += double(part);
    }
    const acc_t dot = acc_t(dot_sum);
    if (sigmoid) {
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) g[c] = g[c] * y[c] * (acc_t(1) - y[c]) * w.inv_temperature;
    } else {
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) g[c] = y[c] * (g[c] - dot) * w.inv_temperature;
    }
  }
}

KDFAST_ROW_DISPATCH(void, grad_row,
                    (const float* u, const float* v, float* ys, float* yt, float* gs,
                     float* gt, int64_t n, bool sigmoid, const float* stats, const float* col,
                     Weights<float> w),
                    (u, v, ys, yt, gs, gt, n, sigmoid, stats, col, w), grad_row_impl)
void grad_row(const double* u, const double* v, double* ys, double* yt, double* gs, double* gt,
              int64_t n, bool sigmoid, const double* stats, const double* col,
              Weights<double> w) {
  grad_row_impl(u, v, ys, yt, gs, gt, n, sigmoid, stats, col, w);
}

struct Options {
  double beta, gamma, temperature, scale;
  bool sigmoid, grad_s, grad_t;
};

constexpr int64_t kBlocksPerThread = 4;

template <typename scalar_t>
double dist_rows(const at::Tensor& s, const at::Tensor& t, const bool* mask, const Options& o,
                 at::Tensor& grad_s, at::Tensor& grad_t) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = rows::row_count(s), n = s.size(1);
  const auto sv = rows::row_view(s, s.const_data_ptr<scalar_t>());
  const auto tv = rows::row_view(t, t.const_data_ptr<scalar_t>());
  const acc_t inv_temperature = acc_t(1.0 / o.temperature);
  auto kept_row = [&](int64_t i) { return mask == nullptr || mask[i]; };

  // Pass 1: blocks of rows, each with its own column moments.
  // A whole number of blocks per thread, at most kBlocksPerThread (with 3 blocks on 2
  // threads of an idle machine, one thread idles while the other runs its last block). The
  // threads claim blocks dynamically: on a busy machine the others take over the blocks of
  // a descheduled thread, so there are several per thread.
  const int64_t threads = at::get_num_threads();
  const int64_t max_blocks =
      std::max<int64_t>(1, std::min<int64_t>(rows, kBlocksPerThread * threads));
  int64_t blocks = std::clamp<int64_t>(rows * n / rows::kTaskElements, 1, max_blocks);
  if (blocks > 1) blocks = std::min(max_blocks, (blocks + threads - 1) / threads * threads);
  const int64_t block_rows = (rows + blocks - 1) / blocks;
  std::vector<acc_t> stats(rows * kRowFields, acc_t(0));
  std::vector<double> col(blocks * kColFields * n, 0.0);
  std::vector<int64_t> count(blocks, 0);
  // Pass 1 keeps the activations of one side in the other side's gradient rows (float and
  // double, (rows, C) layout, when that gradient is requested): pass 2 then reads them
  // instead of reading the logits again and recomputing their exp (it writes those rows
  // last).
  scalar_t* gs_data = o.grad_s ? grad_s.mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* gt_data = o.grad_t ? grad_t.mutable_data_ptr<scalar_t>() : nullptr;
  const auto gsv = rows::row_view(grad_s, gs_data), gtv = rows::row_view(grad_t, gt_data);
  const bool direct = std::is_same_v<scalar_t, acc_t> && s.dim() == 2;
  acc_t* saved_yt = direct ? reinterpret_cast<acc_t*>(gs_data) : nullptr;
  acc_t* saved_ys = direct ? reinterpret_cast<acc_t*>(gt_data) : nullptr;
  // Rows are fetched in runs (rows::run_rows: up to kRunRows rows of one n for (N, C, S));
  // the first run is the longest.
  const int64_t run_cap = rows::run_rows(sv, 0, rows, n);
  tiles::run_workers(blocks, [&](tiles::TileQueue& queue) {
    std::vector<acc_t> buffers((2 * run_cap + 2 * kTileRows + 5) * n);
    acc_t *u = buffers.data(), *v = u + run_cap * n, *ys = v + run_cap * n,
          *yt = ys + kTileRows * n, *scratch = yt + kTileRows * n;
    for (int64_t b; queue.next(b);) {
      double* col_b = col.data() + b * kColFields * n;
      int64_t m = 0;  // rows in the tile
      auto flush = [&] {
        if (m == 0) return;
        tile_moments(ys, yt, m, n, double(count[b]), col_b, scratch);
        count[b] += m;
        m = 0;
      };
      const int64_t end = std::min(rows, (b + 1) * block_rows);
      for (int64_t i0 = b * block_rows, w = 1; i0 < end; i0 += w) {
        w = rows::run_rows(sv, i0, end, n);
        if (w == 1 && !kept_row(i0)) continue;
        rows::load_run(sv, i0, w, n, inv_temperature, u);
        rows::load_run(tv, i0, w, n, inv_temperature, v);
        for (int64_t k = 0; k < w; ++k) {
          const int64_t i = i0 + k;
          if (!kept_row(i)) continue;
          stats_row(u + k * n, v + k * n, ys + m * n, yt + m * n, n, o.sigmoid,
                    stats.data() + i * kRowFields);
          if (saved_yt) std::copy_n(yt + m * n, n, saved_yt + i * n);
          if (saved_ys) std::copy_n(ys + m * n, n, saved_ys + i * n);
          if (++m == kTileRows) flush();
        }
      }
      flush();
    }
  });
  // Merge the blocks (Chan et al.), then turn the moments into Pearson coefficients.
  double* c0 = col.data();
  double total = double(count[0]);
  for (int64_t b = 1; b < blocks; ++b) {
    if (count[b] == 0) continue;
    const double* cb = col.data() + b * kColFields * n;
    for (int64_t c = 0; c < n; ++c) {
      if (total == 0.0) {
        for (int f = 0; f < kColFields; ++f) c0[f * n + c] = cb[f * n + c];
        continue;
      }
      merge_moments(total, double(count[b]), c0[kColMeanS * n + c], c0[kColMeanT * n + c],
                    c0[kColM2S * n + c], c0[kColM2T * n + c], c0[kColC * n + c],
                    cb[kColMeanS * n + c], cb[kColMeanT * n + c], cb[kColM2S * n + c],
                    cb[kColM2T * n + c], cb[kColC * n + c]);
    }
    total += double(count[b]);
  }
  const int64_t kept = static_cast<int64_t>(total);
  // Pass-2 column arrays in acc_t: means, then the Pearson coefficients.
  std::vector<acc_t> coef(kColFields * n);
  double rho_cols = 0.0;
  for (int64_t c = 0; c < n; ++c) {
    const Pearson<double> p = pearson(c0[kColM2S * n + c], c0[kColM2T * n + c], c0[kColC * n + c]);
    rho_cols += p.rho;
    coef[kColMeanS * n + c] = acc_t(c0[kColMeanS * n + c]);
    coef[kColMeanT * n + c] = acc_t(c0[kColMeanT * n + c]);
    coef[kColM2S * n + c] = acc_t(p.inv_d), coef[kColM2T * n + c] = acc_t(p.k_a);
    coef[kColC * n + c] = acc_t(p.k_b);
  }
  double rho_rows = 0.0;
  for (int64_t i = 0; i < rows; ++i) {
    if (!kept_row(i)) continue;
    const acc_t* st = stats.data() + i * kRowFields;
    rho_rows += static_cast<double>(pearson(st[kSaa], st[kSbb], st[kSab]).rho);
  }
  const double kept_d = static_cast<double>(kept);
  const double loss = o.beta * o.scale * (1.0 - rho_rows / kept_d) +
                      o.gamma * o.scale * (1.0 - rho_cols / static_cast<double>(n));
  if (!o.grad_s && !o.grad_t) return loss;

  // Pass 2: gradients.
  const Weights<acc_t> w{acc_t(-o.beta * o.scale / kept_d),
                         acc_t(-o.gamma * o.scale / static_cast<double>(n)), inv_temperature};
  auto make_buffers = [&] { return std::vector<acc_t>((4 * run_cap + 2) * n); };
  tiles::for_each_range_with(
      0, rows, tiles::row_tile(rows, rows::row_grain(n)), make_buffers,
      [&](std::vector<acc_t>& buffers, int64_t begin, int64_t end) {
    acc_t *u = buffers.data(), *v = u + run_cap * n, *gs = v + run_cap * n,
          *gt = gs + run_cap * n, *ys = gt + run_cap * n, *yt = ys + n;
    for (int64_t i0 = begin, run = 1; i0 < end; i0 += run) {
      run = rows::run_rows(sv, i0, end, n);
      if (run == 1 && !kept_row(i0)) {
        if (gs_data) rows::zero_row(n, gsv.row(i0), gsv.stride_c);
        if (gt_data) rows::zero_row(n, gtv.row(i0), gtv.stride_c);
        continue;
      }
      if (!saved_ys) rows::load_run(sv, i0, run, n, inv_temperature, u);
      if (!saved_yt) rows::load_run(tv, i0, run, n, inv_temperature, v);
      for (int64_t k = 0; k < run; ++k) {
        const int64_t i = i0 + k;
        acc_t *gs_k = gs + k * n, *gt_k = gt + k * n;
        if (!kept_row(i)) {
          std::fill_n(gs_k, n, acc_t(0));
          std::fill_n(gt_k, n, acc_t(0));
          continue;
        }
        acc_t* ys_row = saved_ys ? saved_ys + i * n : ys;
        acc_t* yt_row = saved_yt ? saved_yt + i * n : yt;
        grad_row(saved_ys ? nullptr : u + k * n, saved_yt ? nullptr : v + k * n, ys_row,
                 yt_row, gs_data ? gs_k : nullptr, gt_data ? gt_k : nullptr, n, o.sigmoid,
                 stats.data() + i * kRowFields, coef.data(), w);
      }
      if (gs_data) rows::store_run(gs, i0, run, n, acc_t(1), gsv);
      if (gt_data) rows::store_run(gt, i0, run, n, acc_t(1), gtv);
    }
  });
  return loss;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dist_loss_cpu(
    const at::Tensor& student, const at::Tensor& teacher, double beta, double gamma,
    double temperature, bool temperature_squared, c10::string_view activation,
    const std::optional<at::Tensor>& mask, bool compute_grad_student, bool compute_grad_teacher) {
  rows::check_logit_shapes("dist_loss_cpp", student, teacher);
  const std::string act(activation);
  TORCH_CHECK(act == "softmax" || act == "sigmoid", "dist_loss_cpp: unknown activation ", act);
  const at::ScalarType dtype =
      at::promote_types(at::promote_types(student.scalar_type(), teacher.scalar_type()),
                        at::kFloat);
  // Mixed input dtypes compute on copies in the loss dtype (see kd_loss.cpp).
  const bool mixed = student.scalar_type() != teacher.scalar_type();
  const at::Tensor s = rows::unit_column_stride(mixed ? student.to(dtype) : student);
  const at::Tensor t = rows::unit_column_stride(mixed ? teacher.to(dtype) : teacher);
  const at::Tensor mask_c = mask.has_value() ? mask->contiguous() : at::Tensor();
  const double scale = temperature_squared ? temperature * temperature : 1.0;
  const Options o{beta, gamma, temperature, scale, act == "sigmoid", compute_grad_student,
                  compute_grad_teacher};
  at::Tensor grad_s =
      rows::empty_output(o.grad_s ? s.sizes() : at::IntArrayRef{0}, s.options());
  at::Tensor grad_t =
      rows::empty_output(o.grad_t ? t.sizes() : at::IntArrayRef{0}, t.options());
  double loss = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "dist_loss_cpp", [&] {
    loss = dist_rows<scalar_t>(s, t, mask_c.defined() ? mask_c.const_data_ptr<bool>() : nullptr,
                               o, grad_s, grad_t);
  });
  if (mixed) {
    if (o.grad_s) grad_s = grad_s.to(student.scalar_type());
    if (o.grad_t) grad_t = grad_t.to(teacher.scalar_type());
  }
  return {at::scalar_tensor(loss, s.options().dtype(dtype)), grad_s, grad_t};
}

}  // namespace

// Up to 512^2 logits the glue is serial and the passes go to the helpers (tiles::OpScope).
TORCH_LIBRARY_IMPL(kdfast, CPU, m) { m.impl("dist_loss_cpp", tiles::serial_glue<&dist_loss_cpu>); }

}  // namespace kdfast::dist

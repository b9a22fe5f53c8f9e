// The CUDA passes of the RKD angle op as host-and-device bodies of (block, thread), and
// their launchers, templated on where the grid runs: the CUDA launch in
// csrc/cuda/rkd_angle.cu, the CPU grid driver in csrc/cpu/cuda_host_rkd.cpp (tests). Grid
// provides threads(default) -> threads per block, and launch(kernel, blocks, threads,
// args...) with the kernels named below as its members. One thread per pair streams the
// third index: (i, j) over k for the loss, w and p, for the vertices i in [start, stop);
// (j, k) over those i for m, so every output has one writer (no atomics, deterministic).
#pragma once

#include <ATen/ATen.h>

#include <cfloat>

#include "../rkd_angle.h"
#include "../rkd_angle_op.h"
#include "grid.h"

namespace kdfast::rkd {

constexpr double kAngleUnitRoundoff = DBL_EPSILON / 2;
constexpr int kAngleThreads = 256;

// r, norm_active and d2_fix of the pair (i, j) for one thread per entry.
KDFAST_HOST_DEVICE void pairs_body(const cuda::GridPos& at, const double* g, const double* x,
                                   double* r, double* active, double* fix, int64_t n,
                                   int64_t dim) {
  const int64_t idx = at.global();
  if (idx >= n * n) return;
  pair_entry(g, x, n, dim, idx / n, idx % n, kAngleUnitRoundoff, r[idx], active[idx], fix[idx]);
}

struct Sides {
  const double* gs;
  const double* rs;
  const double* fs;
  const double* gt;
  const double* rt;
  const double* ft;
};

KDFAST_HOST_DEVICE void cosines(const Sides& v, int64_t n, int64_t i, int64_t j, int64_t k,
                                double& cs, double& ct) {
  cs = triplet_cosine(v.gs[j * n + k], v.gs[i * n + j], v.gs[i * n + k], v.gs[i * n + i],
                      k == j ? v.fs[i * n + j] : 0.0, v.rs[i * n + j], v.rs[i * n + k]);
  ct = triplet_cosine(v.gt[j * n + k], v.gt[i * n + j], v.gt[i * n + k], v.gt[i * n + i],
                      k == j ? v.ft[i * n + j] : 0.0, v.rt[i * n + j], v.rt[i * n + k]);
}

// out[i - start, j] = sum_k SmoothL1(A^s_ijk - A^t_ijk) for the vertices i in [start, stop).
KDFAST_HOST_DEVICE void loss_body(const cuda::GridPos& at, Sides v, double* out, int64_t n,
                                  int64_t start, int64_t stop) {
  const int64_t local = at.global();
  if (local >= (stop - start) * n) return;
  const int64_t idx = start * n + local;
  const int64_t i = idx / n, j = idx % n;
  double acc = 0.0;
  if (v.rs[idx] != 0.0 || v.rt[idx] != 0.0) {
    for (int64_t k = 0; k < n; ++k) {
      double cs, ct;
      cosines(v, n, i, j, k, cs, ct);
      acc += smooth_l1(cs - ct);
    }
  }
  out[local] = acc;
}

// w[i, j] = sum_k g r_ij r_ik and p[i, j] = sum_k g A_ijk per side (null: not needed), for
// the vertices i in [start, stop) (the other rows are left as they are: zero).
KDFAST_HOST_DEVICE void row_body(const cuda::GridPos& at, Sides v, double* ws, double* ps,
                                 double* wt, double* pt, int64_t n, int64_t start,
                                 int64_t stop) {
  const int64_t local = at.global();
  if (local >= (stop - start) * n) return;
  const int64_t idx = start * n + local;
  const int64_t i = idx / n, j = idx % n;
  double sws = 0.0, sps = 0.0, swt = 0.0, spt = 0.0;
  if (v.rs[idx] != 0.0 || v.rt[idx] != 0.0) {
    for (int64_t k = 0; k < n; ++k) {
      double cs, ct;
      cosines(v, n, i, j, k, cs, ct);
      const double g = smooth_l1_grad(cs - ct);
      sws += g * v.rs[idx] * v.rs[i * n + k];
      sps += g * cs;
      swt -= g * v.rt[idx] * v.rt[i * n + k];
      spt -= g * ct;
    }
  }
  if (ws != nullptr) {
    ws[idx] = sws;
    ps[idx] = sps;
  }
  if (wt != nullptr) {
    wt[idx] = swt;
    pt[idx] = spt;
  }
}

// m[j, k] = sum over i in [start, stop) of g r_ij r_ik per side.
KDFAST_HOST_DEVICE void column_body(const cuda::GridPos& at, Sides v, double* ms, double* mt,
                                    int64_t n, int64_t start, int64_t stop) {
  const int64_t idx = at.global();
  if (idx >= n * n) return;
  const int64_t j = idx / n, k = idx % n;
  double sms = 0.0, smt = 0.0;
  for (int64_t i = start; i < stop; ++i) {
    if (v.rs[i * n + j] == 0.0 && v.rt[i * n + j] == 0.0) continue;
    double cs, ct;
    cosines(v, n, i, j, k, cs, ct);
    const double g = smooth_l1_grad(cs - ct);
    sms += g * v.rs[i * n + j] * v.rs[i * n + k];
    smt -= g * v.rt[i * n + j] * v.rt[i * n + k];
  }
  if (ms != nullptr) ms[idx] = sms;
  if (mt != nullptr) mt[idx] = smt;
}

inline Sides sides(const AngleSideMatrices& s, const AngleSideMatrices& t) {
  return {s.gram.const_data_ptr<double>(), s.inv_norm.const_data_ptr<double>(),
          s.d2_fix.const_data_ptr<double>(), t.gram.const_data_ptr<double>(),
          t.inv_norm.const_data_ptr<double>(), t.d2_fix.const_data_ptr<double>()};
}

inline double* ptr_or_null(at::Tensor& x) {
  return x.defined() ? x.mutable_data_ptr<double>() : nullptr;
}

// AnglePairPass, AngleTripletForward and AngleTripletBackward of csrc/rkd_angle_op.h.
template <class Grid>
void launch_pairs(const at::Tensor& centred, AngleSideMatrices& side) {
  const int64_t n = side.gram.size(0);
  const int threads = Grid::threads(kAngleThreads);
  Grid::launch(Grid::pairs, cuda::blocks_for(n * n, threads), threads,
               side.gram.const_data_ptr<double>(), centred.const_data_ptr<double>(),
               side.inv_norm.mutable_data_ptr<double>(),
               side.norm_active.mutable_data_ptr<double>(),
               side.d2_fix.mutable_data_ptr<double>(), n, centred.size(1));
}

template <class Grid>
at::Tensor launch_triplet_forward(const AngleSideMatrices& student,
                                  const AngleSideMatrices& teacher, int64_t start,
                                  int64_t stop) {
  const int64_t n = student.gram.size(0);
  at::Tensor partial = at::empty({stop - start, n}, student.gram.options());
  const int threads = Grid::threads(kAngleThreads);
  Grid::launch(Grid::loss, cuda::blocks_for((stop - start) * n, threads), threads,
               sides(student, teacher), partial.mutable_data_ptr<double>(), n, start, stop);
  return partial;
}

template <class Grid>
void launch_triplet_backward(const AngleSideMatrices& s, const AngleSideMatrices& t,
                             AngleGradAccumulators& student, AngleGradAccumulators& teacher,
                             int64_t start, int64_t stop) {
  const int64_t n = s.gram.size(0);
  const Sides v = sides(s, t);
  const int threads = Grid::threads(kAngleThreads);
  Grid::launch(Grid::row, cuda::blocks_for((stop - start) * n, threads), threads, v,
               ptr_or_null(student.w), ptr_or_null(student.p), ptr_or_null(teacher.w),
               ptr_or_null(teacher.p), n, start, stop);
  Grid::launch(Grid::column, cuda::blocks_for(n * n, threads), threads, v,
               ptr_or_null(student.m), ptr_or_null(teacher.m), n, start, stop);
}

template <class Grid>
constexpr AngleKernels angle_kernels{launch_pairs<Grid>, launch_triplet_forward<Grid>,
                                     launch_triplet_backward<Grid>};

}  // namespace kdfast::rkd

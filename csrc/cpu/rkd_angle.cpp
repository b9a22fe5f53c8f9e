// CPU passes of the RKD angle op (csrc/rkd_angle.h): the pair pass and the streamed triple
// loops, parallel over the middle index j (each task owns rows j of the accumulators, so no
// per-thread copies), vertices i of the requested range [start, stop) in sequence and the
// innermost k loop vectorisable. Blocks of j rows and tiles of k keep the working set in L1.
// Each pass is one parallel region whose threads claim blocks dynamically (csrc/cpu/tiles.h):
// a block's results do not depend on the thread that ran it.
// And the CPU registration of rkd_angle_cpp (all vertices) and rkd_angle_vertices_cpp.
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "../rkd_angle.h"
#include "../rkd_angle_op.h"
#include "isa_dispatch.h"
#include "tiles.h"
#include "rkd_cpu.h"

namespace kdfast::rkd {
namespace {

constexpr double kUnitRoundoff = std::numeric_limits<double>::epsilon() / 2;
// The triple loops run over blocks of kRowsPerBlock rows j and tiles of kTile columns k,
// vertices i in between: the j rows' tiles (G, and the accumulators m) and the streamed row
// i tiles (G, r) stay in L1.
constexpr int64_t kRowsPerBlock = 8;
constexpr int64_t kTile = 128;

void pairs_cpu(const at::Tensor& centred, AngleSideMatrices& side) {
  const int64_t n = side.gram.size(0), dim = centred.size(1);
  const double* g = side.gram.const_data_ptr<double>();
  const double* x = centred.const_data_ptr<double>();
  double* r = side.inv_norm.mutable_data_ptr<double>();
  double* active = side.norm_active.mutable_data_ptr<double>();
  double* fix = side.d2_fix.mutable_data_ptr<double>();
  tiles::for_each_range(0, n, tiles::rows_per_tile(n, tiles::kPairsPerTile),
                        [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t j = 0; j < n; ++j) {
        const int64_t ij = i * n + j;
        pair_entry(g, x, n, dim, i, j, kUnitRoundoff, r[ij], active[ij], fix[ij]);
      }
    }
  });
}

// Pointers to one side's G, r and D2 corrections.
struct SideView {
  const double* g;
  const double* r;
  const double* fix;
};

SideView view(const AngleSideMatrices& side) {
  return {side.gram.const_data_ptr<double>(), side.inv_norm.const_data_ptr<double>(),
          side.d2_fix.const_data_ptr<double>()};
}

// Accumulator rows of one side (csrc/rkd_angle_op.h); null when not needed.
struct AccView {
  double* m;
  double* w;
  double* p;
};

AccView view(AngleGradAccumulators& acc) {
  if (!acc.m.defined()) return {nullptr, nullptr, nullptr};
  return {acc.m.mutable_data_ptr<double>(), acc.w.mutable_data_ptr<double>(),
          acc.p.mutable_data_ptr<double>()};
}

// The k loops run on 4-wide double vectors (GCC vector extensions: AVX2 in the AVX2
// variants of the block entry points below, SSE2 pairs otherwise) with a scalar tail; both
// compute the same per-element math as csrc/rkd_angle.h. The helpers are KDFAST_INLINE
// (csrc/cpu/isa_dispatch.h), so each entry point's variant compiles them with its ISA.
typedef double v4d __attribute__((vector_size(32)));
typedef int64_t v4l __attribute__((vector_size(32)));
constexpr int64_t kWidth = 4;

KDFAST_INLINE v4d load4(const double* p) {
  v4d v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
KDFAST_INLINE void store4(double* p, v4d v) { __builtin_memcpy(p, &v, sizeof v); }
KDFAST_INLINE v4d splat(double x) { return v4d{x, x, x, x}; }
KDFAST_INLINE double hsum(v4d v) { return (v[0] + v[1]) + (v[2] + v[3]); }

// Everything the triple loop over one vertex i, one middle index j and the k range
// [k0, k1) needs.
struct RowArgs {
  int64_t n, i, j, k0, k1;
  SideView s, t;
};

// One side's cosines A_ijk for k = k0..k0+3 (the fix applies at k = j, csrc/rkd_angle.h).
struct SideRow {
  const double *g_i, *r_i, *g_j;
  double g_ij, g_ii, r_ij, fix_ij;

  SideRow(const SideView& v, int64_t n, int64_t i, int64_t j)
      : g_i(v.g + i * n), r_i(v.r + i * n), g_j(v.g + j * n), g_ij(g_i[j]), g_ii(g_i[i]),
        r_ij(r_i[j]), fix_ij(v.fix[i * n + j]) {}

  KDFAST_INLINE v4d cosines(int64_t k0, v4l at_j) const {
    const v4d fix = at_j ? splat(fix_ij) : splat(0.0);
    return (((load4(g_j + k0) - splat(g_ij)) - (load4(g_i + k0) - splat(g_ii))) + fix) *
           splat(r_ij) * load4(r_i + k0);
  }
  KDFAST_INLINE double cosine(int64_t k, int64_t j) const {
    return triplet_cosine(g_j[k], g_ij, g_i[k], g_ii, k == j ? fix_ij : 0.0, r_ij, r_i[k]);
  }
};

KDFAST_INLINE v4l lanes_at(int64_t k0, int64_t j) {
  const v4l k = v4l{k0, k0 + 1, k0 + 2, k0 + 3};
  return k == v4l{j, j, j, j};
}

KDFAST_INLINE v4d smooth_l1_v(v4d d) {
  const v4d a = d < 0.0 ? -d : d;
  return a < 1.0 ? 0.5 * d * d : a - 0.5;
}
KDFAST_INLINE v4d smooth_l1_grad_v(v4d d) {
  return d > 1.0 ? splat(1.0) : (d < -1.0 ? splat(-1.0) : d);  // NaN propagates
}

// sum over k of SmoothL1(A^s_ijk - A^t_ijk).
KDFAST_INLINE double loss_row(const RowArgs& a) {
  const SideRow s(a.s, a.n, a.i, a.j), t(a.t, a.n, a.i, a.j);
  v4d acc = splat(0.0);
  int64_t k = a.k0;
  for (; k + kWidth <= a.k1; k += kWidth) {
    const v4l at_j = lanes_at(k, a.j);
    acc += smooth_l1_v(s.cosines(k, at_j) - t.cosines(k, at_j));
  }
  double sum = hsum(acc);
  for (; k < a.k1; ++k) sum += smooth_l1(s.cosine(k, a.j) - t.cosine(k, a.j));
  return sum;
}

// Gradient accumulation of one (i, j) row over k (csrc/rkd_angle.h): m[j, k] += w_ijk,
// w[i, j] = sum_k w_ijk, p[i, j] = sum_k g A_ijk per side (w_ijk = g r_ij r_ik).
template <bool kStudent, bool kTeacher>
KDFAST_INLINE void grad_row(const RowArgs& a, AccView as_, AccView at_) {
  const int64_t n = a.n, i = a.i, j = a.j;
  const SideRow s(a.s, n, i, j), t(a.t, n, i, j);
  double* ms_j = kStudent ? as_.m + j * n : nullptr;
  double* mt_j = kTeacher ? at_.m + j * n : nullptr;
  v4d ws = splat(0.0), ps = splat(0.0), wt = splat(0.0), pt = splat(0.0);
  int64_t k = a.k0;
  for (; k + kWidth <= a.k1; k += kWidth) {
    const v4l at_j = lanes_at(k, j);
    const v4d cs = s.cosines(k, at_j), ct = t.cosines(k, at_j);
    const v4d g = smooth_l1_grad_v(cs - ct);
    if constexpr (kStudent) {
      const v4d w = g * load4(s.r_i + k);
      store4(ms_j + k, load4(ms_j + k) + w * splat(s.r_ij));
      ws += w;
      ps += g * cs;
    }
    if constexpr (kTeacher) {
      const v4d w = g * load4(t.r_i + k);
      store4(mt_j + k, load4(mt_j + k) - w * splat(t.r_ij));
      wt -= w;
      pt -= g * ct;
    }
  }
  double sws = hsum(ws), sps = hsum(ps), swt = hsum(wt), spt = hsum(pt);
  for (; k < a.k1; ++k) {
    const double cs = s.cosine(k, j), ct = t.cosine(k, j);
    const double g = smooth_l1_grad(cs - ct);
    if constexpr (kStudent) {
      const double w = g * s.r_i[k];
      ms_j[k] += w * s.r_ij;
      sws += w;
      sps += g * cs;
    }
    if constexpr (kTeacher) {
      const double w = g * t.r_i[k];
      mt_j[k] -= w * t.r_ij;
      swt -= w;
      spt -= g * ct;
    }
  }
  if constexpr (kStudent) {
    as_.w[i * n + j] += sws * s.r_ij;
    as_.p[i * n + j] += sps;
  }
  if constexpr (kTeacher) {
    at_.w[i * n + j] += swt * t.r_ij;
    at_.p[i * n + j] += spt;
  }
}

// One block of j rows [j0, j1) over the vertices i in [i0, i1). Rows with r_ij = 0 on both
// sides (j = i, degenerate pairs) have every angle 0 and are skipped.
KDFAST_INLINE void loss_block_body(int64_t n, SideView s, SideView t, int64_t i0, int64_t i1,
                                   int64_t j0, int64_t j1, double* out) {
  for (int64_t j = j0; j < j1; ++j) out[j] = 0.0;
  for (int64_t k0 = 0; k0 < n; k0 += kTile) {
    const int64_t k1 = std::min(n, k0 + kTile);
    for (int64_t i = i0; i < i1; ++i) {
      for (int64_t j = j0; j < j1; ++j) {
        if (s.r[i * n + j] == 0.0 && t.r[i * n + j] == 0.0) continue;
        out[j] += loss_row({n, i, j, k0, k1, s, t});
      }
    }
  }
}

template <bool kStudent, bool kTeacher>
KDFAST_INLINE void grad_block_body(int64_t n, SideView s, SideView t, AccView as_, AccView at_,
                                   int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
  for (int64_t k0 = 0; k0 < n; k0 += kTile) {
    const int64_t k1 = std::min(n, k0 + kTile);
    for (int64_t i = i0; i < i1; ++i) {
      for (int64_t j = j0; j < j1; ++j) {
        if (s.r[i * n + j] == 0.0 && t.r[i * n + j] == 0.0) continue;
        grad_row<kStudent, kTeacher>({n, i, j, k0, k1, s, t}, as_, at_);
      }
    }
  }
}

// The block entry points, each compiled for AVX2 and for baseline x86-64 and picked at run
// time by the CPU's feature bits (csrc/cpu/isa_dispatch.h). Without FMA: both variants give
// bit-identical results.
KDFAST_ROW_DISPATCH_NO_FMA(void, loss_block,
                    (int64_t n, SideView s, SideView t, int64_t i0, int64_t i1, int64_t j0,
                     int64_t j1, double* out),
                    (n, s, t, i0, i1, j0, j1, out), loss_block_body)
KDFAST_ROW_DISPATCH_NO_FMA(void, grad_block_both,
                    (int64_t n, SideView s, SideView t, AccView as_, AccView at_, int64_t i0,
                     int64_t i1, int64_t j0, int64_t j1),
                    (n, s, t, as_, at_, i0, i1, j0, j1), (grad_block_body<true, true>))
KDFAST_ROW_DISPATCH_NO_FMA(void, grad_block_student,
                    (int64_t n, SideView s, SideView t, AccView as_, AccView at_, int64_t i0,
                     int64_t i1, int64_t j0, int64_t j1),
                    (n, s, t, as_, at_, i0, i1, j0, j1), (grad_block_body<true, false>))
KDFAST_ROW_DISPATCH_NO_FMA(void, grad_block_teacher,
                    (int64_t n, SideView s, SideView t, AccView as_, AccView at_, int64_t i0,
                     int64_t i1, int64_t j0, int64_t j1),
                    (n, s, t, as_, at_, i0, i1, j0, j1), (grad_block_body<false, true>))

int64_t num_blocks(int64_t n) { return (n + kRowsPerBlock - 1) / kRowsPerBlock; }

// partial[j] = sum over i in [start, stop), all k of SmoothL1(A^s_ijk - A^t_ijk).
at::Tensor triplet_forward_cpu(const AngleSideMatrices& student, const AngleSideMatrices& teacher,
                               int64_t start, int64_t stop) {
  const int64_t n = student.gram.size(0);
  const SideView s = view(student), t = view(teacher);
  at::Tensor partial = at::empty({n}, student.gram.options());
  double* out = partial.mutable_data_ptr<double>();
  tiles::for_each_tile(num_blocks(n), [&](int64_t block) {
    const int64_t j0 = block * kRowsPerBlock;
    loss_block(n, s, t, start, stop, j0, std::min(n, j0 + kRowsPerBlock), out);
  });
  return partial;
}

// Accumulates the unit gradient (g = SmoothL1'); the 1 / N^3 and the upstream gradient are
// applied by the caller (csrc/rkd_angle_op.cpp).
void triplet_backward_cpu(const AngleSideMatrices& student, const AngleSideMatrices& teacher,
                          AngleGradAccumulators& grad_student,
                          AngleGradAccumulators& grad_teacher, int64_t start, int64_t stop) {
  const int64_t n = student.gram.size(0);
  const SideView s = view(student), t = view(teacher);
  const AccView as_ = view(grad_student), at_ = view(grad_teacher);
  auto block_fn = as_.m != nullptr ? (at_.m != nullptr ? grad_block_both : grad_block_student)
                                   : grad_block_teacher;
  tiles::for_each_tile(num_blocks(n), [&](int64_t block) {
    const int64_t j0 = block * kRowsPerBlock;
    block_fn(n, s, t, as_, at_, start, stop, j0, std::min(n, j0 + kRowsPerBlock));
  });
}

constexpr AngleKernels kCpuKernels{pairs_cpu, triplet_forward_cpu, triplet_backward_cpu};

at::Tensor forward_cpu(const at::Tensor& student, const at::Tensor& teacher) {
  tiles::OpScope scope(glue_elements(student), angle_work(student));
  return angle_loss(student, teacher, kCpuKernels, 0, student.size(0));
}

std::tuple<at::Tensor, at::Tensor> backward_cpu(const at::Tensor& grad, const at::Tensor& student,
                                                const at::Tensor& teacher, bool student_grad,
                                                bool teacher_grad) {
  tiles::OpScope scope(glue_elements(student), angle_work(student));
  return angle_loss_backward(grad, student, teacher, student_grad, teacher_grad, kCpuKernels, 0,
                             student.size(0));
}

at::Tensor vertices_forward_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                int64_t start, int64_t stop) {
  tiles::OpScope scope(glue_elements(student), angle_work(student, start, stop));
  return angle_loss(student, teacher, kCpuKernels, start, stop);
}

std::tuple<at::Tensor, at::Tensor> vertices_backward_cpu(const at::Tensor& grad,
                                                         const at::Tensor& student,
                                                         const at::Tensor& teacher, int64_t start,
                                                         int64_t stop, bool student_grad,
                                                         bool teacher_grad) {
  tiles::OpScope scope(glue_elements(student), angle_work(student, start, stop));
  return angle_loss_backward(grad, student, teacher, student_grad, teacher_grad, kCpuKernels,
                             start, stop);
}

}  // namespace

const AngleKernels& cpu_angle_kernels() { return kCpuKernels; }

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("rkd_angle_cpp", &forward_cpu);
  m.impl("rkd_angle_cpp_backward", &backward_cpu);
  m.impl("rkd_angle_vertices_cpp", &vertices_forward_cpu);
  m.impl("rkd_angle_vertices_cpp_backward", &vertices_backward_cpu);
}

}  // namespace kdfast::rkd

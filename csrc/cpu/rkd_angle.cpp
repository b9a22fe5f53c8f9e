// CPU passes of the RKD angle op (csrc/rkd_angle.h): the pair pass and the streamed triple
// loops, parallel over the middle index j (each task owns rows j of the accumulators, so no
// per-thread copies), vertices i in sequence and the innermost k loop vectorisable. Blocks
// of j rows reuse each streamed row i of G and r from cache. And the CPU registration.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "../rkd_angle.h"
#include "../rkd_angle_op.h"

namespace kdfast::rkd {
namespace {

constexpr double kUnitRoundoff = std::numeric_limits<double>::epsilon() / 2;
constexpr int64_t kPairRowsPerTask = 16;
// j rows per block: 2 x kRowsPerBlock rows of G, r and the accumulators stay in L2.
constexpr int64_t kRowsPerBlock = 8;

void pairs_cpu(const at::Tensor& centred, AngleSideMatrices& side) {
  const int64_t n = side.gram.size(0), dim = centred.size(1);
  const double* g = side.gram.const_data_ptr<double>();
  const double* x = centred.const_data_ptr<double>();
  double* r = side.inv_norm.mutable_data_ptr<double>();
  double* active = side.norm_active.mutable_data_ptr<double>();
  double* fix = side.d2_fix.mutable_data_ptr<double>();
  at::parallel_for(0, n, kPairRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t j = 0; j < n; ++j) {
        const int64_t ij = i * n + j;
        const double diag_sum = g[i * n + i] + g[j * n + j];
        const double gram_d2 = diag_sum - 2.0 * g[ij];
        double d2 = gram_d2;
        if (i != j && pair_is_near(gram_d2, diag_sum)) {
          d2 = 0.0;
          for (int64_t d = 0; d < dim; ++d) {
            const double v = x[j * dim + d] - x[i * dim + d];
            d2 += v * v;
          }
        }
        bool flows = false;
        r[ij] = i == j ? 0.0 : pair_inverse_norm(d2, diag_sum, kUnitRoundoff, flows);
        active[ij] = flows ? 1.0 : 0.0;
        fix[ij] = i == j ? 0.0 : d2 - gram_d2;
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

// partial[j] = sum over i, k of SmoothL1(A^s_ijk - A^t_ijk).
at::Tensor triplet_forward_cpu(const AngleSideMatrices& student,
                               const AngleSideMatrices& teacher) {
  const int64_t n = student.gram.size(0);
  const SideView s = view(student), t = view(teacher);
  at::Tensor partial = at::empty({n}, student.gram.options());
  double* out = partial.mutable_data_ptr<double>();
  at::parallel_for(0, (n + kRowsPerBlock - 1) / kRowsPerBlock, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t block = b0; block < b1; ++block) {
      const int64_t j0 = block * kRowsPerBlock, j1 = std::min(n, j0 + kRowsPerBlock);
      double sums[kRowsPerBlock] = {};
      for (int64_t i = 0; i < n; ++i) {
        const double* gs_i = s.g + i * n;
        const double* gt_i = t.g + i * n;
        const double* rs_i = s.r + i * n;
        const double* rt_i = t.r + i * n;
        for (int64_t j = j0; j < j1; ++j) {
          const double rs_ij = rs_i[j], rt_ij = rt_i[j];
          if (rs_ij == 0.0 && rt_ij == 0.0) continue;  // j = i or degenerate: all angles 0
          const double fs_ij = s.fix[i * n + j], ft_ij = t.fix[i * n + j];
          const double* gs_j = s.g + j * n;
          const double* gt_j = t.g + j * n;
          double acc = 0.0;
          for (int64_t k = 0; k < n; ++k) {
            const double as = triplet_cosine(gs_j[k], gs_i[j], gs_i[k], gs_i[i],
                                             k == j ? fs_ij : 0.0, rs_ij, rs_i[k]);
            const double at = triplet_cosine(gt_j[k], gt_i[j], gt_i[k], gt_i[i],
                                             k == j ? ft_ij : 0.0, rt_ij, rt_i[k]);
            acc += smooth_l1(as - at);
          }
          sums[j - j0] += acc;
        }
      }
      for (int64_t j = j0; j < j1; ++j) out[j] = sums[j - j0];
    }
  });
  return partial;
}

// Accumulator rows of one side (csrc/rkd_angle_op.h).
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

template <bool kStudent, bool kTeacher>
void triplet_backward_impl(int64_t n, const SideView s, const SideView t, AccView as_,
                           AccView at_) {
  const double scale = 1.0 / (static_cast<double>(n) * static_cast<double>(n) *
                              static_cast<double>(n));
  at::parallel_for(0, (n + kRowsPerBlock - 1) / kRowsPerBlock, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t block = b0; block < b1; ++block) {
      const int64_t j0 = block * kRowsPerBlock, j1 = std::min(n, j0 + kRowsPerBlock);
      for (int64_t i = 0; i < n; ++i) {
        const double* gs_i = s.g + i * n;
        const double* gt_i = t.g + i * n;
        const double* rs_i = s.r + i * n;
        const double* rt_i = t.r + i * n;
        for (int64_t j = j0; j < j1; ++j) {
          const double rs_ij = rs_i[j], rt_ij = rt_i[j];
          if (rs_ij == 0.0 && rt_ij == 0.0) continue;  // every g_ijk is 0
          const double fs_ij = s.fix[i * n + j], ft_ij = t.fix[i * n + j];
          const double* gs_j = s.g + j * n;
          const double* gt_j = t.g + j * n;
          double* ms_j = kStudent ? as_.m + j * n : nullptr;
          double* mt_j = kTeacher ? at_.m + j * n : nullptr;
          double ws = 0.0, ps = 0.0, wt = 0.0, pt = 0.0;
          for (int64_t k = 0; k < n; ++k) {
            const double cs = triplet_cosine(gs_j[k], gs_i[j], gs_i[k], gs_i[i],
                                             k == j ? fs_ij : 0.0, rs_ij, rs_i[k]);
            const double ct = triplet_cosine(gt_j[k], gt_i[j], gt_i[k], gt_i[i],
                                             k == j ? ft_ij : 0.0, rt_ij, rt_i[k]);
            const double g = smooth_l1_grad(cs - ct) * scale;
            if constexpr (kStudent) {
              const double w = g * rs_ij * rs_i[k];
              ms_j[k] += w;
              ws += w;
              ps += g * cs;
            }
            if constexpr (kTeacher) {
              const double w = g * rt_ij * rt_i[k];
              mt_j[k] -= w;
              wt -= w;
              pt -= g * ct;
            }
          }
          if constexpr (kStudent) {
            as_.w[i * n + j] = ws;
            as_.p[i * n + j] = ps;
          }
          if constexpr (kTeacher) {
            at_.w[i * n + j] = wt;
            at_.p[i * n + j] = pt;
          }
        }
      }
    }
  });
}

void triplet_backward_cpu(const AngleSideMatrices& student, const AngleSideMatrices& teacher,
                          AngleGradAccumulators& grad_student,
                          AngleGradAccumulators& grad_teacher) {
  const int64_t n = student.gram.size(0);
  const SideView s = view(student), t = view(teacher);
  const AccView as_ = view(grad_student), at_ = view(grad_teacher);
  if (as_.m != nullptr && at_.m != nullptr) {
    triplet_backward_impl<true, true>(n, s, t, as_, at_);
  } else if (as_.m != nullptr) {
    triplet_backward_impl<true, false>(n, s, t, as_, at_);
  } else if (at_.m != nullptr) {
    triplet_backward_impl<false, true>(n, s, t, as_, at_);
  }
}

constexpr AngleKernels kCpuKernels{pairs_cpu, triplet_forward_cpu, triplet_backward_cpu};

at::Tensor forward_cpu(const at::Tensor& student, const at::Tensor& teacher) {
  return angle_loss(student, teacher, kCpuKernels);
}

std::tuple<at::Tensor, at::Tensor> backward_cpu(const at::Tensor& grad, const at::Tensor& student,
                                                const at::Tensor& teacher, bool student_grad,
                                                bool teacher_grad) {
  return angle_loss_backward(grad, student, teacher, student_grad, teacher_grad, kCpuKernels);
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("rkd_angle_cpp", &forward_cpu);
  m.impl("rkd_angle_cpp_backward", &backward_cpu);
}

}  // namespace kdfast::rkd

// CPU per-pair passes of the RKD distance op (tiles of rows claimed dynamically,
// csrc/cpu/tiles.h), and its CPU registration.
#include <torch/library.h>

#include <limits>

#include "../rkd_distance.h"
#include "../rkd_distance_op.h"
#include "tiles.h"
#include "rkd_cpu.h"

namespace kdfast::rkd {
namespace {

constexpr double kUnitRoundoff = std::numeric_limits<double>::epsilon() / 2;

void pair_forward_cpu(const at::Tensor& gram, at::Tensor& dist) {
  const int64_t n = gram.size(0);
  const double* g = gram.const_data_ptr<double>();
  double* d = dist.mutable_data_ptr<double>();
  const int64_t grain = tiles::rows_per_tile(n, tiles::kPairsPerTile);
  tiles::for_each_range(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t j = 0; j < n; ++j) {
        bool active = false;
        d[i * n + j] =
            i == j ? 0.0 : pair_distance(g[i * n + i], g[j * n + j], g[i * n + j], kUnitRoundoff,
                                         active);
      }
    }
  });
}

void pair_backward_cpu(const at::Tensor& gram, const at::Tensor& grad_dist, at::Tensor& grad_d2) {
  const int64_t n = gram.size(0);
  const double* g = gram.const_data_ptr<double>();
  const double* gd = grad_dist.const_data_ptr<double>();
  double* out = grad_d2.mutable_data_ptr<double>();
  const int64_t grain = tiles::rows_per_tile(n, tiles::kPairsPerTile);
  tiles::for_each_range(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t j = 0; j < n; ++j) {
        if (i == j) {
          out[i * n + j] = 0.0;
          continue;
        }
        bool active = false;
        const double d =
            pair_distance(g[i * n + i], g[j * n + j], g[i * n + j], kUnitRoundoff, active);
        out[i * n + j] = pair_distance_backward(gd[i * n + j], d, active);
      }
    }
  });
}

at::Tensor forward_cpu(const at::Tensor& student, const at::Tensor& teacher) {
  tiles::OpScope scope(glue_elements(student));
  return distance_loss(student, teacher, pair_forward_cpu);
}

std::tuple<at::Tensor, at::Tensor> backward_cpu(const at::Tensor& grad, const at::Tensor& student,
                                                const at::Tensor& teacher, bool student_grad,
                                                bool teacher_grad) {
  tiles::OpScope scope(glue_elements(student));
  return distance_loss_backward(grad, student, teacher, student_grad, teacher_grad,
                                pair_forward_cpu, pair_backward_cpu);
}

}  // namespace

PairForward cpu_distance_pair_forward() { return pair_forward_cpu; }
PairBackward cpu_distance_pair_backward() { return pair_backward_cpu; }

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("rkd_distance_cpp", &forward_cpu);
  m.impl("rkd_distance_cpp_backward", &backward_cpu);
}

}  // namespace kdfast::rkd

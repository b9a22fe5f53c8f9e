// The CUDA per-pair passes of the RKD distance op as host-and-device bodies of
// (block, thread), and their launcher, templated on where the grid runs: the CUDA launch
// in csrc/cuda/rkd_distance.cu, the CPU grid driver in csrc/cpu/cuda_host_rkd.cpp (tests).
// Grid provides threads(default) -> threads per block, and launch(kernel, blocks, threads,
// args...) with the kernels named below as its members.
#pragma once

#include <ATen/ATen.h>

#include <cfloat>

#include "../rkd_distance.h"
#include "grid.h"

namespace kdfast::rkd {

constexpr double kDistanceUnitRoundoff = DBL_EPSILON / 2;
constexpr int kDistanceThreads = 256;

// dist[i, j] for one thread per entry of the N x N matrix.
KDFAST_HOST_DEVICE void pair_forward_body(const cuda::GridPos& at, const double* g, double* d,
                                          int64_t n) {
  const int64_t idx = at.global();
  if (idx >= n * n) return;
  const int64_t i = idx / n, j = idx % n;
  bool active = false;
  d[idx] = i == j ? 0.0
                  : pair_distance(g[i * n + i], g[j * n + j], g[idx], kDistanceUnitRoundoff,
                                  active);
}

KDFAST_HOST_DEVICE void pair_backward_body(const cuda::GridPos& at, const double* g,
                                           const double* grad_dist, double* grad_d2,
                                           int64_t n) {
  const int64_t idx = at.global();
  if (idx >= n * n) return;
  const int64_t i = idx / n, j = idx % n;
  if (i == j) {
    grad_d2[idx] = 0.0;
    return;
  }
  bool active = false;
  const double d = pair_distance(g[i * n + i], g[j * n + j], g[idx], kDistanceUnitRoundoff,
                                 active);
  grad_d2[idx] = pair_distance_backward(grad_dist[idx], d, active);
}

// PairForward and PairBackward of csrc/rkd_distance_op.h.
template <class Grid>
void launch_pair_forward(const at::Tensor& gram, at::Tensor& dist) {
  const int64_t n = gram.size(0);
  if (n == 0) return;
  const int threads = Grid::threads(kDistanceThreads);
  Grid::launch(Grid::pair_forward, cuda::blocks_for(n * n, threads), threads,
               gram.const_data_ptr<double>(), dist.mutable_data_ptr<double>(), n);
}

template <class Grid>
void launch_pair_backward(const at::Tensor& gram, const at::Tensor& grad_dist,
                          at::Tensor& grad_d2) {
  const int64_t n = gram.size(0);
  if (n == 0) return;
  const int threads = Grid::threads(kDistanceThreads);
  Grid::launch(Grid::pair_backward, cuda::blocks_for(n * n, threads), threads,
               gram.const_data_ptr<double>(), grad_dist.const_data_ptr<double>(),
               grad_d2.mutable_data_ptr<double>(), n);
}

}  // namespace kdfast::rkd

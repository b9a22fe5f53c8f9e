// The CPU kernels of the RKD ops (csrc/cpu/rkd_distance.cpp, csrc/cpu/rkd_angle.cpp), for the
// combined op's CPU registration (csrc/cpu/rkd_loss.cpp).
#pragma once

#include "../rkd_angle_op.h"
#include "../rkd_distance_op.h"

#include <algorithm>

namespace kdfast::rkd {

PairForward cpu_distance_pair_forward();
PairBackward cpu_distance_pair_backward();
const AngleKernels& cpu_angle_kernels();

// The size of the RKD ops' glue tensors (N x N) for tiles::OpScope; 0 for input the op will
// reject with its own message.
inline int64_t glue_elements(const at::Tensor& x) {
  const int64_t n = x.dim() > 0 ? x.size(0) : 0;
  return n * n;
}

// The entries the angle ops' triplet pass visits for vertices [start, stop): N^2 each.
inline int64_t angle_work(const at::Tensor& x, int64_t start, int64_t stop) {
  return glue_elements(x) * std::max<int64_t>(0, stop - start);
}
inline int64_t angle_work(const at::Tensor& x) {
  return angle_work(x, 0, x.dim() > 0 ? x.size(0) : 0);
}

}  // namespace kdfast::rkd

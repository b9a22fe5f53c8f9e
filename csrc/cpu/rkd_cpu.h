// The CPU kernels of the RKD ops (csrc/cpu/rkd_distance.cpp, csrc/cpu/rkd_angle.cpp), for the
// combined op's CPU registration (csrc/cpu/rkd_loss.cpp).
#pragma once

#include "../rkd_angle_op.h"
#include "../rkd_distance_op.h"

namespace kdfast::rkd {

PairForward cpu_distance_pair_forward();
PairBackward cpu_distance_pair_backward();
const AngleKernels& cpu_angle_kernels();

}  // namespace kdfast::rkd

// The matrix exponential and its Frechet derivative on ATen (device-generic), batched over
// leading dims (SPEC 6). The same code serves CPU tensors and, in the CUDA build, CUDA
// tensors; it mirrors kdfast/reference/expm.py step by step (degrees, thresholds, d_p
// estimates, rounding check, per-matrix scaling with masked squaring).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace kdfast::expm {

// exp(A) for A (..., n, n) float32/float64.
at::Tensor expm(const at::Tensor& A, bool skew);

// (exp(A), L(A, E)) computed jointly with the thresholds l_m.
std::tuple<at::Tensor, at::Tensor> expm_frechet(const at::Tensor& A, const at::Tensor& E,
                                                bool skew);

}  // namespace kdfast::expm

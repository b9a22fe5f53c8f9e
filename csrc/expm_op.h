// The matrix exponential and its Frechet derivative on ATen (device-generic), batched over
// leading dims (semantics 6). The same code serves CPU tensors and, in the CUDA build, CUDA
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

// exp(A) with the thresholds l_m, and what the backward reuses, flattened to N matrices:
// (exp(A), powers (N, slots, n, n), LU^T (N, n, n), pivots (N, n) int32, r_m^T before the
// squarings (N, n, n), m (N,), s (N,)).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
expm_save(const at::Tensor& A, bool skew);

// grad_A = L(A^T, grad) from expm_save's state (one solve; the squarings recomputed).
at::Tensor expm_backward(const at::Tensor& grad, const at::Tensor& pw, const at::Tensor& LUt,
                         const at::Tensor& pivots, const at::Tensor& R0t, const at::Tensor& m,
                         const at::Tensor& s);

}  // namespace kdfast::expm

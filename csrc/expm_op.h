// The matrix exponential and its Frechet derivative on ATen (device-generic), batched over
// leading dims (semantics 6). The same code serves CPU tensors and, in the CUDA build, CUDA
// tensors; it mirrors kdfast/reference/expm.py step by step (degrees, thresholds, d_p
// estimates, rounding check, per-matrix scaling with masked squaring).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <tuple>

namespace kdfast::expm {

// expm(A, skew=True) (semantics 6): a skew-symmetric exponential loses orthogonality as about
// u ||A||_1 through the squarings. float32 batches with ||A||_1 > kSkewFloat32MaxNorm are
// computed in float64, orthogonal to float32 rounding; above kSkewMaxNorm even float64 is not
// (its rotation angles are known only to ~1e-7), so no dtype is: ValueError. Mirrors
// kdfast/reference/expm.py's skew_compute_dtype.
constexpr double kSkewFloat32MaxNorm = 64.0;
constexpr double kSkewMaxNorm = 1073741824.0;  // 2^30

// The dtype to compute a skew batch in (one host synchronisation). Non-finite input keeps its
// dtype: NaN propagates.
inline at::ScalarType skew_compute_type(const at::Tensor& A) {
  const int64_t n = A.size(-1);
  const double norm =
      A.reshape({-1, n, n}).abs().sum(-2).amax().to(at::kDouble).item<double>();
  if (!std::isfinite(norm)) return A.scalar_type();
  TORCH_CHECK_VALUE(norm <= kSkewMaxNorm, "expm(A, skew=True): ||A||_1 = ", norm,
                    " > 2^30, where scaling and squaring cannot return an orthogonal matrix "
                    "even in float64 (the rotation angles are known only to about u ||A||); "
                    "scale A down or pass skew=False");
  return A.scalar_type() != at::kDouble && norm > kSkewFloat32MaxNorm ? at::kDouble
                                                                        : A.scalar_type();
}

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

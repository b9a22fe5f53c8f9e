// ATen side of the fused small-matrix exponential (shared by the CPU and CUDA kernels):
// checks, flattening to contiguous (N, n, n) batches and the outputs. `launch(A, E, R, L,
// skew)` runs csrc/expm_small.h on every matrix (E and L undefined without a direction).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "expm_op.h"
#include "expm_small.h"

namespace kdfast::expm::small {

using Launch = void (*)(const at::Tensor& A, const at::Tensor& E, at::Tensor& R, at::Tensor& L,
                        bool skew);

inline std::tuple<at::Tensor, at::Tensor> run(const at::Tensor& A,
                                              const std::optional<at::Tensor>& E, bool skew,
                                              Launch launch) {
  TORCH_CHECK(A.dim() >= 2 && A.size(-1) == A.size(-2),
              "expm_small: A must be (..., n, n), got ", A.sizes());
  TORCH_CHECK(A.size(-1) <= kMaxN, "expm_small: n must be <= ", kMaxN, ", got ", A.size(-1));
  TORCH_CHECK(A.scalar_type() == at::kFloat || A.scalar_type() == at::kDouble,
              "expm_small: A must be float32 or float64, got ", A.scalar_type());
  if (E) {
    TORCH_CHECK(E->sizes() == A.sizes(), "expm_frechet_small: E must have the shape of A, got A ",
                A.sizes(), " and E ", E->sizes());
  }
  if (skew && !E && A.numel() > 0) {  // expm(A, skew=True): see skew_compute_type
    const at::ScalarType type = skew_compute_type(A);
    if (type != A.scalar_type()) {
      return {std::get<0>(run(A.to(type), E, skew, launch)).to(A.scalar_type()), at::Tensor()};
    }
  }
  const int64_t n = A.size(-1);
  const at::Tensor A3 = A.reshape({-1, n, n}).contiguous();
  at::Tensor E3 = E ? E->reshape({-1, n, n}).to(A.scalar_type()).contiguous() : at::Tensor();
  at::Tensor R = at::empty_like(A3);
  at::Tensor L = E ? at::empty_like(A3) : at::Tensor();
  if (A3.numel() > 0) launch(A3, E3, R, L, skew);
  return {R.view(A.sizes()), E ? L.view(A.sizes()) : at::Tensor()};
}

}  // namespace kdfast::expm::small

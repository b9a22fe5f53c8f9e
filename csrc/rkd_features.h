// One side's features as the RKD ops consume them (semantics 1.5): the input rows, the
// centred float64 rows and their Gram matrix. The combined RKD op
// (csrc/rkd_loss_op.h) forms them once per side and hands them to both terms, and its
// backward reuses the Gram matrix saved by the forward.
#pragma once

#include <ATen/ATen.h>

#include "cpu/tile_gemm.h"

namespace kdfast::rkd {

// a @ b for the RKD ops' float64 GEMMs: on CPU a tiled GEMM (csrc/cpu/tiles.h: its row blocks
// shared with the helpers, no parallel region of MKL's own), elsewhere at::mm.
inline at::Tensor mm64(const at::Tensor& a, const at::Tensor& b) {
  return a.is_cpu() ? tiles::mm(a, b) : at::mm(a, b);
}

struct RkdFeatures {
  at::Tensor x;        // the input rows, N x D, any floating dtype
  at::Tensor centred;  // x in float64 minus its column mean, contiguous
  at::Tensor gram;     // centred centred^T, N x N float64, contiguous

  // The uncentred float64 rows (for near pairs, which are rare: formed on demand).
  at::Tensor x64() const { return x.to(at::kDouble).contiguous(); }
};

// The features of `x` (N x D, any floating dtype). `gram`, when defined and non-empty, is the
// Gram matrix of these very features formed earlier (the combined op's saved one): it is
// reused instead of forming the float64 GEMM again. float64 for every input dtype: products
// of float32 values are exact in float64, and it is never TF32. The centring subtracts in
// place from one contiguous float64 copy of x (a mixed-dtype x - mean measured slower).
inline RkdFeatures rkd_features(const at::Tensor& x, const at::Tensor& gram = at::Tensor()) {
  RkdFeatures f;
  f.x = x;
  f.centred = x.to(at::kDouble, /*non_blocking=*/false, /*copy=*/true,
                   at::MemoryFormat::Contiguous);
  f.centred.sub_(f.centred.mean(0, /*keepdim=*/true));
  if (gram.defined() && gram.numel() > 0) {
    TORCH_CHECK(gram.scalar_type() == at::kDouble && gram.dim() == 2 &&
                    gram.size(0) == x.size(0) && gram.size(1) == x.size(0),
                "kdfast rkd: a saved Gram matrix must be N x N float64, got ", gram.sizes(), " ",
                gram.scalar_type(), " for N = ", x.size(0));
    f.gram = gram.contiguous();
  } else {
    f.gram = mm64(f.centred, f.centred.t());
  }
  return f;
}

}  // namespace kdfast::rkd

// CPU kernel of the fused small-matrix exponential: csrc/expm_small.h per matrix (one
// SerialTeam per matrix), tiles of matrices claimed dynamically (csrc/cpu/tiles.h), and the
// CPU registration.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <vector>

#include "../expm_small_op.h"
#include "tiles.h"

namespace kdfast::expm::small {
namespace {

void launch_cpu(const at::Tensor& A, const at::Tensor& E, at::Tensor& R, at::Tensor& L,
                bool skew) {
  const int64_t batch = A.size(0);
  const int n = static_cast<int>(A.size(-1));
  const int64_t grain = std::max<int64_t>(1, 4096 / (int64_t{n} * n * n));
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "expm_small_cpu", [&] {
    const scalar_t* a = A.const_data_ptr<scalar_t>();
    const scalar_t* e = E.defined() ? E.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* r = R.mutable_data_ptr<scalar_t>();
    scalar_t* l = L.defined() ? L.mutable_data_ptr<scalar_t>() : nullptr;
    const int64_t nn = int64_t{n} * n;
    auto make_work = [&] { return std::vector<scalar_t>(workspace_size(n)); };
    tiles::for_each_range_with(0, batch, grain, make_work,
                               [&](std::vector<scalar_t>& work, int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        expm_one(SerialTeam{}, n, skew, a + i * nn, e ? e + i * nn : nullptr, r + i * nn,
                 l ? l + i * nn : nullptr, work.data());
      }
    });
  });
}

at::Tensor expm_cpu(const at::Tensor& A, bool skew) {
  return std::get<0>(run(A, std::nullopt, skew, launch_cpu));
}

std::tuple<at::Tensor, at::Tensor> expm_frechet_cpu(const at::Tensor& A, const at::Tensor& E,
                                                    bool skew) {
  return run(A, E, skew, launch_cpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("expm_small_cpp", tiles::serial_glue<&expm_cpu>);
  m.impl("expm_frechet_small_cpp", tiles::serial_glue<&expm_frechet_cpu>);
}

}  // namespace kdfast::expm::small

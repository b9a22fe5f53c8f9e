// Test-only CPU ops that run the raw CUDA kernel of the fused small-matrix exponential
// (csrc/cuda/expm_small_kernels.h) on the CPU grid driver, the threads of each block as
// concurrent std::threads meeting at every __syncthreads, through the same launcher and
// csrc/expm_small_op.h as csrc/cuda/expm_small.cu. `threads` and `max_blocks` override the
// launcher's geometry (0: its own). Not a backend: kdfast/_dispatch.py never picks them.
#include <torch/library.h>

#include "../cuda/expm_small_kernels.h"
#include "../expm_small_op.h"
#include "cuda_host.h"

namespace kdfast::expm::small {
namespace {

using cuda_host::HostBlockTeam;

struct Grid : cuda_host::HostGrid {
  template <typename T>
  static constexpr auto expm_small =
      cuda_host::block_kernel("expm_small_kernel", &expm_small_body<T, HostBlockTeam>);
};

cuda_host::Geometry geometry(int64_t threads, int64_t max_blocks) {
  TORCH_CHECK_VALUE(0 <= threads && threads <= 1024,
                    "cuda_host: threads must be in [0, 1024] (0: the CUDA launcher's), got ",
                    threads);
  TORCH_CHECK_VALUE(max_blocks >= 0, "cuda_host: max_blocks must be >= 0, got ", max_blocks);
  return {threads, max_blocks};
}

at::Tensor expm_host(const at::Tensor& A, bool skew, int64_t threads, int64_t max_blocks) {
  const cuda_host::GeometryScope scope(geometry(threads, max_blocks));
  return std::get<0>(run(A, std::nullopt, skew, launch_expm_small<Grid>));
}

std::tuple<at::Tensor, at::Tensor> expm_frechet_host(const at::Tensor& A, const at::Tensor& E,
                                                     bool skew, int64_t threads,
                                                     int64_t max_blocks) {
  const cuda_host::GeometryScope scope(geometry(threads, max_blocks));
  return run(A, E, skew, launch_expm_small<Grid>);
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("expm_small_cuda_host", &expm_host);
  m.impl("expm_frechet_small_cuda_host", &expm_frechet_host);
}

}  // namespace kdfast::expm::small

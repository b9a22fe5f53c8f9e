// CUDA kernel of the fused small-matrix exponential: the __global__ wrapper around the body
// of csrc/cuda/expm_small_kernels.h (which the cuda_host tests run on CPU) with the thread
// block as its Team, and the CUDA registration.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../expm_small_op.h"
#include "expm_small_kernels.h"
#include "launch.cuh"

namespace kdfast::expm::small {
namespace {

struct BlockTeam {
  __device__ int64_t rank() const { return threadIdx.x; }
  __device__ int64_t size() const { return blockDim.x; }
  __device__ void sync() const { __syncthreads(); }
};

template <typename T>
__global__ void expm_small_kernel(const T* __restrict__ A, const T* __restrict__ E,
                                  T* __restrict__ R, T* __restrict__ L, T* __restrict__ work,
                                  int64_t batch, int n, bool skew) {
  expm_small_body(cuda::grid_pos(), BlockTeam{}, A, E, R, L, work, batch, n, skew);
}

struct Grid : cuda::CudaGrid {
  template <typename T>
  static constexpr auto expm_small = &expm_small_kernel<T>;
};

at::Tensor expm_cuda(const at::Tensor& A, bool skew) {
  const c10::cuda::CUDAGuard guard(A.device());
  return std::get<0>(run(A, std::nullopt, skew, launch_expm_small<Grid>));
}

std::tuple<at::Tensor, at::Tensor> expm_frechet_cuda(const at::Tensor& A, const at::Tensor& E,
                                                     bool skew) {
  const c10::cuda::CUDAGuard guard(A.device());
  return run(A, E, skew, launch_expm_small<Grid>);
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CUDA, m) {
  m.impl("expm_small_cpp", &expm_cuda);
  m.impl("expm_frechet_small_cpp", &expm_frechet_cuda);
}

}  // namespace kdfast::expm::small

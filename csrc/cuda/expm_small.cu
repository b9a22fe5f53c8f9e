// CUDA kernel of the fused small-matrix exponential: one matrix per thread block running
// csrc/expm_small.h (whose math the CPU tests cover) with the block as its Team, a
// grid-stride loop over matrices, and a global workspace per block; the CUDA registration.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "../expm_small_op.h"

namespace kdfast::expm::small {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1024;  // bounds the workspace; blocks stride over matrices

struct BlockTeam {
  __device__ int64_t rank() const { return threadIdx.x; }
  __device__ int64_t size() const { return blockDim.x; }
  __device__ void sync() const { __syncthreads(); }
};

template <typename T>
__global__ void expm_small_kernel(const T* __restrict__ A, const T* __restrict__ E,
                                  T* __restrict__ R, T* __restrict__ L, T* __restrict__ work,
                                  int64_t batch, int n, bool skew) {
  const int64_t nn = int64_t{n} * n;
  T* my_work = work + blockIdx.x * workspace_size(n);
  for (int64_t i = blockIdx.x; i < batch; i += gridDim.x) {
    expm_one(BlockTeam{}, n, skew, A + i * nn, E ? E + i * nn : nullptr, R + i * nn,
             L ? L + i * nn : nullptr, my_work);
  }
}

void launch_cuda(const at::Tensor& A, const at::Tensor& E, at::Tensor& R, at::Tensor& L,
                 bool skew) {
  const c10::cuda::CUDAGuard guard(A.device());
  const int64_t batch = A.size(0);
  const int n = static_cast<int>(A.size(-1));
  const int64_t blocks = std::min(batch, kMaxBlocks);
  const int threads = std::min(kThreads, std::max(32, n * n));
  at::Tensor work = at::empty({blocks * workspace_size(n)}, A.options());
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "expm_small_cuda", [&] {
    expm_small_kernel<scalar_t>
        <<<static_cast<unsigned int>(blocks), threads, 0, at::cuda::getCurrentCUDAStream()>>>(
            A.const_data_ptr<scalar_t>(), E.defined() ? E.const_data_ptr<scalar_t>() : nullptr,
            R.mutable_data_ptr<scalar_t>(), L.defined() ? L.mutable_data_ptr<scalar_t>() : nullptr,
            work.mutable_data_ptr<scalar_t>(), batch, n, skew);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor expm_cuda(const at::Tensor& A, bool skew) {
  return std::get<0>(run(A, std::nullopt, skew, launch_cuda));
}

std::tuple<at::Tensor, at::Tensor> expm_frechet_cuda(const at::Tensor& A, const at::Tensor& E,
                                                     bool skew) {
  return run(A, E, skew, launch_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CUDA, m) {
  m.impl("expm_small_cpp", &expm_cuda);
  m.impl("expm_frechet_small_cpp", &expm_frechet_cuda);
}

}  // namespace kdfast::expm::small

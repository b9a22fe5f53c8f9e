// The Grid of the launchers in csrc/cuda/*_kernels.h on a GPU: the CUDA launchers' own
// geometry (the CPU grid driver of the tests may override it) and a launch on the current
// stream. A derived struct names the op's __global__ kernels.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <cstdint>

namespace kdfast::cuda {

struct CudaGrid {
  static int threads(int default_threads) { return default_threads; }
  static int64_t max_blocks(int64_t default_blocks) { return default_blocks; }

  template <typename... Params, typename... Args>
  static void launch(void (*kernel)(Params...), int64_t blocks, int threads, Args... args) {
    kernel<<<static_cast<unsigned int>(blocks), threads, 0, at::cuda::getCurrentCUDAStream()>>>(
        args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace kdfast::cuda

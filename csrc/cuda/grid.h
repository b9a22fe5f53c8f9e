// Where a CUDA kernel body is in its grid, as plain integers, so that the body can run in
// a __global__ wrapper (CUDA builtins) and in the CPU grid driver of csrc/cpu/cuda_host.h
// (loops and std::threads), which runs every raw CUDA kernel's indexing in the CPU tests.
#pragma once

#include <stdint.h>

#include "../macros.h"

namespace kdfast::cuda {

// blockIdx.x, threadIdx.x, blockDim.x and gridDim.x, widened to int64 so that every index
// formed from them is 64-bit (tests/kernels/test_ptx.py checks the PTX for 32-bit offsets).
struct GridPos {
  int64_t block, thread, block_dim, grid_dim;

  KDFAST_HOST_DEVICE int64_t global() const { return block * block_dim + thread; }
};

#if defined(__CUDACC__)
__device__ __forceinline__ GridPos grid_pos() {
  return {static_cast<int64_t>(blockIdx.x), static_cast<int64_t>(threadIdx.x),
          static_cast<int64_t>(blockDim.x), static_cast<int64_t>(gridDim.x)};
}
#endif

// Blocks of `threads` covering `count` threads (the last block may be partial).
KDFAST_HOST_DEVICE int64_t blocks_for(int64_t count, int64_t threads) {
  return (count + threads - 1) / threads;
}

}  // namespace kdfast::cuda

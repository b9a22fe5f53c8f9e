// The CUDA kernel of the fused small-matrix exponential as a host-and-device body of
// (block, thread): one matrix per thread block running csrc/expm_small.h with the block as
// its Team, a grid-stride loop over matrices and a global workspace per block; and its
// launcher, templated on where the grid runs: the CUDA launch in csrc/cuda/expm_small.cu,
// the CPU grid driver in csrc/cpu/cuda_host_expm.cpp (tests), whose Team syncs are real
// barriers between concurrent threads. Grid provides threads(default), max_blocks(default)
// and launch(kernel, blocks, threads, args...) with the kernel named below as its member.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>

#include "../expm_small.h"
#include "grid.h"

namespace kdfast::expm::small {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1024;  // bounds the workspace; blocks stride over matrices

// One thread per entry of the n x n matrix, at least a warp, at most kThreads.
inline int threads_for(int n) { return std::min(kThreads, std::max(32, n * n)); }

// A block per matrix, at most max_blocks: the blocks then stride over the batch.
inline int64_t grid_blocks(int64_t batch, int64_t max_blocks) {
  return std::min(batch, max_blocks);
}

// `team` holds the threads of block `at.block` (team.rank() == at.thread).
template <typename T, typename Team>
KDFAST_HOST_DEVICE void expm_small_body(const cuda::GridPos& at, const Team& team, const T* A,
                                        const T* E, T* R, T* L, T* work, int64_t batch, int n,
                                        bool skew) {
  const int64_t nn = int64_t{n} * n;
  T* my_work = work + at.block * workspace_size(n);
  for (int64_t i = at.block; i < batch; i += at.grid_dim) {
    expm_one(team, n, skew, A + i * nn, E ? E + i * nn : nullptr, R + i * nn,
             L ? L + i * nn : nullptr, my_work);
  }
}

// The Launch of csrc/expm_small_op.h; A, E, R, L are contiguous (batch, n, n).
template <class Grid>
void launch_expm_small(const at::Tensor& A, const at::Tensor& E, at::Tensor& R, at::Tensor& L,
                       bool skew) {
  const int64_t batch = A.size(0);
  const int n = static_cast<int>(A.size(-1));
  const int64_t blocks = grid_blocks(batch, Grid::max_blocks(kMaxBlocks));
  const int threads = Grid::threads(threads_for(n));
  at::Tensor work = at::empty({blocks * workspace_size(n)}, A.options());
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "expm_small_cuda", [&] {
    Grid::launch(Grid::template expm_small<scalar_t>, blocks, threads,
                 A.const_data_ptr<scalar_t>(),
                 E.defined() ? E.const_data_ptr<scalar_t>() : nullptr,
                 R.mutable_data_ptr<scalar_t>(),
                 L.defined() ? L.mutable_data_ptr<scalar_t>() : nullptr,
                 work.mutable_data_ptr<scalar_t>(), batch, n, skew);
  });
}

}  // namespace kdfast::expm::small

// Host/device qualifiers shared by the per-element math headers, so one definition serves
// the CPU kernels (compiled by the host compiler) and the CUDA kernels (compiled by nvcc).
#pragma once

#if defined(__CUDACC__)
#define KDFAST_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define KDFAST_HOST_DEVICE inline
#endif

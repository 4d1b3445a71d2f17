// Device helpers the CUDA kernels share: exact activations for float and double,
// and a block-wide sum.
#pragma once

#include <cuda_runtime.h>

#include "cuda.h"

namespace fastl2r::cuda {

__device__ __forceinline__ float exp_(float x) { return expf(x); }
__device__ __forceinline__ double exp_(double x) { return exp(x); }
__device__ __forceinline__ float tanh_(float x) { return tanhf(x); }
__device__ __forceinline__ double tanh_(double x) { return tanh(x); }

template <typename T>
__device__ __forceinline__ T sigmoid_(T x) {
  return T(1) / (T(1) + exp_(-x));
}

// Sum of v over the block (blockDim.x a multiple of 32, every thread calling); the
// result is valid in thread 0.  `scratch` holds 32 values in shared memory.
template <typename A>
__device__ A block_sum(A v, A* scratch) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x >> 5) ? scratch[lane] : A(0);
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;
}

}  // namespace fastl2r::cuda

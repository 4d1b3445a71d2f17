// What the CUDA kernels of every op share on the host side: launch constants, the row-block
// table and the Context an op's kernels get.  Plain C++ with no torch, so that every cuda.cu
// compiles with nvcc alone; cuda_module.cpp is the torch-facing side (checks, allocation,
// streams, registration).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <functional>
#include <vector>

#include "layout.h"

namespace fastl2r::cuda {

// Rows per block of the row-blocked kernels (a block never straddles two segments).
constexpr int kRowBlock = 16;
// Threads per block of every kernel (a multiple of 32).
constexpr int kThreads = 256;
// The largest hidden size the meta-LSTM and gated-update kernels take (4H gates over 256 threads, 4 each).
constexpr int64_t kMaxHidden = 256;

// A group's row blocks, in device memory (cuda_module.cpp builds and caches it per segment
// layout).  The rows come in segments: segment e is episode slot e % slots of tensor e / slots
// (checks.h); the gated update's table has one slot, so a segment is a tensor.
struct RowTable {
  const int64_t* blocks;       // [num_blocks][4]: tensor, first row, end row, segment
  const int64_t* starts;       // [segments + 1]: where each segment's rows start, then R
  const int64_t* first_block;  // [segments + 1]: each segment's first block, then num_blocks
  int64_t num_blocks;
  int64_t tensors;
  int64_t slots;

  FASTL2R_HOST_DEVICE int64_t segments() const { return tensors * slots; }
  FASTL2R_HOST_DEVICE int64_t tensor(int64_t block) const { return blocks[4 * block]; }
  FASTL2R_HOST_DEVICE int64_t begin(int64_t block) const { return blocks[4 * block + 1]; }
  FASTL2R_HOST_DEVICE int64_t end(int64_t block) const { return blocks[4 * block + 2]; }
  FASTL2R_HOST_DEVICE int64_t segment(int64_t block) const { return blocks[4 * block + 3]; }
};

// What an op's CUDA kernels get beside their raw arguments (cuda_module.cpp fills it in): the
// `cuda::run` of each op (common/entry_points.h) records the first launch error in `status`.
struct Context {
  RowTable table;  // the group's row blocks (not set for the channel means)
  cudaStream_t stream;
  // Device memory for `elements` values of the op's scalar type, alive until the op returns.
  std::function<void*(int64_t elements)> workspace;
  // A copy of a host table in device memory, alive until the op returns.
  std::function<const int64_t*(const std::vector<int64_t>&)> upload;
  cudaError_t status = cudaSuccess;

  // Records `error` unless an earlier one is recorded; whether every launch so far succeeded.
  bool ok(cudaError_t error) {
    if (status == cudaSuccess) status = error;
    return status == cudaSuccess;
  }
};

}  // namespace fastl2r::cuda

// Instantiates an op's cuda::run for Args<float> and Args<double> (in its cuda.cu, for cuda_module.cpp).
#define FASTL2R_INSTANTIATE_RUN(Args)                    \
  template void run<float>(Context&, const Args<float>&); \
  template void run<double>(Context&, const Args<double>&);

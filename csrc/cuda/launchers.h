// The CUDA kernels' launchers: raw device pointers in, a cudaError_t out.  Plain C++
// with no torch, so that every .cu file compiles with nvcc alone; binding.cpp is the
// torch-facing side (checks, allocation, streams, registration).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../layout.h"

namespace fastl2r::cuda {

// Rows per block of the row-blocked kernels (a block never straddles two segments).
constexpr int kRowBlock = 16;
// Threads per block of every kernel (a multiple of 32).
constexpr int kThreads = 256;

// A group's row blocks, in device memory (binding.cpp builds and caches it per `rows` and
// slot count).  The rows come in segments: segment e is episode slot e % slots of tensor
// e / slots (op_common.h); the gated update's table has one slot, so a segment is a tensor.
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

// Channel means.  `table` (device, int64): per unique source tensor its (data pointer,
// batch, channels, inner size, first channel among all sources' channels); then
// [sources + 1] starts into the output-offset list; then that list (a tensor listed
// several times is read once and written to each of its places in `out`).
template <typename T>
cudaError_t channel_means(const int64_t* table, int64_t sources, int64_t channels, T* out, cudaStream_t stream);

// The largest hidden size the meta-LSTM kernels take (4H gates over 256 threads, 4 each).
constexpr int64_t kMaxHidden = 256;

// Workspace sizes (elements of T) of the launchers below: per segment, scales (and cell 0's bias).
inline int64_t meta_lstm_forward_workspace(const GroupLayout& L, int64_t segments) {
  return segments * (L.num_scales() + L.gates());
}
inline int64_t meta_lstm_backward_workspace(const GroupLayout& L, int64_t segments, int64_t rows) {
  return segments * L.num_scales() + kNumCells * rows * L.gates();
}
// The gated update's kernels take the K columns of a row block kThreads at a time.
inline int64_t head_column_blocks(const GroupLayout& L) { return (L.K + kThreads - 1) / kThreads; }
inline int64_t gated_update_backward_workspace(const GroupLayout& L, const RowTable& table, int64_t rows) {
  return rows * L.K + table.num_blocks * head_column_blocks(L);
}

template <typename T>
cudaError_t meta_lstm_forward(const GroupLayout& L, const RowTable& table, int64_t rows, const T* w, const T* g,
                              const T* a_row, const T* a_shared, const T* lstm, const T* h, const T* c,
                              T* workspace, T* h_new, T* c_new, T* gates, cudaStream_t stream);

template <typename T>
cudaError_t meta_lstm_backward(const GroupLayout& L, const RowTable& table, int64_t rows, const T* grad_h_new,
                               const T* grad_c_new, const T* w, const T* g, const T* a_row, const T* a_shared,
                               const T* lstm, const T* h, const T* c, const T* h_new, const T* c_new,
                               const T* gates, T* workspace, T* grad_w, T* grad_lstm, T* grad_h, T* grad_c,
                               cudaStream_t stream);

template <typename T>
cudaError_t gated_update_forward(const GroupLayout& L, const RowTable& table, const T* h3, const T* head,
                                 const T* w, const T* g, T lr, T* w_new, T* delta, T* tanh_z,
                                 cudaStream_t stream);

template <typename T>
cudaError_t gated_update_backward(const GroupLayout& L, const RowTable& table, int64_t rows, const T* grad_w_new,
                                  const T* grad_delta, const T* h3, const T* head, const T* g, T lr,
                                  const T* tanh_z, T* workspace, T* grad_h3, T* grad_head, cudaStream_t stream);

}  // namespace fastl2r::cuda

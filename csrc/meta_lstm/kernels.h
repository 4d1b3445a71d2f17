// The grouped meta-LSTM's kernels (fastl2r/ops/reference.py::meta_lstm): their raw arguments,
// the same for the CPU (cpu.cpp) and the CUDA (cuda.cu) kernels, and each device's entry
// points (common/entry_points.h).  Plain C++ with no torch, so that cuda.cu compiles with
// nvcc alone.
#pragma once

#include <cstdint>

#include "../common/entry_points.h"
#include "../common/layout.h"

namespace fastl2r {

// Every tensor contiguous; R rows in all, every slot's; the row segments come with the
// device's Context.
template <typename T>
struct MetaLstmForward {
  using Scalar = T;
  GroupLayout layout;
  int64_t rows;                                           // R
  const T *w, *g;                                         // [R, K]
  const T* a_row;                                         // [R, Ar]
  const T* a_shared;                                      // [G·S, Ds]
  const T* lstm;                                          // [G, lstm_size]
  const T *h, *c;                                         // [3, R, H]
  T *h_new, *c_new;                                       // [3, R, H]
  T* gates;                                               // [3, R, 4H]: activated i, f, g, o
};

template <typename T>
struct MetaLstmBackward {
  using Scalar = T;
  GroupLayout layout;
  int64_t rows;                                           // R
  const T *grad_h_new, *grad_c_new;                       // [3, R, H]; null: absent, read as zero
  const T *w, *g, *a_row, *a_shared, *lstm, *h, *c;       // the forward's inputs
  const T *h_new, *c_new, *gates;                         // and outputs
  T *grad_w, *grad_lstm, *grad_h, *grad_c;                // shaped as w, lstm, h, c
};

FASTL2R_DECLARE_RUN(MetaLstmForward)
FASTL2R_DECLARE_RUN(MetaLstmBackward)

}  // namespace fastl2r

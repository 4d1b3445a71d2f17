// The gated update's kernels (fastl2r/ops/reference.py::gated_update): their raw arguments,
// the same for the CPU (cpu.cpp) and the CUDA (cuda.cu) kernels, and each device's entry
// points (common/entry_points.h).  Plain C++ with no torch, so that cuda.cu compiles with
// nvcc alone.
#pragma once

#include <cstdint>

#include "../common/entry_points.h"
#include "../common/layout.h"

namespace fastl2r {

// Every tensor contiguous; R rows in all; the rows of each head come with the device's Context.
template <typename T>
struct GatedUpdateForward {
  using Scalar = T;
  GroupLayout layout;                  // K and H (no activation features)
  int64_t rows;                        // R
  const T* h3;                         // [R, H]
  const T* head;                       // [G, head_size]
  const T *w, *g;                      // [R, K]
  T lr;
  T *w_new, *delta, *tanh_z;           // [R, K]; tanh_z is saved for the backward
};

template <typename T>
struct GatedUpdateBackward {
  using Scalar = T;
  GroupLayout layout;
  int64_t rows;
  const T *grad_w_new, *grad_delta;    // [R, K]; null: absent, read as zero
  const T *h3, *head, *g;
  T lr;
  const T* tanh_z;
  T *grad_h3, *grad_head;              // shaped as h3, head
};

FASTL2R_DECLARE_RUN(GatedUpdateForward)
FASTL2R_DECLARE_RUN(GatedUpdateBackward)

}  // namespace fastl2r

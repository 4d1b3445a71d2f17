// The channel means' kernels (fastl2r/ops/reference.py::channel_means): their raw arguments,
// the same for the CPU (cpu.cpp) and the CUDA (cuda.cu) kernels, and each device's entry
// points (common/entry_points.h).  Plain C++ with no torch, so that cuda.cu compiles with
// nvcc alone.
#pragma once

#include <cstdint>
#include <vector>

#include "../common/entry_points.h"

namespace fastl2r {

template <typename T>
struct ChannelMeans {
  using Scalar = T;
  // One activation, contiguous, read as [batch, channels, inner].
  struct Source {
    const T* data;
    int64_t batch, channels, inner;
  };
  // Each distinct activation with channels once (a layer's output is often the next one's
  // input: listed twice, read once).
  std::vector<Source> sources;
  // Where source s's means go: out[places[k] + channel] for k in [place_starts[s], place_starts[s + 1]).
  std::vector<int64_t> place_starts{0};
  std::vector<int64_t> places;
  T* out;
};

FASTL2R_DECLARE_RUN(ChannelMeans)

}  // namespace fastl2r

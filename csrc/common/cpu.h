// What the CPU kernels share: how an op reaches them (Context, Device), task-parallel loops
// on ATen's OpenMP threads, the GEMM (gemm.h) and vectorised activations on raw row-major
// blocks, row blocks of a group.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <utility>
#include <vector>

#include "checks.h"
#include "gemm.h"

namespace fastl2r::cpu {

// What an op's CPU kernels get beside their raw arguments: the group's row segments (none for
// the channel means).
struct Context {
  Segments segments;
};

// Runs an op's CPU kernels for its device-agnostic side (csrc/<op>/op.h): the op's
// `cpu::run(const Context&, const Args&)` (common/entry_points.h), found by argument-dependent
// lookup on Context.
struct Device {
  explicit Device(const at::Tensor&) {}
  Device(const at::Tensor&, const GroupLayout&, Segments segments) : context{std::move(segments)} {}

  template <typename Args>
  void launch(const Args& args) const {
    run(context, args);
  }

  Context context;
};

// Runs task(i) for every i in [0, n) on ATen's intra-op threads (OpenMP), handing
// tasks out one at a time so that unequal tasks still balance.  Every task writes
// its own outputs and runs single-threaded (ATen's kernels inside it too), and tasks
// are cut by shapes only, never along a sum: no result depends on the number of threads.
template <typename Task>
void parallel_tasks(int64_t n, const Task& task) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(n, at::get_num_threads());
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    c10::InferenceMode no_autograd;  // the activations wrap raw memory: no graph, no version counters
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) task(i);
  });
}

// A tensor over raw memory (no ownership), for handing a block to an ATen kernel.
template <typename T>
at::Tensor view(const T* data, at::IntArrayRef sizes, at::IntArrayRef strides) {
  return at::from_blob(const_cast<T*>(data), sizes, strides,
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

// out[r, :] = row for every r < rows (out row-major [rows, n]): a bias before a GEMM with beta = 1.
template <typename T>
void fill_rows(const T* row, int64_t rows, int64_t n, T* out) {
  for (int64_t r = 0; r < rows; ++r) std::copy_n(row, n, out + r * n);
}

// Activations in place on a row-major [rows, n] block with row stride ld, by ATen's
// vectorised kernels (SLEEF, picked for this CPU at run time): a scalar std::exp or
// std::tanh per element would cost more than the GEMMs around it.
template <typename T>
void sigmoid_(T* x, int64_t rows, int64_t n, int64_t ld) {
  view(x, {rows, n}, {ld, 1}).sigmoid_();
}
template <typename T>
void tanh_(T* x, int64_t rows, int64_t n, int64_t ld) {
  view(x, {rows, n}, {ld, 1}).tanh_();
}

// A run of at most `block` consecutive rows of one segment (tensor, slot) of a group.
struct RowBlock {
  int64_t tensor, segment, begin, end;
};

inline std::vector<RowBlock> row_blocks(const Segments& segments, int64_t block) {
  std::vector<RowBlock> blocks;
  for (int64_t e = 0; e < segments.count(); ++e) {
    const int64_t end = segments.starts[e + 1];
    for (int64_t r = segments.starts[e]; r < end; r += block) {
      blocks.push_back({segments.tensor(e), e, r, std::min(r + block, end)});
    }
  }
  return blocks;
}

// Rows per task of the row-blocked loops: small enough to balance two threads on the
// groups of a ResNet, large enough for an efficient GEMM.
constexpr int64_t kRowBlock = 32;

// Uninitialised scratch memory, NaN-filled in the poison test mode.
template <typename T>
std::unique_ptr<T[]> scratch(int64_t n) {
  std::unique_ptr<T[]> buffer(new T[n]);
  if (poison_outputs()) std::fill_n(buffer.get(), n, std::numeric_limits<T>::quiet_NaN());
  return buffer;
}

}  // namespace fastl2r::cpu

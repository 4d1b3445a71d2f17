// What the torch-facing side of every op (csrc/<op>/op.h) shares, whatever the device:
// argument checks, output allocation, optional tensors and the group's row segments.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <limits>
#include <optional>
#include <vector>

#include "layout.h"

namespace fastl2r {

// Test mode: FASTL2R_POISON_OUTPUTS=1 fills every output and scratch buffer with NaN
// when it is allocated, so that an element a kernel forgets to write fails the tests.
inline bool poison_outputs() {
  const char* value = std::getenv("FASTL2R_POISON_OUTPUTS");
  return value != nullptr && value[0] == '1';
}

inline at::Tensor new_buffer(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor buffer = at::empty(sizes, options);
  if (poison_outputs()) buffer.fill_(std::numeric_limits<double>::quiet_NaN());
  return buffer;
}

inline void check_float(const at::Tensor& x, const char* name, const at::Tensor& like) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "fastl2r: ", name, " must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.scalar_type() == like.scalar_type(), "fastl2r: ", name, " has dtype ", x.scalar_type(),
              ", expected ", like.scalar_type());
  TORCH_CHECK(x.device() == like.device(), "fastl2r: ", name, " is on ", x.device(), ", expected ",
              like.device());
}

inline void check_shape(const at::Tensor& x, const char* name, at::IntArrayRef expected) {
  TORCH_CHECK(x.sizes() == expected, "fastl2r: ", name, " has shape ", x.sizes(), ", expected ", expected);
}

// An absent cotangent (None: its output is unused) is passed as no tensor and read as zero by
// every kernel; a present one is checked like `like`, with `like`'s shape.
inline void check_cotangent(const std::optional<at::Tensor>& x, const char* name, const at::Tensor& like) {
  if (!x) return;
  check_float(*x, name, like);
  check_shape(*x, name, like.sizes());
}

inline std::optional<at::Tensor> contiguous(const std::optional<at::Tensor>& x) {
  return x ? std::optional<at::Tensor>(x->contiguous()) : std::nullopt;
}

// The kernels' pointer to an optional tensor: null where it is absent.
template <typename T>
const T* data_or_null(const std::optional<at::Tensor>& x) {
  return x ? x->data_ptr<T>() : nullptr;
}

// A group's rows by segment.  Segment e is episode slot e % slots of tensor e / slots: tensor
// t's slots·rows[t] rows follow the earlier tensors' rows, slot by slot (reference.py::meta_lstm).
struct Segments {
  int64_t slots = 1;
  std::vector<int64_t> starts{0};  // [G·slots + 1]: where each segment starts, then the group's rows

  int64_t count() const { return static_cast<int64_t>(starts.size()) - 1; }
  int64_t tensors() const { return count() / slots; }
  int64_t tensor(int64_t segment) const { return segment / slots; }
  // Tensor t's rows, all its slots: [first_row(t), first_row(t + 1)).
  int64_t first_row(int64_t t) const { return starts[t * slots]; }
};

// One slot's rows, each tensor's checked: their sum.
inline int64_t rows_per_slot(at::IntArrayRef rows, int64_t groups) {
  TORCH_CHECK(static_cast<int64_t>(rows.size()) == groups, "fastl2r: rows has ", rows.size(),
              " entries for ", groups, " tensors");
  int64_t sum = 0;
  for (int64_t n : rows) {
    TORCH_CHECK(n > 0, "fastl2r: every tensor needs at least one row, got rows ", rows);
    sum += n;
  }
  return sum;
}

inline Segments segments(at::IntArrayRef rows, int64_t slots) {
  Segments s{slots, {0}};
  const int64_t count = static_cast<int64_t>(rows.size()) * slots;
  for (int64_t e = 0; e < count; ++e) s.starts.push_back(s.starts.back() + rows[e / slots]);
  return s;
}

// The meta-LSTM's rows: `rows` counts one slot's, the group's `total` rows hold total / sum(rows) slots.
inline Segments slot_segments(at::IntArrayRef rows, int64_t groups, int64_t total) {
  const int64_t per_slot = rows_per_slot(rows, groups);
  TORCH_CHECK(total > 0 && total % per_slot == 0, "fastl2r: rows ", rows, " (one episode slot's) add up to ",
              per_slot, ", which does not divide the group's ", total, " rows");
  return segments(rows, total / per_slot);
}

// The gated update's rows: rows[t] rows use head t and together are all of the group's rows
// (ops.gated_update passes each tensor's rows of every slot).
inline Segments head_segments(at::IntArrayRef rows, int64_t groups, int64_t total) {
  const int64_t sum = rows_per_slot(rows, groups);
  TORCH_CHECK(sum == total, "fastl2r: rows ", rows, " add up to ", sum, ", not ", total);
  return segments(rows, 1);
}

}  // namespace fastl2r

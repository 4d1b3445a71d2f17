// What the torch-facing side of every backend (CPU kernels, CUDA binding) shares:
// argument checks, output allocation and the group's row segments.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <limits>
#include <string>
#include <utility>
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

// A group's rows by segment.  Segment e is episode slot e % slots of tensor e / slots: tensor
// t's slots·rows[t] rows follow the earlier tensors' rows, slot by slot (reference.py::meta_lstm).
struct Segments {
  int64_t slots;
  std::vector<int64_t> starts;  // [G·slots + 1]: where each segment starts, then the group's rows

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

// A checked meta_lstm call: its layout and its group's segments.
struct MetaLstmGroup {
  GroupLayout layout;
  Segments segments;
};

inline MetaLstmGroup check_meta_lstm(const at::Tensor& w, const at::Tensor& g, const at::Tensor& a_row,
                                     const at::Tensor& a_shared, const at::Tensor& lstm, at::IntArrayRef rows,
                                     const at::Tensor& h, const at::Tensor& c) {
  TORCH_CHECK(w.dim() == 2 && a_row.dim() == 2 && a_shared.dim() == 2 && lstm.dim() == 2 && h.dim() == 3,
              "fastl2r.meta_lstm: expected w, a_row, a_shared, lstm 2-D and h 3-D");
  const GroupLayout layout{w.size(1), a_row.size(1), a_shared.size(1), h.size(2)};
  const int64_t R = w.size(0), G = lstm.size(0);
  Segments segs = slot_segments(rows, G, R);
  check_float(w, "w", w);
  for (auto [x, name] : {std::pair{&g, "g"}, {&a_row, "a_row"}, {&a_shared, "a_shared"}, {&lstm, "lstm"},
                         {&h, "h"}, {&c, "c"}}) {
    check_float(*x, name, w);
  }
  check_shape(g, "g", w.sizes());
  check_shape(a_row, "a_row", {R, layout.Ar});
  check_shape(a_shared, "a_shared", {G * segs.slots, layout.Ds});  // one row per (tensor, slot)
  check_shape(lstm, "lstm", {G, layout.lstm_size()});
  check_shape(h, "h", {kNumCells, R, layout.H});
  check_shape(c, "c", {kNumCells, R, layout.H});
  return {layout, std::move(segs)};
}

inline GroupLayout check_gated_update(const at::Tensor& h3, const at::Tensor& head, const at::Tensor& w,
                                      const at::Tensor& g) {
  TORCH_CHECK(h3.dim() == 2 && head.dim() == 2 && w.dim() == 2,
              "fastl2r.gated_update: expected h3, head and w 2-D");
  const GroupLayout layout{w.size(1), 0, 0, h3.size(1)};
  check_float(w, "w", w);
  for (auto [x, name] : {std::pair{&g, "g"}, {&h3, "h3"}, {&head, "head"}}) check_float(*x, name, w);
  check_shape(g, "g", w.sizes());
  check_shape(h3, "h3", {w.size(0), layout.H});
  check_shape(head, "head", {head.size(0), layout.head_size()});
  return layout;
}

// The backward's inputs: the forward's checks plus the cotangents and saved outputs.
inline MetaLstmGroup check_meta_lstm_backward(const at::Tensor& grad_h, const at::Tensor& grad_c,
                                              const at::Tensor& w, const at::Tensor& g, const at::Tensor& a_row,
                                              const at::Tensor& a_shared, const at::Tensor& lstm,
                                              at::IntArrayRef rows, const at::Tensor& h, const at::Tensor& c,
                                              const at::Tensor& h_new, const at::Tensor& c_new,
                                              const at::Tensor& gates) {
  MetaLstmGroup group = check_meta_lstm(w, g, a_row, a_shared, lstm, rows, h, c);
  for (auto [x, name] : {std::pair{&grad_h, "grad_h"}, {&grad_c, "grad_c"}, {&h_new, "h_new"}, {&c_new, "c_new"}}) {
    check_float(*x, name, w);
    check_shape(*x, name, h.sizes());
  }
  check_float(gates, "gates", w);
  check_shape(gates, "gates", {kNumCells, w.size(0), group.layout.gates()});
  return group;
}

inline GroupLayout check_gated_update_backward(const at::Tensor& grad_w_new, const at::Tensor& grad_delta,
                                               const at::Tensor& h3, const at::Tensor& head, const at::Tensor& g,
                                               const at::Tensor& tanh_z) {
  const GroupLayout layout = check_gated_update(h3, head, g, g);
  for (auto [x, name] : {std::pair{&grad_w_new, "grad_w_new"}, {&grad_delta, "grad_delta"}, {&tanh_z, "tanh_z"}}) {
    check_float(*x, name, g);
    check_shape(*x, name, g.sizes());
  }
  return layout;
}

}  // namespace fastl2r

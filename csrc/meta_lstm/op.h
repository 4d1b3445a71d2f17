// The meta_lstm and meta_lstm_backward operators' torch-facing side, one for every device:
// argument checks, contiguous inputs, outputs, and the kernels' raw arguments.  `Device`
// (cpu::Device in common/cpu.h, cuda::Device in common/cuda_module.cpp) adds what only its
// kernels need and runs them.
#pragma once

#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <tuple>
#include <utility>

#include "../common/checks.h"
#include "kernels.h"

namespace fastl2r {

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

template <typename Device>
std::tuple<at::Tensor, at::Tensor, at::Tensor> meta_lstm(const at::Tensor& w, const at::Tensor& g,
                                                         const at::Tensor& a_row, const at::Tensor& a_shared,
                                                         const at::Tensor& lstm, at::IntArrayRef rows,
                                                         const at::Tensor& h, const at::Tensor& c) {
  MetaLstmGroup group = check_meta_lstm(w, g, a_row, a_shared, lstm, rows, h, c);
  const GroupLayout L = group.layout;
  Device device(w, L, std::move(group.segments));
  const at::Tensor wc = w.contiguous(), gc = g.contiguous(), ac = a_row.contiguous(), sc = a_shared.contiguous(),
                   lc = lstm.contiguous(), hc = h.contiguous(), cc = c.contiguous();
  at::Tensor h_new = new_buffer(h.sizes(), h.options());
  at::Tensor c_new = new_buffer(h.sizes(), h.options());
  at::Tensor gates = new_buffer({kNumCells, w.size(0), L.gates()}, h.options());
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "fastl2r.meta_lstm", [&] {
    device.launch(MetaLstmForward<scalar_t>{
        L, w.size(0), wc.data_ptr<scalar_t>(), gc.data_ptr<scalar_t>(), ac.data_ptr<scalar_t>(),
        sc.data_ptr<scalar_t>(), lc.data_ptr<scalar_t>(), hc.data_ptr<scalar_t>(), cc.data_ptr<scalar_t>(),
        h_new.data_ptr<scalar_t>(), c_new.data_ptr<scalar_t>(), gates.data_ptr<scalar_t>()});
  });
  return {h_new, c_new, gates};
}

// The cotangents of h_new and c_new are optional (absent: that output is unused).
template <typename Device>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> meta_lstm_backward(
    const std::optional<at::Tensor>& grad_h_new, const std::optional<at::Tensor>& grad_c_new, const at::Tensor& w,
    const at::Tensor& g, const at::Tensor& a_row, const at::Tensor& a_shared, const at::Tensor& lstm,
    at::IntArrayRef rows, const at::Tensor& h, const at::Tensor& c, const at::Tensor& h_new,
    const at::Tensor& c_new, const at::Tensor& gates) {
  MetaLstmGroup group = check_meta_lstm(w, g, a_row, a_shared, lstm, rows, h, c);
  const GroupLayout L = group.layout;
  check_cotangent(grad_h_new, "grad_h_new", h);
  check_cotangent(grad_c_new, "grad_c_new", h);
  for (auto [x, name] : {std::pair{&h_new, "h_new"}, {&c_new, "c_new"}}) {
    check_float(*x, name, w);
    check_shape(*x, name, h.sizes());
  }
  check_float(gates, "gates", w);
  check_shape(gates, "gates", {kNumCells, w.size(0), L.gates()});
  Device device(w, L, std::move(group.segments));
  const std::optional<at::Tensor> dh = contiguous(grad_h_new), dc = contiguous(grad_c_new);
  const at::Tensor wc = w.contiguous(), gc = g.contiguous(), ac = a_row.contiguous(), sc = a_shared.contiguous(),
                   lc = lstm.contiguous(), hc = h.contiguous(), cc = c.contiguous(), hn = h_new.contiguous(),
                   cn = c_new.contiguous(), gt = gates.contiguous();
  at::Tensor grad_w = new_buffer(w.sizes(), w.options());
  at::Tensor grad_lstm = new_buffer(lstm.sizes(), lstm.options());
  at::Tensor grad_h = new_buffer(h.sizes(), h.options());
  at::Tensor grad_c = new_buffer(h.sizes(), h.options());
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "fastl2r.meta_lstm_backward", [&] {
    device.launch(MetaLstmBackward<scalar_t>{
        L, w.size(0), data_or_null<scalar_t>(dh), data_or_null<scalar_t>(dc), wc.data_ptr<scalar_t>(),
        gc.data_ptr<scalar_t>(), ac.data_ptr<scalar_t>(), sc.data_ptr<scalar_t>(), lc.data_ptr<scalar_t>(),
        hc.data_ptr<scalar_t>(), cc.data_ptr<scalar_t>(), hn.data_ptr<scalar_t>(), cn.data_ptr<scalar_t>(),
        gt.data_ptr<scalar_t>(), grad_w.data_ptr<scalar_t>(), grad_lstm.data_ptr<scalar_t>(),
        grad_h.data_ptr<scalar_t>(), grad_c.data_ptr<scalar_t>()});
  });
  return {grad_w, grad_lstm, grad_h, grad_c};
}

// Registers both operators' kernels for `Device` (its dispatch key: `m`'s).
template <typename Device>
void register_meta_lstm(torch::Library& m) {
  m.impl("meta_lstm", &meta_lstm<Device>);
  m.impl("meta_lstm_backward", &meta_lstm_backward<Device>);
}

}  // namespace fastl2r

// The gated_update and gated_update_backward operators' torch-facing side, one for every
// device: argument checks, contiguous inputs, outputs, and the kernels' raw arguments.
// `Device` (cpu::Device in common/cpu.h, cuda::Device in common/cuda_module.cpp) adds what
// only its kernels need and runs them.
#pragma once

#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <tuple>
#include <utility>

#include "../common/checks.h"
#include "kernels.h"

namespace fastl2r {

// The layout (K, H) of a gated update of weights shaped as `w`.
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

template <typename Device>
std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_update(const at::Tensor& h3, const at::Tensor& head,
                                                            const at::Tensor& w, const at::Tensor& g,
                                                            at::IntArrayRef rows, double lr) {
  const GroupLayout L = check_gated_update(h3, head, w, g);
  Device device(w, L, head_segments(rows, head.size(0), w.size(0)));
  const at::Tensor hc = h3.contiguous(), pc = head.contiguous(), wc = w.contiguous(), gc = g.contiguous();
  at::Tensor w_new = new_buffer(w.sizes(), w.options());
  at::Tensor delta = new_buffer(w.sizes(), w.options());
  at::Tensor tanh_z = new_buffer(w.sizes(), w.options());
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "fastl2r.gated_update", [&] {
    device.launch(GatedUpdateForward<scalar_t>{
        L, w.size(0), hc.data_ptr<scalar_t>(), pc.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(),
        gc.data_ptr<scalar_t>(), static_cast<scalar_t>(lr), w_new.data_ptr<scalar_t>(), delta.data_ptr<scalar_t>(),
        tanh_z.data_ptr<scalar_t>()});
  });
  return {w_new, delta, tanh_z};
}

// The cotangents of w_new and δ are optional (absent: that output is unused).
template <typename Device>
std::tuple<at::Tensor, at::Tensor> gated_update_backward(const std::optional<at::Tensor>& grad_w_new,
                                                         const std::optional<at::Tensor>& grad_delta,
                                                         const at::Tensor& h3, const at::Tensor& head,
                                                         const at::Tensor& g, at::IntArrayRef rows, double lr,
                                                         const at::Tensor& tanh_z) {
  const GroupLayout L = check_gated_update(h3, head, g, g);
  check_cotangent(grad_w_new, "grad_w_new", g);
  check_cotangent(grad_delta, "grad_delta", g);
  check_float(tanh_z, "tanh_z", g);
  check_shape(tanh_z, "tanh_z", g.sizes());
  Device device(g, L, head_segments(rows, head.size(0), g.size(0)));
  const std::optional<at::Tensor> dw = contiguous(grad_w_new), dd = contiguous(grad_delta);
  const at::Tensor hc = h3.contiguous(), pc = head.contiguous(), gc = g.contiguous(), tz = tanh_z.contiguous();
  at::Tensor grad_h3 = new_buffer(h3.sizes(), h3.options());
  at::Tensor grad_head = new_buffer(head.sizes(), head.options());
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "fastl2r.gated_update_backward", [&] {
    device.launch(GatedUpdateBackward<scalar_t>{
        L, g.size(0), data_or_null<scalar_t>(dw), data_or_null<scalar_t>(dd), hc.data_ptr<scalar_t>(),
        pc.data_ptr<scalar_t>(), gc.data_ptr<scalar_t>(), static_cast<scalar_t>(lr), tz.data_ptr<scalar_t>(),
        grad_h3.data_ptr<scalar_t>(), grad_head.data_ptr<scalar_t>()});
  });
  return {grad_h3, grad_head};
}

// Registers both operators' kernels for `Device` (its dispatch key: `m`'s).
template <typename Device>
void register_gated_update(torch::Library& m) {
  m.impl("gated_update", &gated_update<Device>);
  m.impl("gated_update_backward", &gated_update_backward<Device>);
}

}  // namespace fastl2r

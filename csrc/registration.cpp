// The fastl2r:: operators: their schemas (declared once, here), their Meta kernels
// (shapes only, for torch.compile's fake tensors) and the Python module `fastl2r._C`
// whose import registers them.  The CPU kernels register from csrc/cpu/, the CUDA
// kernels from the separate module `fastl2r._C_cuda`; autograd is wired in Python
// (fastl2r/ops/cpp_backend.py) from the backward ops declared here.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <Python.h>
#include <torch/library.h>

#include "layout.h"

namespace fastl2r {
namespace {

at::Tensor like(const at::Tensor& x) { return at::empty_like(x, at::MemoryFormat::Contiguous); }

at::Tensor channel_means_meta(at::TensorList activations) {
  TORCH_CHECK(!activations.empty(), "fastl2r.channel_means needs at least one activation");
  c10::SymInt total = 0;
  for (const at::Tensor& x : activations) total += x.sym_size(1);
  return at::empty_symint({total}, activations[0].options());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> meta_lstm_meta(const at::Tensor& w, const at::Tensor&,
                                                              const at::Tensor&, const at::Tensor&,
                                                              const at::Tensor&, at::IntArrayRef,
                                                              const at::Tensor& h, const at::Tensor&) {
  at::Tensor gates = at::empty_symint({h.sym_size(0), w.sym_size(0), h.sym_size(2) * 4}, h.options());
  return {like(h), like(h), gates};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> meta_lstm_backward_meta(
    const at::Tensor&, const at::Tensor&, const at::Tensor& w, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor& lstm, at::IntArrayRef, const at::Tensor& h, const at::Tensor& c,
    const at::Tensor&, const at::Tensor&, const at::Tensor&) {
  return {like(w), like(lstm), like(h), like(c)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_update_meta(const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor& w, const at::Tensor&,
                                                                 at::IntArrayRef, double) {
  return {like(w), like(w), like(w)};
}

std::tuple<at::Tensor, at::Tensor> gated_update_backward_meta(const at::Tensor&, const at::Tensor&,
                                                              const at::Tensor& h3, const at::Tensor& head,
                                                              const at::Tensor&, at::IntArrayRef, double,
                                                              const at::Tensor&) {
  return {like(h3), like(head)};
}

}  // namespace

TORCH_LIBRARY(fastl2r, m) {
  const std::vector<at::Tag> tags{at::Tag::pt2_compliant_tag};
  // Per-channel means of each activation (over every dim but 1), concatenated.
  m.def("channel_means(Tensor[] activations) -> Tensor", tags);
  // The three stacked meta-LSTM cells of a group; `gates` (the activated i, f, g, o of
  // every cell, [3, R, 4H]) is saved for the backward.
  m.def(
      "meta_lstm(Tensor w, Tensor g, Tensor a_row, Tensor a_shared, Tensor lstm, int[] rows, Tensor h, "
      "Tensor c) -> (Tensor h_new, Tensor c_new, Tensor gates)",
      tags);
  m.def(
      "meta_lstm_backward(Tensor grad_h_new, Tensor grad_c_new, Tensor w, Tensor g, Tensor a_row, "
      "Tensor a_shared, Tensor lstm, int[] rows, Tensor h, Tensor c, Tensor h_new, Tensor c_new, "
      "Tensor gates) -> (Tensor grad_w, Tensor grad_lstm, Tensor grad_h, Tensor grad_c)",
      tags);
  // δ = s·tanh(W_out h3 + b_out), w_new = w − lr·δ⊙g; `tanh_z` is saved for the backward.
  m.def(
      "gated_update(Tensor h3, Tensor head, Tensor w, Tensor g, int[] rows, float lr) -> "
      "(Tensor w_new, Tensor delta, Tensor tanh_z)",
      tags);
  m.def(
      "gated_update_backward(Tensor grad_w_new, Tensor grad_delta, Tensor h3, Tensor head, Tensor g, "
      "int[] rows, float lr, Tensor tanh_z) -> (Tensor grad_h3, Tensor grad_head)",
      tags);
}

TORCH_LIBRARY_IMPL(fastl2r, Meta, m) {
  m.impl("channel_means", &channel_means_meta);
  m.impl("meta_lstm", &meta_lstm_meta);
  m.impl("meta_lstm_backward", &meta_lstm_backward_meta);
  m.impl("gated_update", &gated_update_meta);
  m.impl("gated_update_backward", &gated_update_backward_meta);
}

}  // namespace fastl2r

// `import fastl2r._C` loads this library, which runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "The fastl2r:: operators (CPU kernels).", -1,
                               nullptr};
  return PyModule_Create(&module);
}

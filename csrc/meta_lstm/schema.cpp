// The meta_lstm operators' schemas (declared once, here) with their Meta kernels (shapes only,
// for torch.compile's fake tensors).  Autograd is wired in Python (fastl2r/ops/cpp_backend.py).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../common/schema.h"

namespace fastl2r {
namespace {

at::Tensor like(const at::Tensor& x) { return at::empty_like(x, at::MemoryFormat::Contiguous); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> meta_lstm_meta(const at::Tensor& w, const at::Tensor&,
                                                              const at::Tensor&, const at::Tensor&,
                                                              const at::Tensor&, at::IntArrayRef,
                                                              const at::Tensor& h, const at::Tensor&) {
  at::Tensor gates = at::empty_symint({h.sym_size(0), w.sym_size(0), h.sym_size(2) * 4}, h.options());
  return {like(h), like(h), gates};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> meta_lstm_backward_meta(
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const at::Tensor& w, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, const at::Tensor& lstm, at::IntArrayRef, const at::Tensor& h,
    const at::Tensor& c, const at::Tensor&, const at::Tensor&, const at::Tensor&) {
  return {like(w), like(lstm), like(h), like(c)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastl2r, m) {
  // The three stacked meta-LSTM cells of a group; `gates` (the activated i, f, g, o of every
  // cell, [3, R, 4H]) is saved for the backward.
  define_operator(m,
                  "meta_lstm(Tensor w, Tensor g, Tensor a_row, Tensor a_shared, Tensor lstm, int[] rows, Tensor h, "
                  "Tensor c) -> (Tensor h_new, Tensor c_new, Tensor gates)", &meta_lstm_meta);
  // A cotangent is None where its output is unused (c' at the end of a T-BPTT window): zero.
  define_operator(m,
                  "meta_lstm_backward(Tensor? grad_h_new, Tensor? grad_c_new, Tensor w, Tensor g, Tensor a_row, "
                  "Tensor a_shared, Tensor lstm, int[] rows, Tensor h, Tensor c, Tensor h_new, Tensor c_new, "
                  "Tensor gates) -> (Tensor grad_w, Tensor grad_lstm, Tensor grad_h, Tensor grad_c)",
                  &meta_lstm_backward_meta);
}

}  // namespace fastl2r

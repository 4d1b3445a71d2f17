// The gated_update operators' schemas (declared once, here) with their Meta kernels (shapes only,
// for torch.compile's fake tensors).  Autograd is wired in Python (fastl2r/ops/cpp_backend.py).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../common/schema.h"

namespace fastl2r {
namespace {

at::Tensor like(const at::Tensor& x) { return at::empty_like(x, at::MemoryFormat::Contiguous); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_update_meta(const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor& w, const at::Tensor&,
                                                                 at::IntArrayRef, double) {
  return {like(w), like(w), like(w)};
}

std::tuple<at::Tensor, at::Tensor> gated_update_backward_meta(const std::optional<at::Tensor>&,
                                                              const std::optional<at::Tensor>&,
                                                              const at::Tensor& h3, const at::Tensor& head,
                                                              const at::Tensor&, at::IntArrayRef, double,
                                                              const at::Tensor&) {
  return {like(h3), like(head)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastl2r, m) {
  // δ = s·tanh(W_out h3 + b_out), w_new = w − lr·δ⊙g; `tanh_z` is saved for the backward.
  define_operator(m,
                  "gated_update(Tensor h3, Tensor head, Tensor w, Tensor g, int[] rows, float lr) -> "
                  "(Tensor w_new, Tensor delta, Tensor tanh_z)", &gated_update_meta);
  // A cotangent is None where its output is unused (δ, by most losses): zero.
  define_operator(m,
                  "gated_update_backward(Tensor? grad_w_new, Tensor? grad_delta, Tensor h3, Tensor head, Tensor g, "
                  "int[] rows, float lr, Tensor tanh_z) -> (Tensor grad_h3, Tensor grad_head)",
                  &gated_update_backward_meta);
}

}  // namespace fastl2r

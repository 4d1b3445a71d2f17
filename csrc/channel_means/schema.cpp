// The channel_means operator's schema (declared once, here) and Meta kernel (shapes only, for
// torch.compile's fake tensors).  It has no gradient: the means are constants of the meta-gradient.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../common/schema.h"

namespace fastl2r {
namespace {

at::Tensor channel_means_meta(at::TensorList activations) {
  TORCH_CHECK(!activations.empty(), "fastl2r.channel_means needs at least one activation");
  c10::SymInt total = 0;
  for (const at::Tensor& x : activations) total += x.sym_size(1);
  return at::empty_symint({total}, activations[0].options());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastl2r, m) {
  // Per-channel means of each activation (over every dim but 1), concatenated.
  define_operator(m, "channel_means(Tensor[] activations) -> Tensor", &channel_means_meta);
}

}  // namespace fastl2r

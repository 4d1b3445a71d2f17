// How each op's schema.cpp declares an operator: its schema, the pt2-compliant tag (torch.compile
// traces through it) and its Meta kernel (shapes only, for torch.compile's fake tensors).
#pragma once

#include <torch/library.h>

#include <string>

namespace fastl2r {

template <typename MetaKernel>
void define_operator(torch::Library& m, const char* schema, MetaKernel* meta) {
  m.def(schema, {at::Tag::pt2_compliant_tag});
  const std::string name(schema);
  m.impl(name.substr(0, name.find('(')).c_str(), torch::dispatch(c10::DispatchKey::Meta, meta));
}

}  // namespace fastl2r

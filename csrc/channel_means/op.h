// The channel_means operator's torch-facing side, one for every device: argument checks, each
// distinct activation once (contiguous) and where its means go.  `Device` (cpu::Device in
// common/cpu.h, cuda::Device in common/cuda_module.cpp) runs the kernels.
#pragma once

#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <map>
#include <tuple>
#include <utility>
#include <vector>

#include "../common/checks.h"
#include "kernels.h"

namespace fastl2r {

template <typename Device>
at::Tensor channel_means(at::TensorList activations) {
  TORCH_CHECK(!activations.empty(), "fastl2r.channel_means needs at least one activation");
  const at::Tensor& first = activations[0];
  Device device(first);
  std::vector<at::Tensor> sources;            // contiguous, alive until the kernels are queued
  std::vector<std::vector<int64_t>> places;   // per source, where its means start in the output
  std::map<std::tuple<const void*, std::vector<int64_t>, std::vector<int64_t>>, size_t> seen;
  int64_t total = 0;
  for (const at::Tensor& x : activations) {
    check_float(x, "every activation", first);
    TORCH_CHECK(x.dim() >= 2, "fastl2r.channel_means: activations need a channel dim 1, got shape ", x.sizes());
    if (x.size(1) > 0) {
      auto key = std::make_tuple(x.data_ptr(), x.sizes().vec(), x.strides().vec());
      auto found = seen.find(key);
      if (found != seen.end()) {
        places[found->second].push_back(total);
      } else {
        seen.emplace(std::move(key), sources.size());
        places.push_back({total});
        sources.push_back(x.contiguous());
      }
    }
    total += x.size(1);
  }
  at::Tensor out = new_buffer({total}, first.options());
  AT_DISPATCH_FLOATING_TYPES(first.scalar_type(), "fastl2r.channel_means", [&] {
    ChannelMeans<scalar_t> args;
    args.out = out.data_ptr<scalar_t>();
    for (size_t s = 0; s < sources.size(); ++s) {
      const at::Tensor& x = sources[s];
      const int64_t batch = x.size(0), channels = x.size(1);
      const int64_t inner = batch == 0 ? 0 : x.numel() / (batch * channels);
      args.sources.push_back({x.data_ptr<scalar_t>(), batch, channels, inner});
      args.places.insert(args.places.end(), places[s].begin(), places[s].end());
      args.place_starts.push_back(static_cast<int64_t>(args.places.size()));
    }
    device.launch(args);
  });
  return out;
}

// Registers the operator's kernel for `Device` (its dispatch key: `m`'s).
template <typename Device>
void register_channel_means(torch::Library& m) {
  m.impl("channel_means", &channel_means<Device>);
}

}  // namespace fastl2r

// Channel means on the CPU (fastl2r/ops/reference.py::channel_means): for a list of
// activations [N, C, ...], every per-channel mean over the other dims, in one call.
//
// One task per (activation, channel), summed in double.  A tensor listed twice (a
// layer's output is often the next layer's input) is read once.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <map>
#include <tuple>

#include "cpu_common.h"

namespace fastl2r::cpu {
namespace {

struct Source {
  at::Tensor data;  // contiguous
  int64_t batch, channels, inner, out;
};

template <typename T>
void channel_sums(const std::vector<Source>& sources, const std::vector<std::pair<int64_t, int64_t>>& tasks,
                  T* out) {
  parallel_tasks(static_cast<int64_t>(tasks.size()), [&](int64_t index) {
    const auto [s, channel] = tasks[index];
    const Source& src = sources[s];
    const T* x = src.data.data_ptr<T>();
    double acc = 0;
    for (int64_t n = 0; n < src.batch; ++n) {
      const T* plane = x + (n * src.channels + channel) * src.inner;
#pragma omp simd reduction(+ : acc)
      for (int64_t i = 0; i < src.inner; ++i) acc += static_cast<double>(plane[i]);
    }
    out[src.out + channel] = static_cast<T>(acc / static_cast<double>(src.batch * src.inner));
  });
}

at::Tensor channel_means_cpu(at::TensorList activations) {
  TORCH_CHECK(!activations.empty(), "fastl2r.channel_means needs at least one activation");
  const at::Tensor& first = activations[0];
  std::vector<Source> sources;
  std::vector<std::tuple<int64_t, int64_t, int64_t>> copies;  // (to, from, channels): a tensor seen before
  std::map<std::tuple<const void*, std::vector<int64_t>, std::vector<int64_t>>, int64_t> seen;
  int64_t total = 0;
  for (const at::Tensor& x : activations) {
    check_float(x, "every activation", first);
    TORCH_CHECK(x.dim() >= 2, "fastl2r.channel_means: activations need a channel dim 1, got shape ", x.sizes());
    const int64_t channels = x.size(1);
    auto key = std::make_tuple(x.data_ptr(), x.sizes().vec(), x.strides().vec());
    auto found = seen.find(key);
    if (found != seen.end()) {
      copies.emplace_back(total, found->second, channels);
    } else {
      seen.emplace(std::move(key), total);
      sources.push_back({x.contiguous(), x.size(0), channels, x.numel() / std::max<int64_t>(1, x.size(0) * channels),
                         total});
    }
    total += channels;
  }
  std::vector<std::pair<int64_t, int64_t>> tasks;
  for (size_t s = 0; s < sources.size(); ++s) {
    for (int64_t ch = 0; ch < sources[s].channels; ++ch) tasks.emplace_back(static_cast<int64_t>(s), ch);
  }
  at::Tensor out = new_buffer({total}, first.options());
  AT_DISPATCH_FLOATING_TYPES(first.scalar_type(), "fastl2r.channel_means", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    channel_sums<scalar_t>(sources, tasks, o);
    for (const auto& [to, from, channels] : copies) std::copy_n(o + from, channels, o + to);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastl2r, CPU, m) { m.impl("channel_means", &channel_means_cpu); }

}  // namespace fastl2r::cpu

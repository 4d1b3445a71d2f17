// Channel means on the CPU (fastl2r/ops/reference.py::channel_means): for a list of
// activations [N, C, ...], every per-channel mean over the other dims, in one call.
//
// One task per block of batch rows of an activation: it reads its block front to back
// (memory order, which the prefetchers follow) into per-channel partial sums in double;
// the partials are then added in block order.  Blocks depend on shapes only, so the
// result does not depend on the number of threads.  A tensor listed twice (a layer's
// output is often the next layer's input) is read once.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <map>
#include <tuple>

#include "cpu_common.h"

namespace fastl2r::cpu {
namespace {

constexpr int64_t kBlockBytes = 256 * 1024;  // about what one task reads

struct Source {
  at::Tensor data;  // contiguous
  int64_t batch, channels, inner, out;
  int64_t rows_per_block = 0, blocks = 0, partials = 0;  // set by plan; partials: where its blocks' sums start

  int64_t plan(int64_t element_size, int64_t first_partial) {
    const int64_t row_bytes = std::max<int64_t>(1, channels * inner * element_size);
    rows_per_block = std::clamp<int64_t>(kBlockBytes / row_bytes, 1, std::max<int64_t>(1, batch));
    blocks = std::max<int64_t>(1, (batch + rows_per_block - 1) / rows_per_block);
    partials = first_partial;
    return blocks * channels;
  }
};

template <typename T>
void channel_means_of(const std::vector<Source>& sources, const std::vector<std::pair<int64_t, int64_t>>& tasks,
                      double* partial, T* out) {
  parallel_tasks(static_cast<int64_t>(tasks.size()), [&](int64_t index) {
    const auto [s, block] = tasks[index];
    const Source& src = sources[s];
    double* sums = partial + src.partials + block * src.channels;
    std::fill_n(sums, src.channels, 0.0);
    const int64_t first = block * src.rows_per_block, last = std::min(src.batch, first + src.rows_per_block);
    const T* x = src.data.data_ptr<T>() + first * src.channels * src.inner;
    for (int64_t n = first; n < last; ++n) {
      for (int64_t channel = 0; channel < src.channels; ++channel, x += src.inner) {
        double acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int64_t i = 0; i < src.inner; ++i) acc += static_cast<double>(x[i]);
        sums[channel] += acc;
      }
    }
  });
  for (const Source& src : sources) {  // a few thousand additions: not worth threads
    const double count = static_cast<double>(src.batch * src.inner);
    for (int64_t channel = 0; channel < src.channels; ++channel) {
      double total = 0;
      const double* sums = partial + src.partials + channel;
      for (int64_t block = 0; block < src.blocks; ++block) total += sums[block * src.channels];
      out[src.out + channel] = static_cast<T>(total / count);
    }
  }
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
  std::vector<std::pair<int64_t, int64_t>> tasks;  // (source, block)
  int64_t partials = 0;
  for (size_t s = 0; s < sources.size(); ++s) {
    partials += sources[s].plan(first.element_size(), partials);
    for (int64_t block = 0; block < sources[s].blocks; ++block) tasks.emplace_back(static_cast<int64_t>(s), block);
  }
  std::vector<double> partial(static_cast<size_t>(partials));
  at::Tensor out = new_buffer({total}, first.options());
  AT_DISPATCH_FLOATING_TYPES(first.scalar_type(), "fastl2r.channel_means", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    channel_means_of<scalar_t>(sources, tasks, partial.data(), o);
    for (const auto& [to, from, channels] : copies) std::copy_n(o + from, channels, o + to);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastl2r, CPU, m) { m.impl("channel_means", &channel_means_cpu); }

}  // namespace fastl2r::cpu

// Channel means on the CPU (fastl2r/ops/reference.py::channel_means): for a list of
// activations [N, C, ...], every per-channel mean over the other dims, in one call.
//
// One task per block of batch rows of an activation: it reads its block front to back
// (memory order, which the prefetchers follow) into per-channel partial sums in double;
// the partials are then added in block order.  Blocks depend on shapes only, so the
// result does not depend on the number of threads.  A tensor listed twice (a layer's
// output is often the next layer's input) is read once (op.h).
#include <utility>

#include "../common/cpu.h"
#include "kernels.h"
#include "op.h"

namespace fastl2r::cpu {
namespace {

constexpr int64_t kBlockBytes = 256 * 1024;  // about what one task reads

// One source's batch cut into blocks of rows, one task each, and where their partial sums start.
struct Blocks {
  int64_t rows, count, first_partial;
};

Blocks plan(int64_t batch, int64_t row_bytes, int64_t first_partial) {
  const int64_t rows = std::clamp<int64_t>(kBlockBytes / std::max<int64_t>(1, row_bytes), 1,
                                           std::max<int64_t>(1, batch));
  return {rows, std::max<int64_t>(1, (batch + rows - 1) / rows), first_partial};
}

}  // namespace

template <typename T>
void run(const Context&, const ChannelMeans<T>& args) {
  const auto& sources = args.sources;
  std::vector<Blocks> blocks;
  std::vector<std::pair<size_t, int64_t>> tasks;  // (source, block)
  int64_t partials = 0;
  for (size_t s = 0; s < sources.size(); ++s) {
    const auto& src = sources[s];
    blocks.push_back(plan(src.batch, src.channels * src.inner * static_cast<int64_t>(sizeof(T)), partials));
    partials += blocks.back().count * src.channels;
    for (int64_t block = 0; block < blocks.back().count; ++block) tasks.emplace_back(s, block);
  }
  std::vector<double> partial(static_cast<size_t>(partials));
  parallel_tasks(static_cast<int64_t>(tasks.size()), [&](int64_t index) {
    const auto [s, block] = tasks[index];
    const auto& src = sources[s];
    const Blocks& b = blocks[s];
    double* sums = partial.data() + b.first_partial + block * src.channels;
    std::fill_n(sums, src.channels, 0.0);
    const int64_t first = block * b.rows, last = std::min(src.batch, first + b.rows);
    const T* x = src.data + first * src.channels * src.inner;
    for (int64_t n = first; n < last; ++n) {
      for (int64_t channel = 0; channel < src.channels; ++channel, x += src.inner) {
        double acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int64_t i = 0; i < src.inner; ++i) acc += static_cast<double>(x[i]);
        sums[channel] += acc;
      }
    }
  });
  for (size_t s = 0; s < sources.size(); ++s) {  // a few thousand additions: not worth threads
    const auto& src = sources[s];
    const double count = static_cast<double>(src.batch * src.inner);
    for (int64_t channel = 0; channel < src.channels; ++channel) {
      double total = 0;
      const double* sums = partial.data() + blocks[s].first_partial + channel;
      for (int64_t block = 0; block < blocks[s].count; ++block) total += sums[block * src.channels];
      const T mean = static_cast<T>(total / count);
      for (int64_t k = args.place_starts[s]; k < args.place_starts[s + 1]; ++k) {
        args.out[args.places[k] + channel] = mean;
      }
    }
  }
}

TORCH_LIBRARY_IMPL(fastl2r, CPU, m) { register_channel_means<Device>(m); }

}  // namespace fastl2r::cpu

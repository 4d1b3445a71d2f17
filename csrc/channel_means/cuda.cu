// Channel means on the GPU: one launch for a whole list of activations [N, C, ...]
// (fastl2r/ops/reference.py::channel_means).  One block per channel of each unique
// source tensor; the block sums its N × inner values and writes the mean to every
// place of the output where that tensor was listed.
#include "../common/cuda.h"
#include "../common/cuda_math.cuh"
#include "kernels.h"

namespace fastl2r::cuda {
namespace {

constexpr int kSourceFields = 5;  // data pointer, batch, channels, inner, first channel

template <typename T, typename Index>
__device__ double sum_channel(const T* x, Index batch, Index channels, Index inner, Index channel) {
  double acc = 0;
  const Index count = batch * inner;
  for (Index e = threadIdx.x; e < count; e += blockDim.x) {
    const Index n = e / inner, i = e - n * inner;
    acc += static_cast<double>(x[(n * channels + channel) * inner + i]);
  }
  return acc;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) channel_means_kernel(const int64_t* table, int64_t sources, T* out) {
  __shared__ double scratch[32];
  // This block's source: the last whose first channel is <= blockIdx.x (binary search).
  const int64_t channel_id = blockIdx.x;
  int64_t lo = 0, hi = sources - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (table[mid * kSourceFields + 4] <= channel_id) lo = mid;
    else hi = mid - 1;
  }
  const int64_t* src = table + lo * kSourceFields;
  const T* x = reinterpret_cast<const T*>(src[0]);
  const int64_t batch = src[1], channels = src[2], inner = src[3], channel = channel_id - src[4];
  // 32-bit index arithmetic when it fits: the division per element is much cheaper.
  const bool small = batch * channels * inner < (int64_t{1} << 31);
  double acc = small ? sum_channel<T, int32_t>(x, static_cast<int32_t>(batch), static_cast<int32_t>(channels),
                                               static_cast<int32_t>(inner), static_cast<int32_t>(channel))
                     : sum_channel<T, int64_t>(x, batch, channels, inner, channel);
  acc = block_sum(acc, scratch);
  if (threadIdx.x == 0) {
    const int64_t* out_starts = table + sources * kSourceFields;
    const int64_t* out_offsets = out_starts + sources + 1;
    const T mean = static_cast<T>(acc / static_cast<double>(batch * inner));
    for (int64_t k = out_starts[lo]; k < out_starts[lo + 1]; ++k) out[out_offsets[k] + channel] = mean;
  }
}

}  // namespace

// The kernel's table: per source its (data pointer, batch, channels, inner size, first channel
// among all sources' channels); then the sources' starts into the place list; then that list.
template <typename T>
void run(Context& context, const ChannelMeans<T>& args) {
  std::vector<int64_t> table;
  int64_t channels = 0;
  for (const auto& src : args.sources) {
    table.insert(table.end(), {reinterpret_cast<int64_t>(src.data), src.batch, src.channels, src.inner, channels});
    channels += src.channels;
  }
  table.insert(table.end(), args.place_starts.begin(), args.place_starts.end());
  table.insert(table.end(), args.places.begin(), args.places.end());
  if (channels == 0) return;
  const int64_t* device_table = context.upload(table);
  channel_means_kernel<T><<<static_cast<unsigned>(channels), kThreads, 0, context.stream>>>(
      device_table, static_cast<int64_t>(args.sources.size()), args.out);
  context.ok(cudaGetLastError());
}

FASTL2R_INSTANTIATE_RUN(ChannelMeans)

}  // namespace fastl2r::cuda

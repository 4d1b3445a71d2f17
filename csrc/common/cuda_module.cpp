// The Python module `fastl2r._C_cuda`: the torch-facing side of the CUDA kernels.  Its Device
// runs any op's CUDA kernels for that op's device-agnostic side (csrc/<op>/op.h): the CUDA
// checks, the device guard and current stream, the row-block tables, device memory; importing
// the module registers every op's CUDA kernels (their schemas are declared by fastl2r._C).
#include <ATen/ops/empty.h>
#include <ATen/ops/tensor.h>
#include <Python.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <tuple>
#include <vector>

#include "../channel_means/op.h"
#include "../gated_update/op.h"
#include "../meta_lstm/op.h"
#include "checks.h"
#include "cuda.h"

namespace fastl2r::cuda {
namespace {

const at::Tensor& checked_cuda(const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda(), "fastl2r: the CUDA kernels take CUDA tensors, got one on ", x.device());
  return x;
}

// The row blocks of a group's segments on `device`, built once per segment layout: groups keep their rows.
RowTable row_table(const Segments& segs, const at::Device& device) {
  static std::mutex mutex;
  static std::map<std::tuple<int, std::vector<int64_t>, int64_t>, std::pair<at::Tensor, RowTable>> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto key = std::make_tuple(static_cast<int>(device.index()), segs.starts, segs.slots);
  auto found = cache.find(key);
  if (found != cache.end()) return found->second.second;
  std::vector<int64_t> blocks, first_block;
  int64_t num_blocks = 0;
  for (int64_t e = 0; e < segs.count(); ++e) {
    first_block.push_back(num_blocks);
    const int64_t end = segs.starts[e + 1];
    for (int64_t r = segs.starts[e]; r < end; r += kRowBlock, ++num_blocks) {
      blocks.insert(blocks.end(), {segs.tensor(e), r, std::min<int64_t>(r + kRowBlock, end), e});
    }
  }
  first_block.push_back(num_blocks);
  std::vector<int64_t> packed(blocks);
  packed.insert(packed.end(), segs.starts.begin(), segs.starts.end());
  packed.insert(packed.end(), first_block.begin(), first_block.end());
  at::Tensor table = at::tensor(packed, at::TensorOptions().dtype(at::kLong)).to(device);
  const int64_t* base = table.data_ptr<int64_t>();
  const int64_t* starts = base + 4 * num_blocks;
  const RowTable view{base, starts, starts + segs.count() + 1, num_blocks, segs.tensors(), segs.slots};
  cache.emplace(std::move(key), std::make_pair(table, view));
  return view;
}

}  // namespace

// Runs an op's CUDA kernels for its device-agnostic side (csrc/<op>/op.h): the op's
// `cuda::run(Context&, const Args&)` (common/entry_points.h), found by argument-dependent
// lookup on Context.
class Device {
 public:
  // An op on `like`'s device without row segments (the channel means).
  explicit Device(const at::Tensor& like) : guard_(checked_cuda(like).device()), options_(like.options()) {}

  // An op on a group of meta-nets: its hidden size and tensor count within the kernels' limits.
  Device(const at::Tensor& like, const GroupLayout& L, const Segments& segments) : Device(like) {
    TORCH_CHECK(L.H <= kMaxHidden, "fastl2r: the CUDA kernels take hidden sizes up to ", kMaxHidden, ", got ", L.H);
    TORCH_CHECK(segments.tensors() * kNumCells <= 65535, "fastl2r: the CUDA kernels take at most ",
                65535 / kNumCells, " tensors per group, got ", segments.tensors());
    table_ = row_table(segments, like.device());
  }

  template <typename Args>
  void launch(const Args& args) {
    const at::TensorOptions scalar = options_.dtype(c10::CppTypeToScalarType<typename Args::Scalar>::value);
    Context context{table_, c10::cuda::getCurrentCUDAStream(),
                    [&](int64_t elements) { return keep(new_buffer({elements}, scalar)).data_ptr(); },
                    [&](const std::vector<int64_t>& host) {
                      return keep(at::tensor(host, at::TensorOptions().dtype(at::kLong))
                                      .pin_memory()
                                      .to(options_.device(), /*non_blocking=*/true))
                          .data_ptr<int64_t>();
                    }};
    run(context, args);
    C10_CUDA_CHECK(context.status);
  }

 private:
  const at::Tensor& keep(at::Tensor memory) { return kept_.emplace_back(std::move(memory)); }

  c10::cuda::CUDAGuard guard_;
  at::TensorOptions options_;
  RowTable table_{};
  std::vector<at::Tensor> kept_;  // workspace and uploaded tables, until the kernels are queued
};

TORCH_LIBRARY_IMPL(fastl2r, CUDA, m) {
  register_channel_means<Device>(m);
  register_meta_lstm<Device>(m);
  register_gated_update<Device>(m);
}

}  // namespace fastl2r::cuda

extern "C" PyObject* PyInit__C_cuda(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_cuda", "The fastl2r:: operators' CUDA kernels.", -1,
                               nullptr};
  return PyModule_Create(&module);
}

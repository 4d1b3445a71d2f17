// The torch-facing side of the CUDA kernels: checks, allocation, the current stream,
// the row-block tables, and the registration of the fastl2r:: operators' CUDA kernels
// (their schemas are declared by fastl2r._C, csrc/registration.cpp).  `import
// fastl2r._C_cuda` loads this library and so registers them.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/tensor.h>
#include <Python.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <tuple>
#include <vector>

#include "../op_common.h"
#include "launchers.h"

namespace fastl2r::cuda {
namespace {

void check_cuda(const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda(), "fastl2r: the CUDA kernels take CUDA tensors, got one on ", x.device());
}

void check_hidden(const GroupLayout& L, int64_t tensors) {
  TORCH_CHECK(L.H <= kMaxHidden, "fastl2r: the CUDA kernels take hidden sizes up to ", kMaxHidden, ", got ", L.H);
  TORCH_CHECK(tensors * kNumCells <= 65535, "fastl2r: the CUDA kernels take at most ", 65535 / kNumCells,
              " tensors per group, got ", tensors);
}

// The row blocks of a group's segments on `device`, built once per (`rows`, slots): groups
// keep their rows.
RowTable row_table(const Segments& segs, at::IntArrayRef rows, const at::Device& device) {
  static std::mutex mutex;
  static std::map<std::tuple<int, std::vector<int64_t>, int64_t>, std::pair<at::Tensor, RowTable>> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto key = std::make_tuple(static_cast<int>(device.index()), rows.vec(), segs.slots);
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

at::Tensor channel_means_cuda(at::TensorList activations) {
  TORCH_CHECK(!activations.empty(), "fastl2r.channel_means needs at least one activation");
  const at::Tensor& first = activations[0];
  check_cuda(first);
  const c10::cuda::CUDAGuard guard(first.device());
  std::vector<at::Tensor> keep;  // contiguous copies, alive until the kernel is queued
  std::vector<int64_t> sources, out_starts{0}, out_offsets;
  std::vector<std::vector<int64_t>> outputs;  // per unique source, where its means go
  std::map<std::tuple<const void*, std::vector<int64_t>, std::vector<int64_t>>, size_t> seen;
  int64_t total = 0, channels = 0;
  for (const at::Tensor& x : activations) {
    check_float(x, "every activation", first);
    TORCH_CHECK(x.dim() >= 2, "fastl2r.channel_means: activations need a channel dim 1, got shape ", x.sizes());
    const int64_t c = x.size(1);
    if (c > 0) {
      auto key = std::make_tuple(x.data_ptr(), x.sizes().vec(), x.strides().vec());
      auto found = seen.find(key);
      if (found != seen.end()) {
        outputs[found->second].push_back(total);
      } else {
        seen.emplace(std::move(key), outputs.size());
        outputs.push_back({total});
        keep.push_back(x.contiguous());
        const int64_t batch = x.size(0);
        const int64_t inner = batch * c == 0 ? 0 : x.numel() / (batch * c);
        sources.insert(sources.end(),
                       {reinterpret_cast<int64_t>(keep.back().data_ptr()), batch, c, inner, channels});
        channels += c;
      }
    }
    total += x.size(1);
  }
  for (const auto& places : outputs) {
    out_offsets.insert(out_offsets.end(), places.begin(), places.end());
    out_starts.push_back(static_cast<int64_t>(out_offsets.size()));
  }
  std::vector<int64_t> packed(sources);
  packed.insert(packed.end(), out_starts.begin(), out_starts.end());
  packed.insert(packed.end(), out_offsets.begin(), out_offsets.end());
  const at::Tensor table = at::tensor(packed, at::TensorOptions().dtype(at::kLong))
                               .pin_memory()
                               .to(first.device(), /*non_blocking=*/true);
  at::Tensor out = new_buffer({total}, first.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(first.scalar_type(), "fastl2r.channel_means", [&] {
    C10_CUDA_CHECK(channel_means<scalar_t>(table.data_ptr<int64_t>(), static_cast<int64_t>(outputs.size()),
                                           channels, out.data_ptr<scalar_t>(), stream));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> meta_lstm_cuda(const at::Tensor& w, const at::Tensor& g,
                                                              const at::Tensor& a_row, const at::Tensor& a_shared,
                                                              const at::Tensor& lstm, at::IntArrayRef rows,
                                                              const at::Tensor& h, const at::Tensor& c) {
  const MetaLstmGroup group = check_meta_lstm(w, g, a_row, a_shared, lstm, rows, h, c);
  const GroupLayout& L = group.layout;
  check_cuda(w);
  check_hidden(L, lstm.size(0));
  const c10::cuda::CUDAGuard guard(w.device());
  const RowTable table = row_table(group.segments, rows, w.device());
  const at::Tensor wc = w.contiguous(), gc = g.contiguous(), ac = a_row.contiguous(), sc = a_shared.contiguous(),
                   lc = lstm.contiguous(), hc = h.contiguous(), cc = c.contiguous();
  at::Tensor h_new = new_buffer(h.sizes(), h.options());
  at::Tensor c_new = new_buffer(h.sizes(), h.options());
  at::Tensor gates = new_buffer({kNumCells, w.size(0), L.gates()}, h.options());
  at::Tensor workspace = new_buffer({meta_lstm_forward_workspace(L, table.segments())}, h.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "fastl2r.meta_lstm", [&] {
    C10_CUDA_CHECK(meta_lstm_forward<scalar_t>(
        L, table, w.size(0), wc.data_ptr<scalar_t>(), gc.data_ptr<scalar_t>(), ac.data_ptr<scalar_t>(),
        sc.data_ptr<scalar_t>(), lc.data_ptr<scalar_t>(), hc.data_ptr<scalar_t>(), cc.data_ptr<scalar_t>(),
        workspace.data_ptr<scalar_t>(), h_new.data_ptr<scalar_t>(), c_new.data_ptr<scalar_t>(),
        gates.data_ptr<scalar_t>(), stream));
  });
  return {h_new, c_new, gates};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> meta_lstm_backward_cuda(
    const at::Tensor& grad_h, const at::Tensor& grad_c, const at::Tensor& w, const at::Tensor& g,
    const at::Tensor& a_row, const at::Tensor& a_shared, const at::Tensor& lstm, at::IntArrayRef rows,
    const at::Tensor& h, const at::Tensor& c, const at::Tensor& h_new, const at::Tensor& c_new,
    const at::Tensor& gates) {
  const MetaLstmGroup group =
      check_meta_lstm_backward(grad_h, grad_c, w, g, a_row, a_shared, lstm, rows, h, c, h_new, c_new, gates);
  const GroupLayout& L = group.layout;
  check_cuda(w);
  check_hidden(L, lstm.size(0));
  const c10::cuda::CUDAGuard guard(w.device());
  const RowTable table = row_table(group.segments, rows, w.device());
  const at::Tensor dh = grad_h.contiguous(), dc = grad_c.contiguous(), wc = w.contiguous(), gc = g.contiguous(),
                   ac = a_row.contiguous(), sc = a_shared.contiguous(), lc = lstm.contiguous(),
                   hc = h.contiguous(), cc = c.contiguous(), hn = h_new.contiguous(), cn = c_new.contiguous(),
                   gt = gates.contiguous();
  at::Tensor grad_w = new_buffer(w.sizes(), w.options());
  at::Tensor grad_lstm = new_buffer(lstm.sizes(), lstm.options());
  at::Tensor grad_h_in = new_buffer(h.sizes(), h.options());
  at::Tensor grad_c_in = new_buffer(h.sizes(), h.options());
  at::Tensor workspace = new_buffer({meta_lstm_backward_workspace(L, table.segments(), w.size(0))}, h.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "fastl2r.meta_lstm_backward", [&] {
    C10_CUDA_CHECK(meta_lstm_backward<scalar_t>(
        L, table, w.size(0), dh.data_ptr<scalar_t>(), dc.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(),
        gc.data_ptr<scalar_t>(), ac.data_ptr<scalar_t>(), sc.data_ptr<scalar_t>(), lc.data_ptr<scalar_t>(),
        hc.data_ptr<scalar_t>(), cc.data_ptr<scalar_t>(), hn.data_ptr<scalar_t>(), cn.data_ptr<scalar_t>(),
        gt.data_ptr<scalar_t>(), workspace.data_ptr<scalar_t>(), grad_w.data_ptr<scalar_t>(),
        grad_lstm.data_ptr<scalar_t>(), grad_h_in.data_ptr<scalar_t>(), grad_c_in.data_ptr<scalar_t>(), stream));
  });
  return {grad_w, grad_lstm, grad_h_in, grad_c_in};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_update_cuda(const at::Tensor& h3, const at::Tensor& head,
                                                                 const at::Tensor& w, const at::Tensor& g,
                                                                 at::IntArrayRef rows, double lr) {
  const GroupLayout L = check_gated_update(h3, head, w, g);
  check_cuda(w);
  check_hidden(L, head.size(0));
  const c10::cuda::CUDAGuard guard(w.device());
  const RowTable table = row_table(head_segments(rows, head.size(0), w.size(0)), rows, w.device());
  const at::Tensor hc = h3.contiguous(), pc = head.contiguous(), wc = w.contiguous(), gc = g.contiguous();
  at::Tensor w_new = new_buffer(w.sizes(), w.options());
  at::Tensor delta = new_buffer(w.sizes(), w.options());
  at::Tensor tanh_z = new_buffer(w.sizes(), w.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "fastl2r.gated_update", [&] {
    C10_CUDA_CHECK(gated_update_forward<scalar_t>(
        L, table, hc.data_ptr<scalar_t>(), pc.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(),
        gc.data_ptr<scalar_t>(), static_cast<scalar_t>(lr), w_new.data_ptr<scalar_t>(), delta.data_ptr<scalar_t>(),
        tanh_z.data_ptr<scalar_t>(), stream));
  });
  return {w_new, delta, tanh_z};
}

std::tuple<at::Tensor, at::Tensor> gated_update_backward_cuda(const at::Tensor& grad_w_new,
                                                              const at::Tensor& grad_delta, const at::Tensor& h3,
                                                              const at::Tensor& head, const at::Tensor& g,
                                                              at::IntArrayRef rows, double lr,
                                                              const at::Tensor& tanh_z) {
  const GroupLayout L = check_gated_update_backward(grad_w_new, grad_delta, h3, head, g, tanh_z);
  check_cuda(g);
  check_hidden(L, head.size(0));
  const c10::cuda::CUDAGuard guard(g.device());
  const RowTable table = row_table(head_segments(rows, head.size(0), g.size(0)), rows, g.device());
  const at::Tensor dw = grad_w_new.contiguous(), dd = grad_delta.contiguous(), hc = h3.contiguous(),
                   pc = head.contiguous(), gc = g.contiguous(), tz = tanh_z.contiguous();
  at::Tensor grad_h3 = new_buffer(h3.sizes(), h3.options());
  at::Tensor grad_head = new_buffer(head.sizes(), head.options());
  at::Tensor workspace = new_buffer({gated_update_backward_workspace(L, table, g.size(0))}, g.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "fastl2r.gated_update_backward", [&] {
    C10_CUDA_CHECK(gated_update_backward<scalar_t>(
        L, table, g.size(0), dw.data_ptr<scalar_t>(), dd.data_ptr<scalar_t>(), hc.data_ptr<scalar_t>(),
        pc.data_ptr<scalar_t>(), gc.data_ptr<scalar_t>(), static_cast<scalar_t>(lr), tz.data_ptr<scalar_t>(),
        workspace.data_ptr<scalar_t>(), grad_h3.data_ptr<scalar_t>(), grad_head.data_ptr<scalar_t>(), stream));
  });
  return {grad_h3, grad_head};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastl2r, CUDA, m) {
  m.impl("channel_means", &channel_means_cuda);
  m.impl("meta_lstm", &meta_lstm_cuda);
  m.impl("meta_lstm_backward", &meta_lstm_backward_cuda);
  m.impl("gated_update", &gated_update_cuda);
  m.impl("gated_update_backward", &gated_update_backward_cuda);
}

}  // namespace fastl2r::cuda

extern "C" PyObject* PyInit__C_cuda(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_cuda", "The fastl2r:: operators' CUDA kernels.", -1,
                               nullptr};
  return PyModule_Create(&module);
}

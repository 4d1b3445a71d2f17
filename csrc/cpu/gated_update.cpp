// The gated update on the CPU (fastl2r/ops/reference.py::gated_update):
// δ = s·tanh(W_out h3 + b_out), w_new = w − lr·δ⊙g, forward and backward.
//
// Forward: one task per block of rows of one tensor: b_out and the head GEMM into tanh_z
// (saved for the backward), tanh in place, then scale, δ⊙g and the update in one pass.
// Backward: the same row blocks form dz = ∂L/∂(W_out h3 + b_out) and ∂L/∂h3; then one
// task per tensor forms its head's gradients (W_out, b_out, s).
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "cpu_common.h"

namespace fastl2r::cpu {
namespace {

template <typename T>
void forward(const GroupLayout& L, const Segments& heads, const T* h3, const T* head, const T* w,
             const T* g, T lr, T* w_new, T* delta, T* tanh_z) {
  const int64_t K = L.K, H = L.H, P = L.head_size();
  const std::vector<RowBlock> blocks = row_blocks(heads, kRowBlock);
  parallel_tasks(static_cast<int64_t>(blocks.size()), [&](int64_t index) {
    const RowBlock blk = blocks[index];
    const int64_t rows = blk.end - blk.begin;
    const T* net = head + blk.tensor * P;
    T* z = tanh_z + blk.begin * K;
    fill_rows(net + L.b_out(), rows, K, z);
    gemm<T>(false, true, rows, K, H, 1, h3 + blk.begin * H, H, net + L.w_out(), H, 1, z, K);
    tanh_(z, rows, K, K);
    const T s = net[L.scale()];
    for (int64_t e = blk.begin * K; e < blk.end * K; ++e) {
      const T d = s * tanh_z[e];
      delta[e] = d;
      w_new[e] = w[e] - lr * d * g[e];
    }
  });
}

template <typename T>
void backward(const GroupLayout& L, const Segments& heads, const T* grad_w_new, const T* grad_delta,
              const T* h3, const T* head, const T* g, T lr, const T* tanh_z, T* grad_h3, T* grad_head) {
  const int64_t G = heads.count(), R = heads.starts.back();
  const int64_t K = L.K, H = L.H, P = L.head_size();
  const std::vector<RowBlock> blocks = row_blocks(heads, kRowBlock);
  auto grad_z = scratch<T>(R * K);
  T* dz = grad_z.get();
  std::vector<T> grad_scale(blocks.size());  // per block, its part of ∂L/∂s
  parallel_tasks(static_cast<int64_t>(blocks.size()), [&](int64_t index) {
    const RowBlock blk = blocks[index];
    const int64_t rows = blk.end - blk.begin;
    const T* net = head + blk.tensor * P;
    const T s = net[L.scale()];
    T ds = 0;
    for (int64_t e = blk.begin * K; e < blk.end * K; ++e) {
      const T dd = grad_delta[e] - lr * g[e] * grad_w_new[e];  // ∂L/∂δ
      const T th = tanh_z[e];
      ds += dd * th;
      dz[e] = dd * s * (T(1) - th * th);
    }
    grad_scale[index] = ds;
    gemm<T>(false, false, rows, H, K, 1, dz + blk.begin * K, K, net + L.w_out(), H, 0, grad_h3 + blk.begin * H, H);
  });
  std::vector<int64_t> first_block(G + 1, static_cast<int64_t>(blocks.size()));
  for (int64_t i = static_cast<int64_t>(blocks.size()) - 1; i >= 0; --i) first_block[blocks[i].tensor] = i;
  parallel_tasks(G, [&](int64_t t) {
    const int64_t r0 = heads.starts[t], rows = heads.starts[t + 1] - r0;
    T* grad_net = grad_head + t * P;
    gemm<T>(true, false, K, H, rows, 1, dz + r0 * K, K, h3 + r0 * H, H, 0, grad_net + L.w_out(), H);
    T* grad_b = grad_net + L.b_out();
    std::fill_n(grad_b, K, T(0));
    for (int64_t r = r0; r < r0 + rows; ++r) {
      for (int64_t k = 0; k < K; ++k) grad_b[k] += dz[r * K + k];
    }
    T ds = 0;
    for (int64_t i = first_block[t]; i < first_block[t + 1]; ++i) ds += grad_scale[i];
    grad_net[L.scale()] = ds;
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_update_cpu(const at::Tensor& h3, const at::Tensor& head,
                                                                const at::Tensor& w, const at::Tensor& g,
                                                                at::IntArrayRef rows, double lr) {
  const GroupLayout L = check_gated_update(h3, head, w, g);
  const Segments heads = head_segments(rows, head.size(0), w.size(0));
  const at::Tensor hc = h3.contiguous(), pc = head.contiguous(), wc = w.contiguous(), gc = g.contiguous();
  at::Tensor w_new = new_buffer(w.sizes(), w.options());
  at::Tensor delta = new_buffer(w.sizes(), w.options());
  at::Tensor tanh_z = new_buffer(w.sizes(), w.options());
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "fastl2r.gated_update", [&] {
    forward<scalar_t>(L, heads, hc.data_ptr<scalar_t>(), pc.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(),
                      gc.data_ptr<scalar_t>(), static_cast<scalar_t>(lr), w_new.data_ptr<scalar_t>(),
                      delta.data_ptr<scalar_t>(), tanh_z.data_ptr<scalar_t>());
  });
  return {w_new, delta, tanh_z};
}

std::tuple<at::Tensor, at::Tensor> gated_update_backward_cpu(const at::Tensor& grad_w_new,
                                                             const at::Tensor& grad_delta, const at::Tensor& h3,
                                                             const at::Tensor& head, const at::Tensor& g,
                                                             at::IntArrayRef rows, double lr,
                                                             const at::Tensor& tanh_z) {
  const GroupLayout L = check_gated_update_backward(grad_w_new, grad_delta, h3, head, g, tanh_z);
  const Segments heads = head_segments(rows, head.size(0), g.size(0));
  const at::Tensor dw = grad_w_new.contiguous(), dd = grad_delta.contiguous(), hc = h3.contiguous(),
                   pc = head.contiguous(), gc = g.contiguous(), tz = tanh_z.contiguous();
  at::Tensor grad_h3 = new_buffer(h3.sizes(), h3.options());
  at::Tensor grad_head = new_buffer(head.sizes(), head.options());
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "fastl2r.gated_update_backward", [&] {
    backward<scalar_t>(L, heads, dw.data_ptr<scalar_t>(), dd.data_ptr<scalar_t>(), hc.data_ptr<scalar_t>(),
                       pc.data_ptr<scalar_t>(), gc.data_ptr<scalar_t>(), static_cast<scalar_t>(lr),
                       tz.data_ptr<scalar_t>(), grad_h3.data_ptr<scalar_t>(), grad_head.data_ptr<scalar_t>());
  });
  return {grad_h3, grad_head};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastl2r, CPU, m) {
  m.impl("gated_update", &gated_update_cpu);
  m.impl("gated_update_backward", &gated_update_backward_cpu);
}

}  // namespace fastl2r::cpu

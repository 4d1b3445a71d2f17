// The gated update on the CPU (fastl2r/ops/reference.py::gated_update):
// δ = s·tanh(W_out h3 + b_out), w_new = w − lr·δ⊙g, forward and backward.
//
// Forward: one task per block of rows of one tensor: b_out and the head GEMM into tanh_z
// (saved for the backward), tanh in place, then scale, δ⊙g and the update in one pass.
// Backward: the same row blocks form dz = ∂L/∂(W_out h3 + b_out) and ∂L/∂h3; then one
// task per tensor forms its head's gradients (W_out, b_out, s).  An absent cotangent of w_new
// or δ (null) is read as zero.
#include "../common/cpu.h"
#include "kernels.h"
#include "op.h"

namespace fastl2r::cpu {

template <typename T>
void run(const Context& context, const GatedUpdateForward<T>& args) {
  const GroupLayout& L = args.layout;
  const Segments& heads = context.segments;
  const T *h3 = args.h3, *head = args.head, *w = args.w, *g = args.g;
  const T lr = args.lr;
  T *w_new = args.w_new, *delta = args.delta, *tanh_z = args.tanh_z;
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
void run(const Context& context, const GatedUpdateBackward<T>& args) {
  const GroupLayout& L = args.layout;
  const Segments& heads = context.segments;
  const T *grad_w_new = args.grad_w_new, *grad_delta = args.grad_delta;
  const T *h3 = args.h3, *head = args.head, *g = args.g, *tanh_z = args.tanh_z;
  const T lr = args.lr;
  T *grad_h3 = args.grad_h3, *grad_head = args.grad_head;
  const int64_t G = heads.count(), R = args.rows;
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
      const T dd = (grad_delta != nullptr ? grad_delta[e] : T(0)) -
                   (grad_w_new != nullptr ? lr * g[e] * grad_w_new[e] : T(0));  // ∂L/∂δ
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

TORCH_LIBRARY_IMPL(fastl2r, CPU, m) { register_gated_update<Device>(m); }

}  // namespace fastl2r::cpu

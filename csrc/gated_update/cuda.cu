// The gated update on the GPU (fastl2r/ops/reference.py::gated_update):
// δ = s·tanh(W_out h3 + b_out), w_new = w − lr·δ⊙g.
//
// Forward, one launch: per (row block, 256 columns of K) the head GEMM with h3's rows in
// shared memory, then tanh, scale, δ⊙g and the update.
// Backward, three launches: per (row block, columns) dz = ∂L/∂(W_out h3 + b_out) and a
// partial ∂L/∂s; per row block ∂L/∂h3 = dz W_out; per (tensor, head element) the head's
// gradients summed over the tensor's rows.  An absent cotangent of w_new or δ (null) is read
// as zero.
#include "../common/cuda.h"
#include "../common/cuda_math.cuh"
#include "kernels.h"

namespace fastl2r::cuda {
namespace {

// The kernels take the K columns of a row block kThreads at a time.
int64_t head_column_blocks(const GroupLayout& L) { return (L.K + kThreads - 1) / kThreads; }

template <typename T>
__global__ void __launch_bounds__(kThreads) forward_kernel(GroupLayout L, RowTable table, const T* h3,
                                                           const T* head, const T* w, const T* g, T lr, T* w_new,
                                                           T* delta, T* tanh_z) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  T* hs = reinterpret_cast<T*>(shared_bytes);  // [kRowBlock][H]
  const int64_t t = table.tensor(blockIdx.x), r0 = table.begin(blockIdx.x);
  const int rows = static_cast<int>(table.end(blockIdx.x) - r0);
  const int64_t H = L.H, K = L.K;
  for (int64_t e = threadIdx.x; e < kRowBlock * H; e += blockDim.x) {
    const int64_t r = e / H;
    hs[e] = r < rows ? h3[(r0 + r) * H + (e - r * H)] : T(0);
  }
  __syncthreads();
  const int64_t k = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (k >= K) return;
  const T* net = head + t * L.head_size();
  const T* w_out = net + L.w_out() + k * H;
  T acc[kRowBlock];
#pragma unroll
  for (int r = 0; r < kRowBlock; ++r) acc[r] = T(0);
  for (int64_t j = 0; j < H; ++j) {
    const T wv = w_out[j];
#pragma unroll
    for (int r = 0; r < kRowBlock; ++r) acc[r] += hs[r * H + j] * wv;
  }
  const T b = net[L.b_out() + k], s = net[L.scale()];
#pragma unroll
  for (int r = 0; r < kRowBlock; ++r) {
    if (r < rows) {
      const int64_t e = (r0 + r) * K + k;
      const T th = tanh_(acc[r] + b);
      const T d = s * th;
      tanh_z[e] = th;
      delta[e] = d;
      w_new[e] = w[e] - lr * d * g[e];
    }
  }
}

// dz and, per block, its part of ∂L/∂s (partials[blockIdx.x * gridDim.y + blockIdx.y]).
template <typename T>
__global__ void __launch_bounds__(kThreads) grad_z_kernel(GroupLayout L, RowTable table, const T* grad_w_new,
                                                          const T* grad_delta, const T* head, const T* g, T lr,
                                                          const T* tanh_z, T* grad_z, T* partials) {
  __shared__ double scratch[32];
  const int64_t t = table.tensor(blockIdx.x), r0 = table.begin(blockIdx.x), r1 = table.end(blockIdx.x);
  const int64_t K = L.K;
  const int64_t k = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const T s = head[t * L.head_size() + L.scale()];
  double ds = 0;
  if (k < K) {
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t e = row * K + k;
      const T dd = (grad_delta != nullptr ? grad_delta[e] : T(0)) -
                   (grad_w_new != nullptr ? lr * g[e] * grad_w_new[e] : T(0));  // ∂L/∂δ
      const T th = tanh_z[e];
      ds += static_cast<double>(dd * th);
      grad_z[e] = dd * s * (T(1) - th * th);
    }
  }
  ds = block_sum(ds, scratch);
  if (threadIdx.x == 0) partials[blockIdx.x * gridDim.y + blockIdx.y] = static_cast<T>(ds);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) grad_h3_kernel(GroupLayout L, RowTable table, const T* head,
                                                           const T* grad_z, T* grad_h3) {
  const int64_t t = table.tensor(blockIdx.x), r0 = table.begin(blockIdx.x);
  const int rows = static_cast<int>(table.end(blockIdx.x) - r0);
  const int64_t H = L.H, K = L.K;
  const T* w_out = head + t * L.head_size() + L.w_out();
  for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
    T acc[kRowBlock];
#pragma unroll
    for (int r = 0; r < kRowBlock; ++r) acc[r] = T(0);
    for (int64_t k = 0; k < K; ++k) {
      const T wv = w_out[k * H + j];
#pragma unroll
      for (int r = 0; r < kRowBlock; ++r) {
        if (r < rows) acc[r] += grad_z[(r0 + r) * K + k] * wv;
      }
    }
#pragma unroll
    for (int r = 0; r < kRowBlock; ++r) {
      if (r < rows) grad_h3[(r0 + r) * H + j] = acc[r];
    }
  }
}

// One thread per element of a tensor's head row: w_out [K, H], b_out [K], s.
template <typename T>
__global__ void __launch_bounds__(kThreads) grad_head_kernel(GroupLayout L, RowTable table, const T* h3,
                                                             const T* grad_z, const T* partials,
                                                             int64_t column_blocks, T* grad_head) {
  const int64_t t = blockIdx.y;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t H = L.H, K = L.K;
  if (e >= L.head_size()) return;
  const int64_t r0 = table.starts[t], r1 = table.starts[t + 1];
  T acc = T(0);
  if (e < L.b_out()) {
    const int64_t k = e / H, j = e - k * H;
    for (int64_t row = r0; row < r1; ++row) acc += grad_z[row * K + k] * h3[row * H + j];
  } else if (e < L.scale()) {
    const int64_t k = e - L.b_out();
    for (int64_t row = r0; row < r1; ++row) acc += grad_z[row * K + k];
  } else {
    const int64_t first = table.first_block[t] * column_blocks, end = table.first_block[t + 1] * column_blocks;
    for (int64_t i = first; i < end; ++i) acc += partials[i];
  }
  grad_head[t * L.head_size() + e] = acc;
}

}  // namespace

template <typename T>
void run(Context& context, const GatedUpdateForward<T>& args) {
  const GroupLayout& L = args.layout;
  const size_t bytes = sizeof(T) * kRowBlock * L.H;  // at most 32 KiB: H <= kMaxHidden (checked by the Device)
  const dim3 grid(static_cast<unsigned>(context.table.num_blocks), static_cast<unsigned>(head_column_blocks(L)));
  forward_kernel<T><<<grid, kThreads, bytes, context.stream>>>(L, context.table, args.h3, args.head, args.w, args.g,
                                                               args.lr, args.w_new, args.delta, args.tanh_z);
  context.ok(cudaGetLastError());
}

template <typename T>
void run(Context& context, const GatedUpdateBackward<T>& args) {
  const GroupLayout& L = args.layout;
  const RowTable& table = context.table;
  const int64_t columns = head_column_blocks(L);
  T* grad_z = static_cast<T*>(context.workspace(args.rows * L.K + table.num_blocks * columns));
  T* partials = grad_z + args.rows * L.K;
  const dim3 rows_grid(static_cast<unsigned>(table.num_blocks), static_cast<unsigned>(columns));
  grad_z_kernel<T><<<rows_grid, kThreads, 0, context.stream>>>(L, table, args.grad_w_new, args.grad_delta, args.head,
                                                               args.g, args.lr, args.tanh_z, grad_z, partials);
  if (!context.ok(cudaGetLastError())) return;
  grad_h3_kernel<T><<<static_cast<unsigned>(table.num_blocks), kThreads, 0, context.stream>>>(L, table, args.head,
                                                                                              grad_z, args.grad_h3);
  if (!context.ok(cudaGetLastError())) return;
  const dim3 head_grid(static_cast<unsigned>((L.head_size() + kThreads - 1) / kThreads),
                       static_cast<unsigned>(table.tensors));
  grad_head_kernel<T><<<head_grid, kThreads, 0, context.stream>>>(L, table, args.h3, grad_z, partials, columns,
                                                                  args.grad_head);
  context.ok(cudaGetLastError());
}

FASTL2R_INSTANTIATE_RUN(GatedUpdateForward)
FASTL2R_INSTANTIATE_RUN(GatedUpdateBackward)

}  // namespace fastl2r::cuda

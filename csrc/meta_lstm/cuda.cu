// The grouped meta-LSTM on the GPU (fastl2r/ops/reference.py::meta_lstm).
//
// The rows come in segments, one per (tensor, episode slot) (common/cuda.h, RowTable): each
// has its own RMS scales and shared input; its rows use its tensor's meta-net.  An absent
// cotangent of h_new or c_new (null) is read as zero.
//
// Forward, two launches:
//   prepare     one block per segment: the inverse RMS of each feature block, and cell 0's
//               bias plus its shared-input term (once per segment, not per row);
//   cells       one block per row block (at most kRowBlock rows of one segment) runs all
//               three cells: [input | h] @ [w_ih | w_hh]^T tiled through shared memory
//               (each thread owns gate columns, registers hold a column for every row),
//               then the fused gate/cell/ReLU pass; ReLU(h) stays in shared memory as
//               the next cell's input.
// Backward, three launches:
//   prepare     the inverse RMS again;
//   cells       per row block, cells top-down: gate gradients (saved to the workspace),
//               then ∂h, ∂c of the incoming state and ∂(ReLU input) or ∂w from them;
//   weights     per (tensor, cell, gate rows, input columns): the meta-net's weight
//               gradients summed over the tensor's rows of every slot, segment by segment.
#include "../common/cuda.h"
#include "../common/cuda_math.cuh"
#include "kernels.h"

namespace fastl2r::cuda {
namespace {

constexpr int kTile = 32;      // input columns per shared-memory tile (forward)
constexpr int kGateRows = 8;   // gate rows per thread (weight gradients)

template <typename T>
__device__ __forceinline__ T relu(T x) {
  return x > T(0) ? x : T(0);
}

__device__ __forceinline__ double inverse_rms(double sum_sq, int64_t count) {
  return 1.0 / (sqrt(sum_sq / static_cast<double>(count)) + kRmsEps);
}

// Per segment e: scales [NS] (GroupLayout::num_scales) and, when bias0 is set, cell 0's
// bias plus w_ih[:, Dr:] @ (a_shared[e] / rms) [4H].
template <typename T>
__global__ void __launch_bounds__(kThreads) prepare_kernel(GroupLayout L, RowTable table, const T* w, const T* g,
                                                           const T* a_row, const T* a_shared, const T* lstm,
                                                           T* scales, T* bias0) {
  __shared__ double scratch[32];
  __shared__ double shared_scale;
  const int64_t e = blockIdx.x, t = e / table.slots, r0 = table.starts[e], r1 = table.starts[e + 1];
  const int64_t n = (r1 - r0) * L.K;
  T* s = scales + e * L.num_scales();
  double sw = 0, sg = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const double wv = w[r0 * L.K + i], gv = g[r0 * L.K + i];
    sw += wv * wv;
    sg += gv * gv;
  }
  sw = block_sum(sw, scratch);
  sg = block_sum(sg, scratch);
  if (threadIdx.x == 0) {
    s[L.scale_w()] = static_cast<T>(inverse_rms(sw, n));
    s[L.scale_g()] = static_cast<T>(inverse_rms(sg, n));
  }
  for (int64_t j = 0; j < L.Ar; ++j) {
    double sa = 0;
    for (int64_t r = r0 + threadIdx.x; r < r1; r += blockDim.x) {
      const double a = a_row[r * L.Ar + j];
      sa += a * a;
    }
    sa = block_sum(sa, scratch);
    if (threadIdx.x == 0) s[L.scale_a(j)] = static_cast<T>(inverse_rms(sa, r1 - r0));
  }
  double ss = 0;
  for (int64_t d = threadIdx.x; d < L.Ds; d += blockDim.x) {
    const double a = a_shared[e * L.Ds + d];
    ss += a * a;
  }
  ss = block_sum(ss, scratch);
  if (threadIdx.x == 0) {
    shared_scale = L.Ds ? static_cast<double>(static_cast<T>(inverse_rms(ss, L.Ds))) : 0.0;
    s[L.scale_shared()] = static_cast<T>(shared_scale);
  }
  if (bias0 == nullptr) return;
  __syncthreads();
  const T scale = static_cast<T>(shared_scale);
  const int64_t D = L.D(), Dr = L.Dr();
  const T* w_ih = lstm + t * L.lstm_size() + L.w_ih(0);
  const T* b = lstm + t * L.lstm_size() + L.bias(0);
  for (int64_t q = threadIdx.x; q < L.gates(); q += blockDim.x) {
    T acc = b[q];
    for (int64_t d = 0; d < L.Ds; ++d) acc += w_ih[q * D + Dr + d] * (a_shared[e * L.Ds + d] * scale);
    bias0[e * L.gates() + q] = acc;
  }
}

// Shared memory: x tile [kRowBlock][kTile], ReLU(h) [kRowBlock][H], gates [kRowBlock][4H].
template <typename T>
size_t forward_shared_bytes(const GroupLayout& L) {
  return sizeof(T) * kRowBlock * (kTile + L.H + L.gates());
}

// JT: gate columns per thread, ceil(4H / kThreads): at most 4, as H <= kMaxHidden (checked by the Device).
template <typename T, int JT>
__global__ void __launch_bounds__(kThreads) cells_forward_kernel(GroupLayout L, RowTable table, int64_t R,
                                                                 const T* w, const T* g, const T* a_row,
                                                                 const T* lstm, const T* h, const T* c,
                                                                 const T* scales, const T* bias0, T* h_new,
                                                                 T* c_new, T* gates) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  T* xs = reinterpret_cast<T*>(shared_bytes);
  T* act = xs + kRowBlock * kTile;
  T* gs = act + kRowBlock * L.H;
  const int64_t t = table.tensor(blockIdx.x), segment = table.segment(blockIdx.x), r0 = table.begin(blockIdx.x);
  const int rows = static_cast<int>(table.end(blockIdx.x) - r0);
  const int64_t H = L.H, G4 = L.gates(), K = L.K, Dr = L.Dr();
  const T* net = lstm + t * L.lstm_size();
  const T* s = scales + segment * L.num_scales();

  for (int cell = 0; cell < kNumCells; ++cell) {
    const int64_t in = cell == 0 ? Dr : H;  // row-varying input columns (cell 0's shared ones are in bias0)
    const int64_t ld_ih = L.cell_input(cell);
    const T* w_ih = net + L.w_ih(cell);
    const T* w_hh = net + L.w_hh(cell);
    const int64_t width = in + H;  // [input | h_prev]
    T acc[kRowBlock][JT];
#pragma unroll
    for (int r = 0; r < kRowBlock; ++r) {
#pragma unroll
      for (int jt = 0; jt < JT; ++jt) acc[r][jt] = T(0);
    }
    for (int64_t d0 = 0; d0 < width; d0 += kTile) {
      __syncthreads();  // the previous tile (or the previous cell's ReLU(h)) is consumed
      for (int e = threadIdx.x; e < kRowBlock * kTile; e += blockDim.x) {
        const int r = e / kTile;
        const int64_t d = d0 + e % kTile;
        T v = T(0);
        if (r < rows && d < width) {
          const int64_t row = r0 + r;
          if (d >= in) v = h[(cell * R + row) * H + (d - in)];
          else if (cell > 0) v = act[r * H + d];
          else if (d < K) v = w[row * K + d] * s[L.scale_w()];
          else if (d < 2 * K) v = g[row * K + (d - K)] * s[L.scale_g()];
          else v = a_row[row * L.Ar + (d - 2 * K)] * s[L.scale_a(d - 2 * K)];
        }
        xs[e] = v;
      }
      __syncthreads();
      const int n = static_cast<int>(width - d0 < kTile ? width - d0 : kTile);
#pragma unroll
      for (int jt = 0; jt < JT; ++jt) {
        const int64_t q = threadIdx.x + jt * kThreads;
        if (q < G4) {
          for (int dd = 0; dd < n; ++dd) {
            const int64_t d = d0 + dd;
            const T wv = d < in ? w_ih[q * ld_ih + d] : w_hh[q * H + (d - in)];
#pragma unroll
            for (int r = 0; r < kRowBlock; ++r) acc[r][jt] += xs[r * kTile + dd] * wv;
          }
        }
      }
    }
    const T* bias = cell == 0 ? bias0 + segment * G4 : net + L.bias(cell);
#pragma unroll
    for (int jt = 0; jt < JT; ++jt) {
      const int64_t q = threadIdx.x + jt * kThreads;
      if (q < G4) {
        const T b = bias[q];
#pragma unroll
        for (int r = 0; r < kRowBlock; ++r) {
          if (r < rows) gs[r * G4 + q] = acc[r][jt] + b;
        }
      }
    }
    __syncthreads();
    for (int e = threadIdx.x; e < rows * H; e += blockDim.x) {
      const int r = e / static_cast<int>(H);
      const int64_t j = e - r * H;
      const int64_t at = cell * R + r0 + r;
      const T* gr = gs + r * G4;
      const T i = sigmoid_(gr[j]), f = sigmoid_(gr[H + j]), u = tanh_(gr[2 * H + j]), o = sigmoid_(gr[3 * H + j]);
      const T cn = f * c[at * H + j] + i * u;
      const T hn = o * tanh_(cn);
      T* go = gates + at * G4;
      go[j] = i;
      go[H + j] = f;
      go[2 * H + j] = u;
      go[3 * H + j] = o;
      c_new[at * H + j] = cn;
      h_new[at * H + j] = hn;
      act[r * H + j] = relu(hn);
    }
  }
}

// Shared memory: gate gradients [kRowBlock][4H], ∂ReLU(h) from the cell above [kRowBlock][H].
template <typename T>
size_t backward_shared_bytes(const GroupLayout& L) {
  return sizeof(T) * kRowBlock * (L.gates() + L.H);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) cells_backward_kernel(GroupLayout L, RowTable table, int64_t R,
                                                                  const T* grad_h_new, const T* grad_c_new,
                                                                  const T* lstm, const T* c, const T* h_new,
                                                                  const T* c_new, const T* gates, const T* scales,
                                                                  T* grad_gates, T* grad_w, T* grad_h, T* grad_c) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  T* dgs = reinterpret_cast<T*>(shared_bytes);
  T* dxs = dgs + kRowBlock * L.gates();
  const int64_t t = table.tensor(blockIdx.x), r0 = table.begin(blockIdx.x);
  const int rows = static_cast<int>(table.end(blockIdx.x) - r0);
  const int64_t H = L.H, G4 = L.gates(), K = L.K;
  const T* net = lstm + t * L.lstm_size();
  const T scale_w = scales[table.segment(blockIdx.x) * L.num_scales() + L.scale_w()];

  for (int cell = kNumCells - 1; cell >= 0; --cell) {
    __syncthreads();  // the cell above's gate gradients are consumed and its ∂ReLU(h) is written
    for (int e = threadIdx.x; e < rows * H; e += blockDim.x) {
      const int r = e / static_cast<int>(H);
      const int64_t j = e - r * H;
      const int64_t at = cell * R + r0 + r;
      T dh = grad_h_new != nullptr ? grad_h_new[at * H + j] : T(0);
      if (cell + 1 < kNumCells && h_new[at * H + j] > T(0)) dh += dxs[r * H + j];
      const T* gr = gates + at * G4;
      const T i = gr[j], f = gr[H + j], u = gr[2 * H + j], o = gr[3 * H + j];
      const T tc = tanh_(c_new[at * H + j]);
      const T dc = (grad_c_new != nullptr ? grad_c_new[at * H + j] : T(0)) + dh * o * (T(1) - tc * tc);
      const T di = dc * u * i * (T(1) - i), df = dc * c[at * H + j] * f * (T(1) - f);
      const T du = dc * i * (T(1) - u * u), d_o = dh * tc * o * (T(1) - o);
      T* dg = grad_gates + at * G4;
      dg[j] = di;
      dg[H + j] = df;
      dg[2 * H + j] = du;
      dg[3 * H + j] = d_o;
      T* ds = dgs + r * G4;
      ds[j] = di;
      ds[H + j] = df;
      ds[2 * H + j] = du;
      ds[3 * H + j] = d_o;
      grad_c[at * H + j] = dc * f;
    }
    __syncthreads();
    // Columns: H of w_hh (-> ∂h of the incoming state), then those of w_ih that need a
    // gradient: all H (-> ∂ReLU(h) of the cell below) or, for cell 0, the K of w.
    const int64_t ld_ih = L.cell_input(cell);
    const int64_t columns = H + (cell > 0 ? H : K);
    for (int64_t col = threadIdx.x; col < columns; col += blockDim.x) {
      const T* weight = col < H ? net + L.w_hh(cell) + col : net + L.w_ih(cell) + (col - H);
      const int64_t ld = col < H ? H : ld_ih;
      T acc[kRowBlock];
#pragma unroll
      for (int r = 0; r < kRowBlock; ++r) acc[r] = T(0);
      for (int64_t q = 0; q < G4; ++q) {
        const T wv = weight[q * ld];
#pragma unroll
        for (int r = 0; r < kRowBlock; ++r) acc[r] += dgs[r * G4 + q] * wv;
      }
#pragma unroll
      for (int r = 0; r < kRowBlock; ++r) {
        if (r < rows) {
          if (col < H) grad_h[(cell * R + r0 + r) * H + col] = acc[r];
          else if (cell > 0) dxs[r * H + (col - H)] = acc[r];
          else grad_w[(r0 + r) * K + (col - H)] = acc[r] * scale_w;
        }
      }
    }
  }
}

// One thread: kGateRows gate rows × one input column of one cell of one tensor, where the
// columns are [w_ih's (in), w_hh's (H), the bias (1)] and the bias's input is 1; the sum runs
// over the tensor's segments (slots), each with its own scales and shared input.
template <typename T>
__global__ void __launch_bounds__(kThreads) weight_grad_kernel(GroupLayout L, RowTable table, int64_t R,
                                                               const T* w, const T* g, const T* a_row,
                                                               const T* a_shared, const T* h, const T* h_new,
                                                               const T* scales, const T* grad_gates,
                                                               T* grad_lstm) {
  const int64_t t = blockIdx.z / kNumCells;
  const int cell = static_cast<int>(blockIdx.z % kNumCells);
  const int64_t H = L.H, G4 = L.gates(), K = L.K, Dr = L.Dr();
  const int64_t in = L.cell_input(cell);
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col > in + H) return;
  const int64_t q0 = static_cast<int64_t>(blockIdx.y) * kGateRows;
  if (q0 >= G4) return;
  T acc[kGateRows];
#pragma unroll
  for (int k = 0; k < kGateRows; ++k) acc[k] = T(0);
  for (int64_t segment = t * table.slots; segment < (t + 1) * table.slots; ++segment) {
    const T* s = scales + segment * L.num_scales();
    for (int64_t row = table.starts[segment]; row < table.starts[segment + 1]; ++row) {
      T x;
      if (col == in + H) x = T(1);
      else if (col >= in) x = h[(cell * R + row) * H + (col - in)];
      else if (cell > 0) x = relu(h_new[((cell - 1) * R + row) * H + col]);
      else if (col < K) x = w[row * K + col] * s[L.scale_w()];
      else if (col < 2 * K) x = g[row * K + (col - K)] * s[L.scale_g()];
      else if (col < Dr) x = a_row[row * L.Ar + (col - 2 * K)] * s[L.scale_a(col - 2 * K)];
      else x = a_shared[segment * L.Ds + (col - Dr)] * s[L.scale_shared()];
      const T* dg = grad_gates + (cell * R + row) * G4 + q0;
#pragma unroll
      for (int k = 0; k < kGateRows; ++k) {
        if (q0 + k < G4) acc[k] += dg[k] * x;
      }
    }
  }
  T* out = grad_lstm + t * L.lstm_size();
#pragma unroll
  for (int k = 0; k < kGateRows; ++k) {
    const int64_t q = q0 + k;
    if (q < G4) {
      if (col < in) out[L.w_ih(cell) + q * in + col] = acc[k];
      else if (col < in + H) out[L.w_hh(cell) + q * H + (col - in)] = acc[k];
      else out[L.bias(cell) + q] = acc[k];
    }
  }
}

// Lets a kernel use more than the default 48 KB of dynamic shared memory.
template <typename Kernel>
cudaError_t allow_shared(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

template <typename T, int JT>
cudaError_t launch_cells_forward(const RowTable& table, const MetaLstmForward<T>& a, const T* scales, const T* bias0,
                                 cudaStream_t stream) {
  const size_t bytes = forward_shared_bytes<T>(a.layout);
  cudaError_t status = allow_shared(cells_forward_kernel<T, JT>, bytes);
  if (status != cudaSuccess) return status;
  cells_forward_kernel<T, JT><<<static_cast<unsigned>(table.num_blocks), kThreads, bytes, stream>>>(
      a.layout, table, a.rows, a.w, a.g, a.a_row, a.lstm, a.h, a.c, scales, bias0, a.h_new, a.c_new, a.gates);
  return cudaGetLastError();
}

}  // namespace

template <typename T>
void run(Context& context, const MetaLstmForward<T>& args) {
  const GroupLayout& L = args.layout;
  const RowTable& table = context.table;
  T* scales = static_cast<T*>(context.workspace(table.segments() * (L.num_scales() + L.gates())));
  T* bias0 = scales + table.segments() * L.num_scales();
  prepare_kernel<T><<<static_cast<unsigned>(table.segments()), kThreads, 0, context.stream>>>(
      L, table, args.w, args.g, args.a_row, args.a_shared, args.lstm, scales, bias0);
  if (!context.ok(cudaGetLastError())) return;
  const int64_t per_thread = (L.gates() + kThreads - 1) / kThreads;  // gate columns per thread
  const auto launch = per_thread <= 1   ? launch_cells_forward<T, 1>
                      : per_thread <= 2 ? launch_cells_forward<T, 2>
                                        : launch_cells_forward<T, 4>;
  context.ok(launch(table, args, scales, bias0, context.stream));
}

template <typename T>
void run(Context& context, const MetaLstmBackward<T>& args) {
  const GroupLayout& L = args.layout;
  const RowTable& table = context.table;
  T* scales = static_cast<T*>(context.workspace(table.segments() * L.num_scales() + kNumCells * args.rows * L.gates()));
  T* grad_gates = scales + table.segments() * L.num_scales();
  prepare_kernel<T><<<static_cast<unsigned>(table.segments()), kThreads, 0, context.stream>>>(
      L, table, args.w, args.g, args.a_row, args.a_shared, args.lstm, scales, static_cast<T*>(nullptr));
  if (!context.ok(cudaGetLastError())) return;
  const size_t bytes = backward_shared_bytes<T>(L);
  if (!context.ok(allow_shared(cells_backward_kernel<T>, bytes))) return;
  cells_backward_kernel<T><<<static_cast<unsigned>(table.num_blocks), kThreads, bytes, context.stream>>>(
      L, table, args.rows, args.grad_h_new, args.grad_c_new, args.lstm, args.c, args.h_new, args.c_new, args.gates,
      scales, grad_gates, args.grad_w, args.grad_h, args.grad_c);
  if (!context.ok(cudaGetLastError())) return;
  const int64_t widest = L.D() + L.H + 1;  // cell 0's columns; cells 1 and 2 have 2H + 1
  const dim3 grid(static_cast<unsigned>((widest + kThreads - 1) / kThreads),
                  static_cast<unsigned>((L.gates() + kGateRows - 1) / kGateRows),
                  static_cast<unsigned>(table.tensors * kNumCells));
  weight_grad_kernel<T><<<grid, kThreads, 0, context.stream>>>(L, table, args.rows, args.w, args.g, args.a_row,
                                                               args.a_shared, args.h, args.h_new, scales, grad_gates,
                                                               args.grad_lstm);
  context.ok(cudaGetLastError());
}

FASTL2R_INSTANTIATE_RUN(MetaLstmForward)
FASTL2R_INSTANTIATE_RUN(MetaLstmBackward)

}  // namespace fastl2r::cuda

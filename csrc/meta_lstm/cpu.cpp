// The grouped meta-LSTM on the CPU (fastl2r/ops/reference.py::meta_lstm): the three
// stacked cells for every row of a group, forward and backward.
//
// The rows come in segments, one per (tensor, episode slot) (common/checks.h): each segment has
// its own RMS scales and shared input; a segment's rows use its tensor's meta-net.
//
// Forward: one task per block of rows of one segment runs all three cells (bias and GEMMs
// into the saved gates, the gate activations by ATen's vectorised kernels, then the
// cell/ReLU pass), so a block stays in cache.
// Cell 0's shared input (a_shared) is folded into its bias once per segment.
// Backward: the same row blocks run the cells top-down (fused gate derivatives, then
// the GEMMs for the state and input gradients); then one task per (tensor, cell part)
// forms that meta-net's weight gradients from the saved gate gradients of all its slots.
// An absent cotangent of h_new or c_new (null) is read as zero.
#include "../common/cpu.h"
#include "kernels.h"
#include "op.h"

namespace fastl2r::cpu {
namespace {

// 1 / (rms + eps) of each feature block of segment e, rows [r0, r1) (GroupLayout::num_scales values).
template <typename T>
void inverse_rms(const GroupLayout& L, int64_t e, int64_t r0, int64_t r1, const T* w, const T* g,
                 const T* a_row, const T* a_shared, T* scales) {
  auto inverse = [](double sum_sq, int64_t count) {
    return static_cast<T>(1.0 / (std::sqrt(sum_sq / static_cast<double>(count)) + kRmsEps));
  };
  const int64_t n = (r1 - r0) * L.K;
  const T* wt = w + r0 * L.K;
  const T* gt = g + r0 * L.K;
  double sw = 0, sg = 0;
#pragma omp simd reduction(+ : sw, sg)
  for (int64_t i = 0; i < n; ++i) {
    sw += static_cast<double>(wt[i]) * wt[i];
    sg += static_cast<double>(gt[i]) * gt[i];
  }
  scales[L.scale_w()] = inverse(sw, n);
  scales[L.scale_g()] = inverse(sg, n);
  for (int64_t j = 0; j < L.Ar; ++j) {
    double sa = 0;
    for (int64_t r = r0; r < r1; ++r) sa += static_cast<double>(a_row[r * L.Ar + j]) * a_row[r * L.Ar + j];
    scales[L.scale_a(j)] = inverse(sa, r1 - r0);
  }
  double ss = 0;
  for (int64_t j = 0; j < L.Ds; ++j) ss += static_cast<double>(a_shared[e * L.Ds + j]) * a_shared[e * L.Ds + j];
  scales[L.scale_shared()] = L.Ds ? inverse(ss, L.Ds) : T(0);
}

template <typename T>
std::vector<T> all_inverse_rms(const GroupLayout& L, const Segments& segs, const T* w, const T* g,
                               const T* a_row, const T* a_shared) {
  const int64_t NS = L.num_scales();
  std::vector<T> scales(segs.count() * NS);
  parallel_tasks(segs.count(), [&](int64_t e) {
    inverse_rms(L, e, segs.starts[e], segs.starts[e + 1], w, g, a_row, a_shared, scales.data() + e * NS);
  });
  return scales;
}

// One cell's gates (pre-activation, bias included) -> activated gates in place (i, f, o:
// sigmoid; g: tanh); the new state, and ReLU(h_new), the next cell's input.  `tanh_c` is
// scratch [rows, H].
template <typename T>
void cell_forward(int64_t rows, int64_t H, const T* c_prev, T* gates, T* tanh_c, T* h_out, T* c_out,
                  T* relu_out) {
  const int64_t G4 = 4 * H;
  sigmoid_(gates, rows, 2 * H, G4);
  tanh_(gates + 2 * H, rows, H, G4);
  sigmoid_(gates + 3 * H, rows, H, G4);
  for (int64_t r = 0; r < rows; ++r) {
    const T* gr = gates + r * G4;
    for (int64_t j = 0; j < H; ++j) {
      const T c_new = gr[H + j] * c_prev[r * H + j] + gr[j] * gr[2 * H + j];
      c_out[r * H + j] = c_new;
      tanh_c[r * H + j] = c_new;
    }
  }
  tanh_(tanh_c, rows, H, H);
  for (int64_t r = 0; r < rows; ++r) {
    const T* o = gates + r * G4 + 3 * H;
    for (int64_t j = 0; j < H; ++j) {
      const T h_new = o[j] * tanh_c[r * H + j];
      h_out[r * H + j] = h_new;
      relu_out[r * H + j] = h_new > T(0) ? h_new : T(0);
    }
  }
}

// Gate gradients of one cell from the gradients reaching its outputs: grad_h (+ the
// gradient of ReLU(h_new) from the cell above, if any) and grad_c, each zero where null.
// `tanh_c` is scratch [rows, H].
template <typename T>
void cell_backward(int64_t rows, int64_t H, const T* grad_h, const T* grad_c, const T* grad_relu,
                   const T* h_new, const T* c_new, const T* c_prev, const T* gates, T* tanh_c, T* grad_gates,
                   T* grad_c_prev) {
  std::copy_n(c_new, rows * H, tanh_c);
  tanh_(tanh_c, rows, H, H);
  for (int64_t r = 0; r < rows; ++r) {
    const T* gr = gates + r * 4 * H;
    T* dg = grad_gates + r * 4 * H;
    for (int64_t j = 0; j < H; ++j) {
      const int64_t e = r * H + j;
      T dh = grad_h != nullptr ? grad_h[e] : T(0);
      if (grad_relu != nullptr && h_new[e] > T(0)) dh += grad_relu[e];
      const T i = gr[j], f = gr[H + j], u = gr[2 * H + j], o = gr[3 * H + j];
      const T tc = tanh_c[e];
      const T dc = (grad_c != nullptr ? grad_c[e] : T(0)) + dh * o * (T(1) - tc * tc);
      dg[j] = dc * u * i * (T(1) - i);
      dg[H + j] = dc * c_prev[e] * f * (T(1) - f);
      dg[2 * H + j] = dc * i * (T(1) - u * u);
      dg[3 * H + j] = dh * tc * o * (T(1) - o);
      grad_c_prev[e] = dc * f;
    }
  }
}

// out[q] = sum over rows of m[r, q] (m row-major [rows, cols]).
template <typename T>
void column_sums(const T* m, int64_t rows, int64_t cols, T* out) {
  std::fill_n(out, cols, T(0));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t q = 0; q < cols; ++q) out[q] += m[r * cols + q];
  }
}

}  // namespace

template <typename T>
void run(const Context& context, const MetaLstmForward<T>& args) {
  const GroupLayout& L = args.layout;
  const Segments& segs = context.segments;
  const T *w = args.w, *g = args.g, *a_row = args.a_row, *a_shared = args.a_shared, *lstm = args.lstm, *h = args.h,
          *c = args.c;
  T *h_new = args.h_new, *c_new = args.c_new, *gates = args.gates;
  const int64_t R = args.rows;
  const int64_t H = L.H, G4 = L.gates(), K = L.K, D = L.D(), Dr = L.Dr(), P = L.lstm_size(),
                NS = L.num_scales();
  std::vector<T> scales(segs.count() * NS), bias0(segs.count() * G4);
  parallel_tasks(segs.count(), [&](int64_t e) {
    T* s = scales.data() + e * NS;
    inverse_rms(L, e, segs.starts[e], segs.starts[e + 1], w, g, a_row, a_shared, s);
    // Cell 0's bias plus its shared-input term: one mat-vec per segment, not per row.
    const T* w_ih = lstm + segs.tensor(e) * P + L.w_ih(0);
    const T* b = lstm + segs.tensor(e) * P + L.bias(0);
    for (int64_t q = 0; q < G4; ++q) {
      T acc = b[q];
      for (int64_t d = 0; d < L.Ds; ++d) acc += w_ih[q * D + Dr + d] * (a_shared[e * L.Ds + d] * s[L.scale_shared()]);
      bias0[e * G4 + q] = acc;
    }
  });
  const std::vector<RowBlock> blocks = row_blocks(segs, kRowBlock);
  parallel_tasks(static_cast<int64_t>(blocks.size()), [&](int64_t index) {
    const RowBlock blk = blocks[index];
    const int64_t rows = blk.end - blk.begin;
    const T* net = lstm + blk.tensor * P;
    const T* s = scales.data() + blk.segment * NS;
    auto x0 = scratch<T>(rows * Dr);  // cell 0's row-varying input [w, g, a_row], each block scaled
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t row = blk.begin + r;
      T* xr = x0.get() + r * Dr;
      for (int64_t k = 0; k < K; ++k) xr[k] = w[row * K + k] * s[L.scale_w()];
      for (int64_t k = 0; k < K; ++k) xr[K + k] = g[row * K + k] * s[L.scale_g()];
      for (int64_t j = 0; j < L.Ar; ++j) xr[2 * K + j] = a_row[row * L.Ar + j] * s[L.scale_a(j)];
    }
    auto x = scratch<T>(rows * H);  // ReLU(h_new) of the cell below
    auto tanh_c = scratch<T>(rows * H);
    for (int cell = 0; cell < kNumCells; ++cell) {
      const int64_t at = cell * R + blk.begin;
      T* pre = gates + at * G4;
      fill_rows(cell == 0 ? bias0.data() + blk.segment * G4 : net + L.bias(cell), rows, G4, pre);
      if (cell == 0) {
        gemm<T>(false, true, rows, G4, Dr, 1, x0.get(), Dr, net + L.w_ih(0), D, 1, pre, G4);
      } else {
        gemm<T>(false, true, rows, G4, H, 1, x.get(), H, net + L.w_ih(cell), H, 1, pre, G4);
      }
      gemm<T>(false, true, rows, G4, H, 1, h + at * H, H, net + L.w_hh(cell), H, 1, pre, G4);
      cell_forward(rows, H, c + at * H, pre, tanh_c.get(), h_new + at * H, c_new + at * H, x.get());
    }
  });
}

template <typename T>
void run(const Context& context, const MetaLstmBackward<T>& args) {
  const GroupLayout& L = args.layout;
  const Segments& segs = context.segments;
  const T *grad_h = args.grad_h_new, *grad_c = args.grad_c_new;
  const T *w = args.w, *g = args.g, *a_row = args.a_row, *a_shared = args.a_shared, *lstm = args.lstm, *h = args.h,
          *c = args.c, *h_new = args.h_new, *c_new = args.c_new, *gates = args.gates;
  T *grad_w = args.grad_w, *grad_lstm = args.grad_lstm, *grad_h_in = args.grad_h, *grad_c_in = args.grad_c;
  const int64_t G = segs.tensors(), R = args.rows;
  const int64_t H = L.H, G4 = L.gates(), K = L.K, D = L.D(), Dr = L.Dr(), P = L.lstm_size(),
                NS = L.num_scales();
  const std::vector<T> scales = all_inverse_rms(L, segs, w, g, a_row, a_shared);
  auto grad_gates = scratch<T>(kNumCells * R * G4);
  T* dgates = grad_gates.get();

  const std::vector<RowBlock> blocks = row_blocks(segs, kRowBlock);
  parallel_tasks(static_cast<int64_t>(blocks.size()), [&](int64_t index) {
    const RowBlock blk = blocks[index];
    const int64_t rows = blk.end - blk.begin;
    const T* net = lstm + blk.tensor * P;
    auto grad_relu = scratch<T>(rows * H);  // gradient of the cell above w.r.t. its input ReLU(h_new)
    auto tanh_c = scratch<T>(rows * H);
    for (int cell = kNumCells - 1; cell >= 0; --cell) {
      const int64_t at = cell * R + blk.begin;
      cell_backward(rows, H, grad_h != nullptr ? grad_h + at * H : nullptr,
                    grad_c != nullptr ? grad_c + at * H : nullptr, cell + 1 < kNumCells ? grad_relu.get() : nullptr,
                    h_new + at * H, c_new + at * H, c + at * H, gates + at * G4, tanh_c.get(), dgates + at * G4,
                    grad_c_in + at * H);
      gemm<T>(false, false, rows, H, G4, 1, dgates + at * G4, G4, net + L.w_hh(cell), H, 0, grad_h_in + at * H, H);
      if (cell > 0) {
        gemm<T>(false, false, rows, H, G4, 1, dgates + at * G4, G4, net + L.w_ih(cell), H, 0, grad_relu.get(), H);
      } else {
        // Only w of cell 0's input needs a gradient (g and the activations are constants).
        gemm<T>(false, false, rows, K, G4, scales[blk.segment * NS + L.scale_w()], dgates + at * G4, G4,
                net + L.w_ih(0), D, 0, grad_w + blk.begin * K, K);
      }
    }
  });

  // Weight gradients: per tensor, summed over all its slots' rows: cells 2 and 1, then cell 0
  // split into its w columns and the rest, so that the tasks of a conv group are of similar
  // size.  Cell 0's input columns are scaled per segment (its own RMS and shared input).
  constexpr int kParts = 4;
  parallel_tasks(G * kParts, [&](int64_t index) {
    const int64_t t = index / kParts, part = index % kParts;
    const int64_t r0 = segs.first_row(t), rows = segs.first_row(t + 1) - r0;
    const int64_t e0 = t * segs.slots, e1 = e0 + segs.slots;  // the tensor's segments
    T* grad_net = grad_lstm + t * P;
    auto dg = [&](int cell, int64_t row) { return dgates + (cell * R + row) * G4; };
    // Σ over the tensor's segments of scale·dg0ᵀ·x for the K columns of x [R, K] (w or g).
    auto scaled_product = [&](const T* x, int64_t scale, T* out) {
      for (int64_t e = e0; e < e1; ++e) {
        const int64_t s0 = segs.starts[e];
        gemm<T>(true, false, G4, K, segs.starts[e + 1] - s0, scales[e * NS + scale], dg(0, s0), G4, x + s0 * K, K,
                e == e0 ? 0 : 1, out, D);
      }
    };
    if (part < 2) {
      const int cell = kNumCells - 1 - static_cast<int>(part);
      auto x = scratch<T>(rows * H);  // this cell's input, ReLU(h_new) of the cell below
      const T* below = h_new + ((cell - 1) * R + r0) * H;
      for (int64_t e = 0; e < rows * H; ++e) x[e] = below[e] > T(0) ? below[e] : T(0);
      gemm<T>(true, false, G4, H, rows, 1, dg(cell, r0), G4, x.get(), H, 0, grad_net + L.w_ih(cell), H);
      gemm<T>(true, false, G4, H, rows, 1, dg(cell, r0), G4, h + (cell * R + r0) * H, H, 0, grad_net + L.w_hh(cell),
              H);
      column_sums(dg(cell, r0), rows, G4, grad_net + L.bias(cell));
    } else if (part == 2) {
      scaled_product(w, L.scale_w(), grad_net + L.w_ih(0));
    } else {
      T* grad_w_ih = grad_net + L.w_ih(0);
      T* grad_bias = grad_net + L.bias(0);
      scaled_product(g, L.scale_g(), grad_w_ih + K);
      std::vector<T> acc(G4);
      for (int64_t j = 0; j < L.Ar; ++j) {
        std::fill(acc.begin(), acc.end(), T(0));
        for (int64_t e = e0; e < e1; ++e) {
          const T scale = scales[e * NS + L.scale_a(j)];
          for (int64_t r = segs.starts[e]; r < segs.starts[e + 1]; ++r) {
            const T a = a_row[r * L.Ar + j] * scale;
            for (int64_t q = 0; q < G4; ++q) acc[q] += dg(0, r)[q] * a;
          }
        }
        for (int64_t q = 0; q < G4; ++q) grad_w_ih[q * D + 2 * K + j] = acc[q];
      }
      // The shared input entered through each segment's bias: its weights' gradient is a sum
      // of outer products, one per segment (its column sums of dg0 times its shared input).
      std::fill_n(grad_bias, G4, T(0));
      for (int64_t q = 0; q < G4; ++q) std::fill_n(grad_w_ih + q * D + Dr, L.Ds, T(0));
      for (int64_t e = e0; e < e1; ++e) {
        column_sums(dg(0, segs.starts[e]), segs.starts[e + 1] - segs.starts[e], G4, acc.data());
        const T* shared = a_shared + e * L.Ds;
        const T scale = scales[e * NS + L.scale_shared()];
        for (int64_t q = 0; q < G4; ++q) {
          grad_bias[q] += acc[q];
          for (int64_t d = 0; d < L.Ds; ++d) grad_w_ih[q * D + Dr + d] += acc[q] * (shared[d] * scale);
        }
      }
      gemm<T>(true, false, G4, H, rows, 1, dg(0, r0), G4, h + r0 * H, H, 0, grad_net + L.w_hh(0), H);
    }
  });
}

TORCH_LIBRARY_IMPL(fastl2r, CPU, m) { register_meta_lstm<Device>(m); }

}  // namespace fastl2r::cpu

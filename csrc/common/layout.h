// The memory layout of a group of meta-nets' parameters (fastl2r/ops/layout.py
// documents it; this is its C++ form for the kernels) and the RMS epsilon.  Plain C++
// with no torch, so that the CUDA kernels compile with nvcc alone.
//
// lstm row (one meta-net): per cell k = 0, 1, 2:
//   w_ih [4H, in_k], w_hh [4H, H], b [4H];  in_0 = D = 2K + Ar + Ds, in_1 = in_2 = H.
// Cell 0's input columns: [w (K), g (K), per-row activations (Ar), shared (Ds)].
// head row: w_out [K, H], b_out [K], s [1].
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FASTL2R_HOST_DEVICE __host__ __device__
#else
#define FASTL2R_HOST_DEVICE
#endif

namespace fastl2r {

constexpr int kNumCells = 3;
constexpr double kRmsEps = 1e-8;  // x / (rms(x) + eps), as in the reference

struct GroupLayout {
  int64_t K;   // weights per row
  int64_t Ar;  // per-row activation features
  int64_t Ds;  // shared (per-tensor) activation features
  int64_t H;   // hidden size

  FASTL2R_HOST_DEVICE int64_t D() const { return 2 * K + Ar + Ds; }
  // Input columns of cell 0 that differ from row to row.
  FASTL2R_HOST_DEVICE int64_t Dr() const { return 2 * K + Ar; }
  FASTL2R_HOST_DEVICE int64_t gates() const { return 4 * H; }
  FASTL2R_HOST_DEVICE int64_t cell_input(int cell) const { return cell == 0 ? D() : H; }
  FASTL2R_HOST_DEVICE int64_t cell_size(int cell) const {
    return gates() * (cell_input(cell) + H + 1);
  }
  // Offsets, within one lstm row, of a cell's w_ih [4H, in], w_hh [4H, H] and b [4H].
  FASTL2R_HOST_DEVICE int64_t w_ih(int cell) const {
    int64_t offset = 0;
    for (int k = 0; k < cell; ++k) offset += cell_size(k);
    return offset;
  }
  FASTL2R_HOST_DEVICE int64_t w_hh(int cell) const { return w_ih(cell) + gates() * cell_input(cell); }
  FASTL2R_HOST_DEVICE int64_t bias(int cell) const { return w_hh(cell) + gates() * H; }
  FASTL2R_HOST_DEVICE int64_t lstm_size() const { return w_ih(kNumCells); }

  // Offsets within one head row.
  FASTL2R_HOST_DEVICE int64_t w_out() const { return 0; }
  FASTL2R_HOST_DEVICE int64_t b_out() const { return K * H; }
  FASTL2R_HOST_DEVICE int64_t scale() const { return K * H + K; }
  FASTL2R_HOST_DEVICE int64_t head_size() const { return K * H + K + 1; }

  // Per tensor, the inverse RMS of each feature block: w, g, each per-row column, shared.
  FASTL2R_HOST_DEVICE int64_t num_scales() const { return 3 + Ar; }
  FASTL2R_HOST_DEVICE int64_t scale_w() const { return 0; }
  FASTL2R_HOST_DEVICE int64_t scale_g() const { return 1; }
  FASTL2R_HOST_DEVICE int64_t scale_a(int64_t column) const { return 2 + column; }
  FASTL2R_HOST_DEVICE int64_t scale_shared() const { return 2 + Ar; }
};

}  // namespace fastl2r

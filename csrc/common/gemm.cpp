// The CPU kernels' matrix product (gemm.h): a register-tiled micro-kernel, k in order.
//
// Each call is cast as out = U·V: U is read one element at a time (broadcast), V along its
// contiguous dimension, and a tile of rows of U times a panel of columns of V stays in
// registers for the whole sum over k.  With op(b) = b (rows of b contiguous) V is b itself;
// otherwise the product is taken transposed, cᵀ = op(b)ᵀ·op(a)ᵀ, with V = op(a)ᵀ, packed when
// a is not stored that way.  Nothing is split along k, so every element of c gets the same
// in-order sum whatever tile it is in.
//
// The tile fits the registers of the instruction set: GCC's function multiversioning builds
// one version per set (AVX-512, AVX2 + FMA, baseline x86-64) and picks one when the library
// loads, so the build stays portable.  The versions may round differently (FMA or not); one
// machine always runs the same one.
#include "gemm.h"

#include <algorithm>
#include <cstring>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FASTL2R_MULTIVERSION 1
#endif
// Inlined into each version, hence compiled for its instruction set.
#define FASTL2R_INLINE __attribute__((always_inline)) inline

namespace fastl2r::cpu {
namespace {

// A tile of kRows rows of U by kVectors vectors of Bytes bytes of V: kRows·kVectors accumulators.
template <typename Scalar, int Bytes, int Rows, int Vectors>
struct Tiles {
  using T = Scalar;
  typedef T Vector __attribute__((vector_size(Bytes)));
  static constexpr int kRows = Rows, kVectors = Vectors;
  static constexpr int64_t kLanes = Bytes / sizeof(T);
  static constexpr int64_t kWidth = kLanes * Vectors;  // columns of V per tile
};

// out(r, x) = Σ_p U(r, p)·V(p, x) for r < rows, x < cols, stored as
// c[r·c_row + x·c_col] = alpha·out + beta·c.
template <typename T>
struct Product {
  int64_t rows, cols, k;
  const T* u;
  int64_t u_row, u_step;  // U(r, p) = u[r·u_row + p·u_step]
  const T* v;
  int64_t ldv, v_width;   // V(p, x) = v[p·ldv + x], readable for x < v_width (>= cols)
  T alpha, beta;
  T* c;
  int64_t c_row, c_col;
};

// Scratch that lives as long as the thread: a call must not allocate (or fault in) pages.
template <typename T>
std::vector<T>& edge_buffer() {
  thread_local std::vector<T> buffer;
  return buffer;
}
template <typename T>
std::vector<T>& transpose_buffer() {
  thread_local std::vector<T> buffer;
  return buffer;
}

// acc[r][j] = Σ_p U(r, p)·V(p, x0 + j·kLanes …), p in order, for the rows that u_rows start.
template <typename C>
FASTL2R_INLINE void tile(const typename C::T* const (&u_rows)[C::kRows], int64_t u_step, const typename C::T* v,
                         int64_t ldv, int64_t k, typename C::Vector (&acc)[C::kRows][C::kVectors]) {
  using Vector = typename C::Vector;
  for (int r = 0; r < C::kRows; ++r) {
    for (int j = 0; j < C::kVectors; ++j) acc[r][j] = Vector{};
  }
  for (int64_t p = 0; p < k; ++p, v += ldv) {
    const int64_t at = p * u_step;
#pragma GCC unroll 4
    for (int j = 0; j < C::kVectors; ++j) {
      Vector vp;
      std::memcpy(&vp, v + j * C::kLanes, sizeof(vp));
#pragma GCC unroll 8
      for (int r = 0; r < C::kRows; ++r) acc[r][j] += u_rows[r][at] * vp;
    }
  }
}

// The tile of out at rows r0 … r0 + kRows and columns x0 … x0 + kWidth (clipped to P).
template <typename C>
FASTL2R_INLINE void one_tile(const Product<typename C::T>& P, int64_t r0, int64_t x0, const typename C::T* edge) {
  using T = typename C::T;
  const int64_t rows = std::min<int64_t>(C::kRows, P.rows - r0), cols = std::min(C::kWidth, P.cols - x0);
  const T* u_rows[C::kRows];
  // Rows past the end repeat the last one: computed, never stored.
  for (int r = 0; r < C::kRows; ++r) u_rows[r] = P.u + std::min<int64_t>(r0 + r, P.rows - 1) * P.u_row;
  const bool direct = x0 + C::kWidth <= P.v_width;
  typename C::Vector acc[C::kRows][C::kVectors];
  tile<C>(u_rows, P.u_step, direct ? P.v + x0 : edge, direct ? P.ldv : C::kWidth, P.k, acc);
  T sums[C::kRows][C::kWidth];  // the accumulators stay in registers: indexed only here
  std::memcpy(sums, acc, sizeof(sums));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t x = 0; x < cols; ++x) {
      T& out = P.c[(r0 + r) * P.c_row + (x0 + x) * P.c_col];
      const T value = P.alpha * sums[r][x];
      out = P.beta == T(0) ? value : value + P.beta * out;
    }
  }
}

template <typename C>
FASTL2R_INLINE void run(const Product<typename C::T>& P) {
  using T = typename C::T;
  constexpr int64_t width = C::kWidth;
  // V's last panel, if it would read past V's columns: copied, zero-padded to a full panel.
  const int64_t last = (P.cols - 1) / width * width;
  const T* edge = nullptr;
  if (last + width > P.v_width) {
    std::vector<T>& buffer = edge_buffer<T>();
    buffer.assign(P.k * width, T(0));
    for (int64_t p = 0; p < P.k; ++p) std::copy_n(P.v + p * P.ldv + last, P.cols - last, buffer.data() + p * width);
    edge = buffer.data();
  }
  // The larger operand in the outer loop: it streams through once, the smaller stays in cache.
  if (P.rows >= P.cols) {
    for (int64_t r0 = 0; r0 < P.rows; r0 += C::kRows) {
      for (int64_t x0 = 0; x0 < P.cols; x0 += width) one_tile<C>(P, r0, x0, edge);
    }
  } else {
    for (int64_t x0 = 0; x0 < P.cols; x0 += width) {
      for (int64_t r0 = 0; r0 < P.rows; r0 += C::kRows) one_tile<C>(P, r0, x0, edge);
    }
  }
}

template <typename C>
FASTL2R_INLINE void gemm_tiled(bool transpose_a, bool transpose_b, int64_t m, int64_t n, int64_t k,
                               typename C::T alpha, const typename C::T* a, int64_t lda, const typename C::T* b,
                               int64_t ldb, typename C::T beta, typename C::T* c, int64_t ldc) {
  using T = typename C::T;
  if (m <= 0 || n <= 0) return;
  if (!transpose_b) {  // c = op(a)·b: U = op(a), V = b
    run<C>({m, n, k, a, transpose_a ? 1 : lda, transpose_a ? lda : 1, b, ldb, n, alpha, beta, c, ldc, 1});
  } else if (transpose_a) {  // cᵀ = b·a: U = b, V = a
    run<C>({n, m, k, b, ldb, 1, a, lda, m, alpha, beta, c, 1, ldc});
  } else {  // cᵀ = b·aᵀ: U = b, V = aᵀ, packed to whole panels
    const int64_t width = (m + C::kWidth - 1) / C::kWidth * C::kWidth;
    std::vector<T>& packed = transpose_buffer<T>();
    packed.assign(k * width, T(0));
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t p = 0; p < k; ++p) packed[p * width + i] = a[i * lda + p];
    }
    run<C>({n, m, k, b, ldb, 1, packed.data(), width, width, alpha, beta, c, 1, ldc});
  }
}

// One version per instruction set, with the tile that fits its registers (12 or 8 accumulators,
// then the panel of V and a broadcast) and measured fastest on the shapes of the meta-LSTM:
// AVX-512 (32 registers of 64 bytes) 6 × 2, AVX2 (16 of 32) 3 × 4, SSE2 (16 of 16) 4 × 2.
#define FASTL2R_GEMM_ARGS(T)                                                                                \
  bool transpose_a, bool transpose_b, int64_t m, int64_t n, int64_t k, T alpha, const T *a, int64_t lda, \
      const T *b, int64_t ldb, T beta, T *c, int64_t ldc
#define FASTL2R_GEMM_CALL transpose_a, transpose_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc
#if FASTL2R_MULTIVERSION
__attribute__((target("arch=x86-64-v4"))) void multiply(FASTL2R_GEMM_ARGS(float)) {
  gemm_tiled<Tiles<float, 64, 6, 2>>(FASTL2R_GEMM_CALL);
}
__attribute__((target("arch=x86-64-v4"))) void multiply(FASTL2R_GEMM_ARGS(double)) {
  gemm_tiled<Tiles<double, 64, 6, 2>>(FASTL2R_GEMM_CALL);
}
__attribute__((target("arch=x86-64-v3"))) void multiply(FASTL2R_GEMM_ARGS(float)) {
  gemm_tiled<Tiles<float, 32, 3, 4>>(FASTL2R_GEMM_CALL);
}
__attribute__((target("arch=x86-64-v3"))) void multiply(FASTL2R_GEMM_ARGS(double)) {
  gemm_tiled<Tiles<double, 32, 3, 4>>(FASTL2R_GEMM_CALL);
}
__attribute__((target("default")))
#endif
void multiply(FASTL2R_GEMM_ARGS(float)) {
  gemm_tiled<Tiles<float, 16, 4, 2>>(FASTL2R_GEMM_CALL);
}
#if FASTL2R_MULTIVERSION
__attribute__((target("default")))
#endif
void multiply(FASTL2R_GEMM_ARGS(double)) {
  gemm_tiled<Tiles<double, 16, 4, 2>>(FASTL2R_GEMM_CALL);
}

}  // namespace

template <>
void gemm<float>(FASTL2R_GEMM_ARGS(float)) {
  multiply(FASTL2R_GEMM_CALL);
}

template <>
void gemm<double>(FASTL2R_GEMM_ARGS(double)) {
  multiply(FASTL2R_GEMM_CALL);
}

}  // namespace fastl2r::cpu

// The CPU kernels' matrix product.  Plain C++ with no torch, so that a test can build it alone.
//
// Every element of c is one sum over k taken in order (p = 0, 1, …, k − 1) in its own
// accumulator, then scaled: c = alpha·sum + beta·c.  The order depends on nothing but the
// operands, so a result never depends on the number of threads (a library GEMM may split k
// by thread count: MKL does on some CPUs), nor on the tiling, nor on where c lies in memory.
// Single-threaded: the kernels call it from their own row-block tasks.
#pragma once

#include <cstdint>

namespace fastl2r::cpu {

// c[m, n] = beta·c + alpha·op(a)[m, k] @ op(b)[k, n], every matrix row-major with its row
// stride; op transposes when the flag is set.  With beta = 0, c is only written (it may hold NaN).
template <typename T>
void gemm(bool transpose_a, bool transpose_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
          const T* b, int64_t ldb, T beta, T* c, int64_t ldc);

template <>
void gemm<float>(bool transpose_a, bool transpose_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                 int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc);
template <>
void gemm<double>(bool transpose_a, bool transpose_b, int64_t m, int64_t n, int64_t k, double alpha, const double* a,
                  int64_t lda, const double* b, int64_t ldb, double beta, double* c, int64_t ldc);

}  // namespace fastl2r::cpu

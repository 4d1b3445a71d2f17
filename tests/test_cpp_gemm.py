"""The C++ kernels' GEMM (csrc/common/gemm.cpp), built on its own and called through ctypes.

Against float64 matrix products on odd shapes, every transpose, alpha and beta; and the
property the ops' thread-count independence rests on: an element of c is the same whether
it is computed in one call or in a call on any block of rows or columns (as a task would).
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SOURCES = REPO / "csrc" / "common"
F32, F64 = torch.float32, torch.float64

# C entry points over fastl2r::cpu::gemm<T>, one per dtype.
SHIM = """
#include <cstdint>
#include "gemm.h"
#define ENTRY(name, T)                                                                                     \\
  extern "C" void name(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, \\
                       const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {                               \\
    fastl2r::cpu::gemm<T>(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);                            \\
  }
ENTRY(gemm_float, float)
ENTRY(gemm_double, double)
"""

SHAPES = [(1, 1, 1), (17, 33, 5), (5, 1, 17), (1, 40, 3), (33, 17, 64), (32, 256, 70), (7, 9, 0), (70, 3, 129)]
SCALES = [(1.0, 0.0), (-0.5, 1.5), (2.0, 1.0)]  # (alpha, beta)


@pytest.fixture(scope="module")
def gemm_library(tmp_path_factory):
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None or not (SOURCES / "gemm.cpp").is_file():
        pytest.skip("needs a C++ compiler and the source tree")
    build = tmp_path_factory.mktemp("gemm")
    (build / "shim.cpp").write_text(SHIM)
    library = build / "libgemm.so"
    subprocess.run([compiler, "-std=c++17", "-O3", "-shared", "-fPIC", f"-I{SOURCES}", str(build / "shim.cpp"),
                    str(SOURCES / "gemm.cpp"), "-o", str(library)], check=True, capture_output=True)
    return ctypes.CDLL(str(library))


def call_gemm(lib, transpose_a: bool, transpose_b: bool, alpha: float, a: torch.Tensor, b: torch.Tensor,
              beta: float, c: torch.Tensor) -> None:
    """c = beta·c + alpha·op(a)·op(b) in place; a, b, c are row-major views with any row stride."""
    m, n = c.shape
    k = a.shape[0] if transpose_a else a.shape[1]
    scalar = ctypes.c_float if c.dtype == F32 else ctypes.c_double
    fn = lib.gemm_float if c.dtype == F32 else lib.gemm_double
    fn.argtypes = [ctypes.c_bool, ctypes.c_bool, *[ctypes.c_int64] * 3, scalar, ctypes.c_void_p, ctypes.c_int64,
                   ctypes.c_void_p, ctypes.c_int64, scalar, ctypes.c_void_p, ctypes.c_int64]
    for x in (a, b, c):
        assert x.stride(1) == 1
    fn(transpose_a, transpose_b, m, n, k, alpha, a.data_ptr(), a.stride(0), b.data_ptr(), b.stride(0), beta,
       c.data_ptr(), c.stride(0))


def padded(rows: int, cols: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """A random [rows, cols] view whose row stride is larger than cols (as the kernels' blocks are)."""
    return torch.randn(rows, cols + 3, generator=gen, dtype=F64).to(dtype)[:, :cols]


def operands(m: int, n: int, k: int, transpose_a: bool, transpose_b: bool, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    a = padded(*((k, m) if transpose_a else (m, k)), dtype, gen)
    b = padded(*((n, k) if transpose_b else (k, n)), dtype, gen)
    return a, b, padded(m, n, dtype, gen)


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("alpha,beta", SCALES)
@pytest.mark.parametrize("transpose_a", [False, True], ids=["a", "aT"])
@pytest.mark.parametrize("transpose_b", [False, True], ids=["b", "bT"])
def test_gemm_matches_float64(gemm_library, dtype, alpha, beta, transpose_a, transpose_b):
    for m, n, k in SHAPES:
        a, b, c = operands(m, n, k, transpose_a, transpose_b, dtype)
        op_a = (a.t() if transpose_a else a).double()
        op_b = (b.t() if transpose_b else b).double()
        expected = alpha * (op_a @ op_b) + (beta * c.double() if beta else 0.0)
        if beta == 0:
            c.fill_(float("nan"))  # with beta = 0, c is only written
        call_gemm(gemm_library, transpose_a, transpose_b, alpha, a, b, beta, c)
        tol = (1e-6 if dtype == F32 else 1e-14) * max(k, 1) ** 0.5
        torch.testing.assert_close(c.double(), expected, rtol=tol, atol=tol, msg=lambda e: f"{m}x{n}x{k}: {e}")


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("transpose_a", [False, True], ids=["a", "aT"])
@pytest.mark.parametrize("transpose_b", [False, True], ids=["b", "bT"])
def test_gemm_on_any_block_gives_the_same_bits(gemm_library, dtype, transpose_a, transpose_b):
    m, n, k = 37, 45, 129
    a, b, c = operands(m, n, k, transpose_a, transpose_b, dtype)
    whole = c.clone()
    call_gemm(gemm_library, transpose_a, transpose_b, 0.5, a, b, 1.0, whole)
    for r0, r1, c0, c1 in [(0, 5, 0, n), (5, 37, 0, n), (0, m, 0, 1), (0, m, 1, 20), (11, 12, 17, 45)]:
        block = c[r0:r1, c0:c1].clone()
        a_rows = a[:, r0:r1] if transpose_a else a[r0:r1]
        b_cols = b[c0:c1] if transpose_b else b[:, c0:c1]
        call_gemm(gemm_library, transpose_a, transpose_b, 0.5, a_rows, b_cols, 1.0, block)
        assert torch.equal(block, whole[r0:r1, c0:c1]), (r0, r1, c0, c1)

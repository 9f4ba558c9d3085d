// The GEMMs of the CPU kernels (recurrence_cpu.cpp, layer_cpu.cpp) and of FusedRNNCell's CPU step
// (csrc/rnn_cell.cpp), declared and wrapped once: the BLAS GEMM that torch's own BLAS exports (MKL or
// OpenBLAS), except the large float32 ones on a CPU where oneDNN's micro-kernel is the faster (gemm_onednn.h)
// and the small float32 ones on a CPU with AVX-512 (takes_small_gemm).
#pragma once

#include "gemm_onednn.h"
#include "step_avx512.h"
#include "step_tile.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

extern "C" {
// Fortran BLAS. Weak: null where the installed torch exports none; callers check blas_available first.
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc) __attribute__((weak));
}

namespace rnn_fused {

// Whether a float32 GEMM of rows x N x K multiply-adds takes the AVX-512 tile kernels (avx512::small_gemm)
// instead of BLAS: below 2^18 multiply-adds, where BLAS's setup per call is no longer small against the
// arithmetic (MKL on an AMD EPYC Zen 5 core: 1.7-2.0 us for each 16 x 64 x 64 GEMM of a T = 16, B = 1, H = 64
// layer, 65 K multiply-adds; the tile kernels 0.8-1.3 us, benchmarks/NOTES.md "GEMMs on an AMD EPYC with
// AVX-512"); from there up
// oneDNN or BLAS are as fast. With M^T (m_transposed) only up to 4 rows: its dot products end in one
// horizontal sum per output, and 16 rows of the projection took 2.4 us against MKL's 1.7.
// RNN_FUSED_CPU_GEMM=blas sends them to BLAS too (onednn::blas_forced).
inline bool takes_small_gemm(int64_t rows, int64_t N, int64_t K, bool m_transposed) {
  return tile::isa() == tile::Isa::Avx512 && rows * N * K < (int64_t(1) << 18) && (!m_transposed || rows <= 4) &&
         !onednn::blas_forced();
}

inline bool blas_available(float*) { return sgemm_ != nullptr; }
inline bool blas_available(double*) { return dgemm_ != nullptr; }

// Row-major C[rows, N] (ldc) = A[rows, K] (lda) x op(M) + beta * C (+ row_bias [N] on every row, with beta 0),
// M row-major: op(M) = M^T with M [N, K] if transpose_m, else M [K, N]. In BLAS's column-major view every
// row-major matrix is transposed, so C^T = op(M)^T A^T. Every size > 0 (BLAS refuses a leading dimension of
// 0). beta is 0 or 1.
template <typename T>
void gemm_rows(const T* a, int64_t lda, const T* m, bool transpose_m, T* c, int64_t ldc, int64_t rows, int64_t N,
               int64_t K, T beta, const T* row_bias = nullptr) {
  TORCH_INTERNAL_ASSERT((beta == T(0) || beta == T(1)) && !(row_bias && beta != T(0)));
  if constexpr (std::is_same_v<T, float>) {
    if (onednn::takes(rows, N, K, /*copies_b=*/transpose_m))
      return onednn::gemm_rows(a, lda, m, transpose_m, c, ldc, rows, N, K, beta != T(0), row_bias);
  }
  if (row_bias) {  // C starts as the bias rows, and the product accumulates onto them
    for (int64_t r = 0; r < rows; ++r) std::copy(row_bias, row_bias + N, c + r * ldc);
    beta = T(1);
  }
  if constexpr (std::is_same_v<T, float>) {
    if (takes_small_gemm(rows, N, K, transpose_m))
      return avx512::small_gemm(a, lda, false, m, transpose_m ? K : N, transpose_m, c, ldc, rows, N, K, beta != T(0));
  }
  const int mi = static_cast<int>(N), ni = static_cast<int>(rows), ki = static_cast<int>(K);
  const int lda_i = static_cast<int>(lda), ldm = static_cast<int>(transpose_m ? K : N), ldc_i = static_cast<int>(ldc);
  const char tm = transpose_m ? 'T' : 'N', ta = 'N';
  const T one = 1;
  if constexpr (std::is_same_v<T, float>) {
    sgemm_(&tm, &ta, &mi, &ni, &ki, &one, m, &ldm, a, &lda_i, &beta, c, &ldc_i);
  } else {
    dgemm_(&tm, &ta, &mi, &ni, &ki, &one, m, &ldm, a, &lda_i, &beta, c, &ldc_i);
  }
}

// Row-major C[M, N] (ldc) = A^T B + beta * C with A [K, M] (lda) and B [K, N] (ldb), both row-major: the
// weight gradients' sum over rows (dW = dz^T x). Column-major: C^T = B^T (A^T)^T. Every size > 0; beta 0 or 1.
template <typename T>
void gemm_transposed_a(const T* a, int64_t lda, const T* b, int64_t ldb, T* c, int64_t ldc, int64_t M, int64_t N,
                       int64_t K, T beta) {
  TORCH_INTERNAL_ASSERT(beta == T(0) || beta == T(1));
  if constexpr (std::is_same_v<T, float>) {
    if (onednn::takes(M, N, K, /*copies_b=*/false))
      return onednn::gemm_transposed_a(a, lda, b, ldb, c, ldc, M, N, K, beta != T(0));
    if (takes_small_gemm(M, N, K, /*m_transposed=*/false))
      return avx512::small_gemm(a, lda, true, b, ldb, false, c, ldc, M, N, K, beta != T(0));
  }
  const int mi = static_cast<int>(N), ni = static_cast<int>(M), ki = static_cast<int>(K);
  const int lda_i = static_cast<int>(lda), ldb_i = static_cast<int>(ldb), ldc_i = static_cast<int>(ldc);
  const char tb = 'N', ta = 'T';
  const T one = 1;
  if constexpr (std::is_same_v<T, float>) {
    sgemm_(&tb, &ta, &mi, &ni, &ki, &one, b, &ldb_i, a, &lda_i, &beta, c, &ldc_i);
  } else {
    dgemm_(&tb, &ta, &mi, &ni, &ki, &one, b, &ldb_i, a, &lda_i, &beta, c, &ldc_i);
  }
}

}  // namespace rnn_fused

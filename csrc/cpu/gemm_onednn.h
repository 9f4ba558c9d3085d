// Float32 GEMMs on oneDNN's batch-reduce GEMM micro-kernel (torch's public at::native::cpublas::brgemm), for
// the CPUs where torch's MKL leaves AVX-512 unused. See gemm_onednn.cpp; blas.h's gemm_rows and
// gemm_transposed_a call these where `takes` says so, and BLAS otherwise.
#pragma once

#include <cstdint>

namespace rnn_fused {
namespace onednn {

// Whether float32 GEMMs of this process may go to oneDNN's micro-kernel (decided once): by default where the
// CPU has AVX-512 and is not Intel's and torch's BLAS is MKL (MKL runs its AVX2 kernels on such a CPU: an AMD
// EPYC Zen 5 core did 100-107 GFLOP/s in MKL's sgemm and 235-250 in oneDNN's, benchmarks/NOTES.md "GEMMs on
// an AMD EPYC with AVX-512"), and only in a torch built with the micro-kernel. RNN_FUSED_CPU_GEMM=onednn
// takes it on any CPU where torch has it (tests, A/B timing), RNN_FUSED_CPU_GEMM=blas never.
bool chosen();
// RNN_FUSED_CPU_GEMM=blas: every float32 GEMM on BLAS, the small ones of blas.h's takes_small_gemm too (tests,
// A/B timing).
bool blas_forced();
const char* gemm_name();  // "onednn" or "blas": which one chosen() gives (tests, the benchmark's environment)

// Whether one float32 GEMM of rows x N x K goes to oneDNN: chosen(), torch's oneDNN switched on
// (torch.backends.mkldnn.enabled), and large enough to repay the micro-kernel's calls (and, where B has to be
// transposed first, `copies_b`, the copy).
bool takes(int64_t rows, int64_t N, int64_t K, bool copies_b);

// Row-major C[rows, N] (ldc) = A[rows, K] (lda) x op(M) (+ C if accumulate) (+ row_bias [N] on every row, if
// given), op(M) = M^T with M [N, K] if transpose_m, else M [K, N]: blas.h's gemm_rows.
void gemm_rows(const float* a, int64_t lda, const float* m, bool transpose_m, float* c, int64_t ldc, int64_t rows,
               int64_t N, int64_t K, bool accumulate, const float* row_bias);

// Row-major C[M, N] (ldc) = A^T B (+ C if accumulate), A [K, M] (lda), B [K, N] (ldb): blas.h's
// gemm_transposed_a (the weight gradients).
void gemm_transposed_a(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t M,
                       int64_t N, int64_t K, bool accumulate);

}  // namespace onednn
}  // namespace rnn_fused

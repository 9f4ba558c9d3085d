// The AVX-512 kernels of the CPU step (float32): the register-tile step (step_tile.h) for CPUs with AVX-512,
// and the dot-product step of short calls. See step_avx512.cpp.
#pragma once

#include "step_tile.h"

#include <cstdint>

namespace rnn_fused {
namespace avx512 {

// Whether this build has the AVX-512 kernels and the CPU executes them (checked once). Which step is taken
// (and the switches that turn one off) is tile::isa().
bool cpu_has();

// tile::rows_times on AVX-512.
void rows_times(const tile::StepMatrix& m, int64_t H, const float* in, int64_t in_stride, const float* init,
                int64_t init_stride, float* out, int64_t out_stride, int64_t rows, bool activation, Activation act);

// out[r, n] = act(init[r, n] + sum_k in[r, k] m[n, k]) for r < rows, n < H, m row-major [H, H] read as it
// lies (so m = W_hh gives W_hh h with no packed copy): the forward's small steps in a call too short to repay
// packing W_hh^T, where BLAS's matrix-vector call costs ~0.3 us of setup for 4 K multiply-adds at H = 64.
// A dot product per output: sums in another order than rows_times. init may be out, never in. Only where
// tile::isa() is Avx512.
void rows_times_transposed(const float* m, int64_t H, const float* in, int64_t in_stride, const float* init,
                           int64_t init_stride, float* out, int64_t out_stride, int64_t rows, Activation act);

// A small GEMM on the same kernels (blas.h takes it below BLAS's efficient size: ~0.5 us of MKL's setup per
// call where a 16 x 64 x 64 GEMM is ~0.3 us of arithmetic): row-major C[rows, N] (ldc) (+ C if accumulate) =
// op(A) op(M), where op(A)[r, k] = A[r * a_stride + k], or A[k * a_stride + r] if a_transposed; op(M)[k, n]
// = M[k * ldm + n], or M[n * ldm + k] if m_transposed (dot products along M's rows). Every size > 0. Only
// where tile::isa() is Avx512.
void small_gemm(const float* a, int64_t a_stride, bool a_transposed, const float* m, int64_t ldm, bool m_transposed,
                float* c, int64_t ldc, int64_t rows, int64_t N, int64_t K, bool accumulate);

}  // namespace avx512
}  // namespace rnn_fused

// Float32 GEMMs on oneDNN's batch-reduce GEMM micro-kernel (gemm_onednn.h): why and how.
//
// Why: on an AMD EPYC with AVX-512 (Zen 5), torch's MKL runs its AVX2 kernels (MKL picks AVX-512 only on
// Intel CPUs): 100-107 GFLOP/s per core, where oneDNN's JIT kernels, XLA and our own AVX-512 step run at
// 210-250. The layer's GEMMs (the projection, dx, dW_ih, dW_hh) are half of a large call's flops, so JAX won
// every case at B >= 16 there (benchmarks/NOTES.md, "GEMMs on an AMD EPYC with AVX-512"). oneDNN is the
// library torch already ships and exposes for this (at::native::cpublas::brgemm, used by torch's own CPU
// flash attention), so no GEMM of our own is written.
//
// Decomposition: C in blocks of kRows x kCols (64 x 64), K in chunks of kDepth (256); one micro-kernel call
// per (block, chunk), accumulating into the block while it is in L1 (gemm_transposed_a: the chunks of K
// outermost, so that a chunk of B stays in L2 for every block). Blocks of rows run in parallel
// (at::parallel_for); each block is one thread's and sums its chunks in the same order, so the bits do not
// depend on the number of threads.
// Memory: the micro-kernel reads A as rows [M, K] and B as rows [K, N]. gemm_rows with M^T (the projection's
// W_ih as it lies, [N, K]) first transposes M into a buffer of N * K floats; gemm_transposed_a transposes each
// [kDepth, kRows] piece of A into a buffer of one block (64 KB) per thread; both in 16 x 16 AVX-512 register
// tiles. C is written in place.
// Kernels: torch caches one generated kernel per shape and thread (~35-50 us to generate): a GEMM uses at most
// 2 x 2 x 2 shapes (full and last block of rows, of columns and of K), x 2 where it accumulates.
#include "gemm_onednn.h"

#include "step_avx512.h"
#include "transpose.h"

#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstdlib>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <string>
#include <vector>

namespace rnn_fused {
namespace onednn {
namespace {

constexpr int64_t kRows = 64, kCols = 64, kDepth = 256;

// Below this many multiply-adds a GEMM stays with BLAS: the micro-kernel's call and cache look-up per block
// (~1 us) is no longer small against the block's arithmetic.
constexpr int64_t kMinMultiplyAdds = int64_t(1) << 18;
// Where B must be transposed first (gemm_rows with M^T), the copy of N * K floats pays from this many rows
// (measured, 256 x 256: at 64 rows 168 GFLOP/s with the copy against MKL's 112; at 16 rows 77 against 92).
constexpr int64_t kMinRowsForCopy = 64;

#ifdef CPUBLAS_BRGEMM_F32F32F32
constexpr bool kBuiltWithMicroKernel = true;
#else
constexpr bool kBuiltWithMicroKernel = false;
#endif

bool intel_cpu() {
#if defined(__x86_64__) && defined(__GNUC__)
  return __builtin_cpu_is("intel");
#else
  return false;
#endif
}

// C[rows, N] (+)= A[rows, K] B[K, N] (+ row_bias), all row-major, rows <= kRows: one block of rows, by columns
// and chunks; the bias is added to a block of 64 x 64 outputs while it is in L1 (written as bias rows first and
// accumulated onto, C would take one more pass over memory: ~0.8 ms of a 5.5 ms projection at T128 B64 H256).
void block_rows(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t rows,
                int64_t N, int64_t K, bool accumulate, const float* row_bias = nullptr) {
#ifdef CPUBLAS_BRGEMM_F32F32F32
  for (int64_t n0 = 0; n0 < N; n0 += kCols) {
    const int64_t cols = std::min(kCols, N - n0);
    for (int64_t k0 = 0; k0 < K; k0 += kDepth)
      at::native::cpublas::brgemm(rows, cols, std::min(kDepth, K - k0), lda, ldb, ldc, accumulate || k0 > 0,
                                  a + k0, b + k0 * ldb + n0, c + n0, /*is_vnni=*/false);
    if (row_bias)
      for (int64_t r = 0; r < rows; ++r) {
        float* __restrict cr = c + r * ldc + n0;
        const float* __restrict br = row_bias + n0;
        for (int64_t j = 0; j < cols; ++j) cr[j] += br[j];
      }
  }
#else
  (void)a, (void)lda, (void)b, (void)ldb, (void)c, (void)ldc, (void)rows, (void)N, (void)K, (void)accumulate,
      (void)row_bias;
#endif
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define RNN_FUSED_AVX512_TRANSPOSE __attribute__((target("avx512f")))

// dst[j * ld_dst + i] = src[i * ld_src + j] for one full 16 x 16 tile, in registers: 16 loads, four rounds of
// shuffles, 16 stores.
RNN_FUSED_AVX512_TRANSPOSE void transpose16(const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * ld_src);
  for (int i = 0; i < 16; i += 2) {  // interleave pairs of rows: 32-bit elements
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // 64-bit pairs
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {  // 128-bit lanes, across groups of four rows
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xDD);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xDD);
  }
  for (int i = 0; i < 8; ++i) {  // 256-bit halves
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
  }
  for (int k = 0; k < 16; ++k) _mm512_storeu_ps(dst + k * ld_dst, r[k]);  // r[k]: column k of the tile
}

RNN_FUSED_AVX512_TRANSPOSE void transpose_avx512(const float* src, int64_t ld_src, int64_t rows, int64_t cols,
                                                 float* dst, int64_t ld_dst) {
  const int64_t rows16 = rows / 16 * 16, cols16 = cols / 16 * 16;
  for (int64_t i0 = 0; i0 < rows16; i0 += 16)
    for (int64_t j0 = 0; j0 < cols16; j0 += 16) transpose16(src + i0 * ld_src + j0, ld_src, dst + j0 * ld_dst + i0, ld_dst);
  // the edges, element by element
  if (cols16 < cols) transpose_into(src + cols16, ld_src, rows, cols - cols16, dst + cols16 * ld_dst, ld_dst);
  if (rows16 < rows) transpose_into(src + rows16 * ld_src, ld_src, rows - rows16, cols16, dst + rows16, ld_dst);
}
#endif

// transpose_into for float, in 16 x 16 register tiles where the CPU has AVX-512 (the weight gradients' A^T
// pieces: 2 M floats per dW at T128 B64 H256, ~1 ns each element by element).
void transpose_float(const float* src, int64_t ld_src, int64_t rows, int64_t cols, float* dst, int64_t ld_dst) {
#ifdef RNN_FUSED_AVX512_TRANSPOSE
  if (avx512::cpu_has()) return transpose_avx512(src, ld_src, rows, cols, dst, ld_dst);
#endif
  transpose_into(src, ld_src, rows, cols, dst, ld_dst);
}

// RNN_FUSED_CPU_GEMM, read once: "onednn", "blas" or "" (not set, or another value).
const std::string& forced_gemm() {
  static const std::string value = [] {
    const char* v = std::getenv("RNN_FUSED_CPU_GEMM");
    return v != nullptr && (std::string(v) == "onednn" || std::string(v) == "blas") ? std::string(v) : std::string();
  }();
  return value;
}

}  // namespace

bool blas_forced() { return forced_gemm() == "blas"; }

bool chosen() {
  static const bool yes = kBuiltWithMicroKernel && !blas_forced() &&
                          (forced_gemm() == "onednn" || (avx512::cpu_has() && !intel_cpu() && at::hasMKL()));
  return yes;
}

const char* gemm_name() { return chosen() ? "onednn" : "blas"; }

bool takes(int64_t rows, int64_t N, int64_t K, bool copies_b) {
  return chosen() && at::globalContext().userEnabledMkldnn() && rows * N * K >= kMinMultiplyAdds &&
         (!copies_b || rows >= kMinRowsForCopy);
}

void gemm_rows(const float* a, int64_t lda, const float* m, bool transpose_m, float* c, int64_t ldc, int64_t rows,
               int64_t N, int64_t K, bool accumulate, const float* row_bias) {
  std::vector<float> m_t;
  const float* b = m;
  if (transpose_m) {  // M [N, K] -> B = M^T [K, N]
    m_t.resize(N * K);
    transpose_float(m, K, N, K, m_t.data(), N);
    b = m_t.data();
  }
  const int64_t blocks = (rows + kRows - 1) / kRows;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r0 = i * kRows;
      block_rows(a + r0 * lda, lda, b, N, c + r0 * ldc, ldc, std::min(kRows, rows - r0), N, K, accumulate, row_bias);
    }
  });
}

void gemm_transposed_a(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t M,
                       int64_t N, int64_t K, bool accumulate) {
  // K outermost: a chunk of B (kDepth rows of N, 256 KB at N = 256) stays in L2 while every block of C's rows
  // takes it, where rows outermost streamed all of B once per block (dW_ih at T128 B64 H256: 6.1 ms against
  // 4.9 for dx, the same flops).
  const int64_t blocks = (M + kRows - 1) / kRows;
  for (int64_t k0 = 0; k0 < K; k0 += kDepth) {
    const int64_t depth = std::min(kDepth, K - k0);
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> a_t(kRows * depth);  // A's piece [depth, rows] as [rows, depth]
      for (int64_t i = begin; i < end; ++i) {
        const int64_t m0 = i * kRows, rows = std::min(kRows, M - m0);
        transpose_float(a + k0 * lda + m0, lda, depth, rows, a_t.data(), depth);
        block_rows(a_t.data(), depth, b + k0 * ldb, ldb, c + m0 * ldc, ldc, rows, N, depth, accumulate || k0 > 0);
      }
    });
  }
}

}  // namespace onednn
}  // namespace rnn_fused

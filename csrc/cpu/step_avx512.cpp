// The AVX-512 step (float32): out[rows, H] = act(init + in[rows, H] m), m [H, H] row-major or packed
// (step_tile.h's layout).
//
// Decomposition: one thread, called per step per direction by recurrence_cpu.cpp (directions are its
// parallel axis). The columns of m are cut into panels of kPanelWidth = 64 (four zmm registers); for each
// panel, the rows go in blocks of up to kRowBlock = 6, and a block's 6 x 64 outputs are 24 zmm accumulators
// that live in registers for the whole k loop: per k, four loads of m and one broadcast per row feed 24
// FMAs. The activation is applied to the block while it is in L1, right after it is stored.
// Small forward steps of short calls (rows_times_transposed): one row at a time, 16 outputs at a time, each a
// dot product of a row of W_hh with h (16 accumulators, reduced at the end): no packed copy, no BLAS call.
// Small GEMMs of the layer (small_gemm, taken by blas.h below 2^18 multiply-adds): the same two kernels on
// [K, N] matrices read as they lie (the tile, whose left operand may be read transposed: dW = dz^T x) or on
// the rows of an [N, K] matrix (the dot products).
// Memory: m is read as it lies (the backward's W_hh: row-major, nothing copied) or from the packed W_hh^T of
// the forward, [ceil(H / 64), H, 64], made once per call, each panel contiguous (one 256-byte run per k). A
// panel (H * 256 bytes: 32 KB at H = 128) stays in L1/L2 while every row block of the step reads it.
// Nothing is allocated per step; out is written once.
// Floor: 2 * rows * H * H flops per step at 2 FMA ports x 16 lanes; B = 1 reads all of m per step (1 MB at
// H = 512: an L2 bandwidth problem). Measured against MKL (benchmarks/NOTES.md, "AVX-512 step").
// Why not BLAS here: MKL's sgemm per step (and its packed-B sgemm_compute) is 1.3-2.3x slower at these
// shapes (a call is 6-16 us of setup and re-packing for 0.5-8 MFLOP), and it cannot fuse the projection add
// and the activation.
#include "step_avx512.h"

#include "activation.h"

#include <c10/util/Exception.h>

#include <algorithm>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define RNN_FUSED_HAVE_AVX512_STEP 1
#include <immintrin.h>
#endif

namespace rnn_fused {
namespace avx512 {

using tile::StepMatrix;

namespace {

constexpr int64_t kPanelWidth = tile::kMaxPanelWidth;  // tile::panel_width() where the step is AVX-512's
int64_t panels(int64_t H) { return (H + kPanelWidth - 1) / kPanelWidth; }

constexpr int64_t kVectors = kPanelWidth / 16;  // zmm registers per panel row
constexpr int kRowBlock = 6;                     // 6 x 4 = 24 accumulators of the 32 zmm registers

}  // namespace

#ifdef RNN_FUSED_HAVE_AVX512_STEP

namespace {

#define RNN_FUSED_AVX512 __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma")))

// Rows [0, kRows) of one panel: columns [0, width) of out, over k < K. `panel` is the panel's column 0 at
// k = 0. kFull: width == kPanelWidth, so the loads of m need no mask (masked loads in the k loop halve the
// speed). kInTransposed: in's element (r, k) is in[k * in_stride + r] (the weight gradients' dz^T), else
// in[r * in_stride + k].
template <int kRows, bool kInit, bool kFull, bool kInTransposed = false>
RNN_FUSED_AVX512 inline void block(const float* __restrict panel, int64_t ld, int64_t K,
                                   const float* __restrict in, int64_t in_stride, const float* init,
                                   int64_t init_stride, float* out, int64_t out_stride, int64_t width,
                                   bool activation, Activation act) {
  __mmask16 mask[kVectors];
  for (int64_t v = 0; v < kVectors; ++v) {
    const int64_t left = width - 16 * v;
    mask[v] = left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1);
  }
  __m512 acc[kRows][kVectors];
  for (int r = 0; r < kRows; ++r)
    for (int64_t v = 0; v < kVectors; ++v)
      acc[r][v] = kInit ? _mm512_maskz_loadu_ps(mask[v], init + r * init_stride + 16 * v) : _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    // Masked in a narrow panel: the last panel of a row-major m is narrower than the panel, and its row ends
    // there.
    __m512 w[kVectors];
    for (int64_t v = 0; v < kVectors; ++v)
      w[v] = kFull ? _mm512_loadu_ps(panel + k * ld + 16 * v) : _mm512_maskz_loadu_ps(mask[v], panel + k * ld + 16 * v);
    for (int r = 0; r < kRows; ++r) {
      const __m512 x = _mm512_set1_ps(kInTransposed ? in[k * in_stride + r] : in[r * in_stride + k]);
      for (int64_t v = 0; v < kVectors; ++v) acc[r][v] = _mm512_fmadd_ps(x, w[v], acc[r][v]);
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int64_t v = 0; v < kVectors; ++v) _mm512_mask_storeu_ps(out + r * out_stride + 16 * v, mask[v], acc[r][v]);
  if (activation) {
    // The same scalar activation as the portable loops (activation.h), vectorised here for AVX-512 on a
    // block that is still in L1: identical numbers on every path.
    for (int r = 0; r < kRows; ++r) {
      float* __restrict o = out + r * out_stride;
      for (int64_t i = 0; i < width; ++i) o[i] = activate(o[i], act);
    }
  }
}

template <bool kInit, bool kFull, bool kInTransposed = false>
RNN_FUSED_AVX512 void panel_rows(const float* panel, int64_t ld, int64_t K, const float* in, int64_t in_stride,
                                 const float* init, int64_t init_stride, float* out, int64_t out_stride, int64_t rows,
                                 int64_t width, bool activation, Activation act) {
  for (int64_t r = 0; r < rows; r += kRowBlock) {
    const float* in_r = kInTransposed ? in + r : in + r * in_stride;
    const float* init_r = kInit ? init + r * init_stride : nullptr;
    float* out_r = out + r * out_stride;
    switch (std::min<int64_t>(kRowBlock, rows - r)) {
#define RNN_FUSED_BLOCK(n)                                                                                     \
  case n:                                                                                                      \
    block<n, kInit, kFull, kInTransposed>(panel, ld, K, in_r, in_stride, init_r, init_stride, out_r, out_stride, \
                                          width, activation, act);                                             \
    break;
      RNN_FUSED_BLOCK(1) RNN_FUSED_BLOCK(2) RNN_FUSED_BLOCK(3) RNN_FUSED_BLOCK(4) RNN_FUSED_BLOCK(5)
      RNN_FUSED_BLOCK(6)
#undef RNN_FUSED_BLOCK
    }
  }
}

// out[rows, N] = finish(init + in[rows, K] m[K, N]), by panels of m's columns.
template <bool kInit, bool kInTransposed = false>
RNN_FUSED_AVX512 void rows_times_impl(const StepMatrix& m, int64_t K, int64_t N, const float* in, int64_t in_stride,
                                      const float* init, int64_t init_stride, float* out, int64_t out_stride,
                                      int64_t rows, bool activation, Activation act) {
  for (int64_t p = 0; p < panels(N); ++p) {
    const float* panel = m.data + p * m.panel_stride;
    const int64_t c0 = p * kPanelWidth, width = std::min(kPanelWidth, N - c0);
    const float* init_c = kInit ? init + c0 : nullptr;
    if (width == kPanelWidth)
      panel_rows<kInit, true, kInTransposed>(panel, m.ld, K, in, in_stride, init_c, init_stride, out + c0, out_stride,
                                             rows, width, activation, act);
    else
      panel_rows<kInit, false, kInTransposed>(panel, m.ld, K, in, in_stride, init_c, init_stride, out + c0,
                                              out_stride, rows, width, activation, act);
  }
}

// Outputs [n0, n0 + 16) of one row before the activation, by dot products of x [K] with rows of m [N, K] (ldm
// apart): 16 zmm accumulators, one per output, over k by 16 lanes (the last K % 16 lanes masked), reduced at
// the end. Output rows of m past N - 1 read row N - 1 (valid memory) and are not stored. init null: zeros.
RNN_FUSED_AVX512 inline void dots16(const float* __restrict m, int64_t ldm, int64_t K, int64_t N, int64_t n0,
                                    const float* __restrict x, const float* init, float* out) {
  const int64_t k_full = K / 16 * 16;
  const __mmask16 k_tail = __mmask16((1u << (K - k_full)) - 1);
  const float* row[16];
  for (int j = 0; j < 16; ++j) row[j] = m + std::min(n0 + j, N - 1) * ldm;
  __m512 acc[16];
  for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < k_full; k += 16) {
    const __m512 xv = _mm512_loadu_ps(x + k);
    for (int j = 0; j < 16; ++j) acc[j] = _mm512_fmadd_ps(_mm512_loadu_ps(row[j] + k), xv, acc[j]);
  }
  if (k_tail) {
    const __m512 xv = _mm512_maskz_loadu_ps(k_tail, x + k_full);
    for (int j = 0; j < 16; ++j) acc[j] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k_tail, row[j] + k_full), xv, acc[j]);
  }
  const int64_t n = std::min<int64_t>(16, N - n0);
  for (int64_t j = 0; j < n; ++j) out[n0 + j] = (init ? init[n0 + j] : 0.f) + _mm512_reduce_add_ps(acc[j]);
}

// out[r, n] = finish(init[r, n] + sum_k in[r, k] m[n, k]) for r < rows, n < N, k < K; init null: zeros.
RNN_FUSED_AVX512 void rows_times_transposed_impl(const float* m, int64_t ldm, int64_t K, int64_t N, const float* in,
                                                 int64_t in_stride, const float* init, int64_t init_stride, float* out,
                                                 int64_t out_stride, int64_t rows, bool activation, Activation act) {
  for (int64_t r = 0; r < rows; ++r) {
    float* o = out + r * out_stride;  // may be init's row (the in-place forward): no __restrict
    for (int64_t n0 = 0; n0 < N; n0 += 16)
      dots16(m, ldm, K, N, n0, in + r * in_stride, init ? init + r * init_stride : nullptr, o);
    if (activation)
      for (int64_t i = 0; i < N; ++i) o[i] = activate(o[i], act);  // the row in L1, as block's activation pass
  }
}

}  // namespace

void rows_times_transposed(const float* m, int64_t H, const float* in, int64_t in_stride, const float* init,
                           int64_t init_stride, float* out, int64_t out_stride, int64_t rows, Activation act) {
  rows_times_transposed_impl(m, H, H, H, in, in_stride, init, init_stride, out, out_stride, rows, true, act);
}

void small_gemm(const float* a, int64_t a_stride, bool a_transposed, const float* m, int64_t ldm, bool m_transposed,
                float* c, int64_t ldc, int64_t rows, int64_t N, int64_t K, bool accumulate) {
  TORCH_INTERNAL_ASSERT(!(a_transposed && m_transposed), "rnn_fused: small_gemm takes one operand transposed");
  if (m_transposed)  // C = A M^T, M [N, K]: dot products along M's rows
    return rows_times_transposed_impl(m, ldm, K, N, a, a_stride, accumulate ? c : nullptr, ldc, c, ldc, rows, false,
                                      Activation::Tanh);
  const StepMatrix mk{m, ldm, kPanelWidth};  // M [K, N] as it lies: panels of 64 columns, ldm apart per k
  if (accumulate && a_transposed)
    rows_times_impl<true, true>(mk, K, N, a, a_stride, c, ldc, c, ldc, rows, false, Activation::Tanh);
  else if (accumulate)
    rows_times_impl<true>(mk, K, N, a, a_stride, c, ldc, c, ldc, rows, false, Activation::Tanh);
  else if (a_transposed)
    rows_times_impl<false, true>(mk, K, N, a, a_stride, nullptr, 0, c, ldc, rows, false, Activation::Tanh);
  else
    rows_times_impl<false>(mk, K, N, a, a_stride, nullptr, 0, c, ldc, rows, false, Activation::Tanh);
}

bool cpu_has() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw");
  return yes;
}

void rows_times(const StepMatrix& m, int64_t H, const float* in, int64_t in_stride, const float* init,
                int64_t init_stride, float* out, int64_t out_stride, int64_t rows, bool activation, Activation act) {
  if (init)
    rows_times_impl<true>(m, H, H, in, in_stride, init, init_stride, out, out_stride, rows, activation, act);
  else
    rows_times_impl<false>(m, H, H, in, in_stride, init, init_stride, out, out_stride, rows, activation, act);
}

#else  // not x86-64: the portable loops of recurrence_cpu.cpp do every step

bool cpu_has() { return false; }

void rows_times(const StepMatrix&, int64_t, const float*, int64_t, const float*, int64_t, float*, int64_t, int64_t,
                bool, Activation) {
  TORCH_INTERNAL_ASSERT(false, "rnn_fused: the AVX-512 step is not built for this architecture");
}

void rows_times_transposed(const float*, int64_t, const float*, int64_t, const float*, int64_t, float*, int64_t,
                           int64_t, Activation) {
  TORCH_INTERNAL_ASSERT(false, "rnn_fused: the AVX-512 step is not built for this architecture");
}

void small_gemm(const float*, int64_t, bool, const float*, int64_t, bool, float*, int64_t, int64_t, int64_t, int64_t,
                bool) {
  TORCH_INTERNAL_ASSERT(false, "rnn_fused: the AVX-512 step is not built for this architecture");
}

#endif

}  // namespace avx512
}  // namespace rnn_fused

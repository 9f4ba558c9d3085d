// The AVX2 + FMA step (float32): out[rows, H] = act(init + in[rows, H] m), m [H, H] row-major or packed
// (step_tile.h's layout, the same as the AVX-512 step's).
//
// Decomposition: one thread, called per step per direction by recurrence_cpu.cpp (directions are its
// parallel axis). 16 ymm registers: a block's accumulators must leave room for the loads of m and one
// broadcast. The columns of m come in panels of 64 (tile::kPanelWidth); a step of 4 rows or more cuts each
// panel into four column groups of 16 (two ymm) and runs its rows in blocks of up to 6: 12 accumulators, per
// k two loads of m and one broadcast per row feed 12 FMAs (the FMA ports, not the loads, are the limit). A
// step of fewer rows runs each row alone across the whole panel: 8 accumulators, per k eight loads feeding
// eight FMAs, so that the FMAs' latency (4-5 cycles on 2 ports) is covered, which 2-6 accumulators of a
// narrow group would not do. The activation is applied to the accumulators, in registers, before the store.
// Memory: as the AVX-512 step: m is the packed W_hh^T of the forward (one 256-byte run per k and panel) or
// W_hh as it lies (the backward); a column group reads one 64-byte line per k of its panel, so a group's
// part of m (H lines: 16 KB at H = 256) stays in L1 while the step's row blocks pass over it. Columns past
// H are never loaded (masked loads in the last panel). Nothing is allocated; out is written once.
// Floor: 2 * rows * H * H flops per step at 2 FMA ports x 8 lanes; B = 1 reads all of m per step (1 MB at
// H = 512, from L2/L3). Why not BLAS: on the AMD EPYC CI machines torch's MKL runs sgemm at ~50 GFLOP/s
// (half of these cores' FMA peak) and cannot fuse the projection add and the activation
// (benchmarks/NOTES.md, "AVX2 step").
#include "step_avx2.h"

#include "activation.h"

#include <c10/util/Exception.h>

#include <algorithm>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define RNN_FUSED_HAVE_AVX2_STEP 1
#include <immintrin.h>
#endif

namespace rnn_fused {
namespace avx2 {

#ifdef RNN_FUSED_HAVE_AVX2_STEP

namespace {

using tile::StepMatrix;

constexpr int64_t kPanelWidth = 16;  // tile::panel_width() where the step is AVX2's: two ymm registers
constexpr int kRowBlock = 6;         // 6 x 2 = 12 accumulators of the 16 ymm registers
constexpr int64_t kFewRows = 4;      // steps of fewer rows run row by row across four panels at once
constexpr int kWidePanels = 4;       // ... 64 columns: 8 accumulators

#define RNN_FUSED_AVX2 __attribute__((target("avx2,fma")))

// Lanes [0, left) of a vector set (left may be <= 0 or >= 8).
RNN_FUSED_AVX2 inline __m256i lanes_below(int64_t left) {
  const int64_t n = std::max<int64_t>(0, std::min<int64_t>(8, left));
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// The activations on the accumulators, before the store. tanh_fast of activation.h (the same clamp, rational
// approximation and NaN passing), its Horner steps as FMAs: the scalar loop over a stored block, as the
// AVX-512 step runs it, cost ~7 cycles an element here (T256 B16 H128: 3.5-3.8 ms with tanh, 2.3 with relu).
RNN_FUSED_AVX2 inline __m256 tanh8(__m256 x) {
  const __m256 clamp = _mm256_set1_ps(kTanhClamp), neg_clamp = _mm256_set1_ps(-kTanhClamp);
  x = _mm256_blendv_ps(x, neg_clamp, _mm256_cmp_ps(x, neg_clamp, _CMP_LT_OQ));  // false for NaN: NaN passes
  x = _mm256_blendv_ps(x, clamp, _mm256_cmp_ps(x, clamp, _CMP_GT_OQ));
  const __m256 x2 = _mm256_mul_ps(x, x);
  __m256 p = _mm256_set1_ps(kTanhNumerator[0]);
  for (int i = 1; i < 7; ++i) p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(kTanhNumerator[i]));
  __m256 q = _mm256_set1_ps(kTanhDenominator[0]);
  for (int i = 1; i < 4; ++i) q = _mm256_fmadd_ps(q, x2, _mm256_set1_ps(kTanhDenominator[i]));
  return _mm256_div_ps(_mm256_mul_ps(x, p), q);
}
// max(z, 0) as std::max: 0 > z is false for NaN and for -0, so both pass as they are.
RNN_FUSED_AVX2 inline __m256 relu8(__m256 z) { return _mm256_max_ps(_mm256_setzero_ps(), z); }

// Rows [0, kRows) x columns [0, width) of out (width <= 8 * kVecs), the columns of kVecs / 2 consecutive panels
// from `panel` (its column 0 at k = 0; k's run ld apart, panels panel_stride apart). kFull: width == 8 * kVecs,
// so no load or store needs a mask.
template <int kRows, int kVecs, bool kInit, bool kFull>
RNN_FUSED_AVX2 inline void block(const float* __restrict panel, int64_t ld, int64_t panel_stride, int64_t H,
                                 const float* __restrict in, int64_t in_stride, const float* init,
                                 int64_t init_stride, float* out, int64_t out_stride, int64_t width, bool activation,
                                 Activation act) {
  __m256i mask[kVecs];
  const float* cols[kVecs];
  for (int v = 0; v < kVecs; ++v) {
    mask[v] = lanes_below(width - 8 * v);
    cols[v] = panel + (v / 2) * panel_stride + 8 * (v % 2);
  }
  __m256 acc[kRows][kVecs];
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < kVecs; ++v) {
      const float* src = init + r * init_stride + 8 * v;
      acc[r][v] = !kInit ? _mm256_setzero_ps() : kFull ? _mm256_loadu_ps(src) : _mm256_maskload_ps(src, mask[v]);
    }
  for (int64_t k = 0; k < H; ++k) {
    __m256 w[kVecs];
    for (int v = 0; v < kVecs; ++v)
      w[v] = kFull ? _mm256_loadu_ps(cols[v] + k * ld) : _mm256_maskload_ps(cols[v] + k * ld, mask[v]);
    for (int r = 0; r < kRows; ++r) {
      // set1 of a loaded value, not _mm256_broadcast_ss(pointer): GCC cannot tell what that builtin reads,
      // so it kept all 12 accumulators' stack copies up to date in the k loop (12 stores per k: 1.5x slower).
      const __m256 x = _mm256_set1_ps(in[r * in_stride + k]);
      for (int v = 0; v < kVecs; ++v) acc[r][v] = _mm256_fmadd_ps(x, w[v], acc[r][v]);
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < kVecs; ++v) {
      float* dst = out + r * out_stride + 8 * v;
      const __m256 y = !activation ? acc[r][v] : act == Activation::Tanh ? tanh8(acc[r][v]) : relu8(acc[r][v]);
      if (kFull)
        _mm256_storeu_ps(dst, y);
      else
        _mm256_maskstore_ps(dst, mask[v], y);
    }
}

// Every row of one panel (width <= kPanelWidth), in blocks of up to kRowBlock rows.
template <bool kInit, bool kFull>
RNN_FUSED_AVX2 void panel_rows(const float* panel, int64_t ld, int64_t H, const float* in, int64_t in_stride,
                               const float* init, int64_t init_stride, float* out, int64_t out_stride, int64_t rows,
                               int64_t width, bool activation, Activation act) {
  for (int64_t r = 0; r < rows; r += kRowBlock) {
    const float* in_r = in + r * in_stride;
    const float* init_r = kInit ? init + r * init_stride : nullptr;
    float* out_r = out + r * out_stride;
    switch (std::min<int64_t>(kRowBlock, rows - r)) {
#define RNN_FUSED_BLOCK(n)                                                                                      \
  case n:                                                                                                       \
    block<n, 2, kInit, kFull>(panel, ld, 0, H, in_r, in_stride, init_r, init_stride, out_r, out_stride, width,  \
                              activation, act);                                                                 \
    break;
      RNN_FUSED_BLOCK(1) RNN_FUSED_BLOCK(2) RNN_FUSED_BLOCK(3) RNN_FUSED_BLOCK(4) RNN_FUSED_BLOCK(5)
      RNN_FUSED_BLOCK(6)
#undef RNN_FUSED_BLOCK
    }
  }
}

template <bool kInit>
RNN_FUSED_AVX2 void rows_times_impl(const StepMatrix& m, int64_t H, const float* in, int64_t in_stride,
                                    const float* init, int64_t init_stride, float* out, int64_t out_stride,
                                    int64_t rows, bool activation, Activation act) {
  if (rows < kFewRows) {
    constexpr int64_t kWide = kWidePanels * kPanelWidth;
    for (int64_t c0 = 0; c0 < H; c0 += kWide) {
      const float* panel = m.data + (c0 / kPanelWidth) * m.panel_stride;
      const int64_t width = std::min(kWide, H - c0);
      for (int64_t r = 0; r < rows; ++r) {
        const float* init_r = kInit ? init + r * init_stride + c0 : nullptr;
        float* out_r = out + r * out_stride + c0;
        if (width == kWide)
          block<1, 8, kInit, true>(panel, m.ld, m.panel_stride, H, in + r * in_stride, in_stride, init_r,
                                   init_stride, out_r, out_stride, width, activation, act);
        else
          block<1, 8, kInit, false>(panel, m.ld, m.panel_stride, H, in + r * in_stride, in_stride, init_r,
                                    init_stride, out_r, out_stride, width, activation, act);
      }
    }
    return;
  }
  for (int64_t c0 = 0; c0 < H; c0 += kPanelWidth) {
    const float* panel = m.data + (c0 / kPanelWidth) * m.panel_stride;
    const int64_t width = std::min(kPanelWidth, H - c0);
    const float* init_c = kInit ? init + c0 : nullptr;
    if (width == kPanelWidth)
      panel_rows<kInit, true>(panel, m.ld, H, in, in_stride, init_c, init_stride, out + c0, out_stride, rows, width,
                              activation, act);
    else
      panel_rows<kInit, false>(panel, m.ld, H, in, in_stride, init_c, init_stride, out + c0, out_stride, rows,
                               width, activation, act);
  }
}

}  // namespace

bool cpu_has() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}

void rows_times(const StepMatrix& m, int64_t H, const float* in, int64_t in_stride, const float* init,
                int64_t init_stride, float* out, int64_t out_stride, int64_t rows, bool activation, Activation act) {
  if (init)
    rows_times_impl<true>(m, H, in, in_stride, init, init_stride, out, out_stride, rows, activation, act);
  else
    rows_times_impl<false>(m, H, in, in_stride, init, init_stride, out, out_stride, rows, activation, act);
}

#else  // not x86-64: the portable loops of recurrence_cpu.cpp do every step

bool cpu_has() { return false; }

void rows_times(const tile::StepMatrix&, int64_t, const float*, int64_t, const float*, int64_t, float*, int64_t,
                int64_t, bool, Activation) {
  TORCH_INTERNAL_ASSERT(false, "rnn_fused: the AVX2 step is not built for this architecture");
}

#endif

}  // namespace avx2
}  // namespace rnn_fused

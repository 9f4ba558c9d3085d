// The AVX-512 step of the CPU kernels (float32): rows of states times a matrix packed once per call, with
// the input projection added and the activation applied in registers / L1. See step_avx512.cpp.
#pragma once

#include "../recurrence_args.h"

#include <cstdint>

namespace rnn_fused {
namespace avx512 {

// Whether this build has the AVX-512 step and the CPU it runs on executes it (checked once).
bool available();

// Columns of the matrix per panel: what one row block's accumulators cover (four zmm registers).
constexpr int64_t kPanelWidth = 64;

// An [H, H] matrix as the step reads it: element (k, c) at data[(c / kPanelWidth) * panel_stride + k * ld +
// c % kPanelWidth]. Row-major is {m, H, kPanelWidth}; packed (pack_transposed) is {p, kPanelWidth,
// H * kPanelWidth}, each panel contiguous.
struct StepMatrix {
  const float* data;
  int64_t ld;
  int64_t panel_stride;
};
inline StepMatrix row_major(const float* m, int64_t H) { return {m, H, kPanelWidth}; }

// Floats of the packed form of an [H, H] matrix: ceil(H / kPanelWidth) panels of [H, kPanelWidth].
int64_t packed_floats(int64_t H);

// Packs m^T, m row-major [H, H] (the forward's W_hh, so that rows times it is W_hh h), into `packed`
// (packed_floats(H) floats); returns it as a StepMatrix.
StepMatrix pack_transposed(const float* m, int64_t H, float* packed);

// out[r, :] = finish(init[r, :] + in[r, :] m) for r < rows; init null means zeros; finish = the activation
// when `activation` is set, else nothing. Row r of in / init / out starts at r * in_stride / init_stride /
// out_stride. out may be init (read before written), never in.
void rows_times(const StepMatrix& m, int64_t H, const float* in, int64_t in_stride, const float* init,
                int64_t init_stride, float* out, int64_t out_stride, int64_t rows, bool activation, Activation act);

// out[r, n] = act(init[r, n] + sum_k in[r, k] m[n, k]) for r < rows, n < H, m row-major [H, H] read as it
// lies (so m = W_hh gives W_hh h with no packed copy): the forward's small steps in a call too short to repay
// packing W_hh^T, where BLAS's matrix-vector call costs ~0.3 us of setup for 4 K multiply-adds at H = 64.
// A dot product per output: sums in another order than rows_times. init may be out, never in.
void rows_times_transposed(const float* m, int64_t H, const float* in, int64_t in_stride, const float* init,
                           int64_t init_stride, float* out, int64_t out_stride, int64_t rows, Activation act);

}  // namespace avx512
}  // namespace rnn_fused

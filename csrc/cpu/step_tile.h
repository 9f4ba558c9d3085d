// The register-tile step of the CPU kernels (float32): rows of states times a matrix packed once per call,
// with the input projection added and the activation applied while the outputs are in L1. One interface,
// two instruction sets chosen at run time: AVX-512 (step_avx512.cpp) where the CPU has it, else AVX2 + FMA
// (step_avx2.cpp); both read the same packed layout. See step_tile.cpp.
#pragma once

#include "../recurrence_args.h"

#include <cstdint>

namespace rnn_fused {
namespace tile {

// Which step a CPU takes: AVX-512, else AVX2, else none (the portable loops of recurrence_cpu.cpp).
// RNN_FUSED_CPU_AVX512=0 and RNN_FUSED_CPU_AVX2=0 switch one off (read once), so the others can be tested
// and timed on any CPU.
enum class Isa { None, Avx2, Avx512 };
Isa isa();
inline bool available() { return isa() != Isa::None; }
const char* isa_name();  // "avx512", "avx2" or "none" (tests, the benchmark's environment)

// Columns of the matrix per panel, by instruction set: AVX-512, one row block's accumulators (four zmm
// registers); AVX2, one column group (two ymm registers). A panel is one contiguous run per k, so a block's
// part of m takes consecutive cache lines (16-column groups of a 64-wide panel, 256 bytes apart, used a quarter
// of L1's sets: at H = 256 a group's part of m no longer stayed in L1).
constexpr int64_t kMaxPanelWidth = 64;
int64_t panel_width();

// An [H, H] matrix as the step reads it: element (k, c) at data[(c / panel_width()) * panel_stride + k * ld +
// c % panel_width()]. Row-major is {m, H, panel_width()}; packed (pack_transposed) is {p, panel_width(),
// H * panel_width()}, each panel contiguous.
struct StepMatrix {
  const float* data;
  int64_t ld;
  int64_t panel_stride;
};
inline StepMatrix row_major(const float* m, int64_t H) { return {m, H, panel_width()}; }
inline StepMatrix packed(const float* p, int64_t H) { return {p, panel_width(), H * panel_width()}; }

// Panels of an [H, H] matrix, and floats of its packed form: ceil(H / panel_width()) panels of [H, width].
inline int64_t panels(int64_t H) { return (H + panel_width() - 1) / panel_width(); }
inline int64_t packed_floats(int64_t H) { return panels(H) * H * panel_width(); }

// Packs m^T, m row-major [H, H] (the forward's W_hh, so that rows times it is W_hh h), into `packed`
// (packed_floats(H) floats); returns it as a StepMatrix.
StepMatrix pack_transposed(const float* m, int64_t H, float* packed);

// Packs m itself, row-major [H, H] (the backward's W_hh), into `packed` (packed_floats(H) floats), for a step
// whose row-major reads of m would crowd L1's sets (the AVX2 step: packs_backward_matrix); returns it.
StepMatrix pack(const float* m, int64_t H, float* packed);

// Whether the backward of a call long enough to repay a copy of W_hh packs it (pack) rather than reading it
// as it lies: the AVX2 step, whose 16-column panels of a row-major W_hh are H * 4 bytes apart per k (at
// H = 256 a panel's part took a sixteenth of L1's sets, and the backward ran 1.05-1.17x BLAS's time).
inline bool packs_backward_matrix() { return isa() == Isa::Avx2; }

// out[r, :] = finish(init[r, :] + in[r, :] m) for r < rows; init null means zeros; finish = the activation
// when `activation` is set, else nothing. Row r of in / init / out starts at r * in_stride / init_stride /
// out_stride. out may be init (read before written), never in. Only where available().
void rows_times(const StepMatrix& m, int64_t H, const float* in, int64_t in_stride, const float* init,
                int64_t init_stride, float* out, int64_t out_stride, int64_t rows, bool activation, Activation act);

}  // namespace tile
}  // namespace rnn_fused

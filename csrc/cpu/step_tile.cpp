// The register-tile step's shared part (step_tile.h): the choice of instruction set, the packed layout, the
// dispatch. The kernels are step_avx512.cpp (6 rows x 64 columns in 24 zmm accumulators, 64-column panels)
// and step_avx2.cpp (6 rows x 16 columns in 12 ymm accumulators, or one row x 64 columns for steps of fewer
// than 4 rows; 16-column panels).
#include "step_tile.h"

#include "step_avx2.h"
#include "step_avx512.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <string>

namespace rnn_fused {
namespace tile {
namespace {

bool switched_off(const char* variable) {
  const char* value = std::getenv(variable);
  return value != nullptr && std::string(value) == "0";
}

}  // namespace

Isa isa() {
  static const Isa chosen = avx512::cpu_has() && !switched_off("RNN_FUSED_CPU_AVX512") ? Isa::Avx512
                            : avx2::cpu_has() && !switched_off("RNN_FUSED_CPU_AVX2")    ? Isa::Avx2
                                                                                        : Isa::None;
  return chosen;
}

int64_t panel_width() { return isa() == Isa::Avx2 ? 16 : kMaxPanelWidth; }

const char* isa_name() {
  switch (isa()) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "none";
  }
}

StepMatrix pack_transposed(const float* m, int64_t H, float* packed_out) {
  const int64_t pw = panel_width();
  for (int64_t p = 0; p < panels(H); ++p) {
    const int64_t c0 = p * pw, width = std::min(pw, H - c0);
    float* panel = packed_out + p * H * pw;
    // panel[k][c] = m[c0 + c][k], by blocks of 64 k's, whose panel rows (16 KB at most) and 64 row pieces of
    // m stay in L1; one pass over all k writes H panel rows 256 bytes apart: 6x slower at H = 512. Columns
    // past `width` are never read (both steps mask them, as they must in a row-major matrix).
    for (int64_t k0 = 0; k0 < H; k0 += kMaxPanelWidth) {
      const int64_t k1 = std::min(H, k0 + kMaxPanelWidth);
      for (int64_t c = 0; c < width; ++c)
        for (int64_t k = k0; k < k1; ++k) panel[k * pw + c] = m[(c0 + c) * H + k];
    }
  }
  return packed(packed_out, H);
}

StepMatrix pack(const float* m, int64_t H, float* packed_out) {
  const int64_t pw = panel_width();
  for (int64_t p = 0; p < panels(H); ++p) {
    const int64_t c0 = p * pw, width = std::min(pw, H - c0);
    float* panel = packed_out + p * H * pw;
    for (int64_t k = 0; k < H; ++k) std::copy(m + k * H + c0, m + k * H + c0 + width, panel + k * pw);
  }
  return packed(packed_out, H);
}

void rows_times(const StepMatrix& m, int64_t H, const float* in, int64_t in_stride, const float* init,
                int64_t init_stride, float* out, int64_t out_stride, int64_t rows, bool activation, Activation act) {
  switch (isa()) {
    case Isa::Avx512:
      return avx512::rows_times(m, H, in, in_stride, init, init_stride, out, out_stride, rows, activation, act);
    case Isa::Avx2:
      return avx2::rows_times(m, H, in, in_stride, init, init_stride, out, out_stride, rows, activation, act);
    default:
      TORCH_INTERNAL_ASSERT(false, "rnn_fused: the register-tile step is not available on this CPU");
  }
}

}  // namespace tile
}  // namespace rnn_fused

// The AVX2 + FMA kernel of the CPU's register-tile step (step_tile.h), for CPUs without AVX-512. See
// step_avx2.cpp.
#pragma once

#include "step_tile.h"

#include <cstdint>

namespace rnn_fused {
namespace avx2 {

// Whether the CPU executes AVX2 and FMA (checked once). Which step is taken is tile::isa().
bool cpu_has();

// tile::rows_times on AVX2 + FMA.
void rows_times(const tile::StepMatrix& m, int64_t H, const float* in, int64_t in_stride, const float* init,
                int64_t init_stride, float* out, int64_t out_stride, int64_t rows, bool activation, Activation act);

}  // namespace avx2
}  // namespace rnn_fused

// A matrix's transpose into another buffer, for the CPU kernels: the forward's W_hh^T (recurrence_cpu.cpp)
// and the operands oneDNN's micro-kernel takes only as [K, N] rows (gemm_onednn.cpp).
#pragma once

#include <algorithm>
#include <cstdint>

namespace rnn_fused {

// dst[j * ld_dst + i] = src[i * ld_src + j] for i < rows, j < cols. By 16 x 16 tiles, whose 16 source and 16
// destination rows stay in L1 while a tile is moved (a plain double loop strides one side by a whole row per
// element: ~10x slower at 256 x 256).
template <typename T>
void transpose_into(const T* src, int64_t ld_src, int64_t rows, int64_t cols, T* dst, int64_t ld_dst) {
  constexpr int64_t kTile = 16;
  for (int64_t i0 = 0; i0 < rows; i0 += kTile) {
    const int64_t i1 = std::min(i0 + kTile, rows);
    for (int64_t j0 = 0; j0 < cols; j0 += kTile) {
      const int64_t j1 = std::min(j0 + kTile, cols);
      for (int64_t j = j0; j < j1; ++j)
        for (int64_t i = i0; i < i1; ++i) dst[j * ld_dst + i] = src[i * ld_src + j];
    }
  }
}

}  // namespace rnn_fused

// The CPU recurrence kernels (recurrence_cpu.cpp) on raw buffers: what the registered CPU ops run after
// their checks, and what the eager layer node's CPU path (layer_cpu.cpp) calls with buffers it allocated
// itself. The caller guarantees a checked, non-empty problem (p.empty() false), float32 or float64 data,
// contiguous, in the layouts of csrc/ops.cpp: rows of xw / h_all / dh_all / dz are D*H long
// ([T, B, D, H] padded, [N, D, H] packed), h0 / h_last / dh_last / dh0 are [D, B, H].
#pragma once

#include "../recurrence_args.h"

#include <array>

namespace rnn_fused {

// W_hh [H, H] of each direction, row-major (the second null for one direction): the directions' weights
// need not be one tensor.
template <typename T>
using DirectionWeights = std::array<const T*, 2>;

// h_all and h_last from xw (the input projection with both biases added) and h0. xw may be h_all itself
// (the same pointer, never a partial overlap): the recurrence then runs in place, each step's h_t written
// over its xw_t. reuse_packed: a call that records no graph (the weights are likely the next call's too):
// the tile step's packed W_hh^T comes from, and goes to, the thread's cache (packed_cache.h).
template <typename T>
void recurrence_forward_into(const RecurrenceProblem& p, const DirectionWeights<T>& w_hh, const T* xw, const T* h0,
                             T* h_all, T* h_last, bool reuse_packed = false);

// BPTT: dz (= dxw) and dh0 from the outputs' gradients (dh_all, dh_last: null = zero) under the backward
// options; grad_norm [rows, D] is written when opts.record_norms (else null). dz and dh0 are written whole.
template <typename T>
void recurrence_backward_into(const RecurrenceProblem& p, const DirectionWeights<T>& w_hh, const T* h_all,
                              const T* h0, const T* dh_all, const T* dh_last, T* dz, T* dh0,
                              const BackwardOptions& opts, T* grad_norm);

}  // namespace rnn_fused

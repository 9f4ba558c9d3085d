// The tile step's packed W_hh (recurrence_cpu.cpp, packed_w_hh) kept from one call to the next, for a model
// called again with the same weights without recording a graph (inference, evaluation): the peers this
// project is compared with pack their weights once per session (ONNX Runtime, OpenVINO), and so does this.
//
// Why: packing is one pass over W_hh with strided writes, 0.16 ms of a 1.3-1.5 ms forward at T = 64, B = 1,
// H = 512 (benchmarks/NOTES.md, "Packed W_hh kept between calls").
// Validated by content, never by identity: an entry is reused only when the weights' bytes equal the copy it
// keeps (memcmp, a read of twice W_hh: a fraction of the pack), so every change is seen, in place through
// `.data` or numpy included (they bump no version counter), and another tensor at a freed tensor's address
// cannot match by accident.
// The packed form is made from the copy the entry keeps, never from the caller's weights, so the two always
// match even while another process writes shared weights (Hogwild-style training with no_grad rollouts).
// Memory: per thread (thread_local, so no lock), at most kEntries entries, the least recently used replaced,
// each a copy of the weights and their packed form, only for weights of at most kMaxFloats floats (1 MB:
// H = 512 with one direction), so at most ~8 MB per thread. A no-graph call whose weights changed since the
// last (evaluation between training steps) pays one extra copy of W_hh, ~1/8 of the pack.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>

namespace rnn_fused {

// The packed form of the D matrices w[d] (H x H float32 each) as pack(matrices) builds it from the matrices
// it is given (the forward's packed W_hh^T, its only use), from this thread's cache when an entry holds the
// same bytes under the same (D, H), else made (from the entry's copy when it is kept).
at::Tensor packed_weights(const float* const* w, int64_t D, int64_t H,
                          const std::function<at::Tensor(const float* const*)>& pack);

}  // namespace rnn_fused

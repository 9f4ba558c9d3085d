// The whole stack of a FusedRNN in C++ (csrc/rnn_stack.cpp): the rnn_fused::rnn op's body, and what the
// modules' eager fast path (csrc/eager_call.cpp) calls directly.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace rnn_fused {

// The arguments are the rnn op's (csrc/ops.cpp). fused_layer_nodes: record each layer as one autograd node
// (its input projection and recurrence together: csrc/rnn_stack.cpp's recorded_layer) instead of one node
// per op. Eager only: such a node is opaque to torch.compile / torch.export, which trace the op.
std::tuple<at::Tensor, at::Tensor> rnn_stack(const at::Tensor& input, const c10::optional<at::Tensor>& batch_sizes,
                                             const at::Tensor& hx, at::TensorList params, bool has_biases,
                                             int64_t num_layers, bool bidirectional, double dropout, bool train,
                                             bool batch_first, c10::string_view activation, bool fused_layer_nodes);

}  // namespace rnn_fused

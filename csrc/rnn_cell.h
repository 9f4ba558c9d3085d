// FusedRNNCell's eager step (csrc/rnn_cell.cpp).
#pragma once

#include <ATen/ATen.h>

namespace rnn_fused {

// h' = act(x W_ih^T + b_ih + h W_hh^T + b_hh); params: w_ih, w_hh[, b_ih, b_hh]; act = relu if relu else tanh.
// One autograd node when something requires grad. Eager only (torch.compile traces the stack op instead).
at::Tensor cell_step(const at::Tensor& x, const at::Tensor& h, at::TensorList params, bool relu);

}  // namespace rnn_fused

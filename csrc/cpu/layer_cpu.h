// One padded RNN layer (the input projection and the recurrence) and its backward on the CPU, as BLAS calls
// and the recurrence kernels on buffers allocated here: no ATen op but the allocations. The eager layer node
// (csrc/rnn_stack.cpp, recorded_layer) and the eager stack's unrecorded layers run it; what torch.compile
// and torch.export trace (the rnn_fused::rnn op) is the ATen ops of rnn_stack.cpp's layer_of_ops, the same
// GEMMs with the same arguments (only the bias gradient's sum over rows is ordered differently).
#pragma once

#include "../recurrence_args.h"

#include <ATen/ATen.h>
#include <c10/util/SmallVector.h>

namespace rnn_fused {

// One tensor per direction, inline (no heap allocation: a T = 1 call builds a dozen of these lists).
using PerDirection = c10::SmallVector<at::Tensor, 2>;

// One layer's weights, one per direction: w_ih [H, I], w_hh [H, H], and the biases [H] (empty without).
struct LayerWeights {
  PerDirection w_ih, w_hh, b_ih, b_hh;
};

// Whether the CPU layer runs this call: x [T, B, I] and h0 [D, B, H] and every weight on the CPU, float32
// or float64 alike, contiguous, no size 0, rows (T * B), I and D * H within int (BLAS takes int), and the
// BLAS of torch's build exported (cpu/blas.h).
bool cpu_layer_applies(const at::Tensor& x, const at::Tensor& h0, const LayerWeights& w);

// Whether the backward runs here: cpu_layer_applies, and the saved output as the forward made it
// ([T, B, D*H] contiguous: a saved-tensor hook may hand back something else).
bool cpu_layer_backward_applies(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& output,
                                const LayerWeights& w);

// (output [T, B, D*H], h_last [D, B, H]). recording: the call's graph is recorded (training), so the
// weights will likely change before the next call and their packed form is not kept (recurrence_cpu.h).
std::tuple<at::Tensor, at::Tensor> cpu_layer_forward(const at::Tensor& x, const at::Tensor& h0,
                                                     const LayerWeights& w, Activation activation, bool recording);

// Which gradients the backward computes (the rest are returned undefined); bias: the layer has biases and
// their gradients are wanted (their values are not needed: w's biases may be left empty).
struct LayerGradsWanted {
  bool x = true, h0 = true, w_ih = true, w_hh = true, bias = true;
};

struct LayerGrads {
  at::Tensor x, h0;                            // [T, B, I], [D, B, H]
  PerDirection w_ih, w_hh, b_ih, b_hh;  // per direction (empty when not wanted)
};

// The layer's gradients from its inputs, its output and the outputs' gradients (d_output [T, B, D*H],
// d_h_last [D, B, H], either undefined = zero). Not differentiable itself: for create_graph the caller
// runs the ATen ops instead.
LayerGrads cpu_layer_backward(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& output,
                              const LayerWeights& w, Activation activation, const at::Tensor& d_output,
                              const at::Tensor& d_h_last, const LayerGradsWanted& wanted);

// The same rules for FusedRNNCell's step, the layer of one step: x [B, I], h [B, H], w of one direction;
// for the backward also h' [B, H] (its output) as the forward made it.
bool cpu_cell_applies(const at::Tensor& x, const at::Tensor& h, const LayerWeights& w);
bool cpu_cell_backward_applies(const at::Tensor& x, const at::Tensor& h, const at::Tensor& h_next,
                               const LayerWeights& w);

// FusedRNNCell's backward as the layer of one step: x [B, I], h [B, H], h_next [B, H] = its output,
// d_h_next [B, H] (undefined = zero); g.x [B, I], g.h0 [B, H] (h's gradient). The caller checks
// cpu_cell_backward_applies.
LayerGrads cpu_cell_backward(const at::Tensor& x, const at::Tensor& h, const at::Tensor& h_next,
                             const LayerWeights& w, Activation activation, const at::Tensor& d_h_next,
                             const LayerGradsWanted& wanted);

}  // namespace rnn_fused

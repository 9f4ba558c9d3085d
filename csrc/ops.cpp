// The op boundary of rnn-fused, declared once. Every backend (CPU here, CUDA in csrc/cuda/, Triton and
// the reference in Python) implements exactly these two ops; layers, directions, packing and the module
// are shared Python above them (rnn_fused/functional.py, rnn_fused/modules.py).
//
//   recurrence_forward(xw, w_hh, h0, batch_sizes, activation) -> (h_all, h_last)
//     xw     [T, B, D, H] padded, or [N, D, H] packed   input projection incl. both biases
//     w_hh   [D, H, H]                                   recurrent weights, one matrix per direction
//     h0     [D, B, H]                                   initial state
//     batch_sizes  None (padded), or int64 CPU [T], non-increasing, batch_sizes[0] == B (packed)
//     h_all  like xw                                     every hidden state, h_t = act(xw_t + W_hh h_{t-1})
//     h_last [D, B, H]                                   each sequence's state at its own last step
//     clip_mode, clip, norm_probe: the options of the backward (below) that the registered autograd rule
//            runs for this call; the forward's result is the same with or without them. norm_probe: None,
//            or a tensor shaped like grad_norm (xw's shape without H, float32; float64 for float64 input)
//            whose gradient the rule sets to grad_norm (the norms recorded by that backward). So the BPTT
//            options go through the one registered rule, which torch.compile traces (rnn_fused/bptt.py).
//
//   recurrence_backward(w_hh, h_all, h0, dh_all, dh_last, batch_sizes, activation,
//                       clip_mode="none", clip=0, record_norms=False) -> (dz, dh0, grad_norm)
//     dh_all like h_all or None, dh_last [D, B, H] or None: gradients of the loss w.r.t. the outputs
//     dz     like h_all   gradient w.r.t. the pre-activation z_t (= w.r.t. xw_t); BPTT:
//                         g_t  = dh_t + W_hh^T dz_{t+1}   (+ dh_last at a sequence's last step) = dL/dh_t
//                         dz_t = clip(g_t) * act'(z_t)   (for relu a select: 0 where h_t <= 0, as torch's relu
//                                 backward, so an inf or NaN g_t at a unit that is off gives 0, not NaN)
//     dh0    [D, B, H]    gradient w.r.t. h0 (= W_hh^T dz of each sequence's first step; never clipped)
//     grad_norm h_all's shape without H, float32 (float64 for float64 input): ||g_t[row]|| of every row
//                         and direction, taken before clipping, if record_norms; else empty. The squares are
//                         summed in float64 (a float32 square underflows below ~1e-19: a vanishing gradient
//                         of 1e-30 must read 1e-30, not 0), and the norm clip uses that norm.
//   clip(g) is the identity for clip_mode "none"; "value": each element clamped to [-clip, clip];
//   "norm": each row (one sequence, one direction) rescaled to norm <= clip, g * min(1, clip / ||g||).
//   NaN is never hidden: a NaN element passes "value"; a row whose norm is NaN becomes all NaN under "norm".
//   The clipped g_t is what flows on (into dz_t, W_hh^T dz_t, dW_hh), so a clip bounds every step's
//   gradient, not only the total afterwards.
//   Weight gradients are big GEMMs over dz done by the autograd rule (csrc/recurrence_autograd.cpp).
#include <torch/library.h>

namespace rnn_fused {

TORCH_LIBRARY(rnn_fused, m) {
  m.def("recurrence_forward(Tensor xw, Tensor w_hh, Tensor h0, Tensor? batch_sizes, str activation, "
        "str clip_mode=\"none\", float clip=0., Tensor? norm_probe=None) -> (Tensor h_all, Tensor h_last)");
  m.def("recurrence_backward(Tensor w_hh, Tensor h_all, Tensor h0, Tensor? dh_all, Tensor? dh_last, "
        "Tensor? batch_sizes, str activation, str clip_mode=\"none\", float clip=0., bool record_norms=False) "
        "-> (Tensor dz, Tensor dh0, Tensor grad_norm)");
  // The two parts of the autograd rule (csrc/recurrence_autograd.cpp) that are not kernels, as ops so that
  // the Triton ops' rule (rnn_fused/ops.py) calls the same ones:
  //   recurrence_weight_grad: dW_hh [D, H, H] = sum over rows of dz_t h_{t-1}^T (composite ATen ops);
  //   recurrence_backward_reference: (dz, dh0) as recurrence_backward computes them, by the reference's
  //     differentiable torch ops (rnn_fused/reference.py registers it), for create_graph=True.
  // The whole stack (layers x directions) of FusedRNN in one call, composed of the ops above
  // (csrc/rnn_stack.cpp documents it); what FusedRNN / FusedRNNCell call on the C++ backends.
  m.def("rnn(Tensor input, Tensor? batch_sizes, Tensor hx, Tensor[] params, bool has_biases, int num_layers, "
        "bool bidirectional, float dropout, bool train, bool batch_first, str activation) "
        "-> (Tensor output, Tensor h_n)");
  m.def("recurrence_weight_grad(Tensor dz, Tensor h_all, Tensor h0, Tensor? batch_sizes) -> Tensor");
  m.def("recurrence_backward_reference(Tensor w_hh, Tensor h_all, Tensor h0, Tensor? dh_all, Tensor? dh_last, "
        "Tensor? batch_sizes, str activation) -> (Tensor dz, Tensor dh0)");
}

}  // namespace rnn_fused

// The Python module rnn_fused._C itself is csrc/eager_call.cpp's.

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
//
//   recurrence_backward(w_hh, h_all, h0, dh_all, dh_last, batch_sizes, activation,
//                       clip_mode="none", clip=0, record_norms=False) -> (dz, dh0, grad_norm)
//     dh_all like h_all or None, dh_last [D, B, H] or None: gradients of the loss w.r.t. the outputs
//     dz     like h_all   gradient w.r.t. the pre-activation z_t (= w.r.t. xw_t); BPTT:
//                         g_t  = dh_t + W_hh^T dz_{t+1}   (+ dh_last at a sequence's last step) = dL/dh_t
//                         dz_t = clip(g_t) * act'(z_t)
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
//   Weight gradients are big GEMMs over dz done by the caller (rnn_fused/ops.py).
#include "recurrence_args.h"

#include <Python.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

namespace rnn_fused {

Activation parse_activation(c10::string_view activation) {
  if (activation == "tanh") return Activation::Tanh;
  if (activation == "relu") return Activation::Relu;
  TORCH_CHECK(false, "rnn_fused: activation must be 'tanh' or 'relu', got '", std::string(activation), "'");
}

std::vector<Step> RecurrenceProblem::schedule(int64_t direction) const {
  std::vector<Step> steps(T);
  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = direction == 0 ? s : T - 1 - s;
    const int64_t rows = batch_sizes[t];
    const int64_t prev_rows = s == 0 ? 0 : batch_sizes[direction == 0 ? t - 1 : t + 1];
    const int64_t next_rows = s == T - 1 ? 0 : batch_sizes[direction == 0 ? t + 1 : t - 1];
    steps[s] = Step{t, rows, row_begin[t], std::min(rows, prev_rows), std::min(rows, next_rows)};
  }
  return steps;
}

namespace {

std::string shape_str(const at::Tensor& t) { return c10::str(t.sizes()); }

void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "rnn_fused: ", name, " must have the dtype of ",
              ref_name, " (", ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), "rnn_fused: ", name, " must be on the device of ", ref_name,
              " (", ref.device(), "), got ", t.device());
}

void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef expected, const char* letters) {
  TORCH_CHECK(t.sizes() == expected, "rnn_fused: ", name, " must have shape ", letters, " = ", expected,
              ", got ", shape_str(t));
}

RecurrenceProblem check_common(const at::Tensor& xw_like, const char* xw_name, const at::Tensor& w_hh,
                               const at::Tensor& h0, const c10::optional<at::Tensor>& batch_sizes,
                               c10::string_view activation) {
  RecurrenceProblem p;
  p.activation = parse_activation(activation);
  TORCH_CHECK(w_hh.dim() == 3 && w_hh.size(1) == w_hh.size(2) && (w_hh.size(0) == 1 || w_hh.size(0) == 2),
              "rnn_fused: w_hh must have shape [D, H, H] with D in {1, 2}, got ", shape_str(w_hh));
  p.D = w_hh.size(0);
  p.H = w_hh.size(1);
  TORCH_CHECK(at::isFloatingType(w_hh.scalar_type()), "rnn_fused: w_hh must be floating point, got ",
              w_hh.scalar_type());
  check_like(xw_like, xw_name, w_hh, "w_hh");
  check_like(h0, "h0", w_hh, "w_hh");
  TORCH_CHECK(h0.dim() == 3, "rnn_fused: h0 must have shape [D, B, H], got ", shape_str(h0));
  p.B = h0.size(1);
  check_shape(h0, "h0", {p.D, p.B, p.H}, "[D, B, H]");

  p.packed = batch_sizes.has_value();
  if (!p.packed) {
    TORCH_CHECK(xw_like.dim() == 4, "rnn_fused: ", xw_name, " must have shape [T, B, D, H] (padded) when "
                "batch_sizes is None, got ", shape_str(xw_like));
    p.T = xw_like.size(0);
    check_shape(xw_like, xw_name, {p.T, p.B, p.D, p.H}, "[T, B, D, H]");
    p.batch_sizes.assign(p.T, p.B);
  } else {
    const at::Tensor& bs = *batch_sizes;
    TORCH_CHECK(bs.dim() == 1 && bs.scalar_type() == at::kLong && bs.device().is_cpu(),
                "rnn_fused: batch_sizes must be a 1-D int64 CPU tensor [T] (as in PackedSequence), got ",
                bs.scalar_type(), " ", shape_str(bs), " on ", bs.device());
    p.T = bs.size(0);
    const at::Tensor bs_c = bs.contiguous();
    const int64_t* v = bs_c.data_ptr<int64_t>();
    p.batch_sizes.assign(v, v + p.T);
    for (int64_t t = 0; t < p.T; ++t) {
      TORCH_CHECK(p.batch_sizes[t] > 0 && p.batch_sizes[t] <= (t == 0 ? p.B : p.batch_sizes[t - 1]),
                  "rnn_fused: batch_sizes must be positive and non-increasing with batch_sizes[0] == B (",
                  p.B, "); got ", p.batch_sizes[t], " at step ", t);
    }
    TORCH_CHECK(p.T == 0 || p.batch_sizes[0] == p.B, "rnn_fused: batch_sizes[0] (",
                p.T ? p.batch_sizes[0] : 0, ") must equal the batch size of h0 (", p.B, ")");
    TORCH_CHECK(xw_like.dim() == 3, "rnn_fused: ", xw_name, " must have shape [N, D, H] (packed) when "
                "batch_sizes is given, got ", shape_str(xw_like));
  }
  p.row_begin.resize(p.T);
  int64_t n = 0;
  for (int64_t t = 0; t < p.T; ++t) {
    p.row_begin[t] = n;
    n += p.batch_sizes[t];
  }
  p.N = n;
  if (p.packed) check_shape(xw_like, xw_name, {p.N, p.D, p.H}, "[N = sum(batch_sizes), D, H]");
  return p;
}

}  // namespace

BackwardOptions check_backward_options(c10::string_view clip_mode, double clip, bool record_norms) {
  BackwardOptions o;
  o.record_norms = record_norms;
  if (clip_mode == "none") return o;
  if (clip_mode == "value") {
    o.clip_mode = ClipMode::Value;
  } else if (clip_mode == "norm") {
    o.clip_mode = ClipMode::Norm;
  } else {
    TORCH_CHECK(false, "rnn_fused: clip_mode must be 'none', 'value' or 'norm', got '", std::string(clip_mode), "'");
  }
  TORCH_CHECK(std::isfinite(clip) && clip > 0, "rnn_fused: clip must be a positive finite number when clip_mode is '",
              std::string(clip_mode), "', got ", clip);
  o.clip = clip;
  return o;
}

at::Tensor grad_norm_output(const at::Tensor& h_all, bool record_norms) {
  const auto dtype = h_all.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto options = h_all.options().dtype(dtype);
  if (!record_norms) return at::empty({0}, options);
  return at::empty(h_all.sizes().slice(0, h_all.dim() - 1), options);
}

RecurrenceProblem check_forward_args(const at::Tensor& xw, const at::Tensor& w_hh, const at::Tensor& h0,
                                     const c10::optional<at::Tensor>& batch_sizes,
                                     c10::string_view activation) {
  return check_common(xw, "xw", w_hh, h0, batch_sizes, activation);
}

RecurrenceProblem check_backward_args(const at::Tensor& w_hh, const at::Tensor& h_all, const at::Tensor& h0,
                                      const c10::optional<at::Tensor>& dh_all,
                                      const c10::optional<at::Tensor>& dh_last,
                                      const c10::optional<at::Tensor>& batch_sizes,
                                      c10::string_view activation) {
  RecurrenceProblem p = check_common(h_all, "h_all", w_hh, h0, batch_sizes, activation);
  if (dh_all.has_value()) {
    check_like(*dh_all, "dh_all", w_hh, "w_hh");
    TORCH_CHECK(dh_all->sizes() == h_all.sizes(), "rnn_fused: dh_all must have the shape of h_all (",
                shape_str(h_all), "), got ", shape_str(*dh_all));
  }
  if (dh_last.has_value()) {
    check_like(*dh_last, "dh_last", w_hh, "w_hh");
    check_shape(*dh_last, "dh_last", {p.D, p.B, p.H}, "[D, B, H]");
  }
  return p;
}

TORCH_LIBRARY(rnn_fused, m) {
  m.def("recurrence_forward(Tensor xw, Tensor w_hh, Tensor h0, Tensor? batch_sizes, str activation) "
        "-> (Tensor h_all, Tensor h_last)");
  m.def("recurrence_backward(Tensor w_hh, Tensor h_all, Tensor h0, Tensor? dh_all, Tensor? dh_last, "
        "Tensor? batch_sizes, str activation, str clip_mode=\"none\", float clip=0., bool record_norms=False) "
        "-> (Tensor dz, Tensor dh0, Tensor grad_norm)");
}

}  // namespace rnn_fused

// The extension is imported as the Python module rnn_fused._C only to load the op registrations above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

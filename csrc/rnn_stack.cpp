// rnn_fused::rnn: a whole FusedRNN (every layer and direction) as one call, like ATen's rnn_tanh/rnn_relu,
// so that the module's forward is one dispatcher hop from Python instead of a few dozen small ones.
//
// A composite (CompositeImplicitAutograd) of ops that each have their own autograd: per layer the input
// projection as one GEMM (addmm over all steps and directions), the recurrence (recurrence_forward, whose
// rule is csrc/recurrence_autograd.cpp), dropout between layers in training. So it needs no autograd rule
// or fake of its own, and torch.compile / torch.export trace through it to exactly those ops. The maths
// and the layouts are rnn_fused/functional.py's rnn_layer, which the other backends use; tests compare the
// two paths (tests/test_modules.py runs every configuration on each backend against nn.RNN).
//
//   input   [T, B, I] ([B, T, I] if batch_first), or packed [N, I] with batch_sizes
//   hx      [L*D, B, H], in the packed data's (sorted) batch order
//   params  nn.RNN's flat weights: per layer, per direction: w_ih [H, I], w_hh [H, H], (b_ih, b_hh [H])
//   returns output like input with D*H features, h_n [L*D, B, H]
//
// For eager calls (the modules' fast path, csrc/eager_call.cpp) a padded layer is instead one autograd node,
// recorded_layer below (one LayerBackward node), or nothing recorded when nothing requires grad (eager_layer). Both run the CPU layer
// (cpu/layer_cpu.h: the same GEMMs as BLAS calls and the recurrence kernels on buffers of its own, no ATen
// op) where it applies, else the same ops as the composite. The node's backward is the CPU layer's, or for
// create_graph and other devices the recurrence's gradients (recurrence_autograd.h) followed by the
// projection's (dx = dz W_ih, dW_ih = dz^T x, db = sum dz) as ATen ops. A composite layer records ~8 nodes
// (views, the addmm, its transpose, the bias sum, the stacking, the recurrence), each ~5-10 us of autograd's
// time per backward at small sizes; the node records one.
#include "rnn_stack.h"

#include "cpu/layer_cpu.h"
#include "recorded_node.h"
#include "recurrence_autograd.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace rnn_fused {

namespace {

at::Tensor stacked(at::TensorList per_direction) {
  return per_direction.size() == 1 ? per_direction[0].unsqueeze(0) : at::stack(per_direction);
}

at::Tensor concatenated(at::TensorList per_direction) {
  return per_direction.size() == 1 ? per_direction[0] : at::cat(per_direction, 0);
}

// One layer's parameters by kind, one per direction (params: w_ih, w_hh[, b_ih, b_hh] per direction).
LayerWeights layer_parameters(at::TensorList params, int64_t D, bool has_biases) {
  const int64_t per_direction = has_biases ? 4 : 2;
  LayerWeights out;
  for (int64_t d = 0; d < D; ++d) {
    out.w_ih.push_back(params[d * per_direction]);
    out.w_hh.push_back(params[d * per_direction + 1]);
    if (has_biases) {
      out.b_ih.push_back(params[d * per_direction + 2]);
      out.b_hh.push_back(params[d * per_direction + 3]);
    }
  }
  return out;
}

// One layer with its ops each recording their own backward (or nothing, below autograd): x [.., I]
// contiguous (time-major rows, or packed [N, I]), h0 [D, B, H]; returns (output [.., D*H], h_last [D, B, H]).
std::tuple<at::Tensor, at::Tensor> layer_of_ops(const at::Tensor& x, const at::Tensor& h0, at::TensorList params,
                                                int64_t D, bool has_biases,
                                                const c10::optional<at::Tensor>& batch_sizes,
                                                c10::string_view activation) {
  const LayerWeights p = layer_parameters(params, D, has_biases);
  std::vector<at::Tensor> bias;
  // Summed per direction before stacking (see FusedRNN._layer_weights: two bias leaves must not share one
  // gradient buffer).
  for (size_t d = 0; d < p.b_ih.size(); ++d) bias.push_back(p.b_ih[d] + p.b_hh[d]);
  const at::Tensor w = concatenated(p.w_ih);  // [D*H, I]
  const c10::SymInt DH = w.sym_size(0);
  const at::Tensor x2d = x.flatten(0, -2);  // not reshape(-1, I): ambiguous for I = 0
  at::Tensor xw = !has_biases ? at::mm(x2d, w.t()) : at::addmm(concatenated(bias), x2d, w.t());
  std::vector<c10::SymInt> xw_shape(x.sym_sizes().begin(), x.sym_sizes().end() - 1);
  xw_shape.push_back(D);
  xw_shape.push_back(p.w_hh[0].sym_size(0));
  xw = xw.view_symint(xw_shape);
  static auto recurrence = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("rnn_fused::recurrence_forward", "")
                               .typed<std::tuple<at::Tensor, at::Tensor>(
                                   const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const c10::optional<at::Tensor>&, c10::string_view, c10::string_view, double,
                                   const c10::optional<at::Tensor>&)>();
  auto [h_all, h_last] = recurrence.call(xw, stacked(p.w_hh), h0, batch_sizes, activation, "none", 0.0, c10::nullopt);
  std::vector<c10::SymInt> out_shape(x.sym_sizes().begin(), x.sym_sizes().end() - 1);
  out_shape.push_back(DH);
  return {h_all.view_symint(out_shape), h_last};
}

// One padded layer below autograd in eager mode: the CPU layer (cpu/layer_cpu.h) where it applies, else
// the ATen ops. x [T, B, I] contiguous, h0 [D, B, H], w = layer_parameters(params, ...); returns (output
// [T, B, D*H], h_last [D, B, H]). recording: recorded_layer (cpu_layer_forward says what it changes).
std::tuple<at::Tensor, at::Tensor> eager_layer(const at::Tensor& x, const at::Tensor& h0, at::TensorList params,
                                               const LayerWeights& w, bool has_biases, c10::string_view activation,
                                               bool recording) {
  if (cpu_layer_applies(x, h0, w)) return cpu_layer_forward(x, h0, w, parse_activation(activation), recording);
  return layer_of_ops(x, h0, params, h0.size(0), has_biases, c10::nullopt, activation);
}

// One padded layer's backward, recorded as one node (recorded_node.h; the header comment says why): inputs
// x [T, B, I] contiguous, h0 [D, B, H], the layer's params as layer_of_ops takes them; outputs output
// [T, B, D*H], h_last [D, B, H]. Saved: x, h0, the output and the weights (w_ih, w_hh per direction; the
// biases' values are not needed). Flags: bit 0 has_biases, bit 1 relu.
struct LayerBackward {
  static constexpr const char* kName = "LayerBackward";

  static int64_t flags(bool has_biases, Activation act) {
    return static_cast<int64_t>(has_biases) | static_cast<int64_t>(act == Activation::Relu) << 1;
  }

  static variable_list backward(const variable_list& saved, int64_t flags, const variable_list& grads,
                                uint64_t needs) {
    const at::Tensor &x = saved[0], &h0 = saved[1], &output = saved[2];
    const bool has_biases = flags & 1;
    const Activation act = flags & 2 ? Activation::Relu : Activation::Tanh;
    const int64_t D = h0.size(0), per_direction = has_biases ? 4 : 2;
    const LayerWeights w = layer_parameters(at::TensorList(saved).slice(3), D, /*has_biases=*/false);
    const auto needed = [needs](int64_t i) { return gradient_wanted(needs, i); };
    LayerGradsWanted wanted{needed(0), needed(1), false, false, false};
    for (int64_t d = 0; d < D; ++d) {
      wanted.w_ih |= needed(2 + d * per_direction);
      wanted.w_hh |= needed(2 + d * per_direction + 1);
      for (int64_t k = 2; k < per_direction; ++k) wanted.bias |= needed(2 + d * per_direction + k);
    }
    wanted.bias &= has_biases;
    // create_graph=True records the backward: then the ATen ops, which have derivatives.
    const LayerGrads g = !at::GradMode::is_enabled() && cpu_layer_backward_applies(x, h0, output, w)
                             ? cpu_layer_backward(x, h0, output, w, act, grads[0], grads[1], wanted)
                             : backward_of_ops(x, h0, output, w, act == Activation::Relu ? "relu" : "tanh",
                                               grads[0], grads[1], wanted);
    variable_list out{g.x, g.h0};
    for (int64_t d = 0; d < D; ++d) {
      out.push_back(wanted.w_ih ? g.w_ih[d] : at::Tensor());
      out.push_back(wanted.w_hh ? g.w_hh[d] : at::Tensor());
      if (has_biases) {
        out.push_back(wanted.bias ? g.b_ih[d] : at::Tensor());
        out.push_back(wanted.bias ? g.b_hh[d] : at::Tensor());
      }
    }
    return out;
  }

 private:
  // The backward as ATen ops (differentiable: create_graph), the CPU layer's maths (cpu/layer_cpu.cpp): the
  // recurrence's gradients (recurrence_autograd.h), then dx = dz W_ih, dW_ih = dz^T x, db = sum dz.
  static LayerGrads backward_of_ops(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& output,
                                    const LayerWeights& w, const std::string& activation, const at::Tensor& d_output,
                                    const at::Tensor& d_h_last, const LayerGradsWanted& wanted) {
    const int64_t D = h0.size(0), H = h0.size(2);
    // reshape, not view: a saved-tensor hook may have handed the output back with other strides
    const at::Tensor h_all = output.reshape({x.size(0), x.size(1), D, H});
    const at::Tensor d_out = d_output.defined() ? d_output.reshape({x.size(0), x.size(1), D, H}) : at::Tensor();
    auto [dz, dw_hh, dh0, grad_norm] = recurrence_gradients(stacked(w.w_hh), h0, h_all, c10::nullopt, activation,
                                                            "none", 0.0, false, d_out, d_h_last, wanted.w_hh);
    const at::Tensor dz2d = dz.reshape({-1, D * H}), x2d = x.flatten(0, -2);
    LayerGrads g;
    if (wanted.x) g.x = dz2d.mm(concatenated(w.w_ih)).view(x.sizes());
    if (wanted.h0) g.h0 = dh0;
    const at::Tensor dw_ih = wanted.w_ih ? dz2d.t().mm(x2d) : at::Tensor();  // [D*H, I]
    const at::Tensor db = wanted.bias ? dz2d.sum(0) : at::Tensor();         // [D*H]
    for (int64_t d = 0; d < D; ++d) {
      if (wanted.w_ih) g.w_ih.push_back(dw_ih.narrow(0, d * H, H));
      if (wanted.w_hh) g.w_hh.push_back(dw_hh.select(0, d));
      if (wanted.bias) {
        // Two leaves, two buffers: one tensor handed to both would become both .grad (see layer_of_ops).
        const at::Tensor db_d = db.narrow(0, d * H, H);
        g.b_ih.push_back(db_d);
        g.b_hh.push_back(db_d.clone());
      }
    }
    return g;
  }
};

// The layer computed below autograd and recorded as one LayerBackward node (requires grad mode on, some
// input requiring grad, no tangent).
std::tuple<at::Tensor, at::Tensor> recorded_layer(const at::Tensor& x, const at::Tensor& h0, at::TensorList params,
                                                  bool has_biases, c10::string_view activation) {
  const int64_t D = h0.size(0);
  const LayerWeights w = layer_parameters(params, D, has_biases);
  at::Tensor output, h_last;
  {
    at::AutoGradMode no_grad(false);  // as a Function's forward
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::tie(output, h_last) = eager_layer(x, h0, params, w, has_biases, activation, /*recording=*/true);
  }
  Recording r;
  r.inputs.reserve(2 + params.size());
  r.inputs.push_back(x);
  r.inputs.push_back(h0);
  r.inputs.insert(r.inputs.end(), params.begin(), params.end());
  r.outputs = {output, h_last};
  r.saved.reserve(3 + 2 * D);
  r.saved.push_back(x);
  r.saved.push_back(h0);
  r.saved.push_back(output);
  for (int64_t d = 0; d < D; ++d) {
    r.saved.push_back(w.w_ih[d]);
    r.saved.push_back(w.w_hh[d]);
  }
  r.saved_outputs = 1u << 2;  // the output
  r.flags = LayerBackward::flags(has_biases, parse_activation(activation));
  variable_list out = record_node<LayerBackward>(std::move(r));
  return {out[0], out[1]};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rnn_stack(const at::Tensor& input, const c10::optional<at::Tensor>& batch_sizes,
                                             const at::Tensor& hx, at::TensorList params, bool has_biases,
                                             int64_t num_layers, bool bidirectional, double dropout, bool train,
                                             bool batch_first, c10::string_view activation, bool fused_layer_nodes) {
  // Under no_grad / inference nothing is recorded: the ops below skip their autograd kernels (~0.5-1 us each
  // at T = 1). With grad mode on they run as written, each op recording its own backward.
  c10::optional<at::AutoDispatchBelowADInplaceOrView> below_autograd;
  const bool recording = at::GradMode::is_enabled();
  bool tangents = carries_tangent(input) || carries_tangent(hx);
  for (const at::Tensor& p : params) tangents |= carries_tangent(p);
  if (!recording && !tangents) below_autograd.emplace();
  const int64_t D = bidirectional ? 2 : 1, per_direction = has_biases ? 4 : 2;
  TORCH_CHECK(static_cast<int64_t>(params.size()) == num_layers * D * per_direction, "rnn_fused::rnn: expected ",
              num_layers * D * per_direction, " parameters, got ", params.size());
  const bool packed = batch_sizes.has_value();
  at::Tensor x = packed || !batch_first ? input : input.transpose(0, 1);
  x = x.contiguous();
  std::vector<at::Tensor> h_n;
  for (int64_t layer = 0; layer < num_layers; ++layer) {
    const at::TensorList layer_params = params.slice(layer * D * per_direction, D * per_direction);
    // hx itself when one layer has it all: a slice would add a node whose backward (zeros, then a copy)
    // cost ~15 us at T = 32, B = 1, H = 64.
    const at::Tensor h0 = num_layers == 1 ? hx : hx.slice(0, layer * D, (layer + 1) * D);
    bool requires_grad = x.requires_grad() || h0.requires_grad();
    for (const at::Tensor& t : layer_params) requires_grad |= t.requires_grad();
    at::Tensor h_last;
    if (fused_layer_nodes && recording && requires_grad && !packed && !tangents) {
      std::tie(x, h_last) = recorded_layer(x, h0, layer_params, has_biases, activation);
    } else if (fused_layer_nodes && !packed && !tangents) {  // nothing to record
      std::tie(x, h_last) =
          eager_layer(x, h0, layer_params, layer_parameters(layer_params, D, has_biases), has_biases, activation,
                      /*recording=*/false);
    } else {
      std::tie(x, h_last) = layer_of_ops(x, h0, layer_params, D, has_biases, batch_sizes, activation);
    }
    h_n.push_back(h_last);
    // Dropout sits between layers only, in training only; h_n is taken before it.
    if (dropout > 0 && train && layer < num_layers - 1) x = at::dropout(x, dropout, /*train=*/true);
  }
  at::Tensor output = packed || !batch_first ? x : x.transpose(0, 1);
  return {output, h_n.size() == 1 ? h_n[0] : at::cat(h_n, 0)};
}

namespace {

std::tuple<at::Tensor, at::Tensor> rnn(const at::Tensor& input, const c10::optional<at::Tensor>& batch_sizes,
                                       const at::Tensor& hx, at::TensorList params, bool has_biases,
                                       int64_t num_layers, bool bidirectional, double dropout, bool train,
                                       bool batch_first, c10::string_view activation) {
  return rnn_stack(input, batch_sizes, hx, params, has_biases, num_layers, bidirectional, dropout, train,
                   batch_first, activation, /*fused_layer_nodes=*/false);
}

}  // namespace

TORCH_LIBRARY_IMPL(rnn_fused, CompositeImplicitAutograd, m) {
  m.impl("rnn", &rnn);
}

}  // namespace rnn_fused

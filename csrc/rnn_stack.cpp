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
// For eager calls (the modules' fast path, csrc/eager_call.cpp) a layer can instead be one autograd node,
// LayerFunction below: the same ops in its forward, and in its backward the recurrence's gradients
// (recurrence_autograd.h) followed by the projection's (dx = dz W_ih, dW_ih = dz^T x, db = sum dz). A
// composite layer records ~8 nodes (views, the addmm, its transpose, the bias sum, the stacking, the
// recurrence), each ~5-10 us of autograd's time per backward at small sizes; the node records one.
#include "rnn_stack.h"

#include "recurrence_autograd.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace rnn_fused {

namespace {

at::Tensor stacked(const std::vector<at::Tensor>& per_direction) {
  return per_direction.size() == 1 ? per_direction[0].unsqueeze(0) : at::stack(per_direction);
}

at::Tensor concatenated(const std::vector<at::Tensor>& per_direction) {
  return per_direction.size() == 1 ? per_direction[0] : at::cat(per_direction, 0);
}

// One layer's parameters by kind, one per direction (params: w_ih, w_hh[, b_ih, b_hh] per direction).
struct LayerParameters {
  std::vector<at::Tensor> w_ih, w_hh, b_ih, b_hh;
};

LayerParameters layer_parameters(at::TensorList params, int64_t D, bool has_biases) {
  const int64_t per_direction = has_biases ? 4 : 2;
  LayerParameters out;
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
  const LayerParameters p = layer_parameters(params, D, has_biases);
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

// One padded layer as one autograd node (the header comment says why). Inputs: x [T, B, I] contiguous,
// h0 [D, B, H], params as layer_of_ops takes them. Outputs: output [T, B, D*H] (a view of h_all), h_last.
class LayerFunction : public torch::autograd::Function<LayerFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& h0,
                               at::TensorList params, bool has_biases, c10::string_view activation) {
    const int64_t D = h0.size(0);
    at::Tensor output, h_last;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(output, h_last) = layer_of_ops(x, h0, params, D, has_biases, c10::nullopt, activation);
    }
    std::vector<at::Tensor> saved{x, h0, output};
    saved.insert(saved.end(), params.begin(), params.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["has_biases"] = has_biases;
    ctx->saved_data["activation"] = std::string(activation);
    ctx->set_materialize_grads(false);  // an unused output's gradient stays None: the backward op takes None
    return {output, h_last};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = saved_variables(ctx);
    const at::Tensor &x = saved[0], &h0 = saved[1], &output = saved[2];
    const bool has_biases = ctx->saved_data["has_biases"].toBool();
    const std::string activation = ctx->saved_data["activation"].toStringRef();
    const int64_t D = h0.size(0), H = h0.size(2), per_direction = has_biases ? 4 : 2;
    const LayerParameters p =
        layer_parameters(at::TensorList(saved).slice(3), D, has_biases);
    bool need_w_hh = false;
    for (int64_t d = 0; d < D; ++d) need_w_hh |= ctx->needs_input_grad(2 + d * per_direction + 1);
    const at::Tensor h_all = output.view({x.size(0), x.size(1), D, H});
    const at::Tensor d_out = grads[0].defined() ? grads[0].view({x.size(0), x.size(1), D, H}) : at::Tensor();
    auto [dz, dw_hh, dh0, grad_norm] =
        recurrence_gradients(stacked(p.w_hh), h0, h_all, c10::nullopt, activation, "none", 0.0, false, d_out,
                             grads[1], need_w_hh);
    const at::Tensor dz2d = dz.reshape({-1, D * H}), x2d = x.flatten(0, -2);
    variable_list out;
    out.push_back(ctx->needs_input_grad(0) ? dz2d.mm(concatenated(p.w_ih)).view(x.sizes()) : at::Tensor());
    out.push_back(ctx->needs_input_grad(1) ? dh0 : at::Tensor());
    bool need_w_ih = false, need_b = false;
    for (int64_t d = 0; d < D; ++d) {
      need_w_ih |= ctx->needs_input_grad(2 + d * per_direction);
      for (int64_t k = 2; k < per_direction; ++k) need_b |= ctx->needs_input_grad(2 + d * per_direction + k);
    }
    const at::Tensor dw_ih = need_w_ih ? dz2d.t().mm(x2d) : at::Tensor();            // [D*H, I]
    const at::Tensor db = has_biases && need_b ? dz2d.sum(0) : at::Tensor();         // [D*H]
    for (int64_t d = 0; d < D; ++d) {
      out.push_back(need_w_ih ? dw_ih.narrow(0, d * H, H) : at::Tensor());
      out.push_back(need_w_hh ? dw_hh.select(0, d) : at::Tensor());
      if (has_biases && !need_b) {
        out.emplace_back();
        out.emplace_back();
      } else if (has_biases) {
        // Two leaves, two buffers: one tensor handed to both would become both .grad (see layer_of_ops).
        const at::Tensor db_d = db.narrow(0, d * H, H);
        out.push_back(db_d);
        out.push_back(db_d.clone());
      }
    }
    out.emplace_back();  // has_biases
    out.emplace_back();  // activation
    return out;
  }
};

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
    if (fused_layer_nodes && recording && requires_grad && !packed) {
      variable_list out = LayerFunction::apply(x, h0, layer_params, has_biases, activation);
      x = out[0];
      h_last = out[1];
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

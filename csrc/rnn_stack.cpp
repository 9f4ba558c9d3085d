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
#include <ATen/ATen.h>
#include <torch/library.h>

namespace rnn_fused {

namespace {

at::Tensor stacked(const std::vector<at::Tensor>& per_direction) {
  return per_direction.size() == 1 ? per_direction[0].unsqueeze(0) : at::stack(per_direction);
}

std::tuple<at::Tensor, at::Tensor> rnn(const at::Tensor& input, const c10::optional<at::Tensor>& batch_sizes,
                                       const at::Tensor& hx, at::TensorList params, bool has_biases,
                                       int64_t num_layers, bool bidirectional, double dropout, bool train,
                                       bool batch_first, c10::string_view activation) {
  static auto recurrence = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("rnn_fused::recurrence_forward", "")
                               .typed<std::tuple<at::Tensor, at::Tensor>(
                                   const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const c10::optional<at::Tensor>&, c10::string_view, c10::string_view, double,
                                   const c10::optional<at::Tensor>&)>();
  const int64_t D = bidirectional ? 2 : 1, per_direction = has_biases ? 4 : 2;
  TORCH_CHECK(static_cast<int64_t>(params.size()) == num_layers * D * per_direction, "rnn_fused::rnn: expected ",
              num_layers * D * per_direction, " parameters, got ", params.size());
  // Under no_grad / inference nothing is recorded: the ops below skip their autograd kernels (~0.5-1 us each
  // at T = 1). With grad mode on they run as written, each op recording its own backward.
  c10::optional<at::AutoDispatchBelowADInplaceOrView> below_autograd;
  if (!at::GradMode::is_enabled()) below_autograd.emplace();
  const bool packed = batch_sizes.has_value();
  at::Tensor x = packed || !batch_first ? input : input.transpose(0, 1);
  x = x.contiguous();
  std::vector<at::Tensor> h_n;
  for (int64_t layer = 0; layer < num_layers; ++layer) {
    std::vector<at::Tensor> w_ih, w_hh, bias;
    for (int64_t d = 0; d < D; ++d) {
      const int64_t base = (layer * D + d) * per_direction;
      w_ih.push_back(params[base]);
      w_hh.push_back(params[base + 1]);
      // Summed per direction before stacking (see FusedRNN._layer_weights: two bias leaves must not share
      // one gradient buffer).
      if (has_biases) bias.push_back(params[base + 2] + params[base + 3]);
    }
    const at::Tensor w = D == 1 ? w_ih[0] : at::cat(w_ih, 0);  // [D*H, I]
    const c10::SymInt DH = w.sym_size(0);
    const at::Tensor x2d = x.flatten(0, -2);  // not reshape(-1, I): ambiguous for I = 0
    at::Tensor xw = !has_biases ? at::mm(x2d, w.t()) : at::addmm(D == 1 ? bias[0] : at::cat(bias, 0), x2d, w.t());
    std::vector<c10::SymInt> xw_shape(x.sym_sizes().begin(), x.sym_sizes().end() - 1);
    xw_shape.push_back(D);
    xw_shape.push_back(w_hh[0].sym_size(0));
    xw = xw.view_symint(xw_shape);
    const at::Tensor h0 = hx.slice(0, layer * D, (layer + 1) * D);
    auto [h_all, h_last] = recurrence.call(xw, stacked(w_hh), h0, batch_sizes, activation, "none", 0.0, c10::nullopt);
    h_n.push_back(h_last);
    std::vector<c10::SymInt> out_shape(x.sym_sizes().begin(), x.sym_sizes().end() - 1);
    out_shape.push_back(DH);
    x = h_all.view_symint(out_shape);
    // Dropout sits between layers only, in training only; h_n is taken before it.
    if (dropout > 0 && train && layer < num_layers - 1) x = at::dropout(x, dropout, /*train=*/true);
  }
  at::Tensor output = packed || !batch_first ? x : x.transpose(0, 1);
  return {output, h_n.size() == 1 ? h_n[0] : at::cat(h_n, 0)};
}

}  // namespace

TORCH_LIBRARY_IMPL(rnn_fused, CompositeImplicitAutograd, m) {
  m.impl("rnn", &rnn);
}

}  // namespace rnn_fused

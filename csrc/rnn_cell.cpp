// FusedRNNCell's step for the modules' eager fast path (csrc/eager_call.cpp): h' = act(x W_ih^T + b_ih +
// h W_hh^T + b_hh) as two GEMMs into one buffer and the activation in place, recorded as one autograd node
// (CellFunction) when something requires grad.
//
// Why not the stack op with T = 1 (what the general path and torch.compile run): a step of the stack is the
// recurrence op's machinery (schedule, kernel dispatch, a backward op and a weight-gradient op) around two
// matrix-vector products, and its graph holds the views that make [B, I] a sequence; here a forward is four
// ATen ops (the bias sum, two GEMMs, the activation; no_grad: 20 -> ~13 us at B = 1, H = 64) and a backward
// about eight (dz, four GEMMs, the bias sum and its copy).
// Inputs as nn.RNNCell takes them: x [B, I], h [B, H], w_ih [H, I], w_hh [H, H], b_ih, b_hh [H] (or none).
#include "rnn_cell.h"

#include "recurrence_autograd.h"

#include <ATen/ATen.h>

namespace rnn_fused {

namespace {

// z = x W_ih^T + b_ih + b_hh + h W_hh^T, then act(z) in place.
at::Tensor step(const at::Tensor& x, const at::Tensor& h, at::TensorList params, bool relu) {
  at::Tensor z = params.size() == 4 ? at::addmm(params[2] + params[3], x, params[0].t()) : at::mm(x, params[0].t());
  z.addmm_(h, params[1].t());
  return relu ? z.relu_() : z.tanh_();
}

class CellFunction : public torch::autograd::Function<CellFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& h, at::TensorList params,
                               bool relu) {
    at::Tensor h_next;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      h_next = step(x, h, params, relu);
    }
    std::vector<at::Tensor> saved{x, h, h_next};
    saved.insert(saved.end(), params.begin(), params.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["relu"] = relu;
    return {h_next};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = saved_variables(ctx);
    const at::Tensor &x = saved[0], &h = saved[1], &h_next = saved[2], &w_ih = saved[3], &w_hh = saved[4];
    const bool relu = ctx->saved_data["relu"].toBool(), has_biases = saved.size() == 7;
    // act'(z) from h' = act(z): 1 - h'^2; for relu a select, as torch's relu backward (threshold_backward:
    // an inf or NaN gradient at a unit that is off gives 0, a NaN h' passes the gradient).
    const at::Tensor dz = relu ? at::threshold_backward(grads[0], h_next, 0) : grads[0] * (1 - h_next * h_next);
    variable_list out{ctx->needs_input_grad(0) ? dz.mm(w_ih) : at::Tensor(),
                      ctx->needs_input_grad(1) ? dz.mm(w_hh) : at::Tensor(),
                      ctx->needs_input_grad(2) ? dz.t().mm(x) : at::Tensor(),
                      ctx->needs_input_grad(3) ? dz.t().mm(h) : at::Tensor()};
    if (has_biases) {
      const at::Tensor db = dz.sum(0);
      out.push_back(db);
      out.push_back(db.clone());  // two leaves, two buffers (see csrc/rnn_stack.cpp's layer_of_ops)
    }
    out.emplace_back();  // relu
    return out;
  }
};

}  // namespace

at::Tensor cell_step(const at::Tensor& x, const at::Tensor& h, at::TensorList params, bool relu) {
  bool requires_grad = x.requires_grad() || h.requires_grad();
  bool tangents = carries_tangent(x) || carries_tangent(h);
  for (const at::Tensor& p : params) {
    requires_grad |= p.requires_grad();
    tangents |= carries_tangent(p);
  }
  if (!tangents && (!at::GradMode::is_enabled() || !requires_grad)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return step(x, h, params, relu);
  }
  return CellFunction::apply(x, h, params, relu)[0];
}

}  // namespace rnn_fused

// FusedRNNCell's step for the modules' eager fast path (csrc/eager_call.cpp): h' = act(x W_ih^T + b_ih +
// h W_hh^T + b_hh) as two GEMMs into one buffer and the activation in place, recorded as one autograd node
// (CellBackward) when something requires grad.
//
// Why not the stack op with T = 1 (what the general path and torch.compile run): a step of the stack is the
// recurrence op's machinery (schedule, kernel dispatch, a backward op and a weight-gradient op) around two
// matrix-vector products, and its graph holds the views that make [B, I] a sequence; here a forward is two
// BLAS calls and one loop on the CPU (four ATen ops elsewhere: the bias sum, two GEMMs, the activation) and a
// backward the CPU layer's for one step (cpu/layer_cpu.h: four GEMMs and two loops; elsewhere, and for
// create_graph, about eight ATen ops: dz, four GEMMs, the bias sum and its copy).
// Inputs as nn.RNNCell takes them: x [B, I], h [B, H], w_ih [H, I], w_hh [H, H], b_ih, b_hh [H] (or none).
#include "rnn_cell.h"

#include "cpu/activation.h"
#include "cpu/blas.h"
#include "cpu/layer_cpu.h"
#include "recorded_node.h"
#include "recurrence_autograd.h"

#include <ATen/ATen.h>

namespace rnn_fused {

namespace {

// On the CPU (where cpu_cell_applies: cpu/layer_cpu.h's rule, for the layer of one step): two BLAS calls into
// a fresh buffer and one pass for the biases and the activation (activation.h's, as the CPU kernels), no ATen
// op but the allocation: the four ATen ops below cost ~2-3 us each at B = 1, H = 64, more than the arithmetic.
template <typename T>
at::Tensor cpu_step(const at::Tensor& x, const at::Tensor& h, at::TensorList params, bool relu) {
  const int64_t B = x.size(0), I = x.size(1), H = h.size(1);
  at::Tensor out = at::empty({B, H}, h.options());
  T* z = out.data_ptr<T>();
  gemm_rows<T>(x.data_ptr<T>(), I, params[0].data_ptr<T>(), /*transpose_m=*/true, z, H, B, H, I, T(0));
  gemm_rows<T>(h.data_ptr<T>(), H, params[1].data_ptr<T>(), /*transpose_m=*/true, z, H, B, H, H, T(1));
  const T* b_ih = params.size() == 4 ? params[2].data_ptr<T>() : nullptr;
  const T* b_hh = params.size() == 4 ? params[3].data_ptr<T>() : nullptr;
  const Activation act = relu ? Activation::Relu : Activation::Tanh;
  for (int64_t r = 0; r < B; ++r) {
    T* zr = z + r * H;
    for (int64_t i = 0; i < H; ++i) zr[i] = activate(b_ih ? zr[i] + (b_ih[i] + b_hh[i]) : zr[i], act);
  }
  return out;
}

// The cell's parameters (w_ih, w_hh[, b_ih, b_hh]) as the layer of one direction.
LayerWeights cell_weights(at::TensorList params) {
  LayerWeights w{{params[0]}, {params[1]}, {}, {}};
  if (params.size() == 4) {
    w.b_ih.push_back(params[2]);
    w.b_hh.push_back(params[3]);
  }
  return w;
}

// z = x W_ih^T + b_ih + b_hh + h W_hh^T, then act(z) in place.
at::Tensor step(const at::Tensor& x, const at::Tensor& h, at::TensorList params, bool relu) {
  if (cpu_cell_applies(x, h, cell_weights(params)))
    return x.scalar_type() == at::kFloat ? cpu_step<float>(x, h, params, relu) : cpu_step<double>(x, h, params, relu);
  at::Tensor z = params.size() == 4 ? at::addmm(params[2] + params[3], x, params[0].t()) : at::mm(x, params[0].t());
  z.addmm_(h, params[1].t());
  return relu ? z.relu_() : z.tanh_();
}

// The cell's backward, recorded as one node (recorded_node.h): inputs x [B, I], h [B, H], params (w_ih,
// w_hh[, b_ih, b_hh]); output h' [B, H]. Saved: x, h, h' and the params. Flags: relu.
struct CellBackward {
  static constexpr const char* kName = "CellBackward";

  static variable_list backward(const variable_list& saved, int64_t relu, const variable_list& grads,
                                uint64_t needs) {
    const at::Tensor &x = saved[0], &h = saved[1], &h_next = saved[2], &w_ih = saved[3], &w_hh = saved[4];
    const bool has_biases = saved.size() == 7;
    const auto needed = [needs](int64_t i) { return gradient_wanted(needs, i); };
    // An undefined gradient (the engine never materialises one) means zero: so are all of ours.
    if (!grads[0].defined()) return variable_list(saved.size() - 1);
    const LayerWeights w = cell_weights(at::TensorList(saved).slice(3));
    if (!at::GradMode::is_enabled() && cpu_cell_backward_applies(x, h, h_next, w)) {
      // The CPU layer's backward for one step (cpu/layer_cpu.h): BLAS calls, no ATen op. Not for
      // create_graph (grad mode on): the ops below are differentiable.
      const LayerGradsWanted wanted{needed(0), needed(1), needed(2), needed(3),
                                    has_biases && (needed(4) || needed(5))};
      const LayerGrads g = cpu_cell_backward(x, h, h_next, w, relu ? Activation::Relu : Activation::Tanh, grads[0],
                                             wanted);
      variable_list out{g.x, g.h0, wanted.w_ih ? g.w_ih[0] : at::Tensor(), wanted.w_hh ? g.w_hh[0] : at::Tensor()};
      if (has_biases) {
        out.push_back(wanted.bias ? g.b_ih[0] : at::Tensor());
        out.push_back(wanted.bias ? g.b_hh[0] : at::Tensor());
      }
      return out;
    }
    // act'(z) from h' = act(z): 1 - h'^2; for relu a select, as torch's relu backward (threshold_backward:
    // an inf or NaN gradient at a unit that is off gives 0, a NaN h' passes the gradient).
    const at::Tensor dz = relu ? at::threshold_backward(grads[0], h_next, 0) : grads[0] * (1 - h_next * h_next);
    variable_list out{needed(0) ? dz.mm(w_ih) : at::Tensor(), needed(1) ? dz.mm(w_hh) : at::Tensor(),
                      needed(2) ? dz.t().mm(x) : at::Tensor(), needed(3) ? dz.t().mm(h) : at::Tensor()};
    if (has_biases) {
      const at::Tensor db = dz.sum(0);
      out.push_back(db);
      out.push_back(db.clone());  // two leaves, two buffers (see csrc/rnn_stack.cpp's layer_of_ops)
    }
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
  // Recorded: computed below autograd, then one CellBackward node, which has no forward-mode derivative
  // (the modules run dual inputs on the reference's ops: rnn_fused/func_transforms.py).
  TORCH_CHECK(!tangents, "rnn_fused: the cell's step has no forward-mode derivative (jvp); "
              "call it outside torch.autograd.forward_ad");
  at::Tensor h_next;
  {
    at::AutoGradMode no_grad(false);  // as a Function's forward
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    h_next = step(x, h, params, relu);
  }
  Recording r;
  r.inputs.reserve(2 + params.size());
  r.inputs.push_back(x);
  r.inputs.push_back(h);
  r.inputs.insert(r.inputs.end(), params.begin(), params.end());
  r.outputs = {h_next};
  r.saved = r.inputs;
  r.saved.insert(r.saved.begin() + 2, h_next);
  r.saved_outputs = 1u << 2;  // h'
  r.flags = relu;
  return record_node<CellBackward>(std::move(r))[0];
}

}  // namespace rnn_fused

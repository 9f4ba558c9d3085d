// The autograd rule of rnn_fused::recurrence_forward for the C++ kernels (CPU and CUDA), registered at the
// Autograd dispatch key, so that a differentiable call is one dispatcher hop with no Python on the way.
// The Triton ops (Python custom ops) register the same rule in Python (rnn_fused/ops.py) and share its two
// parts that are not kernels: the weight gradient (recurrence_weight_grad, here) and the differentiable
// BPTT for create_graph (recurrence_backward_reference, the reference's, registered from Python).
//
// The rule (rnn_fused/reference.py explains the split):
//   forward : the kernels' forward below autograd; saves w_hh, h0, h_all, a copy of batch_sizes (the
//             caller's PackedSequence may change before the backward) and the backward options.
//   backward: dz, dh0 (and grad_norm, the gradient of norm_probe) from the backward kernel run under the
//             options (clip_mode, clip, record_norms = norm_probe given); dxw = dz; dW_hh[d] = sum over rows of dz_t h_{t-1}^T as one
//             or two large GEMMs per direction (never T small ones). When the backward itself is recorded
//             (create_graph=True: grad mode is on inside the backward and something requires grad), BPTT
//             runs as the reference's differentiable torch ops instead, as the kernels have no derivative.
#include "recurrence_autograd.h"

#include "named_function.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace rnn_fused {

std::tuple<at::Tensor, at::Tensor> recurrence_forward_kernel(const at::Tensor& xw, const at::Tensor& w_hh, const at::Tensor& h0,
                                                  const c10::optional<at::Tensor>& batch_sizes,
                                                  c10::string_view activation, c10::string_view clip_mode,
                                                  double clip, const c10::optional<at::Tensor>& norm_probe) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("rnn_fused::recurrence_forward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                           c10::string_view, c10::string_view, double, const c10::optional<at::Tensor>&)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(xw, w_hh, h0, batch_sizes, activation, clip_mode, clip, norm_probe);
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_kernel(
    const at::Tensor& w_hh, const at::Tensor& h_all, const at::Tensor& h0, const c10::optional<at::Tensor>& dh_all,
    const c10::optional<at::Tensor>& dh_last, const c10::optional<at::Tensor>& batch_sizes,
    c10::string_view activation, c10::string_view clip_mode, double clip, bool record_norms) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("rnn_fused::recurrence_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                           const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, c10::string_view,
                           c10::string_view, double, bool)>();
  return op.call(w_hh, h_all, h0, dh_all, dh_last, batch_sizes, activation, clip_mode, clip, record_norms);
}

std::tuple<at::Tensor, at::Tensor> backward_reference(
    const at::Tensor& w_hh, const at::Tensor& h_all, const at::Tensor& h0, const c10::optional<at::Tensor>& dh_all,
    const c10::optional<at::Tensor>& dh_last, const c10::optional<at::Tensor>& batch_sizes,
    c10::string_view activation) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("rnn_fused::recurrence_backward_reference", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                           const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, c10::string_view)>();
  return op.call(w_hh, h_all, h0, dh_all, dh_last, batch_sizes, activation);
}

c10::optional<at::Tensor> defined_or_none(const at::Tensor& t) {
  return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt;
}

}  // namespace

// The saved tensors, saying what to do when one was modified in place. The rule saves h_all, the output
// the caller gets, not a copy (a copy costs 4-6% of the CPU forward: benchmarks/NOTES.md, "In-place ops on
// the output"), so an in-place op on the output before backward raises, as for any torch op that saves its
// output; the message is rnn_fused/ops.py's saved_tensors', word for word (tests/test_ops.py checks both).
variable_list saved_variables(AutogradContext* ctx) {
  try {
    return ctx->get_saved_variables();
  } catch (const c10::Error& error) {
    if (std::string(error.what()).find("modified by an inplace operation") == std::string::npos) throw;
    TORCH_CHECK(false,
                "rnn_fused: the recurrence's output (h_all, the RNN layer's output) is saved for its backward "
                "and was modified in place before backward (e.g. F.relu(out, inplace=True), out.mul_(2), out += x), "
                "or w_hh / h0 were; apply the op out of place (out = F.relu(out)) or on a copy (out = out.clone())");
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> recurrence_gradients(
    const at::Tensor& w_hh, const at::Tensor& h0, const at::Tensor& h_all, const c10::optional<at::Tensor>& batch_sizes,
    const std::string& activation, c10::string_view clip_mode, double clip, bool record_norms,
    const at::Tensor& grad_h_all,
    const at::Tensor& grad_h_last, bool need_w_hh) {
  const auto dh_all = defined_or_none(grad_h_all), dh_last = defined_or_none(grad_h_last);
  at::Tensor dz, dh0, grad_norm;
  bool recorded = false;
  if (at::GradMode::is_enabled()) {
    for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&grad_h_all, &grad_h_last, &w_hh, &h0, &h_all})
      recorded |= t->defined() && t->requires_grad();
  }
  if (recorded) {
    // The clipped BPTT has no derivative of its own (plain BPTT has: the reference's torch ops).
    TORCH_CHECK(clip_mode == "none" && !record_norms,
                "rnn_fused: in-BPTT clipping and gradient-norm recording do not support create_graph=True "
                "(double backward); build the model without bptt_clip and record_grad_norms for gradient "
                "penalties");
    std::tie(dz, dh0) = backward_reference(w_hh, h_all, h0, dh_all, dh_last, batch_sizes, activation);
  } else {
    std::tie(dz, dh0, grad_norm) = backward_kernel(w_hh, h_all, h0, dh_all, dh_last, batch_sizes, activation,
                                                   clip_mode, clip, record_norms);
  }
  at::Tensor dw_hh;
  if (need_w_hh) {
    static auto weight_grad = c10::Dispatcher::singleton()
                                  .findSchemaOrThrow("rnn_fused::recurrence_weight_grad", "")
                                  .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                    const c10::optional<at::Tensor>&)>();
    dw_hh = weight_grad.call(dz, h_all, h0, batch_sizes);
  }
  return {dz, dw_hh, dh0, grad_norm};
}

namespace {

class RecurrenceFunction : public torch::autograd::Function<RecurrenceFunction> {
 public:
  static constexpr const char* kName = "RecurrenceBwd";  // the node's name() (named_function.h)

  static variable_list forward(AutogradContext* ctx, const at::Tensor& xw, const at::Tensor& w_hh,
                               const at::Tensor& h0, const c10::optional<at::Tensor>& batch_sizes,
                               c10::string_view activation, c10::string_view clip_mode, double clip,
                               const c10::optional<at::Tensor>& norm_probe) {
    auto [h_all, h_last] = recurrence_forward_kernel(xw, w_hh, h0, batch_sizes, activation, clip_mode, clip, norm_probe);
    ctx->save_for_backward({w_hh, h0, h_all});
    ctx->saved_data["batch_sizes"] = batch_sizes.has_value() ? batch_sizes->clone() : at::Tensor();
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["clip_mode"] = std::string(clip_mode);
    ctx->saved_data["clip"] = clip;
    ctx->saved_data["record_norms"] = norm_probe.has_value();
    ctx->set_materialize_grads(false);  // an unused output's gradient stays None: the backward op takes None
    return {h_all, h_last};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = saved_variables(ctx);
    const at::Tensor &w_hh = saved[0], &h0 = saved[1], &h_all = saved[2];
    const at::Tensor bs = ctx->saved_data["batch_sizes"].toTensor();
    const c10::optional<at::Tensor> batch_sizes = defined_or_none(bs);
    const std::string activation = ctx->saved_data["activation"].toStringRef();
    const std::string clip_mode = ctx->saved_data["clip_mode"].toStringRef();
    const double clip = ctx->saved_data["clip"].toDouble();
    const bool record_norms = ctx->saved_data["record_norms"].toBool();
    auto [dz, dw_hh, dh0, grad_norm] = recurrence_gradients(
        w_hh, h0, h_all, batch_sizes, activation, clip_mode, clip, record_norms, grads[0],
        grads[1], ctx->needs_input_grad(1));
    // norm_probe's gradient is the recorded norms (csrc/ops.cpp).
    return {dz, dw_hh, dh0, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            record_norms ? grad_norm : at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> recurrence_forward_autograd(const at::Tensor& xw, const at::Tensor& w_hh,
                                                               const at::Tensor& h0,
                                                               const c10::optional<at::Tensor>& batch_sizes,
                                                               c10::string_view activation, c10::string_view clip_mode,
                                                               double clip, const c10::optional<at::Tensor>& norm_probe) {
  // A None tensor argument: autograd cannot record it; the kernel's contract check raises, naming it.
  if (!xw.defined() || !w_hh.defined() || !h0.defined())
    return recurrence_forward_kernel(xw, w_hh, h0, batch_sizes, activation, clip_mode, clip, norm_probe);
  // Nothing to record (no_grad, inference, or no input requiring grad): the kernel alone, without the
  // Function's node and saved state (~3 us of a ~10 us call at T = 1).
  const bool probe_requires_grad = norm_probe.has_value() && norm_probe->requires_grad();
  const bool tangents = carries_tangent(xw) || carries_tangent(w_hh) || carries_tangent(h0);
  if (!tangents && (!at::GradMode::is_enabled() ||
                    !(xw.requires_grad() || w_hh.requires_grad() || h0.requires_grad() || probe_requires_grad)))
    return recurrence_forward_kernel(xw, w_hh, h0, batch_sizes, activation, clip_mode, clip, norm_probe);
  variable_list out = apply_named<RecurrenceFunction>(xw, w_hh, h0, batch_sizes, activation, clip_mode, clip,
                                                      norm_probe);
  return {out[0], out[1]};
}

// For the packed layout: which rows read h_prev from h_all and which start from h0 (direction d).
// Returns (rows, prev_rows, starts, start_batch): row rows[i] of h_all took its previous state from row
// prev_rows[i]; row starts[i] took it from h0[d, start_batch[i]].
// Written with the SymInt forms of sizes (sym_numel, sym_size) so that it also traces with symbolic shapes
// (torch.compile with dynamic shapes, opcheck's test_aot_dispatch_dynamic).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> previous_rows(const at::Tensor& batch_sizes,
                                                                         int64_t direction) {
  const c10::SymInt T = batch_sizes.sym_numel();
  const auto opts = batch_sizes.options();
  const at::Tensor begin = at::cumsum(batch_sizes, 0) - batch_sizes;
  const at::Tensor t = at::repeat_interleave(at::arange(c10::Scalar(T), opts), batch_sizes);
  const at::Tensor b = at::arange(c10::Scalar(t.sym_numel()), opts) - begin.index_select(0, t);
  at::Tensor has_prev, neighbour;
  if (direction == 0) {
    has_prev = t > 0;
    neighbour = (t - 1).clamp_min(0);
  } else {
    const c10::SymInt last = T - 1;
    neighbour = (t + 1).clamp_max(c10::Scalar(last)).clamp_min(0);
    has_prev = (t < c10::Scalar(last)).logical_and(b < batch_sizes.index_select(0, neighbour));
  }
  const at::Tensor rows = at::nonzero(has_prev).flatten();
  const at::Tensor starts = at::nonzero(has_prev.logical_not()).flatten();
  const at::Tensor prev_rows = begin.index_select(0, neighbour.index_select(0, rows)) + b.index_select(0, rows);
  return {rows, prev_rows, starts, b.index_select(0, starts)};
}

// dW_hh[d] = sum over steps and rows of dz_t h_{t-1}^T, as one or two GEMMs per direction. Composite of
// ATen ops, so it is differentiable (create_graph) and traces under torch.compile.
at::Tensor recurrence_weight_grad(const at::Tensor& dz, const at::Tensor& h_all, const at::Tensor& h0,
                                  const c10::optional<at::Tensor>& batch_sizes) {
  const int64_t D = h0.size(0);
  const c10::SymInt H = h0.sym_size(2);
  std::vector<at::Tensor> grads;
  for (int64_t d = 0; d < D; ++d) {
    // As few ops as the maths allows: at T = 32, B = 1, H = 64 each costs ~3-5 us, the GEMMs ~5.
    const at::Tensor dz_d = dz.select(-2, d), h_d = h_all.select(-2, d);
    if (!batch_sizes.has_value()) {  // padded [T, B, H]: h_prev is h_all shifted by one step, h0 at the start
      const c10::SymInt T = dz_d.sym_size(0);
      if (T == 0) {
        grads.push_back(at::zeros_symint({H, H}, h0.options()));
        continue;
      }
      const c10::SymInt first = d == 0 ? c10::SymInt(0) : T - 1;
      at::Tensor g = dz_d.select_symint(0, first).t().mm(h0.select(0, d));
      if (T > 1) {
        const at::Tensor inner = d == 0 ? dz_d.slice_symint(0, 1) : dz_d.slice_symint(0, 0, T - 1);
        const at::Tensor prev = d == 0 ? h_d.slice_symint(0, 0, T - 1) : h_d.slice_symint(0, 1);
        g.addmm_(inner.flatten(0, -2).t(), prev.flatten(0, -2));  // H = 0 is legal
      }
      grads.push_back(g);
    } else {
      auto [rows, prev_rows, starts, start_batch] = previous_rows(batch_sizes->cpu(), d);
      const auto device = dz.device();
      at::Tensor g = dz_d.index_select(0, starts.to(device))
                         .t()
                         .mm(h0.select(0, d).index_select(0, start_batch.to(device)));
      g.addmm_(dz_d.index_select(0, rows.to(device)).t(), h_d.index_select(0, prev_rows.to(device)));
      grads.push_back(g);
    }
  }
  return D == 1 ? grads[0].unsqueeze(0) : at::stack(grads);
}

}  // namespace

TORCH_LIBRARY_IMPL(rnn_fused, Autograd, m) {
  m.impl("recurrence_forward", &recurrence_forward_autograd);
}

TORCH_LIBRARY_IMPL(rnn_fused, CompositeImplicitAutograd, m) {
  m.impl("recurrence_weight_grad", &recurrence_weight_grad);
}

}  // namespace rnn_fused

// Our C++ autograd Functions' nodes under a fixed name: RecurrenceFunction's (csrc/recurrence_autograd.cpp;
// the layer's and the cell's nodes are bare Nodes instead, csrc/recorded_node.h: that op's state, strings, a
// float and an optional tensor kept apart from the saved variables, is what Function's context holds).
//
// torch::autograd::Function<F>::apply records a CppNode<F>, whose backward (CppNode::apply) passes name() to
// CppNode_apply_functional on every call, for its error messages; Node::name() demangles the node's C++ type
// (c10::demangle of "torch::autograd::CppNode<rnn_fused::(anonymous namespace)::LayerFunction>"): ~4,300
// instructions and two heap strings per backward, ~1 us of a ~60 us T = 1, B = 1 training call on a Zen 4
// core (benchmarks/NOTES.md, "One core for every provider; the T = 1 training call on a Zen 4 core").
// NamedNode<F> is that CppNode with name() returning F::kName (at most 15 characters: a std::string that
// short needs no heap); apply_named<F> is Function<F>::apply of torch 2.14 (read in 2.14.1) word for word
// except the node's type, so everything else (saved variables, hooks, views, node-creation hooks, compiled
// autograd through CppNode's compiled_args / apply_with_saved) is torch's own code. Built against any other
// torch minor release, apply_named<F> is F::apply itself: Function::apply's body changes between releases
// (the node was a shared_ptr up to 2.3; node-creation hooks are recent), and a copy of another release's
// body is not one we have read.
#pragma once

#include <torch/autograd.h>
#include <torch/version.h>

#include <string>
#include <utility>

namespace rnn_fused {

template <class F>
struct NamedNode : torch::autograd::CppNode<F> {
  std::string name() const override { return F::kName; }
};

// F::apply(args...) with a NamedNode<F> as the node (see above). F derives from torch::autograd::Function<F>
// and declares `static constexpr const char* kName`.
template <class F, typename... Args>
torch::autograd::variable_list apply_named(Args&&... args) {
#if TORCH_VERSION_MAJOR != 2 || TORCH_VERSION_MINOR != 14
  return F::apply(std::forward<Args>(args)...);
#else
  using namespace torch::autograd;
  const auto& functorch_tls = at::functorch::functorchTLSAccessor();
  if (functorch_tls) functorch_tls->checkSupportsCppAutogradFunction();  // as Function::apply: raises

  auto node = c10::make_intrusive<NamedNode<F>>();
  variable_list input_vars;
  input_vars.reserve(sizeof...(Args));
  node->is_variable_input_.reserve(sizeof...(Args));
  extract_vars(node->is_variable_input_, input_vars, args...);

  const bool is_executable = at::GradMode::is_enabled() && any_variable_requires_grad(input_vars);
  auto next_edges = is_executable ? collect_next_edges(input_vars) : edge_list();
  node->set_ctx_grad_fn(node);
  node->set_next_edges(std::move(next_edges));
  node->clear_input_metadata();
  node->input_info_.reserve(input_vars.size());
  for (auto& var : input_vars) node->input_info_.emplace_back(var);

  variable_list outputs;
  {
    at::AutoGradMode grad_mode(false);
    outputs = F::forward(&node->ctx_, std::forward<Args>(args)...);
  }
  const _jvp_fn_t jvp_fn = [](const variable_list&, const variable_list&) -> variable_list {
    TORCH_CHECK(false, "jvp is not implemented for the c++ API of custom Function yet.",
                "Please open a feature request on GitHub if you need this.");
  };
  const auto view_as_self_fn = [](const at::Tensor& x) -> at::Tensor { return x.view_as(x); };
  c10::intrusive_ptr<Node> attached_node;
  auto wrapped_outputs = _wrap_outputs(input_vars, node->ctx_.get_non_differentiable(),
                                       node->ctx_.get_and_bump_dirty(), to_optional(outputs),
                                       is_executable ? node : nullptr, jvp_fn, {}, view_as_self_fn, false,
                                       attached_node);
  node->output_info_.reserve(wrapped_outputs.size());
  for (auto& output : wrapped_outputs) {
    if (is_executable && output.has_value()) {
      node->output_info_.emplace_back(output.value());
    } else if (is_executable) {
      node->output_info_.emplace_back();
    }
  }
  if (is_executable) {
    node->save_variables_to_ctx();
    if (attached_node) fire_node_creation_hooks(attached_node);  // after the saved variables are stored
  }
  return to_output_type<variable_list>(wrapped_outputs);
#endif
}

}  // namespace rnn_fused

// One autograd node for one of our ops, recorded without torch::autograd::Function's bookkeeping.
//
// Function<F>::apply records a CppNode<F>: per call it builds an AutogradContext (a hash map of saved data,
// two hash sets, the saved-variable list), a VariableInfo per input and per output (each a copy of the
// tensor's sizes), wraps the outputs through _wrap_outputs (views, dirty and non-differentiable outputs,
// forward AD), and its backward rebuilds the gradient list and trims the non-tensor arguments' slots. None
// of it is needed by an op whose outputs are fresh tensors (never an input, never a view) and whose
// gradients are plain tensors. With no arithmetic at all (benchmarks/NOTES.md, "A node without
// Function's bookkeeping"), a T = 1 training call through Function<F>::apply costs 48.0 us on a Zen 4
// core, through this node 43.8 us: 4.2 us of a ~60 us call.
//
// RecordedNode<F> is a torch::autograd::Node as torch's generated nodes are (AddmmBackward0 and the rest):
// edges to the inputs, SavedVariables (so saved-tensor hooks, version checks, "backward through the graph a
// second time" and retain_graph are torch's own), history set on the outputs, node-creation hooks fired
// once it is complete. Compiled autograd calls the backward as an opaque function, as it does a CppNode's
// (compiled_args / apply_with_saved). F provides
//
//   static constexpr const char* kName;   // the node's name(): at most 15 characters (no heap string)
//   static variable_list backward(const variable_list& saved, int64_t flags, const variable_list& grads,
//                                 uint64_t needs);
//
// backward returns one gradient per recorded input (undefined where none); `needs` has bit i set when
// input i's gradient is wanted; `grads` holds one entry per output, undefined where the output's gradient
// is zero (never materialised). It runs with grad mode on under create_graph: it must then use
// differentiable ops.
//
// Built against torch 2.14 only (the Node, SavedVariable and compiled-autograd interfaces of that release,
// read in 2.14.1); against any other release record_node<F> records the same backward through
// Function::apply (RecordedFunction<F> below), whose interface is stable.
#pragma once

#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/version.h>

#include <cstdint>
#include <string>
#include <typeinfo>

// Overridable (-DRNN_FUSED_RECORDED_NODE=0) so the Function path can be compile-checked against 2.14 too.
#ifndef RNN_FUSED_RECORDED_NODE
#define RNN_FUSED_RECORDED_NODE (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR == 14)
#endif

namespace rnn_fused {

// What an op records: its tensor inputs (the node's edges, in F::backward's gradient order), its outputs
// (fresh tensors computed below autograd), what the backward needs (saved; bit i of saved_outputs set when
// saved[i] is one of the outputs) and F::backward's flags.
struct Recording {
  torch::autograd::variable_list inputs, outputs, saved;
  uint64_t saved_outputs = 0;
  int64_t flags = 0;
};

// Whether F::backward's `needs` asks for input i's gradient.
inline bool gradient_wanted(uint64_t needs, int64_t i) { return needs >> i & 1; }

#if RNN_FUSED_RECORDED_NODE

template <class F>
struct RecordedNode : torch::autograd::Node {
  std::vector<torch::autograd::SavedVariable> saved_;
  uint64_t saved_outputs_ = 0;
  int64_t flags_ = 0;

  std::string name() const override { return F::kName; }

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);  // as generated nodes: release_variables may run meanwhile
    return F::backward(unpacked(), flags_, grads, needs());
  }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (torch::autograd::SavedVariable& s : saved_) s.reset_data();
  }

  void compiled_args(torch::autograd::CompiledNodeArgs& args) const override {
    args.collect(static_cast<uint64_t>(typeid(F).hash_code()));
    args.collect(std::string(F::kName));
    args.collect(static_cast<uint64_t>(flags_));
    args.collect(saved_outputs_);
    for (size_t i = 0; i < saved_.size(); ++i) args.collect(saved_[i], is_output(i));
  }

  // Compiled autograd: F::backward bound as an opaque function of (grads, [saved, flags, needs]).
  torch::autograd::variable_list apply_with_saved(const torch::autograd::variable_list& inputs,
                                                  torch::autograd::SwapSavedVariables& swap) override {
    using namespace torch::dynamo::autograd;
    for (torch::autograd::SavedVariable& s : saved_) swap.before(s);
    PackedArgs packed;
    packed.pack(unpacked());
    packed.pack(flags_);
    packed.pack(static_cast<int64_t>(needs()));
    const std::vector<c10::IValue> args = std::move(packed).vec();
    std::vector<at::TypePtr> schema;
    for (const c10::IValue& v : args) schema.push_back(v.isTensor() ? at::TensorType::get() : v.type());
    const auto& py = getPyCompilerInterface();
    const std::string fn = py->bind_function(swap.get_py_compiler(), std::string("rnn_fused_") + F::kName,
                                             &functional, schema, /*is_custom_function=*/true,
                                             /*is_traceable=*/false);
    const auto metadata =
        IValuePacker<std::vector<std::optional<torch::autograd::InputMetadata>>>::pack(get_input_metadata(next_edges()));
    torch::autograd::variable_list out =
        py->call_function(swap.get_py_compiler(), "apply_functional", fn, inputs, args, metadata);
    for (torch::autograd::SavedVariable& s : saved_) swap.after(s);
    return out;
  }

 private:
  bool is_output(size_t i) const { return saved_outputs_ >> i & 1; }

  torch::autograd::variable_list unpacked() {
    torch::autograd::variable_list out;
    out.reserve(saved_.size());
    for (size_t i = 0; i < saved_.size(); ++i) out.push_back(saved_[i].unpack(is_output(i) ? getptr() : nullptr));
    return out;
  }

  uint64_t needs() const {
    uint64_t out = 0;
    for (size_t i = 0; i < num_outputs(); ++i) out |= static_cast<uint64_t>(task_should_compute_output(i)) << i;
    return out;
  }

  static torch::autograd::variable_list functional(const torch::autograd::variable_list& grads,
                                                   const std::vector<c10::IValue>& args) {
    torch::dynamo::autograd::PackedArgs packed(args);
    const auto saved = packed.unpack<torch::autograd::variable_list>();
    const auto flags = packed.unpack<int64_t>();
    const auto needs = packed.unpack<int64_t>();
    return F::backward(saved, flags, grads, static_cast<uint64_t>(needs));
  }
};

#else

template <class F>
struct RecordedFunction : torch::autograd::Function<RecordedFunction<F>> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, at::TensorList inputs,
                                                const Recording* r) {
    ctx->save_for_backward(r->saved);
    ctx->saved_data["flags"] = r->flags;
    ctx->saved_data["inputs"] = static_cast<int64_t>(inputs.size());
    ctx->set_materialize_grads(false);
    return r->outputs;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const int64_t n = ctx->saved_data["inputs"].toInt();
    uint64_t needs = 0;
    for (int64_t i = 0; i < n; ++i) needs |= static_cast<uint64_t>(ctx->needs_input_grad(i)) << i;
    torch::autograd::variable_list out =
        F::backward(ctx->get_saved_variables(), ctx->saved_data["flags"].toInt(), grads, needs);
    out.emplace_back();  // the Recording pointer
    return out;
  }
};

#endif

// Records r's outputs as computed by one node of backward F from r's inputs; returns the outputs (with
// their history). The caller has checked that grad mode is on and some input requires grad, computed the
// outputs below autograd (at::AutoDispatchBelowADInplaceOrView) and not under forward AD (a tangent would
// be dropped: the caller takes its ops path instead).
template <class F>
torch::autograd::variable_list record_node(Recording r) {
  TORCH_INTERNAL_ASSERT(r.inputs.size() <= 64 && r.saved.size() <= 64);
  for (const at::Tensor& o : r.outputs)
    for (const at::Tensor& i : r.inputs) TORCH_INTERNAL_ASSERT(!o.is_same(i), F::kName, ": an output is an input");
#if RNN_FUSED_RECORDED_NODE
  using namespace torch::autograd;
  const auto& functorch_tls = at::functorch::functorchTLSAccessor();
  if (functorch_tls) functorch_tls->checkSupportsCppAutogradFunction();  // as Function::apply: raises
  auto node = c10::make_intrusive<RecordedNode<F>>();
  node->set_next_edges(collect_next_edges(r.inputs));
  for (const at::Tensor& o : r.outputs) set_history(o, node);
  node->saved_.reserve(r.saved.size());
  for (size_t i = 0; i < r.saved.size(); ++i) node->saved_.emplace_back(r.saved[i], /*is_output=*/r.saved_outputs >> i & 1);
  node->saved_outputs_ = r.saved_outputs;
  node->flags_ = r.flags;
  fire_node_creation_hooks(node);
  return std::move(r.outputs);
#else
  return RecordedFunction<F>::apply(at::TensorList(r.inputs), &r);
#endif
}

}  // namespace rnn_fused

// The modules' fast path: FusedRNN / FusedRNNCell's plain eager call checked and run in C++, one Python ->
// C++ crossing instead of a dozen (issue 17: inside a module call, right after the kernels ran, each small
// Python-level check cost 1-3 us, ~13 us in all at T = 1, as much as the kernels).
//
// sequence_call(module, input, hx) / cell_call(module, input, hx) return what the module's forward returns,
// or None when the call is not exactly the plain case: a batched tensor input (type Tensor, not a subclass)
// of the parameters' dtype and device, hx None or exactly nn.RNN's shape, no tracing (torch.jit.trace, the
// TorchScript ONNX exporter), no autocast on the input's device, no torch.func transform, no BPTT options.
// None sends the call to the module's general forward (rnn_fused/modules.py), which runs every other case
// and raises nn.RNN's messages for bad arguments: this file never raises for an argument. torch.compile /
// torch.export and the backend choice are checked on the Python side before (dynamo cannot trace into here).
// The maths is the stack op's (csrc/rnn_stack.cpp) for FusedRNN, called directly, each layer recorded as one
// autograd node (its LayerFunction) when something requires grad; the cell's step is csrc/rnn_cell.cpp.
#include "rnn_cell.h"
#include "rnn_stack.h"

#include <torch/extension.h>

#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/frontend/tracer.h>

#include <array>
#include <string>

namespace rnn_fused {
namespace {

namespace py = pybind11;

std::tuple<at::Tensor, at::Tensor> stack_op(const at::Tensor& input, const at::Tensor& hx,
                                            const std::vector<at::Tensor>& params, bool has_biases,
                                            int64_t num_layers, bool bidirectional, double dropout, bool train,
                                            bool batch_first, c10::string_view activation) {
  // Other Python threads run while the kernels do, as with any torch op called from Python.
  py::gil_scoped_release no_gil;
  return rnn_stack(input, c10::nullopt, hx, params, has_biases, num_layers, bidirectional, dropout, train,
                   batch_first, activation, /*fused_layer_nodes=*/true);
}

// A plain torch.Tensor (not a subclass, not None) as the fast path takes it, or null.
const at::Tensor* exact_tensor(py::handle obj) {
  return THPVariable_CheckExact(obj.ptr()) ? &THPVariable_Unpack(obj.ptr()) : nullptr;
}

bool same_kind(const at::Tensor& t, const at::Tensor& input) {
  return t.scalar_type() == input.scalar_type() && t.device() == input.device();
}

bool plain_eager(const at::Tensor& input) {
  return !torch::jit::tracer::isTracing() && !at::autocast::is_autocast_enabled(input.device().type()) &&
         // a torch.func transform is running: functorch's front-mode key is on in this thread
         !c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode);
}

PyObject* item(PyObject* dict, py::handle name) { return PyDict_GetItem(dict, name.ptr()); }  // borrowed
PyObject* item(PyObject* dict, const char* name) { return PyDict_GetItemString(dict, name); }

// module._parameters[name] for each name, each a tensor of the input's kind; false if one is missing (a
// parametrization, an attribute that is not a parameter), None, or of another dtype or device.
template <typename Names>
bool parameters_of(py::handle module, const Names& names, const at::Tensor& input, std::vector<at::Tensor>& out) {
  const py::object own = module.attr("_parameters");
  if (!PyDict_Check(own.ptr())) return false;
  for (const auto& name : names) {
    PyObject* p = item(own.ptr(), name);
    if (p == nullptr || !THPVariable_CheckExact(p)) return false;  // Tensor or Parameter, not a subclass
    const at::Tensor& t = THPVariable_Unpack(p);
    if (!same_kind(t, input)) return false;
    out.push_back(t);
  }
  return true;
}

// The attribute as a string, or nothing if it is not one (the general path then raises what nn.RNN does).
c10::optional<std::string> string_attr(py::handle module, const char* name) {
  const py::object value = module.attr(name);
  if (!py::isinstance<py::str>(value)) return c10::nullopt;
  return value.cast<std::string>();
}

const char* activation_of_mode(const c10::optional<std::string>& mode) {
  return !mode ? nullptr : *mode == "RNN_TANH" ? "tanh" : *mode == "RNN_RELU" ? "relu" : nullptr;
}

py::object sequence_call(py::handle module, py::handle input_obj, py::handle hx_obj) {
  const at::Tensor* input = exact_tensor(input_obj);
  if (input == nullptr || input->dim() != 3 || !plain_eager(*input)) return py::none();
  if (module.attr("record_grad_norms").cast<bool>() || !module.attr("bptt_clip").is_none()) return py::none();
  const char* activation = activation_of_mode(string_attr(module, "mode"));
  const int64_t input_size = module.attr("input_size").cast<int64_t>();
  if (activation == nullptr || input->size(2) != input_size) return py::none();
  const bool batch_first = module.attr("batch_first").cast<bool>();
  const int64_t B = input->size(batch_first ? 0 : 1), T = input->size(batch_first ? 1 : 0);
  if (T == 0) return py::none();  // nn.RNN raises: the general path says so
  std::vector<at::Tensor> params;
  if (!parameters_of(module, module.attr("_flat_weights_names").cast<py::list>(), *input, params))
    return py::none();
  const int64_t num_layers = module.attr("num_layers").cast<int64_t>();
  const bool bidirectional = module.attr("bidirectional").cast<bool>();
  const int64_t hidden_size = module.attr("hidden_size").cast<int64_t>(), layers = num_layers * (bidirectional ? 2 : 1);
  at::Tensor hx;
  if (hx_obj.is_none()) {
    hx = at::zeros({layers, B, hidden_size}, input->options());
  } else {
    const at::Tensor* given = exact_tensor(hx_obj);
    if (given == nullptr || given->dim() != 3 || given->size(0) != layers || given->size(1) != B ||
        given->size(2) != hidden_size || !same_kind(*given, *input))
      return py::none();
    hx = *given;
  }
  auto [output, h_n] = stack_op(*input, hx, params, module.attr("bias").cast<bool>(), num_layers, bidirectional,
                                module.attr("dropout").cast<double>(), module.attr("training").cast<bool>(),
                                batch_first, activation);
  return py::make_tuple(output, h_n);
}

py::object cell_call(py::handle module, py::handle input_obj, py::handle hx_obj) {
  const at::Tensor* input = exact_tensor(input_obj);
  if (input == nullptr || input->dim() != 2 || !plain_eager(*input)) return py::none();
  const c10::optional<std::string> nonlinearity = string_attr(module, "nonlinearity");
  if (!nonlinearity || (*nonlinearity != "tanh" && *nonlinearity != "relu") ||
      input->size(1) != module.attr("input_size").cast<int64_t>())
    return py::none();
  const bool bias = module.attr("bias").cast<bool>();
  static const std::array<const char*, 4> names{"weight_ih", "weight_hh", "bias_ih", "bias_hh"};
  std::vector<at::Tensor> params;
  const std::vector<const char*> wanted(names.begin(), names.begin() + (bias ? 4 : 2));
  if (!parameters_of(module, wanted, *input, params)) return py::none();
  const int64_t B = input->size(0), hidden_size = module.attr("hidden_size").cast<int64_t>();
  at::Tensor hx;
  if (hx_obj.is_none()) {
    hx = at::zeros({B, hidden_size}, input->options());
  } else {
    const at::Tensor* given = exact_tensor(hx_obj);
    if (given == nullptr || given->dim() != 2 || given->size(0) != B || given->size(1) != hidden_size ||
        !same_kind(*given, *input))
      return py::none();
    hx = *given;
  }
  at::Tensor h_next;
  {
    py::gil_scoped_release no_gil;  // as in stack_op
    h_next = cell_step(*input, hx, params, *nonlinearity == "relu");
  }
  return py::cast(h_next);
}

}  // namespace
}  // namespace rnn_fused

// Importing rnn_fused._C loads the op registrations (csrc/ops.cpp and the kernels) and gives the modules'
// fast path.
PYBIND11_MODULE(_C, m) {
  m.def("sequence_call", &rnn_fused::sequence_call);
  m.def("cell_call", &rnn_fused::cell_call);
}

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
// autograd node (its recorded_layer) when something requires grad; the cell's step is csrc/rnn_cell.cpp.
#include "cpu/gemm_onednn.h"
#include "cpu/scratch_cpu.h"
#include "cpu/step_tile.h"
#include "rnn_cell.h"
#include "rnn_stack.h"

#include <torch/extension.h>

#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/frontend/tracer.h>

#include <array>
#include <optional>
#include <unordered_map>
#include <string>

namespace rnn_fused {
namespace {

namespace py = pybind11;

// Other Python threads run while the kernels do, as with any torch op called from Python, but for a CPU call
// of fewer multiply-adds than this (~2-4 us of arithmetic on one core): releasing and taking back the GIL
// costs ~0.3-0.4 us (CPython's take_gil: a mutex and a condition variable), ~10% of a T=1 B=1 H=64 forward,
// more than another thread would gain. A CUDA call always releases it.
constexpr int64_t kGilReleaseMinMacs = int64_t(1) << 16;

bool releases_gil(const at::Tensor& input, double macs) { return !input.is_cpu() || macs >= kGilReleaseMinMacs; }

// Multiply-adds of a padded stack's forward: per layer and direction T * B * H * (layer input + H). In
// double, so sizes whose product passes int64 still count as large.
double stack_macs(int64_t T, int64_t B, int64_t I, int64_t H, int64_t num_layers, bool bidirectional) {
  const double D = bidirectional ? 2 : 1;
  return double(T) * B * H * D * ((I + H) + double(num_layers - 1) * (D * H + H));
}

std::tuple<at::Tensor, at::Tensor> stack_op(const at::Tensor& input, const at::Tensor& hx,
                                            const std::vector<at::Tensor>& params, bool has_biases,
                                            int64_t num_layers, bool bidirectional, double dropout, bool train,
                                            bool batch_first, c10::string_view activation, double macs) {
  std::optional<py::gil_scoped_release> released;
  if (releases_gil(input, macs)) released.emplace();
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
         // a TorchDispatchMode (FlopCounterMode, a logging mode): the CPU layer runs no op it could see
         c10::impl::TorchDispatchModeTLS::stack_len() == 0 &&
         // a torch.func transform is running: functorch's front-mode key is on in this thread
         !c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode);
}

PyObject* item(PyObject* dict, py::handle name) { return PyDict_GetItem(dict, name.ptr()); }  // borrowed
// The interned Python string of a C string literal, made once per literal (the GIL is held): a dict lookup
// by it costs ~20 ns, PyDict_GetItemString's temporary string ~70 ns, a dozen times per call. Keyed by the
// pointer: string literals only, never a buffer whose contents change.
PyObject* key(const char* literal) {
  static std::unordered_map<const char*, PyObject*> keys;
  PyObject*& k = keys[literal];
  if (k == nullptr) k = PyUnicode_InternFromString(literal);  // null only out of memory (then tried again)
  return k;
}
PyObject* item(PyObject* dict, const char* name) {
  PyObject* k = key(name);
  if (k == nullptr) {  // out of memory interning: as if missing (the general path runs the call)
    PyErr_Clear();
    return nullptr;
  }
  return PyDict_GetItem(dict, k);
}

// The module's attributes as its instance __dict__ holds them (nn.Module, RNNBase, RNNCellBase and our
// modules set every one read here in __init__), each of exactly the type the fast path takes; nothing when
// the attribute is elsewhere (a property, a class attribute) or of another type: the caller then returns
// None and the general path reads it as Python does. One dict lookup each instead of a getattr and a
// pybind11 cast (~1.3 us for the dozen a call reads).
class OwnAttributes {
 public:
  explicit OwnAttributes(py::handle module) : dict_(module.attr("__dict__")) {}
  bool ok() const { return PyDict_Check(dict_.ptr()); }
  PyObject* get(const char* name) const { return item(dict_.ptr(), name); }
  c10::optional<bool> flag(const char* name) const {
    PyObject* v = get(name);
    if (v == Py_True) return true;
    if (v == Py_False) return false;
    return c10::nullopt;
  }
  c10::optional<int64_t> integer(const char* name) const {
    PyObject* v = get(name);
    if (v == nullptr || !PyLong_CheckExact(v)) return c10::nullopt;
    const long long value = PyLong_AsLongLong(v);
    if (value == -1 && PyErr_Occurred()) {
      PyErr_Clear();
      return c10::nullopt;
    }
    return value;
  }
  c10::optional<double> real(const char* name) const {
    PyObject* v = get(name);
    if (v == nullptr || !(PyFloat_CheckExact(v) || PyLong_CheckExact(v))) return c10::nullopt;
    const double value = PyFloat_AsDouble(v);
    if (value == -1.0 && PyErr_Occurred()) {
      PyErr_Clear();
      return c10::nullopt;
    }
    return value;
  }
  bool equals(const char* name, const char* text) const {
    PyObject* v = get(name);
    return v != nullptr && PyUnicode_CheckExact(v) && PyUnicode_CompareWithASCIIString(v, text) == 0;
  }

 private:
  py::object dict_;
};

// module._parameters[name] for each name (own: that dict, from the instance __dict__), each a tensor of
// the input's kind; false if one is missing (a parametrization, an attribute that is not a parameter), None,
// or of another dtype or device.
template <typename Names>
bool parameters_of(PyObject* own_borrowed, const Names& names, const at::Tensor& input, std::vector<at::Tensor>& out) {
  if (own_borrowed == nullptr || !PyDict_Check(own_borrowed)) return false;
  // Held for the loop: a name's __hash__ / __eq__ (a str subclass) could run Python that rebinds it.
  const py::object held = py::reinterpret_borrow<py::object>(own_borrowed);
  PyObject* own = held.ptr();
  for (const auto& name : names) {
    PyObject* p = item(own, name);
    if (p == nullptr || !THPVariable_CheckExact(p)) return false;  // Tensor or Parameter, not a subclass
    const at::Tensor& t = THPVariable_Unpack(p);
    if (!same_kind(t, input)) return false;
    out.push_back(t);
  }
  return true;
}

py::object sequence_call(py::handle module, py::handle input_obj, py::handle hx_obj) {
  const at::Tensor* input = exact_tensor(input_obj);
  if (input == nullptr || input->dim() != 3 || !plain_eager(*input)) return py::none();
  const OwnAttributes attrs(module);
  if (!attrs.ok()) return py::none();
  const c10::optional<bool> record = attrs.flag("record_grad_norms"), batch_first = attrs.flag("batch_first"),
                            bidirectional = attrs.flag("bidirectional"), bias = attrs.flag("bias"),
                            training = attrs.flag("training");
  const c10::optional<int64_t> input_size = attrs.integer("input_size"), hidden_size = attrs.integer("hidden_size"),
                               num_layers = attrs.integer("num_layers");
  const c10::optional<double> dropout = attrs.real("dropout");
  if (!record || *record || attrs.get("bptt_clip") != Py_None || !batch_first || !bidirectional || !bias ||
      !training || !input_size || !hidden_size || !num_layers || !dropout)
    return py::none();
  const char* activation = attrs.equals("mode", "RNN_TANH") ? "tanh" : attrs.equals("mode", "RNN_RELU") ? "relu" : nullptr;
  if (activation == nullptr || input->size(2) != *input_size) return py::none();
  const int64_t B = input->size(*batch_first ? 0 : 1), T = input->size(*batch_first ? 1 : 0);
  if (T == 0) return py::none();  // nn.RNN raises: the general path says so
  PyObject* names = attrs.get("_flat_weights_names");
  std::vector<at::Tensor> params;
  if (names == nullptr || !PyList_CheckExact(names) ||
      !parameters_of(attrs.get("_parameters"), py::reinterpret_borrow<py::list>(names), *input, params))
    return py::none();
  const int64_t layers = *num_layers * (*bidirectional ? 2 : 1);
  at::Tensor hx;
  if (hx_obj.is_none()) {
    hx = at::zeros({layers, B, *hidden_size}, input->options());
  } else {
    const at::Tensor* given = exact_tensor(hx_obj);
    if (given == nullptr || given->dim() != 3 || given->size(0) != layers || given->size(1) != B ||
        given->size(2) != *hidden_size || !same_kind(*given, *input))
      return py::none();
    hx = *given;
  }
  auto [output, h_n] = stack_op(*input, hx, params, *bias, *num_layers, *bidirectional, *dropout, *training,
                                *batch_first, activation,
                                stack_macs(T, B, *input_size, *hidden_size, *num_layers, *bidirectional));
  return py::make_tuple(output, h_n);
}

py::object cell_call(py::handle module, py::handle input_obj, py::handle hx_obj) {
  const at::Tensor* input = exact_tensor(input_obj);
  if (input == nullptr || input->dim() != 2 || !plain_eager(*input)) return py::none();
  const OwnAttributes attrs(module);
  if (!attrs.ok()) return py::none();
  const bool relu = attrs.equals("nonlinearity", "relu");
  const c10::optional<bool> bias = attrs.flag("bias");
  const c10::optional<int64_t> input_size = attrs.integer("input_size"), hidden = attrs.integer("hidden_size");
  if (!(relu || attrs.equals("nonlinearity", "tanh")) || !bias || !input_size || !hidden ||
      input->size(1) != *input_size)
    return py::none();
  static const std::array<const char*, 4> names{"weight_ih", "weight_hh", "bias_ih", "bias_hh"};
  std::vector<at::Tensor> params;
  const std::vector<const char*> wanted(names.begin(), names.begin() + (*bias ? 4 : 2));
  if (!parameters_of(attrs.get("_parameters"), wanted, *input, params)) return py::none();
  const int64_t B = input->size(0), hidden_size = *hidden;
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
    std::optional<py::gil_scoped_release> released;  // as in stack_op
    if (releases_gil(*input, double(B) * hidden_size * (*input_size + hidden_size))) released.emplace();
    h_next = cell_step(*input, hx, params, relu);
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
  m.def("kept_scratch_bytes", &rnn_fused::kept_scratch_bytes,
        "Bytes of CPU-layer scratch the calling thread keeps between calls (cpu/scratch_cpu.h); for tests.");
  m.def("cpu_step_isa", &rnn_fused::tile::isa_name,
        "The CPU kernels' register-tile step on this CPU: 'avx512', 'avx2' or 'none' (cpu/step_tile.h).");
  m.def("cpu_gemm", &rnn_fused::onednn::gemm_name,
        "What the CPU kernels' large float32 GEMMs run on: 'onednn' or 'blas' (cpu/gemm_onednn.h).");
}

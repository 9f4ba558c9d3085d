"""``FusedRNN`` and ``FusedRNNCell``: drop-ins for ``torch.nn.RNN`` and ``torch.nn.RNNCell``.

They subclass the torch modules, so construction, argument validation (same exception types and messages),
parameter names, initialisation, ``state_dict``, ``repr``, pickling and ``.to()`` are torch's own, and a
checkpoint moves between the two with ``strict=True``. Only ``forward`` differs: every layer and direction
runs through the op boundary (rnn_fused/functional.py) on the chosen backend.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from . import _extension, backends, contract, func_transforms, onnx_export, scripting
from .backends import check_name
from .bptt import BPTTOptions
from .diagnostics import GradFlow
from .functional import rnn_layer


def _check_bptt_args(record_grad_norms, bptt_clip, bptt_clip_mode) -> None:
    if not isinstance(record_grad_norms, bool):
        raise TypeError(f"record_grad_norms must be a bool, got {type(record_grad_norms).__name__}")
    if bptt_clip_mode not in ("norm", "value"):
        raise ValueError(f"bptt_clip_mode must be 'norm' or 'value', got {bptt_clip_mode!r}")
    if bptt_clip is not None:
        if isinstance(bptt_clip, bool) or not isinstance(bptt_clip, (int, float)):
            raise TypeError(f"bptt_clip must be a positive number or None, got {type(bptt_clip).__name__}")
        if not (math.isfinite(bptt_clip) and bptt_clip > 0):
            raise ValueError(f"bptt_clip must be a positive finite number or None, got {bptt_clip}")


def _check_same_device(input: Tensor, hx: Tensor) -> None:
    if input.device != hx.device:
        raise RuntimeError(
            "Input and hidden tensors are not at the same device, "
            f"found input tensor at {input.device} and hidden tensor at {hx.device}"
        )


def _check_parameters(params: list[Tensor], names: list[str], input: Tensor, check_dtype: bool) -> None:
    """Every parameter on the input's device (nn.RNN's message) and, outside autocast, of its dtype: nn.RNN
    fails inside a matrix product there; a silently promoted parameter would compute in another dtype."""
    for name, p in zip(names, params):
        if p is None:
            continue
        if p.device != input.device:
            raise RuntimeError("Input and parameter tensors are not at the same device, "
                               f"found input tensor at {input.device} and parameter tensor at {p.device}")
        if check_dtype and p.dtype != input.dtype:
            raise RuntimeError(f"parameter {name} has dtype {p.dtype}, the input {input.dtype}: "
                               "input and parameters must have one dtype")


def _parameters(module: nn.Module, names) -> list:
    """The named parameters, current (a reassigned attribute, a parametrization), without nn.Module's slow
    __getattr__ (~1 us each) where the parameter sits plainly in ``_parameters``."""
    own = module._parameters
    return [own[name] if own.get(name) is not None else getattr(module, name) for name in names]


def _autocast_dtype(t: Tensor) -> torch.dtype | None:
    """The dtype torch.autocast asks for on ``t``'s device, or None outside autocast."""
    device_type = t.device.type
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _check_hx_dtype(input: Tensor, hx: Tensor) -> None:
    # nn.RNN fails here inside a matrix product ("mat1 and mat2 must have the same dtype"); same type,
    # clearer words.
    if hx.dtype != input.dtype:
        raise RuntimeError(f"hx dtype ({hx.dtype}) must match the input dtype ({input.dtype})")


def _fast_path_open(backend: str, input) -> bool:
    """Whether a module call may try the fast path (csrc/eager_call.cpp checks the rest): a plain tensor
    input, not while torch.compile traces (dynamo cannot trace into the C++ call), not under forward-mode AD,
    on a backend whose whole stack is the stack op."""
    return (type(input) is Tensor and not torch.compiler.is_compiling() and not func_transforms.forward_ad_active()
            and backends.stack_op_for(backend, input))


def _stacked(tensors: list[Tensor]) -> Tensor:
    """Per-direction tensors stacked on a new leading direction axis (a view for one direction)."""
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


class FusedRNN(nn.RNNBase):
    """Elman RNN with fused kernels; ``nn.RNN``'s arguments plus ``backend`` and the BPTT options.

    ``backend``: ``'auto'`` (the fastest available for the input's device and dtype), ``'cuda'``,
    ``'triton'``, ``'cpu'`` or ``'reference'`` (plain PyTorch). An explicit backend that cannot run the
    input raises ``rnn_fused.BackendUnavailableError`` saying why.

    BPTT options (keyword-only; docs/bptt.md explains them; ``bptt_clip`` compiles with
    ``torch.compile(fullgraph=True)`` on the kernel backends, ``record_grad_norms`` runs eagerly):

    - ``record_grad_norms``: every forward sets ``self.grad_flow``, a ``rnn_fused.diagnostics.GradFlow``
      that the backward fills with ``||dL/dh_t||`` per layer, direction and time step (before clipping).
    - ``bptt_clip`` / ``bptt_clip_mode``: clip ``g_t = dL/dh_t`` at every step of the backward, before it
      goes through act' and on to earlier steps: ``'norm'`` (default) rescales each sequence's ``g_t`` to norm
      ``<= bptt_clip``, ``'value'`` clamps each element to ``[-bptt_clip, bptt_clip]``. The forward is
      unchanged; the gradients are those of the clipped BPTT (``rnn_fused.reference.clip_gradient``).

    It derives from ``nn.RNNBase``, not ``nn.RNN``: torch.compile refuses to trace instances of ``nn.RNN``
    (it falls back to eager for them), and ``FusedRNN`` must compile with ``fullgraph=True``. The argument
    handling below is ``nn.RNN.__init__``'s, with its messages.
    """

    def __init__(self, *args, backend: str = "auto", record_grad_norms: bool = False,
                 bptt_clip: float | None = None, bptt_clip_mode: str = "norm", **kwargs):
        check_name(backend)
        _check_bptt_args(record_grad_norms, bptt_clip, bptt_clip_mode)
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        if len(args) > 3:
            self.nonlinearity = args[3]
            args = args[:3] + args[4:]
        else:
            self.nonlinearity = kwargs.pop("nonlinearity", "tanh")
        # Compared with ==, as nn.RNN does: an unhashable nonlinearity (a list) gets nn.RNN's ValueError too.
        if self.nonlinearity == "tanh":
            mode = "RNN_TANH"
        elif self.nonlinearity == "relu":
            mode = "RNN_RELU"
        else:
            raise ValueError(f"Unknown nonlinearity '{self.nonlinearity}'. Select from 'tanh' or 'relu'.")
        super().__init__(mode, *args, **kwargs)
        self.backend = backend
        self.record_grad_norms = record_grad_norms
        self.bptt_clip = None if bptt_clip is None else float(bptt_clip)
        self.bptt_clip_mode = bptt_clip_mode
        self.grad_flow: GradFlow | None = None

    def flatten_parameters(self) -> None:
        """No-op: the kernels read the parameters where they are (cuDNN's flat buffer is not used)."""

    def __prepare_scriptable__(self):
        """``torch.jit.script`` compiles a twin that shares these parameters (rnn_fused/scripting.py)."""
        return scripting.scriptable_twin(self)

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", backend={self.backend!r}"
        if self.record_grad_norms:
            s += ", record_grad_norms=True"
        if self.bptt_clip is not None:
            s += f", bptt_clip={self.bptt_clip}, bptt_clip_mode={self.bptt_clip_mode!r}"
        return s

    def _bptt_options(self, layer: int, x: Tensor) -> BPTTOptions | None:
        """Layer ``layer``'s BPTT options for its input ``x``, or None when neither recording nor clipping."""
        if not self.record_grad_norms and self.bptt_clip is None:
            return None
        clip_mode, clip = ("none", 0.0) if self.bptt_clip is None else (self.bptt_clip_mode, self.bptt_clip)
        probe = None
        if self.record_grad_norms:
            if torch.compiler.is_compiling():
                raise RuntimeError("rnn_fused: record_grad_norms runs in eager mode only (the norms reach "
                                   "module.grad_flow through a hook); compile the model without it (bptt_clip "
                                   "compiles)")
            D = 2 if self.bidirectional else 1
            probe = self.grad_flow.probe(layer, (*x.shape[:-1], D), contract.norm_dtype(x.dtype), x.device)
        return BPTTOptions(clip_mode, clip, probe)

    def _layer_weights(self, layer: int, dtype: torch.dtype | None = None):
        """One layer's parameters stacked over directions: w_ih [D,H,I], w_hh [D,H,H], bias [D,H] or None.

        The two biases are summed per direction before stacking. Summing after a per-leaf view (unsqueeze,
        stack) would hand both bias leaves views of one gradient buffer, which autograd's gradient
        accumulation then shares between bias_ih.grad and bias_hh.grad: a second backward through a
        retained graph would double-count (seen with torch 2.14; tests/test_modules.py checks it).
        """
        params = self._direction_parameters(layer, dtype)
        bias = None
        if self.bias:
            bias = _stacked([b_ih + b_hh for b_ih, b_hh in zip(params["bias_ih"], params["bias_hh"])])
        return _stacked(params["weight_ih"]), _stacked(params["weight_hh"]), bias

    def _direction_parameters(self, layer: int, dtype: torch.dtype | None) -> dict[str, list[Tensor]]:
        """One layer's parameters by kind (weight_ih, weight_hh, bias_ih, bias_hh), one per direction."""
        suffixes = ["", "_reverse"] if self.bidirectional else [""]
        kinds = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if self.bias else [])
        params = {kind: [getattr(self, f"{kind}_l{layer}{s}") for s in suffixes] for kind in kinds}
        return params if dtype is None else {k: [t.to(dtype) for t in ts] for k, ts in params.items()}

    def _onnx_layer(self, layer: int, x: Tensor, h0: Tensor, activation: str, dtype: torch.dtype | None):
        """The layer as one ONNX RNN node (rnn_fused/onnx_export.py), the biases kept apart as ONNX has them."""
        params = self._direction_parameters(layer, dtype)
        b_ih, b_hh = (_stacked(params["bias_ih"]), _stacked(params["bias_hh"])) if self.bias else (None, None)
        return onnx_export.rnn_layer(x, _stacked(params["weight_ih"]), _stacked(params["weight_hh"]), b_ih, b_hh,
                                     h0, activation, self.backend)

    def forward(self, input, hx: Tensor | None = None):
        if _fast_path_open(self.backend, input):  # _fast_forward, inline: its frame is ~0.3 us of ~8 at T = 1
            fast = _extension.compiled().sequence_call(self, input, hx)
            if fast is not None:
                return fast
        return self._general_forward(input, hx)

    def _fast_forward(self, input, hx: Tensor | None):
        """The common call (batched tensors of the parameters' dtype and device, plain eager mode, no BPTT
        options) on a backend whose whole stack is the stack op (csrc/rnn_stack.cpp): checked and run in one
        C++ call (csrc/eager_call.cpp lists the conditions; issue 17: the same checks in Python cost ~13 us
        per call, as much as the kernels at T = 1). Returns None otherwise, and the general path runs the
        call (and raises nn.RNN's messages for what is wrong). Never raises itself."""
        return _extension.compiled().sequence_call(self, input, hx) if _fast_path_open(self.backend, input) else None

    def _general_forward(self, input, hx: Tensor | None):
        # Parameters are read by name (getattr, so parametrizations and reassigned attributes are seen), never
        # from nn.RNN's _flat_weights cache: no _update_flat_weights() here, which torch.export would report
        # as tensor attributes assigned during export.
        exporting = onnx_export.exporting()
        if exporting:  # first: a PackedSequence fails torch.export in the unpacking below, without our reason
            onnx_export.check_exportable(input)
        num_directions = 2 if self.bidirectional else 1
        is_packed = isinstance(input, PackedSequence)
        is_batched = True
        if is_packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
            max_batch_size = int(batch_sizes[0])
        else:
            data, batch_sizes, sorted_indices, unsorted_indices = input, None, None, None
            if input.dim() not in (2, 3):
                raise ValueError(f"RNN: Expected input to be 2D or 3D, got {input.dim()}D tensor instead")
            is_batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            if not is_batched:
                data = input.unsqueeze(batch_dim)
                if hx is not None:
                    if hx.dim() != 2:
                        raise RuntimeError(
                            f"For unbatched 2-D input, hx should also be 2-D but got {hx.dim()}-D tensor"
                        )
                    hx = hx.unsqueeze(1)
            elif hx is not None and hx.dim() != 3:
                raise RuntimeError(f"For batched 3-D input, hx should also be 3-D but got {hx.dim()}-D tensor")
            max_batch_size = data.size(0) if self.batch_first else data.size(1)
        if hx is None:
            hx = torch.zeros(self.num_layers * num_directions, max_batch_size, self.hidden_size,
                             dtype=data.dtype, device=data.device)
        else:
            # hx is in the caller's batch order; the packed data is sorted by decreasing length.
            hx = self.permute_hidden(hx, sorted_indices)
        self.check_forward_args(data, hx, batch_sizes)
        # The activation follows self.mode, as nn.RNN's forward does (self.nonlinearity is only read at init).
        if self.mode != "RNN_TANH" and self.mode != "RNN_RELU":
            raise AssertionError(f"mode must be RNN_TANH or RNN_RELU, got {self.mode}")
        activation = "tanh" if self.mode == "RNN_TANH" else "relu"
        _check_same_device(data, hx)
        # Under autocast nn.RNN runs in the autocast dtype (weights, input and state cast, gradients flow
        # back to the float32 parameters through the casts); so do we, with autocast itself switched off
        # inside so that the input projection and the recurrence agree on one dtype.
        compute_dtype = _autocast_dtype(data)
        params = _parameters(self, self._flat_weights_names)
        _check_parameters(params, self._flat_weights_names, data, check_dtype=compute_dtype is None)
        if compute_dtype is None:
            _check_hx_dtype(data, hx)
        else:
            data, hx = data.to(compute_dtype), hx.to(compute_dtype)
        if not is_packed and data.size(1 if self.batch_first else 0) == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")

        if not exporting and compute_dtype is None and not self.record_grad_norms and self.bptt_clip is None \
                and backends.call_runs_stack_op(self.backend, data):
            # The C++ kernels: the whole stack in one call (csrc/rnn_stack.cpp), the same maths as the loop
            # below.
            output, hidden = torch.ops.rnn_fused.rnn(
                data, batch_sizes, hx, params, self.bias, self.num_layers, self.bidirectional, self.dropout,
                self.training, self.batch_first and not is_packed, activation)
            return self._outputs(output, hidden, input if is_packed else None, is_batched)

        if not is_packed:
            if self.batch_first:
                data = data.transpose(0, 1)
            data = data.contiguous()

        layer_input = data
        h_n = []
        with torch.autocast(data.device.type, enabled=False) if compute_dtype else contextlib.nullcontext():
            weights = [] if exporting else [self._layer_weights(layer, compute_dtype)
                                            for layer in range(self.num_layers)]
            if self.record_grad_norms and not exporting:
                T = len(batch_sizes) if is_packed else data.size(0)
                self.grad_flow = GradFlow(self.num_layers, num_directions, T, max_batch_size,
                                          input if is_packed else None, [w_hh for _, w_hh, _ in weights])
            for layer in range(self.num_layers):
                h0 = hx[layer * num_directions:(layer + 1) * num_directions]
                if exporting:
                    layer_output, h_last = self._onnx_layer(layer, layer_input, h0, activation, compute_dtype)
                else:
                    w_ih, w_hh, bias = weights[layer]
                    layer_output, h_last = rnn_layer(layer_input, w_ih, w_hh, bias, None, h0, batch_sizes,
                                                     activation, self.backend, self._bptt_options(layer, layer_input))
                h_n.append(h_last)
                # Dropout sits between layers only, in training only; h_n is taken before it.
                if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                    layer_output = F.dropout(layer_output, p=self.dropout, training=True)
                layer_input = layer_output
        hidden = torch.cat(h_n, 0)
        output = layer_input if is_packed or not self.batch_first else layer_input.transpose(0, 1)
        return self._outputs(output, hidden, input if is_packed else None, is_batched)

    def _outputs(self, output: Tensor, hidden: Tensor, packed_input: PackedSequence | None, is_batched: bool):
        """(output, h_n) as nn.RNN returns them: a PackedSequence for packed input (h_n back in the caller's
        batch order), squeezed for unbatched input."""
        if packed_input is not None:
            _, batch_sizes, sorted_indices, unsorted_indices = packed_input
            return (PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices),
                    self.permute_hidden(hidden, unsorted_indices))
        if not is_batched:
            output = output.squeeze(0 if self.batch_first else 1)
            hidden = hidden.squeeze(1)
        return output, hidden


_CELL_PARAMETERS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


class FusedRNNCell(nn.RNNCell):
    """One Elman step, ``nn.RNNCell``'s contract: ``h' = act(W_ih x + b_ih + W_hh h + b_hh)``; plus ``backend``."""

    def __init__(self, *args, backend: str = "auto", **kwargs):
        check_name(backend)
        super().__init__(*args, **kwargs)
        self.backend = backend

    def extra_repr(self) -> str:
        return super().extra_repr() + f", backend={self.backend!r}"

    def __prepare_scriptable__(self):
        """``torch.jit.script`` compiles a twin that shares these parameters (rnn_fused/scripting.py)."""
        return scripting.scriptable_twin(self)

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        if _fast_path_open(self.backend, input):  # _fast_forward, inline (as FusedRNN.forward)
            fast = _extension.compiled().cell_call(self, input, hx)
            if fast is not None:
                return fast
        return self._general_forward(input, hx)

    def _fast_forward(self, input, hx: Tensor | None):
        """FusedRNN._fast_forward's counterpart for nn.RNNCell's contract: a batched [B, I] input (hx [B, H]
        or None) in one C++ call (csrc/eager_call.cpp), else None (the general path runs the call)."""
        return _extension.compiled().cell_call(self, input, hx) if _fast_path_open(self.backend, input) else None

    def _general_forward(self, input: Tensor, hx: Tensor | None) -> Tensor:
        input, hx, is_batched = scripting.cell_arguments(input, hx, self.hidden_size)
        if self.nonlinearity not in ("tanh", "relu"):
            raise RuntimeError(f"Unknown nonlinearity: {self.nonlinearity}")
        scripting.check_cell_sizes(input, hx, self.input_size, self.hidden_size)
        _check_same_device(input, hx)
        compute_dtype = _autocast_dtype(input)
        weights = _parameters(self, _CELL_PARAMETERS if self.bias else _CELL_PARAMETERS[:2])
        if compute_dtype is None:
            _check_hx_dtype(input, hx)
            if input.dtype != weights[0].dtype:
                raise RuntimeError(f"input dtype ({input.dtype}) must match the weight dtype ({weights[0].dtype})")
        else:  # as in FusedRNN.forward
            input, hx = input.to(compute_dtype), hx.to(compute_dtype)
            weights = [w.to(compute_dtype) for w in weights]
        w_ih, w_hh = weights[:2]
        if compute_dtype is None and not onnx_export.exporting() and backends.call_runs_stack_op(self.backend, input):
            # One step of the C++ stack op (csrc/rnn_stack.cpp), the same maths as rnn_layer below.
            _, h_n = torch.ops.rnn_fused.rnn(input.unsqueeze(0), None, hx.unsqueeze(0), weights, self.bias, 1,
                                             False, 0.0, False, False, self.nonlinearity)
            return h_n[0] if is_batched else h_n[0].squeeze(0)
        if onnx_export.exporting():
            b_ih, b_hh = (weights[2], weights[3]) if self.bias else (None, None)
            h = onnx_export.rnn_cell(input, hx, w_ih, w_hh, b_ih, b_hh, self.nonlinearity)
            return h if is_batched else h.squeeze(0)
        # Biases summed before the unsqueeze, for the reason given in FusedRNN._layer_weights.
        bias = (weights[2] + weights[3]).unsqueeze(0) if self.bias else None
        with torch.autocast(input.device.type, enabled=False) if compute_dtype else contextlib.nullcontext():
            _, h_last = rnn_layer(input.unsqueeze(0), w_ih.unsqueeze(0), w_hh.unsqueeze(0), bias, None,
                                  hx.unsqueeze(0), None, self.nonlinearity, self.backend)
        h = h_last[0]
        return h if is_batched else h.squeeze(0)

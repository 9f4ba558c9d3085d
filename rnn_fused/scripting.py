"""TorchScript twins of ``FusedRNN`` and ``FusedRNNCell``: what ``torch.jit.script`` compiles in their place.

The modules' own ``forward`` is Python that TorchScript cannot compile (PackedSequence dispatch, backend
choice, autocast, the BPTT options). ``torch.jit.script`` calls ``__prepare_scriptable__`` first, and the
modules answer with a twin from here: the **same Parameter objects** under the same names (so
``state_dict`` keys and training updates are shared), nn.RNN's own scriptable argument checks
(``check_forward_args``, inherited from ``nn.RNNBase``), and a forward that runs the C++ kernels through the
registered op ``rnn_fused::recurrence_forward`` (CPU or CUDA, differentiable through the registered autograd
rule). The scripted module can be saved and loaded in C++ (libtorch) once ``rnn_fused/_C`` is loaded there.

What the twin cannot script raises when ``torch.jit.script`` is called, naming the feature: the BPTT options
(they run Python during the backward), an explicit ``backend='triton'`` or ``'reference'`` (TorchScript runs
the C++ kernels only), and a missing C++ extension. PackedSequence input is rejected by TorchScript's type
check on ``input: Tensor``.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def check_scriptable(module: nn.Module) -> None:
    """Raise, naming the feature, if ``module`` (a FusedRNN or FusedRNNCell) has something TorchScript lacks."""
    name = type(module).__name__
    if getattr(module, "record_grad_norms", False) or getattr(module, "bptt_clip", None) is not None:
        raise RuntimeError(f"rnn_fused: torch.jit.script({name}) does not support the BPTT options "
                           "(record_grad_norms, bptt_clip): they run Python during the backward")
    if module.backend not in ("auto", "cpu", "cuda"):
        raise RuntimeError(f"rnn_fused: torch.jit.script({name}) runs the C++ kernels only; backend "
                           f"{module.backend!r} cannot be scripted (use 'auto', 'cpu' or 'cuda')")
    from . import _extension

    reason = _extension.load()
    if reason is not None:
        raise RuntimeError(f"rnn_fused: torch.jit.script({name}) needs the C++ extension: {reason}")


def _recurrence(xw: Tensor, w_hh: Tensor, h0: Tensor, activation: str) -> Tuple[Tensor, Tensor]:
    """The registered op; half types on the CPU computed in float32, as backends.py's CPU backend does."""
    if xw.device.type == "cpu" and (xw.dtype == torch.float16 or xw.dtype == torch.bfloat16):
        h_all, h_last = torch.ops.rnn_fused.recurrence_forward(xw.float(), w_hh.float(), h0.float(), None,
                                                               activation)
        return h_all.to(xw.dtype), h_last.to(xw.dtype)
    return torch.ops.rnn_fused.recurrence_forward(xw, w_hh, h0, None, activation)


def cell_arguments(input: Tensor, hx: Optional[Tensor], hidden_size: int) -> Tuple[Tensor, Tensor, bool]:
    """nn.RNNCell's handling of its arguments, with its messages: the ranks checked, unbatched input as a
    batch of one, hx zeros when None. Returns (input [B, I], hx [B, H], is_batched). Shared by FusedRNNCell
    and its twin below, so written in TorchScript's subset."""
    if input.dim() != 1 and input.dim() != 2:
        raise ValueError(f"RNNCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
    if hx is not None and hx.dim() != 1 and hx.dim() != 2:
        raise ValueError(f"RNNCell: Expected hidden to be 1D or 2D, got {hx.dim()}D instead")
    is_batched = input.dim() == 2
    if not is_batched:
        input = input.unsqueeze(0)
    if hx is None:
        hx = torch.zeros(input.size(0), hidden_size, dtype=input.dtype, device=input.device)
    elif not is_batched:
        hx = hx.unsqueeze(0)
    return input, hx, is_batched


def check_cell_sizes(input: Tensor, hx: Tensor, input_size: int, hidden_size: int) -> None:
    """nn.RNNCell's size checks of (input [B, I], hx [B, H]), with its messages."""
    if input.size(1) != input_size:
        raise RuntimeError(f"input has inconsistent input_size: got {input.size(1)} expected {input_size}")
    if hx.size(0) != input.size(0):
        raise RuntimeError(f"Input batch size {input.size(0)} doesn't match hidden0 batch size {hx.size(0)}")
    if hx.size(1) != hidden_size:
        raise RuntimeError(f"hidden0 has inconsistent hidden_size: got {hx.size(1)}, expected {hidden_size}")


def _stack(tensors: List[Tensor]) -> Tensor:
    return torch.stack(tensors)


class ScriptedFusedRNN(nn.RNNBase):
    """FusedRNN for TorchScript: padded (or unbatched) input; see the module docstring."""

    def __init__(self, source: nn.RNNBase):
        nn.Module.__init__(self)
        for attr in ("mode", "input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
                     "bidirectional", "proj_size", "_flat_weights_names", "_all_weights"):
            setattr(self, attr, getattr(source, attr))
        for name in source._flat_weights_names:
            self.register_parameter(name, getattr(source, name))
        self._flat_weights = [getattr(self, name) for name in self._flat_weights_names]
        self.activation = "tanh" if source.mode == "RNN_TANH" else "relu"
        self.train(source.training)

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        num_directions = 2 if self.bidirectional else 1
        if input.dim() != 2 and input.dim() != 3:
            raise ValueError(f"RNN: Expected input to be 2D or 3D, got {input.dim()}D tensor instead")
        is_batched = input.dim() == 3
        if not is_batched:
            input = input.unsqueeze(0 if self.batch_first else 1)
            if hx is not None:
                if hx.dim() != 2:
                    raise RuntimeError(
                        f"For unbatched 2-D input, hx should also be 2-D but got {hx.dim()}-D tensor")
                hx = hx.unsqueeze(1)
        elif hx is not None and hx.dim() != 3:
            raise RuntimeError(f"For batched 3-D input, hx should also be 3-D but got {hx.dim()}-D tensor")
        x = input.transpose(0, 1) if self.batch_first else input  # [T, B, I]
        if hx is None:
            hx = torch.zeros(self.num_layers * num_directions, x.size(1), self.hidden_size, dtype=x.dtype,
                             device=x.device)
        self.check_forward_args(input, hx, None)  # nn.RNN's checks read batch_first themselves
        if x.size(0) == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        if hx.dtype != x.dtype:
            raise RuntimeError(f"hx dtype ({hx.dtype}) must match the input dtype ({x.dtype})")
        T, B, H = x.size(0), x.size(1), self.hidden_size
        layer_input = x.contiguous()
        h_n: List[Tensor] = []
        per_direction = 4 if self.bias else 2
        for layer in range(self.num_layers):
            w_ih: List[Tensor] = []
            w_hh: List[Tensor] = []
            bias: List[Tensor] = []
            for d in range(num_directions):
                base = (layer * num_directions + d) * per_direction
                w_ih.append(self._flat_weights[base])
                w_hh.append(self._flat_weights[base + 1])
                if self.bias:
                    bias.append(self._flat_weights[base + 2] + self._flat_weights[base + 3])
            w = torch.cat(w_ih, 0)  # [D*H, I]
            x2d = layer_input.flatten(0, 1)
            if self.bias:
                xw = torch.addmm(torch.cat(bias, 0), x2d, w.t())
            else:
                xw = torch.mm(x2d, w.t())
            h0 = hx[layer * num_directions:(layer + 1) * num_directions]
            h_all, h_last = _recurrence(xw.view(T, B, num_directions, H), _stack(w_hh), h0, self.activation)
            h_n.append(h_last)
            layer_input = h_all.reshape(T, B, num_directions * H)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, p=self.dropout, training=True)
        hidden = torch.cat(h_n, 0)
        output = layer_input.transpose(0, 1) if self.batch_first else layer_input
        if not is_batched:
            output = output.squeeze(0 if self.batch_first else 1)
            hidden = hidden.squeeze(1)
        return output, hidden


class ScriptedFusedRNNCell(nn.RNNCellBase):
    """FusedRNNCell for TorchScript: one step of the registered op (T = 1, D = 1)."""

    def __init__(self, source: nn.RNNCellBase):
        nn.Module.__init__(self)
        for attr in ("input_size", "hidden_size", "bias", "nonlinearity"):
            setattr(self, attr, getattr(source, attr))
        for name, p in source.named_parameters(recurse=False):
            self.register_parameter(name, p)
        if not self.bias:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.train(source.training)

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        input, hx, is_batched = cell_arguments(input, hx, self.hidden_size)
        check_cell_sizes(input, hx, self.input_size, self.hidden_size)
        b_ih, b_hh = self.bias_ih, self.bias_hh
        if b_ih is not None and b_hh is not None:
            xw = torch.addmm(b_ih + b_hh, input, self.weight_ih.t())
        else:
            xw = torch.mm(input, self.weight_ih.t())
        _, h_last = _recurrence(xw.view(1, input.size(0), 1, self.hidden_size), self.weight_hh.unsqueeze(0),
                                hx.unsqueeze(0), self.nonlinearity)
        h = h_last[0]
        return h if is_batched else h.squeeze(0)


def scriptable_twin(module: nn.Module) -> nn.Module:
    """The module's TorchScript twin (FusedRNN.__prepare_scriptable__ and FusedRNNCell's call this)."""
    check_scriptable(module)
    if isinstance(module, nn.RNNBase):
        return ScriptedFusedRNN(module)
    return ScriptedFusedRNNCell(module)

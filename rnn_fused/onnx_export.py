"""How a ``FusedRNN`` layer appears in an ONNX graph: one ONNX ``RNN`` node, for both of torch's exporters.

While ``torch.onnx.export`` runs (``torch.onnx.is_in_onnx_export()``), ``FusedRNN.forward`` hands each layer
to :func:`rnn_layer` here instead of the kernels. The graph then holds one ``RNN`` node per layer (opset 7+
semantics: ``X [T, B, I]``, ``W [D, H, I]``, ``R [D, H, H]``, ``B [D, 2H]`` = ``[b_ih, b_hh]``,
``initial_h [D, B, H]``; outputs ``Y [T, D, B, H]`` and ``Y_h [D, B, H]``), with the sequence and batch
axes left symbolic, so the model runs at any T and B in ONNX Runtime (its fused RNN kernel). nn.RNN's own
export with the default exporter unrolls every step and fixes T to the example's.

- The default exporter (``dynamo=True``, torch.export based): ``torch.onnx.ops.symbolic_multi_out``, the
  public way to put an ONNX operator into the exported graph.
- The TorchScript exporter (``dynamo=False``): it traces the model, so the layer runs as an
  ``autograd.Function`` whose ``symbolic`` emits the node; its ``forward`` computes the real values with the
  module's backend, so the trace sees correct shapes and values.

No extra argument is needed in the user's export call. tests/test_deploy.py exports every configuration
through both exporters and runs the result in ONNX Runtime, so a change in either torch API fails there.
"""

from __future__ import annotations

import torch
from torch import Tensor

ONNX_ACTIVATION = {"tanh": "Tanh", "relu": "Relu"}

# ONNX RNN's type constraint T: tensor(float16), tensor(float), tensor(double).
ONNX_DTYPES = (torch.float16, torch.float32, torch.float64)


def exporting() -> bool:
    """True while torch.onnx.export (either exporter) is tracing the model.

    Both exporters trace (TorchScript's with torch.jit's tracer, the default one under torch.export), so the
    ~1 us ``is_in_onnx_export`` is asked only while tracing: this runs on every eager call of the modules."""
    return (torch.jit.is_tracing() or torch.compiler.is_compiling()) and torch.onnx.is_in_onnx_export()


def check_exportable(input) -> None:
    """What FusedRNN cannot put into an ONNX ``RNN`` node raises here, naming the feature."""
    from torch.nn.utils.rnn import PackedSequence

    if isinstance(input, PackedSequence):
        raise RuntimeError(
            "rnn_fused: ONNX export of FusedRNN with a PackedSequence input is not supported (the ONNX RNN "
            "operator takes padded input); export with the padded tensor (torch.nn.utils.rnn."
            "pad_packed_sequence) instead")
    if isinstance(input, Tensor) and input.dtype not in ONNX_DTYPES:
        raise RuntimeError(f"rnn_fused: the ONNX RNN operator takes float16, float32 or float64, got {input.dtype}")
    # The BPTT options (bptt_clip, record_grad_norms) change only the backward, which an ONNX graph does not
    # hold: the exported forward is the same with or without them.


def rnn_layer(x: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None, b_hh: Tensor | None, h0: Tensor,
              activation: str, backend: str) -> tuple[Tensor, Tensor]:
    """One layer as one ONNX ``RNN`` node; same contract as ``functional.rnn_layer`` for padded input.

    ``x`` ``[T, B, I]``, ``w_ih`` ``[D, H, I]``, ``w_hh`` ``[D, H, H]``, ``b_ih``/``b_hh`` ``[D, H]`` or None,
    ``h0`` ``[D, B, H]``. Returns ``output`` ``[T, B, D*H]`` and ``h_last`` ``[D, B, H]``.
    """
    if torch.jit.is_tracing():  # the TorchScript exporter
        return _TracedRNNLayer.apply(x, w_ih, w_hh, b_ih, b_hh, h0, activation, backend)
    D, H, _ = w_ih.shape
    T, B = x.shape[0], x.shape[1]
    bias = None if b_ih is None else torch.cat([b_ih, b_hh], dim=1)
    y, y_h = torch.onnx.ops.symbolic_multi_out(
        "RNN", [x, w_ih, w_hh, bias, None, h0], _attributes(D, H, activation),
        dtypes=[x.dtype, x.dtype], shapes=[[T, D, B, H], [D, B, H]], version=14)
    return _output_layout(y, D, H), y_h


def rnn_cell(x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None, b_hh: Tensor | None,
             activation: str) -> Tensor:
    """One step as nn.RNNCell exports it (MatMul, Add, Tanh/Relu): a single step needs no RNN node."""
    z = torch.nn.functional.linear(x, w_ih, b_ih) + torch.nn.functional.linear(h, w_hh, b_hh)
    return torch.tanh(z) if activation == "tanh" else torch.relu(z)


def _attributes(D: int, H: int, activation: str) -> dict:
    return {"hidden_size": H, "direction": "bidirectional" if D == 2 else "forward",
            "activations": [ONNX_ACTIVATION[activation]] * D}


def _output_layout(y: Tensor, D: int, H: int) -> Tensor:
    """ONNX's ``Y [T, D, B, H]`` as nn.RNN's ``[T, B, D*H]`` (the directions side by side)."""
    return y.permute(0, 2, 1, 3).reshape(y.shape[0], y.shape[2], D * H)


class _TracedRNNLayer(torch.autograd.Function):
    """The layer for the TorchScript exporter: real values in ``forward``, one RNN node in ``symbolic``."""

    @staticmethod
    def forward(ctx, x, w_ih, w_hh, b_ih, b_hh, h0, activation, backend):
        from .functional import rnn_layer as fused_rnn_layer

        return fused_rnn_layer(x, w_ih, w_hh, b_ih, b_hh, h0, None, activation, backend)

    @staticmethod
    def symbolic(g, x, w_ih, w_hh, b_ih, b_hh, h0, activation, backend):
        D = w_ih.type().sizes()[0]
        H = w_ih.type().sizes()[1]
        bias = _missing(g) if b_ih is None else g.op("Concat", b_ih, b_hh, axis_i=1)
        attrs = _attributes(D, H, activation)
        y, y_h = g.op("RNN", x, w_ih, w_hh, bias, _missing(g), h0, outputs=2, hidden_size_i=attrs["hidden_size"],
                      direction_s=attrs["direction"], activations_s=attrs["activations"])
        y = g.op("Transpose", y, perm_i=[0, 2, 1, 3])  # [T, B, D, H]
        # Reshape's 0 copies T and B from the input, so both stay symbolic; -1 is D*H.
        shape = g.op("Constant", value_t=torch.tensor([0, 0, -1], dtype=torch.int64))
        return g.op("Reshape", y, shape), y_h


def _missing(g):
    """An omitted optional input of an ONNX node, as torch's own RNN symbolic writes it."""
    n = g.op("prim::Constant")
    n.setType(torch._C.OptionalType.ofTensor())
    return n

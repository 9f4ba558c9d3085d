"""Deployment paths of a model holding FusedRNN: ONNX (both exporters, run in ONNX Runtime), TorchScript,
torch.export + AOTInductor. Each exported artefact runs at a T and B other than the export example's and is
judged against float64 nn.RNN with the same weights (tests/conftest.py's rule)."""

import copy
import io
import itertools
from typing import Optional

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from rnn_fused import FusedRNN, FusedRNNCell

from .conftest import EXTENSION_ERROR, assert_matches

# In the test extra (pyproject.toml), so imported, not skipped: a missing one fails the suite.
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import onnxscript  # noqa: E402,F401  (the default ONNX exporter's translator)

I, H, OUT = 4, 16, 3
EXAMPLE = (2, 5)  # (B, T) of the export example
OTHER = (3, 9)  # (B, T) the exported model runs at

# Every configuration nn.RNN has, each option flipped at least once against a two-layer default.
CONFIGS = [
    dict(num_layers=2, batch_first=True),
    dict(num_layers=1),
    dict(num_layers=2, bidirectional=True),
    dict(num_layers=2, batch_first=True, bidirectional=True, nonlinearity="relu"),
    dict(num_layers=2, bias=False),
    dict(num_layers=3, nonlinearity="relu", batch_first=True),
]


def _name(cfg):
    return "-".join(f"{k}={v}" for k, v in cfg.items())


class Model(nn.Module):
    """The user's model: an RNN and a Linear head, hx optional."""

    def __init__(self, rnn: nn.Module):
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(rnn.hidden_size * (2 if rnn.bidirectional else 1), OUT)

    def forward(self, x: torch.Tensor, hx: Optional[torch.Tensor] = None):  # typed for torch.jit.script
        y, h = self.rnn(x, hx)
        return self.head(y), h


def _pair(cfg, seed=0):
    """(FusedRNN model, nn.RNN model) with the same weights."""
    torch.manual_seed(seed)
    ref = Model(nn.RNN(I, H, **cfg)).eval()
    ours = Model(FusedRNN(I, H, **cfg)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def _inputs(cfg, B, T, with_hx, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((B, T, I) if cfg.get("batch_first") else (T, B, I), generator=g)
    if not with_hx:
        return (x,)
    D = 2 if cfg.get("bidirectional") else 1
    return x, torch.randn(cfg["num_layers"] * D, B, H, generator=g)


def _judge(actual, ref_model, inputs, name):
    """``actual`` (numpy or tensors) against float64 nn.RNN, with float32 nn.RNN as the yardstick."""
    ref64 = copy.deepcopy(ref_model).double()
    with torch.no_grad():
        expected64 = ref64(*[t.double() for t in inputs])
        yardstick = ref_model(*inputs)
    for a, e, y, part in zip(actual, expected64, yardstick, ("output", "h_n")):
        assert_matches(torch.as_tensor(a), e, y, name=f"{name} {part}")


def _export(model, inputs, path, dynamo: bool):
    batch_axis = 0 if model.rnn.batch_first else 1
    names = ["x", "hx"][:len(inputs)]
    if dynamo:
        B, T = torch.export.Dim("batch"), torch.export.Dim("time")
        shapes = [{batch_axis: B, 1 - batch_axis: T}, {1: B}][:len(inputs)]
        torch.onnx.export(model, inputs, path, dynamo=True, input_names=names, dynamic_shapes=shapes,
                          verbose=False)
    else:
        axes = {"x": {batch_axis: "batch", 1 - batch_axis: "time"}, "hx": {1: "batch"}}
        torch.onnx.export(model, inputs, path, dynamo=False, input_names=names,
                          dynamic_axes={n: axes[n] for n in names})
    return onnx.load(path)


def _rnn_nodes(graph):
    return [n for n in graph.node if n.op_type == "RNN"]


@pytest.mark.skipif(EXTENSION_ERROR is not None, reason=f"extension: {EXTENSION_ERROR}")
@pytest.mark.parametrize("with_hx", [False, True], ids=["no-hx", "hx"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=_name)
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_onnx_export_is_one_rnn_node_per_layer_and_runs_at_other_shapes(tmp_path, dynamo, cfg, with_hx):
    ours, ref = _pair(cfg)
    example = _inputs(cfg, *EXAMPLE, with_hx)
    graph = _export(ours, example, str(tmp_path / "model.onnx"), dynamo).graph
    nodes = _rnn_nodes(graph)
    assert len(nodes) == cfg["num_layers"], [n.op_type for n in graph.node]
    # No per-step unrolling: the activation lives inside the RNN nodes only.
    assert not {"Tanh", "Relu", "Loop", "Scan"} & {n.op_type for n in graph.node}
    D = 2 if cfg.get("bidirectional") else 1
    activation = "Relu" if cfg.get("nonlinearity") == "relu" else "Tanh"
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["hidden_size"] == H
        assert attrs.get("direction", b"forward") == (b"bidirectional" if D == 2 else b"forward")
        assert attrs["activations"] == [activation.encode()] * D
        assert (node.input[3] != "") == cfg.get("bias", True), "B given exactly when the model has biases"

    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    other = _inputs(cfg, *OTHER, with_hx, seed=2)
    names = [i.name for i in session.get_inputs()]
    actual = session.run(None, dict(zip(names, (t.numpy() for t in other))))
    _judge(actual, ref, other, f"onnx {'dynamo' if dynamo else 'torchscript'} {_name(cfg)}")


@pytest.mark.skipif(EXTENSION_ERROR is not None, reason=f"extension: {EXTENSION_ERROR}")
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_onnx_export_keeps_the_users_call_working_and_the_bptt_options_export(tmp_path, dynamo):
    """A plain export call with no extra arguments, and a model trained with BPTT options: the options change
    only the backward, so the exported forward is the same."""
    torch.manual_seed(0)
    ref = Model(nn.RNN(I, H, num_layers=2)).eval()
    ours = Model(FusedRNN(I, H, num_layers=2, bptt_clip=1.0, record_grad_norms=True)).eval()
    ours.load_state_dict(ref.state_dict())
    x = _inputs({}, *EXAMPLE, False)
    path = str(tmp_path / "plain.onnx")
    torch.onnx.export(ours, x, path, dynamo=dynamo)
    assert len(_rnn_nodes(onnx.load(path).graph)) == 2
    actual = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {
        ort.InferenceSession(path).get_inputs()[0].name: x[0].numpy()})
    _judge(actual, ref, x, "plain export")


@pytest.mark.skipif(EXTENSION_ERROR is not None, reason=f"extension: {EXTENSION_ERROR}")
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_onnx_export_of_a_packed_sequence_names_the_feature(tmp_path, dynamo):
    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = FusedRNN(I, H)

        def forward(self, x, lengths):
            return self.rnn(pack_padded_sequence(x, lengths, enforce_sorted=False))[1]

    x, lengths = torch.randn(5, 2, I), torch.tensor([5, 3])
    with pytest.raises(Exception) as info:
        torch.onnx.export(Packed(), (x, lengths), str(tmp_path / "p.onnx"), dynamo=dynamo)
    chain = []
    e = info.value
    while e is not None:
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    assert any("PackedSequence" in m and "pad_packed_sequence" in m for m in chain), chain


@pytest.mark.skipif(EXTENSION_ERROR is not None, reason=f"extension: {EXTENSION_ERROR}")
def test_onnx_export_of_bfloat16_names_the_dtype(tmp_path):
    model = FusedRNN(I, H).to(torch.bfloat16)
    with pytest.raises(Exception) as info:
        torch.onnx.export(model, (torch.randn(5, 2, I, dtype=torch.bfloat16),), str(tmp_path / "b.onnx"),
                          dynamo=False)
    assert "bfloat16" in str(info.value)


# --- TorchScript ---------------------------------------------------------------------------------------

@pytest.mark.skipif(EXTENSION_ERROR is not None, reason=f"extension: {EXTENSION_ERROR}")
@pytest.mark.parametrize("with_hx", [False, True], ids=["no-hx", "hx"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=_name)
def test_torchscript_runs_our_kernel_and_matches_nn_rnn_forward_and_backward(cfg, with_hx):
    ours, ref = _pair(cfg)
    scripted = torch.jit.script(ours)
    assert "rnn_fused::recurrence_forward" in str(scripted.rnn.inlined_graph)
    assert list(scripted.state_dict()) == list(ref.state_dict())
    inputs = _inputs(cfg, *OTHER, with_hx, seed=3)
    _judge(scripted(*inputs), ref, inputs, f"torchscript {_name(cfg)}")
    # Backward through the scripted module reaches the shared parameters (the registered autograd rule).
    leaves = [t.clone().requires_grad_() for t in inputs]
    out, h = scripted(*leaves)
    (out.square().sum() + h.sum()).backward()
    ref64 = copy.deepcopy(ref).double()
    leaves64 = [t.detach().double().requires_grad_() for t in inputs]
    out64, h64 = ref64(*leaves64)
    (out64.square().sum() + h64.sum()).backward()
    ref32 = copy.deepcopy(ref)
    leaves32 = [t.detach().clone().requires_grad_() for t in inputs]
    out32, h32 = ref32(*leaves32)
    (out32.square().sum() + h32.sum()).backward()
    for (name, p), p64, p32 in zip(ours.named_parameters(), ref64.parameters(), ref32.parameters()):
        assert_matches(p.grad, p64.grad, p32.grad, name=f"grad {name}")
    for t, t64, t32 in zip(leaves, leaves64, leaves32):
        assert_matches(t.grad, t64.grad, t32.grad, name="grad input")


@pytest.mark.skipif(EXTENSION_ERROR is not None, reason=f"extension: {EXTENSION_ERROR}")
def test_torchscript_saves_loads_handles_unbatched_input_and_shares_parameters():
    ours, ref = _pair(dict(num_layers=2, bidirectional=True))
    scripted = torch.jit.script(ours)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    x = torch.randn(7, 3, I)
    _judge(loaded(x), ref, (x,), "loaded")
    _judge(scripted(x[:, 0]), ref, (x[:, 0],), "unbatched")
    with torch.no_grad():  # the scripted twin holds the eager module's Parameter objects
        ours.rnn.weight_hh_l0.mul_(0.5)
        ref.rnn.weight_hh_l0.mul_(0.5)
    _judge(scripted(x), ref, (x,), "after an in-place parameter update")


@pytest.mark.skipif(EXTENSION_ERROR is not None, reason=f"extension: {EXTENSION_ERROR}")
@pytest.mark.parametrize("bias,nonlinearity", list(itertools.product([True, False], ["tanh", "relu"])))
def test_torchscript_cell_matches_nn_rnncell(bias, nonlinearity):
    torch.manual_seed(0)
    ref = nn.RNNCell(I, H, bias=bias, nonlinearity=nonlinearity)
    ours = FusedRNNCell(I, H, bias=bias, nonlinearity=nonlinearity)
    ours.load_state_dict(ref.state_dict())
    scripted = torch.jit.script(ours)
    assert "rnn_fused::recurrence_forward" in str(scripted.inlined_graph)
    x, h = torch.randn(5, I), torch.randn(5, H)
    for args in [(x,), (x, h), (x[0], h[0])]:
        ref64 = copy.deepcopy(ref).double()
        with torch.no_grad():
            assert_matches(scripted(*args), ref64(*[a.double() for a in args]), ref(*args), name="cell")


@pytest.mark.skipif(EXTENSION_ERROR is not None, reason=f"extension: {EXTENSION_ERROR}")
@pytest.mark.parametrize("kwargs,feature", [
    (dict(bptt_clip=1.0), "bptt_clip"),
    (dict(record_grad_norms=True), "record_grad_norms"),
    (dict(backend="reference"), "'reference'"),
])
def test_torchscript_names_what_it_cannot_script(kwargs, feature):
    with pytest.raises(RuntimeError, match=feature):
        torch.jit.script(FusedRNN(I, H, **kwargs))


@pytest.mark.skipif(EXTENSION_ERROR is not None, reason=f"extension: {EXTENSION_ERROR}")
def test_torchscript_rejects_a_packed_sequence_by_type():
    scripted = torch.jit.script(FusedRNN(I, H))
    packed = pack_padded_sequence(torch.randn(5, 2, I), torch.tensor([5, 3]))
    with pytest.raises(RuntimeError, match="input"):
        scripted(packed)


@pytest.mark.skipif(EXTENSION_ERROR is not None, reason=f"extension: {EXTENSION_ERROR}")
def test_jit_trace_matches_nn_rnn():
    ours, ref = _pair(dict(num_layers=2, batch_first=True))
    x = _inputs(dict(batch_first=True), *EXAMPLE, False)
    traced = torch.jit.trace(ours, x)
    _judge(traced(*x), ref, x, "traced")


# --- torch.export + AOTInductor ------------------------------------------------------------------------

@pytest.mark.skipif(EXTENSION_ERROR is not None, reason=f"extension: {EXTENSION_ERROR}")
def test_aoti_package_with_dynamic_batch_and_time_runs_our_op_and_matches_eager(tmp_path):
    cfg = dict(num_layers=2, batch_first=True, bidirectional=True)
    ours, ref = _pair(cfg)
    example = _inputs(cfg, *EXAMPLE, False)
    batch, time = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("time", min=1, max=1 << 20)
    program = torch.export.export(ours, example, dynamic_shapes=({0: batch, 1: time},))
    code = program.graph_module.code  # our C++ ops (the whole stack, or per layer), not an unrolled loop
    assert "rnn_fused.rnn" in code or "rnn_fused.recurrence_forward" in code, code
    package = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "model.pt2"))
    loaded = torch._inductor.aoti_load_package(package)
    for B, T in [OTHER, (1, 1), (5, 33)]:
        x = _inputs(cfg, B, T, False, seed=B * T)
        _judge(loaded(*x), ref, x, f"aoti B={B} T={T}")


@pytest.mark.skipif(EXTENSION_ERROR is not None, reason=f"extension: {EXTENSION_ERROR}")
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("bias,nonlinearity", [(True, "tanh"), (False, "relu")])
def test_onnx_export_of_the_cell_runs_in_onnxruntime(tmp_path, dynamo, bias, nonlinearity):
    torch.manual_seed(0)
    ref = nn.RNNCell(I, H, bias=bias, nonlinearity=nonlinearity)
    ours = FusedRNNCell(I, H, bias=bias, nonlinearity=nonlinearity)
    ours.load_state_dict(ref.state_dict())
    x, h = torch.randn(2, I), torch.randn(2, H)
    path = str(tmp_path / "cell.onnx")
    if dynamo:
        batch = torch.export.Dim("batch")
        torch.onnx.export(ours, (x, h), path, dynamo=True, input_names=["x", "h"],
                          dynamic_shapes=({0: batch}, {0: batch}))
    else:
        torch.onnx.export(ours, (x, h), path, dynamo=False, input_names=["x", "h"],
                          dynamic_axes={"x": {0: "batch"}, "h": {0: "batch"}})
    x2, h2 = torch.randn(5, I), torch.randn(5, H)
    (actual,) = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(
        None, {"x": x2.numpy(), "h": h2.numpy()})
    with torch.no_grad():
        assert_matches(torch.as_tensor(actual), copy.deepcopy(ref).double()(x2.double(), h2.double()), ref(x2, h2),
                       name="cell")

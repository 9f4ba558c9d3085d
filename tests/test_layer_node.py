"""The layer's and the cell's autograd nodes (csrc/recorded_node.h; csrc/rnn_stack.cpp's recorded_layer,
csrc/rnn_cell.cpp's cell_step) are bare torch::autograd::Nodes, not a torch::autograd::Function's CppNode: what Function gave for free (compiled
autograd, node-creation hooks, the saved tensors' checks, hooks on the node) must still hold, as nn.RNN's
nodes give it."""

import pytest
import torch
from torch import nn

from rnn_fused import FusedRNN, FusedRNNCell
from .conftest import EXTENSION_ERROR

pytestmark = pytest.mark.skipif(EXTENSION_ERROR is not None, reason=f"extension: {EXTENSION_ERROR}")

F64 = torch.float64


def _model(**kw):
    torch.manual_seed(0)
    return FusedRNN(5, 7, backend="cpu", dtype=F64, **kw)


def _leaves(model, T=4, B=3):
    x = torch.randn(T, B, 5, dtype=F64, requires_grad=True)
    h0 = torch.randn(model.num_layers * (2 if model.bidirectional else 1), B, 7, dtype=F64, requires_grad=True)
    return x, h0, [x, h0, *model.parameters()]


def _loss(model, x, h0):
    out, h_n = model(x, h0)
    return out.square().sum() + h_n.sin().sum()


def test_the_node_is_the_layers_own():
    model = _model()
    x, h0, _ = _leaves(model)
    out, h_n = model(x, h0)
    assert out.grad_fn.name() == h_n.grad_fn.name() == "LayerBackward"
    assert out.grad_fn is h_n.grad_fn
    # edges to x, h0 and the four parameters, each leaf's AccumulateGrad
    assert [type(f).__name__ for f, _ in out.grad_fn.next_functions] == ["AccumulateGrad"] * 6
    cell = FusedRNNCell(5, 7, backend="cpu", dtype=F64)
    h = cell(torch.randn(3, 5, dtype=F64, requires_grad=True), torch.randn(3, 7, dtype=F64, requires_grad=True))
    assert h.grad_fn.name() == "CellBackward"
    assert [type(f).__name__ for f, _ in h.grad_fn.next_functions] == ["AccumulateGrad"] * 6


@pytest.mark.parametrize("kw", [dict(), dict(num_layers=2, bidirectional=True, nonlinearity="relu"),
                                dict(bias=False)], ids=["one-layer", "two-bidirectional-relu", "no-bias"])
def test_compiled_autograd_gives_the_eager_gradients(kw):
    """torch._dynamo.compiled_autograd runs the node's backward as an opaque function (apply_with_saved),
    as it does a C++ Function's: the same gradients as the eager engine."""
    from torch._dynamo import compiled_autograd

    model = _model(**kw)
    x, h0, leaves = _leaves(model)
    eager = torch.autograd.grad(_loss(model, x, h0), leaves)
    torch._dynamo.reset()
    loss = _loss(model, x, h0)
    with compiled_autograd._enable(torch.compile(backend="eager")):
        loss.backward()
    for leaf, want in zip(leaves, eager):
        torch.testing.assert_close(leaf.grad, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("nonlinearity,bias", [("tanh", True), ("relu", False)])
def test_compiled_autograd_gives_the_cells_eager_gradients(nonlinearity, bias):
    from torch._dynamo import compiled_autograd

    torch.manual_seed(0)
    cell = FusedRNNCell(5, 7, bias=bias, nonlinearity=nonlinearity, backend="cpu", dtype=F64)
    x, h = torch.randn(3, 5, dtype=F64, requires_grad=True), torch.randn(3, 7, dtype=F64, requires_grad=True)
    leaves = [x, h, *cell.parameters()]
    eager = torch.autograd.grad(cell(x, cell(x, h)).square().sum(), leaves)
    torch._dynamo.reset()
    loss = cell(x, cell(x, h)).square().sum()
    with compiled_autograd._enable(torch.compile(backend="eager")):
        loss.backward()
    for leaf, want in zip(leaves, eager):
        torch.testing.assert_close(leaf.grad, want, rtol=1e-12, atol=1e-12)


def test_backward_through_the_graph_a_second_time_raises():
    model = _model()
    x, h0, leaves = _leaves(model)
    loss = _loss(model, x, h0)
    first = torch.autograd.grad(loss, leaves, retain_graph=True)
    second = torch.autograd.grad(loss, leaves)  # retained: runs again, the same
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="a second time"):
        torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("changed", ["weight", "input", "output"])
def test_a_saved_tensor_changed_in_place_raises_as_nn_rnn(changed):
    """The node saves x, h0, the output and the weights as SavedVariables: a change in place between forward
    and backward is caught by the version counter, as nn.RNN's nodes catch it. nn.RNN's output is a stack of
    the steps' results, which its backward does not read, so it takes that change; ours reads the output (the
    activation's derivative), so it must raise."""
    for cls in (nn.RNN, FusedRNN) if changed != "output" else (FusedRNN,):
        torch.manual_seed(0)
        model = cls(5, 7, dtype=F64) if cls is nn.RNN else _model()
        x, h0, _ = _leaves(model)
        xi = x * 1  # a non-leaf input that can be changed in place
        out, _ = model(xi, h0)
        with torch.no_grad():
            {"weight": model.weight_hh_l0, "input": xi, "output": out}[changed].add_(1)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()


def test_node_creation_hooks_and_node_hooks_see_the_node():
    """torch.autograd.graph.node_creation_hook fires once for the layer's node, complete (its edges wired);
    hooks registered on the node run in the backward with its gradients."""
    model = _model()
    x, h0, leaves = _leaves(model)
    seen, ran = [], []

    def on_creation(node):
        if node.name() == "LayerBackward":
            seen.append(len(node.next_functions))
            node.register_prehook(lambda grad_outputs: ran.append(("pre", len(grad_outputs))))
            node.register_hook(lambda grad_inputs, grad_outputs: ran.append(("post", len(grad_inputs))))

    with torch.autograd.graph.node_creation_hook(on_creation):
        loss = _loss(model, x, h0)
    assert seen == [6]
    torch.autograd.grad(loss, leaves)
    assert ran == [("pre", 2), ("post", 6)]


def test_anomaly_mode_names_the_node():
    """Under detect_anomaly a NaN made by the node's backward is reported with the node's name: one infinite
    input saturates its step (tanh = +-1, so dz = 0 there) and dW_ih = dz^T x takes 0 * inf."""
    model = _model()
    x, h0, _ = _leaves(model)
    with torch.no_grad():
        x[1, 0, 2] = float("inf")
    with torch.autograd.detect_anomaly(check_nan=True):
        out, h_n = model(x, h0)
        assert torch.isfinite(out).all()
        with pytest.raises(RuntimeError, match="LayerBackward"):
            (out.sum() + h_n.sum()).backward()

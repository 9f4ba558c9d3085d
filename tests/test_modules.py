"""FusedRNN / FusedRNNCell as drop-ins for nn.RNN / nn.RNNCell: same numbers, same contract, same errors."""

import copy
import io
import itertools
import pickle
import warnings

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from rnn_fused import BackendUnavailableError, FusedRNN, FusedRNNCell

from .conftest import assert_matches, available_backends

CPU_BACKENDS = [b for b in available_backends("cpu", torch.float64) if b != "triton"]
# The Triton interpreter is slow: it runs a subset of the grid (see test_parity_grid_triton_subset).
TRITON_ON_CPU = "triton" in available_backends("cpu", torch.float32)


def _pair(backend, *args, dtype=torch.float64, seed=0, **kwargs):
    """nn.RNN and FusedRNN with identical weights (FusedRNN loads nn.RNN's state_dict)."""
    torch.manual_seed(seed)
    ref = torch.nn.RNN(*args, dtype=dtype, **kwargs)
    ours = FusedRNN(*args, dtype=dtype, backend=backend, **kwargs)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _run(module, x, hx, grad_seed=1):
    """Forward, a backward from fixed random output grads; returns outputs and every gradient."""
    x = x.detach().clone().requires_grad_()
    hx = hx.detach().clone().requires_grad_() if hx is not None else None
    module.zero_grad()
    out, h_n = module(x, hx)
    g = torch.Generator().manual_seed(grad_seed)
    d_out = torch.randn(out.shape, generator=g, dtype=out.dtype)
    d_hn = torch.randn(h_n.shape, generator=g, dtype=h_n.dtype)
    torch.autograd.backward([out, h_n], [d_out, d_hn])
    grads = {"input": x.grad, **({"hx": hx.grad} if hx is not None else {})}
    grads.update({n: p.grad for n, p in module.named_parameters()})
    return out, h_n, grads


def _compare(ours, ref, yardstick=None):
    (o, h, g), (ro, rh, rg) = ours, ref
    yo, yh, yg = yardstick if yardstick is not None else (None, None, {k: None for k in rg})
    assert_matches(o, ro, yo, name="output")
    assert_matches(h, rh, yh, name="h_n")
    assert g.keys() == rg.keys()
    for k in rg:
        assert_matches(g[k], rg[k], yg[k], name=f"grad {k}")


GRID = list(itertools.product([1, 2, 3], [True, False], [False, True], [False, True], ["tanh", "relu"],
                              [False, True]))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("num_layers,bias,batch_first,bidirectional,nonlinearity,with_hx", GRID)
def test_parity_grid_float64(backend, num_layers, bias, batch_first, bidirectional, nonlinearity, with_hx):
    ref, ours = _pair(backend, 4, 5, num_layers, nonlinearity, bias, batch_first, 0.0, bidirectional)
    T, B = 6, 3
    x = torch.randn((B, T, 4) if batch_first else (T, B, 4), dtype=torch.float64)
    hx = torch.randn(num_layers * (2 if bidirectional else 1), B, 5, dtype=torch.float64) if with_hx else None
    _compare(_run(ours, x, hx), _run(ref, x, hx))


@pytest.mark.skipif(not TRITON_ON_CPU, reason="triton backend unavailable here")
@pytest.mark.parametrize("num_layers,bias,batch_first,bidirectional,nonlinearity,with_hx",
                         [c for c in GRID if c[0] <= 2 and c[3] == c[5]])
def test_parity_grid_triton_subset(num_layers, bias, batch_first, bidirectional, nonlinearity, with_hx):
    ref64, _ = _pair("reference", 4, 5, num_layers, nonlinearity, bias, batch_first, 0.0, bidirectional)
    ref32, ours = _pair("triton", 4, 5, num_layers, nonlinearity, bias, batch_first, 0.0, bidirectional,
                        dtype=torch.float32)
    T, B = 4, 2
    x = torch.randn((B, T, 4) if batch_first else (T, B, 4), dtype=torch.float64)
    hx = torch.randn(num_layers * (2 if bidirectional else 1), B, 5, dtype=torch.float64) if with_hx else None
    f32 = (lambda t: t.float() if t is not None else None)
    _compare(_run(ours, f32(x), f32(hx)), _run(ref64, x, hx), _run(ref32, f32(x), f32(hx)))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("T,B,I,H", [(13, 7, 3, 17), (31, 2, 9, 65), (5, 33, 1, 129)])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_float32_awkward_sizes(backend, T, B, I, H, bidirectional):
    ref64, _ = _pair("reference", I, H, 2, bidirectional=bidirectional)
    ref32, ours = _pair(backend, I, H, 2, bidirectional=bidirectional, dtype=torch.float32)
    x, hx = torch.randn(T, B, I, dtype=torch.float64), torch.randn(2 * (1 + bidirectional), B, H, dtype=torch.float64)
    _compare(_run(ours, x.float(), hx.float()), _run(ref64, x, hx), _run(ref32, x.float(), hx.float()))


def _packed_run(module, padded, lengths, hx, enforce_sorted):
    padded = padded.detach().clone().requires_grad_()
    hx = hx.detach().clone().requires_grad_() if hx is not None else None
    module.zero_grad()
    packed = pack_padded_sequence(padded, lengths, enforce_sorted=enforce_sorted)
    out, h_n = module(packed, hx)
    out_padded, out_lengths = pad_packed_sequence(out)
    g = torch.Generator().manual_seed(3)
    (out_padded * torch.randn(out_padded.shape, generator=g, dtype=out_padded.dtype)).sum().backward(retain_graph=True)
    (h_n * torch.randn(h_n.shape, generator=g, dtype=h_n.dtype)).sum().backward()
    grads = {"input": padded.grad, **({"hx": hx.grad} if hx is not None else {})}
    grads.update({n: p.grad for n, p in module.named_parameters()})
    assert out_lengths.tolist() == list(lengths)
    return out_padded, h_n, grads


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("lengths,enforce_sorted", [([2, 7, 1, 5, 5], False), ([7, 5, 5, 2, 1], True),
                                                     ([1], True), ([3, 3], False)])
@pytest.mark.parametrize("with_hx", [False, True])
def test_packed_sequences(backend, bidirectional, lengths, enforce_sorted, with_hx):
    ref, ours = _pair(backend, 3, 4, 2, "tanh", True, False, 0.0, bidirectional)
    padded = torch.randn(max(lengths), len(lengths), 3, dtype=torch.float64)
    hx = torch.randn(2 * (1 + bidirectional), len(lengths), 4, dtype=torch.float64) if with_hx else None
    _compare(_packed_run(ours, padded, lengths, hx, enforce_sorted), _packed_run(ref, padded, lengths, hx, enforce_sorted))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_two_backward_passes_through_a_retained_graph(backend):
    """Gradients accumulate correctly over two backward calls (the bias-sharing trap in _layer_weights)."""
    ref, ours = _pair(backend, 3, 4, 2, bidirectional=True)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    for m in (ref, ours):
        m.zero_grad()
        out, h_n = m(x)
        out.sum().backward(retain_graph=True)
        h_n.sum().backward()
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert_matches(p.grad, q.grad, name=name)
    cell_ref = torch.nn.RNNCell(3, 4, dtype=torch.float64)
    cell = FusedRNNCell(3, 4, dtype=torch.float64, backend=backend)
    cell.load_state_dict(cell_ref.state_dict())
    for m in (cell_ref, cell):
        h = m(x[0])
        h.sum().backward(retain_graph=True)
        (2 * h).sum().backward()
    assert_matches(cell.bias_hh.grad, cell_ref.bias_hh.grad, name="cell bias_hh")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("with_hx", [False, True])
def test_unbatched_input(backend, batch_first, with_hx):
    ref, ours = _pair(backend, 3, 4, 2, batch_first=batch_first, bidirectional=True)
    x = torch.randn(6, 3, dtype=torch.float64)
    hx = torch.randn(4, 4, dtype=torch.float64) if with_hx else None
    _compare(_run(ours, x, hx), _run(ref, x, hx))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dropout_between_layers_train_and_eval(backend):
    ref, ours = _pair(backend, 3, 8, 3, dropout=0.5)
    x = torch.randn(5, 4, 3, dtype=torch.float64)
    ours.eval(), ref.eval()
    _compare(_run(ours, x, None), _run(ref, x, None))
    ours.train()
    torch.manual_seed(7)
    out_a, h_a = ours(x)
    torch.manual_seed(7)
    out_b, h_b = ours(x)
    assert torch.equal(out_a, out_b), "dropout must follow torch's RNG"
    torch.manual_seed(8)
    out_c, h_c = ours(x)
    assert not torch.equal(out_a, out_c), "dropout is not applied in training"
    assert torch.equal(h_a[0], h_c[0]), "the first layer's h_n is taken before any dropout"
    ours.dropout = 0.0  # reassigning dropout between calls takes effect
    ref.train()
    _compare(_run(ours, x, None), _run(ref.eval(), x, None))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_batch_forward_and_backward(backend):
    ref, ours = _pair(backend, 3, 4, 2, bidirectional=True)
    x = torch.randn(5, 0, 3, dtype=torch.float64)
    _compare(_run(ours, x, None), _run(ref, x, None))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bias,nonlinearity", [(True, "tanh"), (False, "relu")])
@pytest.mark.parametrize("batched,with_hx", [(True, True), (True, False), (False, True), (False, False)])
def test_cell(backend, bias, nonlinearity, batched, with_hx):
    torch.manual_seed(0)
    ref = torch.nn.RNNCell(4, 6, bias, nonlinearity, dtype=torch.float64)
    ours = FusedRNNCell(4, 6, bias, nonlinearity, dtype=torch.float64, backend=backend)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(*((3,) if batched else ()), 4, dtype=torch.float64)
    hx = torch.randn(*((3,) if batched else ()), 6, dtype=torch.float64) if with_hx else None

    def run(m):
        xi = x.clone().requires_grad_()
        hi = hx.clone().requires_grad_() if hx is not None else None
        m.zero_grad()
        h = m(xi, hi)
        (h * torch.linspace(-1, 1, h.numel(), dtype=h.dtype).view(h.shape)).sum().backward()
        grads = {"x": xi.grad, **({"hx": hi.grad} if hi is not None else {})}
        return h, grads | {n: p.grad for n, p in m.named_parameters()}

    (h, g), (rh, rg) = run(ours), run(ref)
    assert_matches(h, rh, name="h")
    for k in rg:
        assert_matches(g[k], rg[k], name=k)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_training_run_matches_nn_rnn(backend):
    """25 SGD steps with gradient clipping: the loss curves agree."""
    torch.manual_seed(0)
    ref, ours = _pair(backend, 5, 16, 2, dtype=torch.float32, bidirectional=True)
    head_ref = torch.nn.Linear(32, 1)
    head_ours = copy.deepcopy(head_ref)
    data = [(torch.randn(20, 8, 5), torch.randn(8, 1)) for _ in range(5)]
    losses = {}
    for name, rnn, head in (("ref", ref, head_ref), ("ours", ours, head_ours)):
        opt = torch.optim.SGD(list(rnn.parameters()) + list(head.parameters()), lr=0.1)
        losses[name] = []
        for step in range(25):
            x, y = data[step % len(data)]
            out, _ = rnn(x)
            loss = torch.nn.functional.mse_loss(head(out[-1]), y)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(rnn.parameters()) + list(head.parameters()), 1.0)
            opt.step()
            losses[name].append(loss.item())
    assert losses["ours"] == pytest.approx(losses["ref"], rel=1e-4, abs=1e-6)
    assert losses["ours"][-1] < losses["ours"][0], "the model did not train"


def test_state_dict_round_trip_and_repr():
    ref = torch.nn.RNN(3, 4, 2, "relu", bidirectional=True, batch_first=True)
    ours = FusedRNN(3, 4, 2, "relu", bidirectional=True, batch_first=True)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(ours.state_dict(), strict=True)
    assert repr(ours) == repr(ref).replace("RNN(", "FusedRNN(", 1).replace(")", ", backend='auto')", 1)
    ours.flatten_parameters()
    cell_repr = repr(FusedRNNCell(3, 4, False, "relu", backend="cpu"))
    assert cell_repr == "FusedRNNCell(3, 4, bias=False, nonlinearity=relu, backend='cpu')"


def test_module_utilities_work():
    torch.manual_seed(0)
    rnn = FusedRNN(3, 4, 2)
    x = torch.randn(5, 2, 3)
    expected = rnn(x)[0]
    assert torch.equal(copy.deepcopy(rnn)(x)[0], expected)
    assert torch.equal(pickle.loads(pickle.dumps(rnn))(x)[0], expected)
    buf = io.BytesIO()
    torch.save(rnn, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(x)[0], expected)
    doubled = {n: p.detach() * 2 for n, p in rnn.named_parameters()}
    plain = torch.nn.RNN(3, 4, 2)
    plain.load_state_dict(doubled)
    yardstick = plain(x)[0].detach()
    out_fc = torch.func.functional_call(rnn, doubled, (x,))[0]
    assert_matches(out_fc, plain.double()(x.double())[0], yardstick, name="functional_call")
    rnn64 = copy.deepcopy(rnn).double()
    assert rnn64.weight_hh_l0.dtype == torch.float64
    plain64 = torch.nn.RNN(3, 4, 2, dtype=torch.float64)
    plain64.load_state_dict(rnn64.state_dict())
    assert_matches(rnn64(x.double())[0], plain64(x.double())[0], name=".double()")
    rnn_to = copy.deepcopy(rnn).to(torch.float64)
    assert rnn_to(x.double())[0].dtype == torch.float64


# ---- errors: the same exception type and message as nn.RNN / nn.RNNCell --------------------------------

def _raised(fn):
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - we compare whatever was raised
        return type(err), str(err)
    return None


@pytest.mark.parametrize("args,kwargs", [
    ((4, 5), dict(nonlinearity="sigmoid")), ((4, 5), dict(proj_size=2)), ((4, 5), dict(dropout=2)),
    ((4, 5), dict(dropout=True)), ((0, 5), {}), ((4, 0), {}), ((4.0, 5), {}), ((4, 5, 0), {}),
    ((4, 5), dict(bias=1)), ((4, 5), dict(batch_first="yes")), ((4, 5), dict(nonlinearity=["tanh"])),
])
def test_constructor_errors_match_nn_rnn(args, kwargs):
    expected = _raised(lambda: torch.nn.RNN(*args, **kwargs))
    assert expected is not None
    assert _raised(lambda: FusedRNN(*args, **kwargs)) == expected


def test_dropout_with_one_layer_warns_like_nn_rnn():
    with warnings.catch_warnings(record=True) as ours:
        warnings.simplefilter("always")
        FusedRNN(4, 5, 1, dropout=0.3)
    with warnings.catch_warnings(record=True) as ref:
        warnings.simplefilter("always")
        torch.nn.RNN(4, 5, 1, dropout=0.3)
    assert [str(w.message) for w in ours] == [str(w.message) for w in ref] and ref


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match=r"backend must be one of"):
        FusedRNN(4, 5, backend="fast")


def test_unavailable_backend_says_why():
    rnn = FusedRNN(4, 5, backend="cuda")
    with pytest.raises(BackendUnavailableError, match=r"backend 'cuda' is unavailable: .*CUDA tensors"):
        rnn(torch.randn(3, 2, 4))
    with pytest.raises(BackendUnavailableError, match=r"backend 'triton' supports float32, float16, bfloat16, got float64"):
        FusedRNN(4, 5, backend="triton", dtype=torch.float64)(torch.randn(3, 2, 4, dtype=torch.float64))


@pytest.mark.parametrize("make_input", [
    lambda: (torch.randn(4),), lambda: (torch.randn(1, 2, 3, 4),), lambda: (torch.randn(6, 3, 7),),
    lambda: (torch.randn(6, 3, 4, dtype=torch.float64),), lambda: (torch.zeros(6, 3, 4, dtype=torch.int64),),
    lambda: (torch.randn(6, 3, 4), torch.randn(2, 4, 5)), lambda: (torch.randn(6, 3, 4), torch.randn(3, 5)),
    lambda: (torch.randn(6, 4), torch.randn(2, 1, 5)), lambda: (torch.randn(0, 3, 4),),
    lambda: (torch.randn(6, 3, 4), torch.randn(2, 3, 5, device="meta")),
])
def test_forward_errors_match_nn_rnn(make_input):
    torch.manual_seed(0)
    ref = torch.nn.RNN(4, 5, 2)
    ours = FusedRNN(4, 5, 2)
    args = make_input()
    expected = _raised(lambda: ref(*args))
    assert expected is not None
    assert _raised(lambda: ours(*args)) == expected


def test_hx_dtype_mismatch_raises_runtime_error_naming_hx():
    with pytest.raises(RuntimeError, match=r"hx dtype \(torch.float64\) must match the input dtype"):
        FusedRNN(4, 5)(torch.randn(6, 3, 4), torch.randn(1, 3, 5, dtype=torch.float64))


@pytest.mark.parametrize("make_input", [
    lambda: (torch.randn(1, 2, 4),), lambda: (torch.randn(2, 3),), lambda: (torch.randn(2, 4), torch.randn(3, 6)),
    lambda: (torch.randn(2, 4), torch.randn(6)), lambda: (torch.randn(2, 4), torch.randn(2, 7)),
    lambda: (torch.randn(2, 4), torch.randn(1, 2, 6)),
])
def test_cell_errors_match_nn_rnn_cell(make_input):
    ref, ours = torch.nn.RNNCell(4, 6), FusedRNNCell(4, 6)
    args = make_input()
    expected = _raised(lambda: ref(*args))
    assert expected is not None
    assert _raised(lambda: ours(*args)) == expected


@pytest.mark.parametrize("attribute,value", [("nonlinearity", "relu"), ("mode", "RNN_RELU")])
def test_activation_follows_mode_like_nn_rnn(attribute, value):
    """nn.RNN's forward reads self.mode, never self.nonlinearity: after setting either, both modules agree."""
    ref, ours = _pair("cpu", 3, 4, 1, "tanh")
    setattr(ref, attribute, value)
    setattr(ours, attribute, value)
    x = torch.randn(5, 2, 3, dtype=torch.float64) * 3
    _compare(_run(ours, x, None), _run(ref, x, None))


def test_unknown_mode_raises_like_nn_rnn():
    ref, ours = _pair("cpu", 3, 4)
    ref.mode = ours.mode = "GRU"
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    with pytest.raises(AssertionError, match="mode must be RNN_TANH or RNN_RELU, got GRU"):
        ref(x)
    with pytest.raises(AssertionError, match="mode must be RNN_TANH or RNN_RELU, got GRU"):
        ours(x)


def test_cell_with_input_size_zero_works_like_nn_rnn_cell():
    """nn.RNNCell accepts input_size 0 (only the recurrence and the biases act)."""
    torch.manual_seed(0)
    ref = torch.nn.RNNCell(0, 4, dtype=torch.float64)
    ours = FusedRNNCell(0, 4, dtype=torch.float64)
    ours.load_state_dict(ref.state_dict())
    x, hx = torch.randn(2, 0, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    out, expected = ours(x, hx), ref(x, hx)
    assert_matches(out, expected, name="h'")
    out.sum().backward()
    expected.sum().backward()
    for name, p in ours.named_parameters():
        assert_matches(p.grad, dict(ref.named_parameters())[name].grad, name=f"grad {name}")


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_fast_path_gives_the_general_paths_numbers(bidirectional, batch_first):
    """The one-call fast path (FusedRNN._fast_forward) and the general path, on the same call: the same output,
    h_n and gradients. On the CPU the fast path's layer (csrc/cpu/layer_cpu.cpp) makes the general path's GEMMs
    with the same arguments, so bit for bit; only the bias gradients sum the rows in another order."""
    torch.manual_seed(0)
    m = FusedRNN(5, 7, num_layers=2, bidirectional=bidirectional, batch_first=batch_first, backend="cpu",
                 dtype=torch.float64)
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4 if bidirectional else 2, 3 if batch_first else 4, 7, dtype=torch.float64)

    def run(path):
        x.grad = None
        m.zero_grad()
        out, h_n = path(x, h0)
        (out.square().sum() + h_n.sum()).backward()
        return [out, h_n, x.grad] + [p.grad for p in m.parameters()]

    names = ["output", "h_n", "grad input"] + [f"grad {n}" for n, _ in m.named_parameters()]
    for name, a, b in zip(names, run(m._fast_forward), run(m._general_forward)):
        if "bias" in name:
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13, msg=name)
        else:
            assert torch.equal(a, b), name

    def penalty(path):  # double backward (a gradient penalty) through the fast path's one node per layer
        out, h_n = path(x, h0)
        (dx,) = torch.autograd.grad(out.square().sum() + h_n.sum(), x, create_graph=True)
        return torch.autograd.grad(dx.square().sum(), list(m.parameters()))

    for a, b in zip(penalty(m._fast_forward), penalty(m._general_forward)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("bias", [True, False])
def test_cell_fast_path_matches_the_general_path(nonlinearity, bias):
    """FusedRNNCell's fast path (csrc/rnn_cell.cpp: two GEMMs and the activation, one autograd node) against
    its general path (the stack op, T = 1), float64: h', every gradient, and a double backward."""
    torch.manual_seed(0)
    cell = FusedRNNCell(5, 7, bias=bias, nonlinearity=nonlinearity, backend="cpu", dtype=torch.float64)
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    h = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)

    def run(path):
        out = path(x, h)
        leaves = [x, h, *cell.parameters()]
        grads = torch.autograd.grad(out.square().sum(), leaves, create_graph=True)
        penalty = torch.autograd.grad(sum(g.square().sum() for g in grads[:2]), list(cell.parameters()),
                                      allow_unused=True)
        return [out, *grads, *(torch.zeros(()) if p is None else p for p in penalty)]

    for a, b in zip(run(cell._fast_forward), run(cell._general_forward)):
        torch.testing.assert_close(a, b)


def test_fast_path_declines_what_the_general_path_handles():
    """Every call the fast path is not sure of returns None (the general path then runs it or raises nn.RNN's
    message): never an error of its own, never a silently different call."""
    m = FusedRNN(5, 7, backend="cpu")
    x, h0 = torch.randn(4, 3, 5), torch.randn(1, 3, 7)
    assert m._fast_forward(x, h0) is not None
    packed = pack_padded_sequence(x, [4, 2, 1])
    declined = {
        "packed": (packed, None), "unbatched": (x[:, 0], None), "input_size": (torch.randn(4, 3, 6), None),
        "hx shape": (x, torch.randn(1, 2, 7)), "hx rank": (x, torch.randn(3, 7)), "dtype": (x.double(), None),
        "hx dtype": (x, h0.double()), "no steps": (x[:0], None), "meta": (x.to("meta"), None),
    }
    for name, (inp, hx) in declined.items():
        assert m._fast_forward(inp, hx) is None, name
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m._fast_forward(x, h0) is None, "autocast"
    assert FusedRNN(5, 7, backend="reference")._fast_forward(x, h0) is None, "reference backend"
    assert FusedRNN(5, 7, backend="cpu", bptt_clip=1.0)._fast_forward(x, h0) is None, "bptt options"
    # An attribute not of the exact type the fast path reads (it reads the instance dict: csrc/eager_call.cpp)
    # declines; the general path reads it as Python does and the call still matches nn.RNN's contract.
    expected = m(x, h0)
    for attr, value in (("training", 1), ("batch_first", 0), ("num_layers", True), ("record_grad_norms", 0)):
        old = getattr(m, attr)
        setattr(m, attr, value)
        try:
            assert m._fast_forward(x, h0) is None, attr
            for a, b in zip(m(x, h0), expected):
                torch.testing.assert_close(a, b, msg=attr)
        finally:
            setattr(m, attr, old)
    m.double()
    assert m._fast_forward(x, h0) is None, "parameters of another dtype"
    cell = FusedRNNCell(5, 7, backend="cpu")
    for name, (inp, hx) in {"unbatched": (torch.randn(5), None), "hx": (torch.randn(3, 5), torch.randn(2, 7)),
                            "input_size": (torch.randn(3, 4), None)}.items():
        assert cell._fast_forward(inp, hx) is None, f"cell {name}"


@pytest.mark.parametrize("cls", ["FusedRNN", "FusedRNNCell"])
def test_a_long_fast_path_call_lets_other_threads_run(cls, one_thread):
    """The fast path releases the GIL around a call of >= 2^16 multiply-adds (csrc/eager_call.cpp; below that
    it keeps it: releasing costs ~0.3 us). Another thread counting meanwhile must not stall for the call. One
    torch thread, so the call's length does not shrink with a machine's core count."""
    import threading
    import time
    torch.manual_seed(0)
    # Sized for ~0.1 s on one core at oneDNN's GEMM rate (an AMD EPYC Zen 5 ran T = 1500 in 40 ms).
    if cls == "FusedRNN":
        module, args = FusedRNN(256, 256, backend="cpu"), (torch.randn(4000, 16, 256),)
    else:
        module, args = FusedRNNCell(1024, 1024, backend="cpu"), (torch.randn(8192, 1024),)

    def run():
        with torch.no_grad():
            module(*args)

    started = time.perf_counter()
    run()
    alone = time.perf_counter() - started
    worker = threading.Thread(target=run)
    stamps = [time.perf_counter()]
    worker.start()
    while worker.is_alive():
        stamps.append(time.perf_counter())
    worker.join()
    longest_stall = max(b - a for a, b in zip(stamps, stamps[1:]))
    assert alone > 0.04  # long against the interpreter's 5 ms switch interval
    assert longest_stall < alone / 2, (longest_stall, alone)

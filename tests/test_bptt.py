"""In-BPTT clipping and gradient-flow diagnostics (rnn_fused/bptt.py, rnn_fused/diagnostics.py).

The yardstick is independent of every backend, the reference included: an RNN unrolled one sequence at a
time with one autograd node per hidden state h_t. ``retain_grad`` on each h_t gives dL/dh_t; the clip rule
is a hook on h_t that sees dL/dh_t (everything flowing into h_t: its output and the next step) and returns
the clipped value, which is then what flows into act', W_hh, W_ih and the earlier steps.
"""

import math

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from rnn_fused import FusedRNN, reference
from rnn_fused.bptt import BPTTOptions, backend_ops
from rnn_fused.diagnostics import GradFlow, plot_grad_flow, spectral_radius

from .conftest import EXTENSION_ERROR, HAS_CUDA, assert_matches, available_backends

CPU_BACKENDS = [b for b in available_backends("cpu", torch.float64) if b != "triton"]
TRITON_ON_CPU = "triton" in available_backends("cpu", torch.float32)
CLIPS = [("none", None), ("value", 0.05), ("norm", 0.2)]  # small enough to bind at most steps


def _clip_rule(g, mode, clip):
    """The documented rule, written here again (not imported) so the test does not trust reference.py."""
    if mode == "value":
        return g.clamp(-clip, clip)
    if mode == "norm":
        n = g.norm()
        return g * (clip / n) if n > clip else g
    return g


def unrolled(params, x, lengths, h0, num_layers, D, act, clip_mode, clip):
    """Runs each sequence alone, returns (outputs [per sequence: [len, D*H]], h_n [L*D, B, H], grads),
    where grads[l][d][b][t] is filled with dL/dh_t (before clipping) by the backward.

    params: dict of nn.RNN's parameter names -> tensors; x [T, B, I] padded; lengths: list of ints.
    """
    f = torch.tanh if act == "tanh" else torch.relu
    B = x.shape[1]
    outputs, finals = [], [[None] * B for _ in range(num_layers * D)]
    grads = [[[{} for _ in range(B)] for _ in range(D)] for _ in range(num_layers)]
    for b in range(B):
        inp = x[:lengths[b], b]
        for layer in range(num_layers):
            outs = []
            for d in range(D):
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                w_ih, w_hh = params["weight_ih" + sfx], params["weight_hh" + sfx]
                b_ih, b_hh = params.get("bias_ih" + sfx), params.get("bias_hh" + sfx)
                h = h0[layer * D + d, b]
                hs = [None] * lengths[b]
                for t in (range(lengths[b]) if d == 0 else reversed(range(lengths[b]))):
                    z = inp[t] @ w_ih.T + h @ w_hh.T
                    if b_ih is not None:
                        z = z + b_ih + b_hh
                    h = f(z)

                    def hook(g, store=grads[layer][d][b], t=t):
                        store[t] = g.detach().clone()
                        return _clip_rule(g, clip_mode, clip)

                    h.register_hook(hook)
                    hs[t] = h
                finals[layer * D + d][b] = h
                outs.append(torch.stack(hs))
            inp = torch.cat(outs, -1)
        outputs.append(inp)
    h_n = torch.stack([torch.stack(row) for row in finals])
    return outputs, h_n, grads


def _setup(num_layers, bidirectional, packed, act, dtype=torch.float64, seed=0, T=6, B=3, I=4, H=5):
    torch.manual_seed(seed)
    D = 2 if bidirectional else 1
    module_args = dict(input_size=I, hidden_size=H, num_layers=num_layers, nonlinearity=act,
                       bidirectional=bidirectional, dtype=dtype)
    params = {k: v.detach() for k, v in torch.nn.RNN(**module_args).state_dict().items()}
    lengths = [T, T - 2, T - 3] if packed else [T] * B
    x = torch.randn(T, B, I, dtype=dtype)
    h0 = torch.randn(num_layers * D, B, H, dtype=dtype)
    w_out = torch.randn(T, B, D * H, dtype=dtype)  # loss = sum(w_out * output) + sum(w_hn * h_n)
    w_hn = torch.randn(num_layers * D, B, H, dtype=dtype)
    return module_args, params, lengths, x, h0, w_out, w_hn


def _leaf(t, dtype):
    """A fresh leaf copy (the setup's tensors are shared by several runs)."""
    return t.detach().to(dtype, copy=True).requires_grad_()


def _expected(setup, clip_mode, clip, dtype):
    module_args, params, lengths, x, h0, w_out, w_hn = setup
    L, D = module_args["num_layers"], 2 if module_args["bidirectional"] else 1
    leaves = {k: _leaf(v, dtype) for k, v in params.items()}
    xs, h0s = _leaf(x, dtype), _leaf(h0, dtype)
    outs, h_n, grads = unrolled(leaves, xs, lengths, h0s, L, D, module_args["nonlinearity"], clip_mode, clip)
    loss = sum((o * w_out[:len(o), b].to(dtype)).sum() for b, o in enumerate(outs)) + (h_n * w_hn.to(dtype)).sum()
    loss.backward()
    T, B = x.shape[:2]
    norms = torch.full((L, D, T, B), math.nan, dtype=torch.float64)
    for layer in range(L):
        for d in range(D):
            for b in range(B):
                for t, g in grads[layer][d][b].items():
                    norms[layer, d, t, b] = g.double().norm()
    param_grads = {k: v.grad for k, v in leaves.items()}
    return norms, param_grads, xs.grad, h0s.grad


def _ours(setup, backend, clip_mode, clip, dtype, record=True, device="cpu"):
    module_args, params, lengths, x, h0, w_out, w_hn = setup
    kwargs = dict(module_args, dtype=dtype, device=device)
    if clip_mode != "none":
        kwargs.update(bptt_clip=clip, bptt_clip_mode=clip_mode)
    rnn = FusedRNN(**kwargs, backend=backend, record_grad_norms=record)
    rnn.load_state_dict({k: v.to(dtype) for k, v in params.items()})
    xs, h0s = _leaf(x.to(device), dtype), _leaf(h0.to(device), dtype)
    w_out, w_hn = w_out.to(device), w_hn.to(device)
    packed = len(set(lengths)) > 1
    if packed:
        # enforce_sorted=False on a deliberately unsorted batch: the diagnostics must come back in the
        # caller's order
        order = [1, 0, 2]
        inp = pack_padded_sequence(xs[:, order], [lengths[i] for i in order], enforce_sorted=False)
        out, h_n = rnn(inp, h0s[:, order])
        out, _ = pad_packed_sequence(out, total_length=x.shape[0])
        inverse = [order.index(i) for i in range(len(order))]
        out, h_n = out[:, inverse], h_n[:, inverse]
    else:
        out, h_n = rnn(xs, h0s)
    loss = (out * w_out.to(dtype)).sum() + (h_n * w_hn.to(dtype)).sum()
    loss.backward()
    flow = rnn.grad_flow
    norms = None
    if flow is not None:
        norms = flow.sequence_norms()
        if packed:
            norms = norms[..., inverse]
    return (rnn, flow, norms, {k: v.grad.cpu() for k, v in rnn.named_parameters()}, xs.grad.cpu(),
            h0s.grad.cpu())


def _compare(setup, backend, clip_mode, clip, dtype, device="cpu"):
    ref_norms, ref_pgrads, ref_dx, ref_dh0 = _expected(setup, clip_mode, clip, torch.float64)
    yard = _expected(setup, clip_mode, clip, dtype) if dtype != torch.float64 else (None,) * 4
    rnn, flow, norms, pgrads, dx, dh0 = _ours(setup, backend, clip_mode, clip, dtype, device=device)
    assert flow.complete
    assert torch.equal(norms.isnan(), ref_norms.isnan()), "steps present differ"
    present = ~ref_norms.isnan()
    assert_matches(norms[present], ref_norms[present], None if yard[0] is None else yard[0][present],
                   name="||dL/dh_t||", precision=dtype)
    step = ref_norms.nan_to_num(0).square().sum(-1).sqrt()
    step_yard = None if yard[0] is None else yard[0].nan_to_num(0).square().sum(-1).sqrt()
    assert_matches(flow.step_norms(), step, step_yard, name="step norms", precision=dtype)
    for name, g in pgrads.items():
        assert_matches(g, ref_pgrads[name], None if yard[1] is None else yard[1][name], name=name)
    assert_matches(dx, ref_dx, yard[2], name="d input")
    assert_matches(dh0, ref_dh0, yard[3], name="d h0")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("clip_mode,clip", CLIPS)
@pytest.mark.parametrize("num_layers,bidirectional", [(1, False), (1, True), (2, False), (2, True)])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("act", ["tanh", "relu"])
def test_norms_and_clipping_match_unrolled_autograd(backend, clip_mode, clip, num_layers, bidirectional, packed,
                                                     act):
    assert EXTENSION_ERROR is None or backend == "reference", EXTENSION_ERROR
    setup = _setup(num_layers, bidirectional, packed, act)
    _compare(setup, backend, clip_mode, clip, torch.float64)


@pytest.mark.skipif(not TRITON_ON_CPU, reason="triton is not installed")
@pytest.mark.parametrize("clip_mode,clip", CLIPS)
@pytest.mark.parametrize("packed", [False, True])
def test_triton_norms_and_clipping_match_unrolled_autograd(clip_mode, clip, packed):
    setup = _setup(2, True, packed, "tanh")
    _compare(setup, "triton", clip_mode, clip, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["auto", "stepwise"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("clip_mode,clip", CLIPS)
@pytest.mark.parametrize("packed", [False, True])
def test_cuda_norms_and_clipping_match_unrolled_autograd(monkeypatch, kernel, dtype, clip_mode, clip, packed):
    """The CUDA backend (an optioned backward always runs the stepwise kernels; 'auto' lets the forward
    take the persistent kernel)."""
    monkeypatch.setenv("RNN_FUSED_CUDA_KERNEL", kernel)
    setup = _setup(2, True, packed, "tanh", H=37)
    _compare(setup, "cuda", clip_mode, clip, dtype, device="cuda")


@pytest.mark.gpu
def test_cuda_forced_persistent_backward_refuses_options(monkeypatch):
    monkeypatch.setenv("RNN_FUSED_CUDA_KERNEL", "persistent")
    xw, w_hh, h0, _ = _op_problem(1, 8, 3, 2, False, torch.float32)
    xw, w_hh, h0 = xw.cuda(), w_hh.cuda(), h0.cuda()
    h_all, _ = backend_ops("cuda")[0](xw, w_hh, h0, None, "tanh")
    with pytest.raises(RuntimeError, match="persistent backward does not implement clipping"):
        backend_ops("cuda")[1](w_hh, h_all, h0, None, None, None, "tanh", "norm", 1.0, True)


def _op_problem(D, H, T, B, packed, dtype, seed=3):
    torch.manual_seed(seed)
    bs = None
    if packed:
        lengths = sorted(torch.randint(1, T + 1, (B,)).tolist(), reverse=True)
        lengths[0] = T
        bs = torch.tensor([sum(l > t for l in lengths) for t in range(T)])
        xw = torch.randn(int(bs.sum()), D, H, dtype=dtype)
    else:
        xw = torch.randn(T, B, D, H, dtype=dtype)
    w_hh = torch.randn(D, H, H, dtype=dtype) * (1.2 / H ** 0.5)
    h0 = torch.randn(D, B, H, dtype=dtype)
    return xw, w_hh, h0, bs


def _op_case_ids():
    # (backend, H, B): large enough for the CPU's BLAS step, the Triton step kernel's several K chunks and
    # column programs, and more than one batch tile; odd sizes on purpose.
    cases = [(b, 7, 5) for b in CPU_BACKENDS] + ([("cpu", 70, 17)] if "cpu" in CPU_BACKENDS else [])
    if TRITON_ON_CPU:
        cases += [("triton", 7, 5), ("triton-step", 70, 17)]
    if HAS_CUDA:
        cases += [pytest.param("cuda", 7, 5, marks=pytest.mark.gpu), pytest.param("cuda", 300, 70, marks=pytest.mark.gpu)]
    return cases


@pytest.mark.parametrize("backend,H,B", _op_case_ids())
@pytest.mark.parametrize("clip_mode,clip", CLIPS)
@pytest.mark.parametrize("packed", [False, True])
def test_backward_op_options_match_reference(monkeypatch, backend, H, B, clip_mode, clip, packed):
    """The op boundary itself: (dz, dh0, grad_norm) with options against the reference op in float64."""
    dtype = torch.float32 if backend.startswith("triton") else torch.float64
    if backend == "triton-step":
        from rnn_fused.triton import recurrence as K

        monkeypatch.setattr(K, "MAX_REGISTER_H", 0)
        backend = "triton"
    clip = clip or 0.0
    xw, w_hh, h0, bs = _op_problem(2, H, 5, B, packed, torch.float64)
    h_all, _ = reference.recurrence_forward(xw, w_hh, h0, bs, "tanh")
    dh_all, dh_last = torch.randn_like(h_all), torch.randn(2, B, H, dtype=torch.float64)
    args = (w_hh, h_all, h0, dh_all, dh_last)
    ref = reference.recurrence_backward(*args, bs, "tanh", clip_mode, clip, True)
    yard = reference.recurrence_backward(*(t.to(dtype) for t in args), bs, "tanh", clip_mode, clip, True) \
        if dtype != torch.float64 else (None,) * 3
    device = "cuda" if backend == "cuda" else "cpu"
    ours = backend_ops(backend)[1](*(t.to(device, dtype) for t in args), bs, "tanh", clip_mode, clip, True)
    ours = [t.cpu() for t in ours]
    assert ours[2].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    for name, a, r, y in zip(["dz", "dh0", "grad_norm"], ours, ref, yard):
        assert_matches(a, r, y, name=f"{backend} {name}", precision=dtype)
    # without recording: an empty grad_norm, and the same dz
    plain = backend_ops(backend)[1](*(t.to(device, dtype) for t in args), bs, "tanh", clip_mode, clip, False)
    assert plain[2].shape == (0,) and torch.equal(plain[0].cpu(), ours[0])


@pytest.mark.parametrize("backend", CPU_BACKENDS + (["triton"] if TRITON_ON_CPU else []) +
                         ([pytest.param("cuda", marks=pytest.mark.gpu)] if HAS_CUDA else []))
def test_vanishing_norms_are_recorded_not_flushed_to_zero(backend):
    """In float32 a gradient of 1e-30 has a square of 0: the norms must be summed in float64 to read 1e-30
    (the vanishing-gradient plots are exactly about such numbers)."""
    device = "cuda" if backend == "cuda" else "cpu"
    xw, w_hh, h0, _ = _op_problem(1, 6, 3, 2, False, torch.float32)
    xw, w_hh, h0 = xw.to(device), w_hh.to(device), h0.to(device)
    h_all, _ = backend_ops(backend)[0](xw, w_hh, h0, None, "tanh")
    dh_all = torch.randn_like(h_all) * 1e-30
    _, _, norms = backend_ops(backend)[1](w_hh, h_all, h0, dh_all, None, None, "tanh", "norm", 1e-32, True)
    expected = reference.recurrence_backward(w_hh.double().cpu(), h_all.double().cpu(), h0.double().cpu(),
                                             dh_all.double().cpu(), None, None, "tanh", "norm", 1e-32, True)[2]
    assert (expected > 1e-31).all() and (expected < 1e-28).all()
    torch.testing.assert_close(norms.cpu().double(), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS + (["triton"] if TRITON_ON_CPU else []))
def test_norm_clip_turns_a_nan_row_into_nan_and_value_clip_keeps_other_elements(backend):
    dtype = torch.float32 if backend == "triton" else torch.float64
    xw, w_hh, h0, _ = _op_problem(1, 6, 3, 2, False, dtype)
    h_all, _ = backend_ops(backend)[0](xw, w_hh, h0, None, "tanh")
    dh_all = torch.randn_like(h_all)
    dh_all[2, 0, 0, 1] = math.nan  # the last step of sequence 0
    backward = backend_ops(backend)[1]
    dz, _, sq = backward(w_hh, h_all, h0, dh_all, None, None, "tanh", "norm", 1.0, True)
    assert dz[2, 0].isnan().all() and not dz[2, 1].isnan().any() and sq[2, 0].isnan() and not sq[2, 1].isnan()
    dz, _, _ = backward(w_hh, h_all, h0, dh_all, None, None, "tanh", "value", 1.0, False)
    assert dz[2, 0, 0, 1].isnan() and dz[2, 0, 0].isnan().sum() == 1


def test_clip_bounds_every_step():
    """What the clip promises: no step's g_t, as it enters act', is larger than the bound."""
    setup = _setup(1, False, False, "tanh", T=12)
    _, params, lengths, x, h0, w_out, w_hn = setup
    big = {k: (v * 4 if k.startswith("weight_hh") else v) for k, v in params.items()}  # exploding
    setup = (setup[0], big, lengths, x, h0, w_out * 10, w_hn)
    for mode, clip in [("norm", 0.5), ("value", 0.1)]:
        _, _, norms, _, _, _ = _ours(setup, "reference", mode, clip, torch.float64)
        assert (norms > clip).any()  # the recorded norms are taken before the clip: they do exceed it
    # op level: every dz row is clip(g) * act', so |dz| <= |clip(g)| <= bound
    xw, w_hh, h0_, _ = _op_problem(1, 6, 12, 3, False, torch.float64)
    w_hh = w_hh * 4
    h_all, _ = reference.recurrence_forward(xw, w_hh, h0_, None, "tanh")
    dh_all = torch.randn_like(h_all) * 10
    dz, _, norms = reference.recurrence_backward(w_hh, h_all, h0_, dh_all, None, None, "tanh", "norm", 0.5, True)
    assert (norms > 0.5).any() and (dz.norm(dim=-1) <= 0.5 + 1e-12).all()
    dz, _, _ = reference.recurrence_backward(w_hh, h_all, h0_, dh_all, None, None, "tanh", "value", 0.1, False)
    assert (dz.abs() <= 0.1 + 1e-12).all()


def test_no_backward_raises_and_an_unused_layer_has_zero_norms():
    rnn = FusedRNN(3, 4, num_layers=2, backend="reference", record_grad_norms=True, dtype=torch.float64)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    out, h_n = rnn(x)
    with pytest.raises(RuntimeError, match="no gradient norms recorded yet"):
        rnn.grad_flow.step_norms()
    h_n[0].sum().backward()  # only layer 0's final state: dL/dh_t of layer 1 is zero
    norms = rnn.grad_flow.step_norms()
    assert norms.shape == (2, 1, 5) and (norms[1] == 0).all() and (norms[0] > 0).all()
    assert rnn.grad_flow.complete
    # a later forward starts a new record, which its backward fills
    first = rnn.grad_flow
    out, _ = rnn(x)
    second = rnn.grad_flow
    assert second is not first and not second.complete
    out.sum().backward()
    assert second.complete and not torch.equal(second.step_norms(), first.step_norms())


def test_spectral_radius():
    w = torch.tensor([[0.0, 2.0], [-2.0, 0.0]])  # eigenvalues +-2i
    assert spectral_radius(w) == pytest.approx(2.0)
    q, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    assert spectral_radius(0.7 * q) == pytest.approx(0.7)
    with pytest.raises(ValueError, match=r"square matrix \[H, H\]"):
        spectral_radius(torch.randn(2, 3))
    rnn = FusedRNN(3, 8, bidirectional=True, backend="reference", record_grad_norms=True)
    with torch.no_grad():
        rnn.weight_hh_l0.copy_(0.7 * q)
        rnn.weight_hh_l0_reverse.copy_(1.3 * q)
    rnn(torch.randn(4, 2, 3))
    radius = rnn.grad_flow.spectral_radius
    assert radius.shape == (1, 2) and radius[0].tolist() == pytest.approx([0.7, 1.3], rel=1e-5)


def test_plot_grad_flow_writes_a_labelled_png(tmp_path):
    rnn = FusedRNN(3, 4, num_layers=2, bidirectional=True, backend="reference", record_grad_norms=True)
    out, _ = rnn(torch.randn(7, 2, 3))
    out[-1].sum().backward()
    path = tmp_path / "flow.png"
    fig = plot_grad_flow(rnn.grad_flow, path, title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    ax = fig.axes[0]
    assert ax.get_xlabel() == "time step t" and ax.get_ylabel() == "||dL/dh_t||" and ax.get_yscale() == "log"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert len(labels) == 4 and all("ρ(W_hh)" in s for s in labels) and "layer 1 reverse" in labels[3]
    assert len(ax.lines) == 4 and len(ax.lines[0].get_xdata()) == 7


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(bptt_clip=0.0), ValueError, r"bptt_clip must be a positive finite number or None, got 0.0"),
    (dict(bptt_clip=math.inf), ValueError, r"bptt_clip must be a positive finite number"),
    (dict(bptt_clip="1"), TypeError, r"bptt_clip must be a positive number or None, got str"),
    (dict(bptt_clip=1.0, bptt_clip_mode="global"), ValueError, r"bptt_clip_mode must be 'norm' or 'value', got 'global'"),
    (dict(record_grad_norms=1), TypeError, r"record_grad_norms must be a bool, got int"),
])
def test_module_rejects_bad_bptt_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        FusedRNN(3, 4, **kwargs)


@pytest.mark.parametrize("backend", CPU_BACKENDS + (["triton"] if TRITON_ON_CPU else []))
def test_ops_reject_bad_clip_arguments(backend):
    dtype = torch.float32
    xw, w_hh, h0, _ = _op_problem(1, 4, 2, 2, False, dtype)
    h_all, _ = backend_ops(backend)[0](xw, w_hh, h0, None, "tanh")
    backward = backend_ops(backend)[1]
    # One rule (rnn_fused/contract.py check_clip), one exception type and message on every backend: the C++
    # op's RuntimeError.
    with pytest.raises(RuntimeError, match=r"rnn_fused: clip_mode must be 'none', 'value' or 'norm', got 'max'"):
        backward(w_hh, h_all, h0, None, None, None, "tanh", "max", 1.0, False)
    with pytest.raises(RuntimeError,
                       match=r"rnn_fused: clip must be a positive finite number when clip_mode is 'norm', got -1"):
        backward(w_hh, h_all, h0, None, None, None, "tanh", "norm", -1.0, False)
    with pytest.raises(RuntimeError, match=r"rnn_fused: clip must be a positive finite number when clip_mode is "
                                           r"'value', got nan"):
        BPTTOptions("value", math.nan)


def test_repr_pickle_and_state_dict_with_bptt_options():
    import pickle

    rnn = FusedRNN(3, 4, bptt_clip=2, bptt_clip_mode="value", record_grad_norms=True)
    assert "record_grad_norms=True, bptt_clip=2.0, bptt_clip_mode='value'" in repr(rnn)
    assert "bptt" not in repr(FusedRNN(3, 4)) and "record" not in repr(FusedRNN(3, 4))
    assert set(rnn.state_dict()) == set(torch.nn.RNN(3, 4).state_dict())  # checkpoints stay nn.RNN's
    copy = pickle.loads(pickle.dumps(rnn))
    assert copy.bptt_clip == 2.0 and copy.bptt_clip_mode == "value" and copy.record_grad_norms


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_options_off_is_the_plain_path(backend):
    """Recording changes nothing in the gradients (bit for bit where both paths run the same kernel; the
    reference's plain path is torch autograd through its forward, so only to rounding); no options means no
    GradFlow."""
    setup = _setup(2, True, True, "tanh")
    _, flow_off, _, g_off, dx_off, _ = _ours(setup, backend, "none", None, torch.float64, record=False)
    _, flow_on, _, g_on, dx_on, _ = _ours(setup, backend, "none", None, torch.float64, record=True)
    assert flow_off is None and isinstance(flow_on, GradFlow)
    same = torch.equal if backend != "reference" else (lambda a, b: assert_matches(a, b) or True)
    assert all(same(g_on[k], g_off[k]) for k in g_off) and same(dx_on, dx_off)


@pytest.mark.parametrize("clip_mode", ["norm", "value"])
@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "reference"])
def test_torch_compile_fullgraph_with_bptt_clip_matches_eager(backend, clip_mode):
    """The clip travels through the op's one registered autograd rule: fullgraph compiles, same gradients."""
    torch.manual_seed(0)
    eager = FusedRNN(3, 4, num_layers=2, bidirectional=True, backend=backend, bptt_clip=0.05,
                     bptt_clip_mode=clip_mode)
    compiled_module = FusedRNN(3, 4, num_layers=2, bidirectional=True, backend=backend, bptt_clip=0.05,
                               bptt_clip_mode=clip_mode)
    compiled_module.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_module, backend="aot_eager", fullgraph=True)
    x = torch.randn(6, 2, 3)
    for model in (eager, compiled):
        out, h = model(x)
        (out.square().sum() + h.sum()).backward()
    for (name, a), b in zip(eager.named_parameters(), compiled_module.parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=name)
    plain = FusedRNN(3, 4, num_layers=2, bidirectional=True, backend=backend)
    plain.load_state_dict(eager.state_dict())
    out, h = plain(x)
    (out.square().sum() + h.sum()).backward()
    assert not torch.allclose(plain.weight_hh_l0.grad, eager.weight_hh_l0.grad), "the clip must bind here"


@pytest.mark.parametrize("kwargs", [dict(backend="reference", bptt_clip=1.0), dict(record_grad_norms=True)])
def test_torch_compile_refuses_what_runs_eagerly_with_a_clear_error(kwargs):
    rnn = FusedRNN(3, 4, **kwargs)
    compiled = torch.compile(rnn, backend="eager", fullgraph=True)
    with pytest.raises(RuntimeError, match="eager mode only"):
        compiled(torch.randn(5, 2, 3))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_double_backward_with_bptt_options_raises_a_clear_error(backend):
    if backend == "triton":
        pytest.skip("Triton takes no float64")
    rnn = FusedRNN(2, 3, backend=backend, bptt_clip=1.0, dtype=torch.float64)
    x = torch.randn(4, 2, 2, dtype=torch.float64, requires_grad=True)
    out, _ = rnn(x)
    with pytest.raises(RuntimeError, match="do not support create_graph=True"):
        torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_step_norms_do_not_hide_nan_or_inf_but_skip_missing_packed_steps(bad):
    setup = _setup(1, False, True, "tanh")  # packed: sequences of lengths 6, 4, 3
    _, _, norms, _, _, _ = _ours(setup, "cpu" if "cpu" in CPU_BACKENDS else "reference", "none", None,
                                 torch.float64)
    assert norms[0, 0, 5].isnan().tolist() == [False, True, True]  # steps the short sequences do not have
    module_args, params, lengths, x, h0, w_out, w_hn = setup
    w_out = w_out.clone()
    w_out[1, 0] = bad  # a non-finite loss weight on sequence 0 at t = 1 makes dL/dh_1 non-finite
    rnn, flow, norms, _, _, _ = _ours((module_args, params, lengths, x, h0, w_out, w_hn), "reference", "none",
                                      None, torch.float64)
    steps = flow.step_norms()[0, 0]
    assert not steps[1].isfinite() and (steps[1].isnan() if math.isnan(bad) else steps[1] == math.inf)
    assert steps[5].isfinite()  # t = 5 exists for sequence 0 only: the others are left out, not NaN


def test_plain_torch_compile_runs_the_options_eagerly_with_the_same_gradients():
    def grads(module):
        torch.manual_seed(5)
        x = torch.randn(6, 2, 3, requires_grad=True)
        out, _ = module(x)
        (out ** 2).sum().backward()
        return [x.grad] + [p.grad for p in rnn.parameters()]

    rnn = FusedRNN(3, 4, backend="reference", bptt_clip=0.05)
    eager = grads(rnn)
    rnn.zero_grad()
    compiled = grads(torch.compile(rnn, backend="eager"))
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_value_clip_beyond_the_dtype_range_clamps_nothing(backend):
    setup = _setup(1, False, False, "tanh")
    # The plain call records the norms, so that it takes the clipped call's path (the BPTT-options kernel and
    # the ATen ops around it; recording changes no gradient): a plain call on the modules' fast path has
    # GEMMs of its own (csrc/cpu/blas.h: small ones on the AVX-512 kernels) and another bias sum, which differ
    # from the ATen ops' in the last bits.
    plain = _ours(setup, backend, "none", None, torch.float32, record=True)
    huge = _ours(setup, backend, "value", 1e39, torch.float32, record=False)  # > float32 max
    # bit for bit on the CPU kernel; the reference's plain path is torch autograd, so there only to rounding.
    close = lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-6)  # noqa: E731
    same = torch.equal if backend == "cpu" else close
    assert all(same(plain[3][k], huge[3][k]) for k in plain[3])
    assert same(plain[4], huge[4])

"""The op boundary (rnn_fused::recurrence_forward/backward) on the compiled backends: against the float64
reference and nn.RNN over the foundation grid, packed and bidirectional layouts, gradcheck, opcheck, and
bad inputs."""

import pytest
import torch

import rnn_fused
from rnn_fused import reference as R
from rnn_fused.functional import rnn_layer

from .conftest import EXTENSION_ERROR, HAS_CUDA, assert_matches

assert EXTENSION_ERROR is None, EXTENSION_ERROR

# (device, backend) pairs whose compiled kernels this file checks; triton has its own file.
COMPILED = [("cpu", "cpu")] + ([("cuda", "cuda")] if HAS_CUDA else [])


def _skip_if_unavailable(backend: str, device: str = "cpu") -> None:
    """Skips (saying why) a Triton case where triton cannot run; the compiled backends never skip (a broken
    extension fails, see tests/conftest.py)."""
    if backend != "triton":
        return
    reason = rnn_fused.backends.unavailable_reason(backend, torch.device(device), torch.float32)
    if reason is not None:
        pytest.skip(reason)


def _grid_case(device, backend, dtype, nonlinearity, T, B, H, I=3, seed=0):
    """nn.RNN with random weights vs our layer with the same weights: outputs and every gradient."""
    torch.manual_seed(seed)
    rnn64 = torch.nn.RNN(I, H, nonlinearity=nonlinearity, dtype=torch.float64)
    x64 = torch.randn(T, B, I, dtype=torch.float64)
    h064 = torch.randn(1, B, H, dtype=torch.float64)
    d_out, d_hn = torch.randn(T, B, H, dtype=torch.float64), torch.randn(1, B, H, dtype=torch.float64)

    def run(impl, dt):
        params = [p.detach().to(device, dt).requires_grad_() for p in rnn64.parameters()]
        x = x64.to(device, dt, copy=True).requires_grad_()
        h0 = h064.to(device, dt, copy=True).requires_grad_()
        if impl == "nn.RNN":
            rnn = torch.nn.RNN(I, H, nonlinearity=nonlinearity, device=device, dtype=dt)
            out, h_n = torch.func.functional_call(rnn, dict(zip([n for n, _ in rnn64.named_parameters()], params)),
                                                  (x, h0))
        else:
            w_ih, w_hh, b_ih, b_hh = (p.unsqueeze(0) for p in params)
            out, h_n = rnn_layer(x, w_ih, w_hh, b_ih, b_hh, h0, activation=nonlinearity, backend=impl)
        torch.autograd.backward([out, h_n], [d_out.to(device, dt), d_hn.to(device, dt)])
        return [out, h_n, x.grad, h0.grad] + [p.grad for p in params]

    names = ["output", "h_n", "d input", "d h0", "d weight_ih", "d weight_hh", "d bias_ih", "d bias_hh"]
    ref = run("reference", torch.float64)
    ours = run(backend, dtype)
    yardstick = run("nn.RNN", dtype) if dtype != torch.float64 else [None] * len(names)
    for name, a, r, y in zip(names, ours, ref, yardstick):
        assert_matches(a, r, y, name=f"{backend} {name}")


@pytest.mark.parametrize("device,backend", COMPILED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("T", [1, 7, 100])
@pytest.mark.parametrize("B", [1, 3, 33])
@pytest.mark.parametrize("H", [1, 5, 64, 257])
def test_layer_matches_reference_and_nn_rnn(device, backend, dtype, nonlinearity, T, B, H):
    _grid_case(device, backend, dtype, nonlinearity, T, B, H)


def _random_problem(D, packed, dtype, device, H=6, seed=0):
    torch.manual_seed(seed)
    lengths = [7, 5, 5, 2, 1]
    B = len(lengths)
    batch_sizes = torch.tensor([sum(n > t for n in lengths) for t in range(max(lengths))]) if packed else None
    rows = (int(batch_sizes.sum()),) if packed else (max(lengths), B)
    xw = torch.randn(*rows, D, H, dtype=dtype, device=device)
    w_hh = torch.randn(D, H, H, dtype=dtype, device=device) / H ** 0.5
    h0 = torch.randn(D, B, H, dtype=dtype, device=device)
    return xw, w_hh, h0, batch_sizes


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"] + (["cuda"] if HAS_CUDA else []))
def test_relu_gradient_at_a_unit_that_is_off_is_zero_like_nn_rnn(backend):
    """An inf gradient arriving at a relu unit that is off gives 0 there, as nn.RNN's relu backward (a select);
    a product g * act' would give inf * 0 = NaN and spread it through every gradient."""
    device = "cuda" if backend in ("cuda", "triton") and HAS_CUDA else "cpu"
    _skip_if_unavailable(backend, device)
    torch.manual_seed(0)
    T, B, I, H = 4, 3, 3, 6
    rnn = torch.nn.RNN(I, H, nonlinearity="relu", device=device)
    x, h0 = torch.randn(T, B, I, device=device), torch.randn(1, B, H, device=device)
    d_out = torch.randn(T, B, H, device=device)
    with torch.no_grad():
        off = rnn(x, h0)[0] == 0
    assert off.any() and (~off).any()
    d_out[off] = float("inf")

    def grads(impl):
        params = [p.detach().clone().requires_grad_() for p in rnn.parameters()]
        xs, hs = x.clone().requires_grad_(), h0.clone().requires_grad_()
        if impl == "nn.RNN":
            names = [n for n, _ in rnn.named_parameters()]
            out, h_n = torch.func.functional_call(rnn, dict(zip(names, params)), (xs, hs))
        else:
            w_ih, w_hh, b_ih, b_hh = (p.unsqueeze(0) for p in params)
            out, h_n = rnn_layer(xs, w_ih, w_hh, b_ih, b_hh, hs, activation="relu", backend=impl)
        out.backward(d_out)
        return [xs.grad, hs.grad] + [p.grad for p in params]

    expected = grads("nn.RNN")
    assert all(torch.isfinite(g).all() for g in expected)
    for name, ours, theirs in zip(["d input", "d h0", "d weight_ih", "d weight_hh", "d bias_ih", "d bias_hh"],
                                  grads(backend), expected):
        assert torch.isfinite(ours).all(), f"{backend} {name}: {ours}"
        torch.testing.assert_close(ours, theirs, msg=f"{backend} {name}")


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_value_clip_beyond_the_dtype_range_clamps_nothing(backend):
    """One rule on every backend: clip=1e300 in float32 rounds to inf and clamps nothing, an inf included."""
    _skip_if_unavailable(backend)
    xw, w_hh, h0, _ = _random_problem(1, False, torch.float32, "cpu")
    forward, backward = rnn_fused.bptt.backend_ops(backend)
    h_all, _ = forward(xw, w_hh, h0, None, "tanh")
    dh_all = torch.randn_like(h_all)
    dh_all[-1, 0, 0, :2] = torch.tensor([float("inf"), 1e30])
    clipped = backward(w_hh, h_all, h0, dh_all, None, None, "tanh", "value", 1e300, False)
    plain = backward(w_hh, h_all, h0, dh_all, None, None, "tanh")
    for a, b in zip(clipped[:2], plain[:2]):
        torch.testing.assert_close(a, b, equal_nan=True)
    assert clipped[0][-1, 0, 0, 0] == float("inf") or torch.isnan(clipped[0][-1, 0, 0, 0])


def test_reference_relu_backward_selects():
    """The reference's own BPTT (the double-backward path and every kernel test's yardstick) selects too."""
    xw, w_hh, h0 = torch.tensor([[[[-1.0, 1.0]]]]), torch.zeros(1, 2, 2), torch.zeros(1, 1, 2)
    h_all, _ = R.recurrence_forward(xw, w_hh, h0, None, "relu")
    dz, dh0, _ = R.recurrence_backward(w_hh, h_all, h0, torch.tensor([[[[float("inf"), 2.0]]]]), None, None, "relu")
    assert dz.flatten().tolist() == [0.0, 2.0] and torch.isfinite(dh0).all()


@pytest.mark.parametrize("device,backend", COMPILED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("D", [1, 2])
@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_ops_match_reference_packed_and_bidirectional(device, backend, dtype, packed, D, activation):
    xw, w_hh, h0, bs = _random_problem(D, packed, torch.float64, device)
    ref_all, ref_last = R.recurrence_forward(xw, w_hh, h0, bs, activation)
    dh_all, dh_last = torch.randn_like(ref_all), torch.randn_like(ref_last)
    ref_dz, ref_dh0, _ = R.recurrence_backward(w_hh, ref_all, h0, dh_all, dh_last, bs, activation)

    def ours_and_yardstick(impl):
        args = [t.to(dtype) for t in (xw, w_hh, h0)]
        if impl == "ours":
            h_all, h_last = torch.ops.rnn_fused.recurrence_forward(*args, bs, activation)
            dz, dh0, _ = torch.ops.rnn_fused.recurrence_backward(args[1], h_all, args[2], dh_all.to(dtype),
                                                                 dh_last.to(dtype), bs, activation)
        else:  # the reference math run in `dtype`: torch's own rounding in that precision
            h_all, h_last = R.recurrence_forward(*args, bs, activation)
            dz, dh0, _ = R.recurrence_backward(args[1], h_all, args[2], dh_all.to(dtype), dh_last.to(dtype), bs,
                                               activation)
        return h_all, h_last, dz, dh0

    ours = ours_and_yardstick("ours")
    yard = ours_and_yardstick("torch") if dtype != torch.float64 else [None] * 4
    for name, a, r, y in zip(["h_all", "h_last", "dz", "dh0"], ours, (ref_all, ref_last, ref_dz, ref_dh0), yard):
        assert_matches(a, r, y, name=name)


@pytest.mark.parametrize("device,backend", COMPILED)
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("D", [1, 2])
@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_gradcheck(device, backend, packed, D, activation):
    xw, w_hh, h0, bs = _random_problem(D, packed, torch.float64, device, H=3)
    inputs = [t.clone().requires_grad_() for t in (xw, w_hh, h0)]
    assert torch.autograd.gradcheck(
        lambda a, b, c: rnn_fused.functional.recurrence(a, b, c, bs, activation, backend), inputs)


@pytest.mark.parametrize("device,backend", COMPILED)
@pytest.mark.parametrize("packed", [False, True])
def test_opcheck(device, backend, packed):
    xw, w_hh, h0, bs = _random_problem(2, packed, torch.float32, device)
    fwd_args = (xw.requires_grad_(), w_hh.requires_grad_(), h0.requires_grad_(), bs, "tanh")
    torch.library.opcheck(torch.ops.rnn_fused.recurrence_forward.default, fwd_args)
    # With the backward options: the clip and the norm probe (whose gradient is the recorded norms).
    probe = torch.zeros(xw.shape[:-1], device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.rnn_fused.recurrence_forward.default, (*fwd_args, "norm", 0.5, probe))
    h_all, h_last = torch.ops.rnn_fused.recurrence_forward(xw.detach(), w_hh.detach(), h0.detach(), bs, "tanh")
    bwd_args = (w_hh.detach(), h_all, h0.detach(), torch.randn_like(h_all), torch.randn_like(h_last), bs, "tanh")
    torch.library.opcheck(torch.ops.rnn_fused.recurrence_backward.default, bwd_args)
    bwd_args_no_grads = (w_hh.detach(), h_all, h0.detach(), None, None, bs, "relu")
    torch.library.opcheck(torch.ops.rnn_fused.recurrence_backward.default, bwd_args_no_grads)


@pytest.mark.parametrize("device,backend", COMPILED)
def test_empty_batch_and_zero_steps(device, backend):
    w_hh = torch.randn(1, 4, 4, device=device)
    h_all, h_last = torch.ops.rnn_fused.recurrence_forward(torch.randn(5, 0, 1, 4, device=device), w_hh,
                                                           torch.randn(1, 0, 4, device=device), None, "tanh")
    assert h_all.shape == (5, 0, 1, 4) and h_last.shape == (1, 0, 4)
    h0 = torch.randn(1, 3, 4, device=device)
    h_all, h_last = torch.ops.rnn_fused.recurrence_forward(torch.randn(0, 3, 1, 4, device=device), w_hh, h0,
                                                           None, "tanh")
    assert h_all.shape == (0, 3, 1, 4) and torch.equal(h_last, h0)
    dh_last = torch.randn_like(h0)
    dz, dh0, grad_norm = torch.ops.rnn_fused.recurrence_backward(w_hh, h_all, h0, None, dh_last, None, "tanh")
    assert dz.shape == (0, 3, 1, 4) and torch.equal(dh0, dh_last) and grad_norm.shape == (0,)


@pytest.mark.parametrize("device,backend", COMPILED)
def test_empty_work_returns_at_once(device, backend):
    """2^40 rows of H = 0 (an expanded zero-memory view) is no work: it must not loop over the rows."""
    xw = torch.empty(2, 2**40, 1, 0, device=device)
    h0 = torch.empty(1, 2**40, 0, device=device)
    w_hh = torch.empty(1, 0, 0, device=device)
    h_all, h_last = torch.ops.rnn_fused.recurrence_forward(xw, w_hh, h0, None, "tanh")
    assert h_all.shape == xw.shape and h_last.shape == h0.shape
    dz, dh0, _ = torch.ops.rnn_fused.recurrence_backward(w_hh, h_all, h0, None, None, None, "tanh")
    assert dz.shape == xw.shape and dh0.shape == h0.shape


@pytest.mark.parametrize("device,backend", COMPILED)
def test_batch_sizes_that_overflow_int64_are_refused(device, backend):
    """[2^62] * 4 summed in int64 wraps to 0, which would let an xw of 0 rows through."""
    h0 = torch.empty(1, 2**62, 0, device=device).expand(1, 2**62, 0)
    with pytest.raises(RuntimeError, match=r"sum\(batch_sizes\) overflows int64 at step 1"):
        torch.ops.rnn_fused.recurrence_forward(torch.empty(0, 1, 0, device=device), torch.empty(1, 0, 0, device=device),
                                               h0, torch.tensor([2**62] * 4), "tanh")


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_outputs_are_contiguous_as_the_fakes_say(backend):
    """One output layout for every backend: contiguous, whatever the inputs' strides; opcheck's fake-tensor test
    compares the fake impls' promise with the kernels' outputs, strides included."""
    _skip_if_unavailable(backend)
    xw = torch.randn(3, 4, 1, 5).transpose(0, 1)  # [4, 3, 1, 5], not contiguous
    w_hh, h0 = torch.randn(1, 5, 5) / 3, torch.randn(1, 3, 5)
    f = torch.compile(lambda a, b, c: rnn_fused.functional.recurrence(a, b, c, None, "tanh", backend)[0] * 2,
                      fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(xw, w_hh, h0), R.recurrence_forward(xw, w_hh, h0)[0] * 2)
    forward, backward = rnn_fused.bptt.backend_ops(backend)
    torch.library.opcheck(forward, (xw, w_hh, h0, None, "tanh"), test_utils=("test_faketensor",))
    h_all, h_last = forward(xw, w_hh, h0, None, "tanh")
    assert h_all.is_contiguous() and h_last.is_contiguous()
    torch.library.opcheck(backward, (w_hh, h_all.transpose(0, 1).contiguous().transpose(0, 1), h0, None, None, None,
                                     "tanh"), test_utils=("test_faketensor",))


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
@pytest.mark.parametrize("bptt_clip", [None, 1.0])
def test_changing_batch_sizes_after_forward_does_not_change_gradients(backend, bptt_clip):
    """The backward uses the batch sizes of its forward, even if the caller's PackedSequence changes in between."""
    _skip_if_unavailable(backend)
    torch.manual_seed(0)
    x = torch.nn.utils.rnn.pack_padded_sequence(torch.randn(4, 3, 2), [4, 2, 2])

    def grads(mutate):
        rnn = rnn_fused.FusedRNN(2, 3, backend=backend, bptt_clip=bptt_clip)
        torch.manual_seed(1)
        for p in rnn.parameters():
            torch.nn.init.normal_(p)
        ps = torch.nn.utils.rnn.PackedSequence(x.data, x.batch_sizes.clone())
        out, _ = rnn(ps)
        if mutate:
            ps.batch_sizes.copy_(torch.tensor([3, 2, 2, 1]))
        out.data.sum().backward()
        return [p.grad for p in rnn.parameters()]

    for ours, expected in zip(grads(True), grads(False)):
        torch.testing.assert_close(ours, expected)


def _bad(device, **override):
    args = dict(xw=torch.randn(4, 3, 1, 5, device=device), w_hh=torch.randn(1, 5, 5, device=device),
                h0=torch.randn(1, 3, 5, device=device), batch_sizes=None, activation="tanh")
    args.update(override)
    return torch.ops.rnn_fused.recurrence_forward(**args)


BAD_INPUTS = [
    (dict(xw=torch.randn(4, 3, 5)), r"xw must have shape \[T, B, D, H\]"),
    (dict(xw=torch.randn(4, 3, 1, 6)), r"xw must have shape \[T, B, D, H\] = \[4, 3, 1, 5\]"),
    (dict(w_hh=torch.randn(5, 5)), r"w_hh must have shape \[D, H, H\]"),
    (dict(w_hh=torch.randn(3, 5, 5)), r"w_hh must have shape \[D, H, H\] with D in \{1, 2\}"),
    (dict(h0=torch.randn(1, 4, 5)), r"h0 must have shape \[D, B, H\] = \[1, 3, 5\], got \[1, 4, 5\]"),
    (dict(h0=torch.randn(3, 5)), r"h0 must have shape \[D, B, H\]"),
    # dtypes in the C++ words (Float, Double) on every backend: rnn_fused/contract.py dtype_name
    (dict(h0=torch.randn(1, 3, 5, dtype=torch.float64)), r"h0 must have the dtype of w_hh \(Float\), got Double$"),
    (dict(xw=torch.randn(4, 3, 1, 5, dtype=torch.float64)), r"xw must have the dtype of w_hh \(Float\), got Double$"),
    (dict(w_hh=torch.ones(1, 5, 5, dtype=torch.int32)), r"w_hh must be floating point, got Int$"),
    (dict(activation="sigmoid"), r"activation must be 'tanh' or 'relu', got 'sigmoid'"),
    (dict(batch_sizes=torch.tensor([3, 2])), r"xw must have shape \[N, D, H\] \(packed\)"),
    (dict(xw=torch.randn(6, 1, 5), batch_sizes=torch.tensor([3, 2])),
     r"xw must have shape \[N = sum\(batch_sizes\), D, H\] = \[5, 1, 5\]"),
    (dict(xw=torch.randn(6, 1, 5), batch_sizes=torch.tensor([3, 4])), r"non-increasing"),
    (dict(xw=torch.randn(6, 1, 5), batch_sizes=torch.tensor([2, 2, 2])), r"batch_sizes\[0\] \(2\) must equal"),
    (dict(xw=torch.randn(6, 1, 5), batch_sizes=torch.tensor([3.0, 3.0])),
     r"batch_sizes must be a 1-D int64 CPU tensor \[T\] \(as in PackedSequence\), got Float \[2\] on cpu$"),
    (dict(xw=torch.randn(6, 1, 5), batch_sizes=torch.tensor([3, 3], dtype=torch.int32)),
     r"batch_sizes must be a 1-D int64 CPU tensor \[T\] \(as in PackedSequence\), got Int \[2\] on cpu$"),
    (dict(xw=torch.randn(0, 1, 5), batch_sizes=torch.tensor([3, 2**40])), r"non-increasing"),
    (dict(xw=None), r"xw must be a tensor, got None"),
    (dict(w_hh=None), r"w_hh must be a tensor, got None"),
    (dict(w_hh=torch.randn(1, 0, 0), xw=torch.randn(4, 3, 1, 0), h0=torch.randn(1, 3, 0)), None),  # H = 0: fine
]


@pytest.mark.parametrize("device,backend", COMPILED)
@pytest.mark.parametrize("override,message", BAD_INPUTS)
def test_bad_inputs_raise_clear_errors(device, backend, override, message):
    override = {k: (v.to(device) if isinstance(v, torch.Tensor) and k != "batch_sizes" else v)
                for k, v in override.items()}
    if message is None:
        _bad(device, **override)
        return
    with pytest.raises(RuntimeError, match=message):
        _bad(device, **override)


@pytest.mark.parametrize("backend", ["reference", "triton", "meta"])
@pytest.mark.parametrize("override,message", BAD_INPUTS)
def test_every_implementation_checks_the_op_contract(backend, override, message):
    """The same bad-input table, and the same messages, on the reference, the Triton ops and the fake impls
    (all arguments on the meta device): one contract (rnn_fused/contract.py mirrors the C++ checks)."""
    _skip_if_unavailable(backend)
    device = "meta" if backend == "meta" else "cpu"
    forward = rnn_fused.bptt.backend_ops("cpu" if backend == "meta" else backend)[0]
    args = dict(xw=torch.randn(4, 3, 1, 5), w_hh=torch.randn(1, 5, 5), h0=torch.randn(1, 3, 5), batch_sizes=None,
                activation="tanh")
    args.update(override)
    args = {k: (v.to(device) if isinstance(v, torch.Tensor) and k != "batch_sizes" else v) for k, v in args.items()}
    if message is None:
        forward(*args.values())
        return
    with pytest.raises(RuntimeError, match=message):
        forward(*args.values())


def test_one_argument_on_meta_raises_instead_of_returning_garbage():
    """A meta w_hh sends the call to the fake impl; it must refuse the mix as the kernels do (nn.RNN raises too)."""
    with pytest.raises(RuntimeError, match=r"xw must be on the device of w_hh \(meta\), got cpu"):
        torch.ops.rnn_fused.recurrence_forward(torch.randn(4, 3, 1, 5), torch.randn(1, 5, 5, device="meta"),
                                               torch.randn(1, 3, 5), None, "tanh")
    m = rnn_fused.FusedRNN(3, 4)
    m.weight_hh_l0 = torch.nn.Parameter(torch.empty(4, 4, device="meta"))
    with pytest.raises(RuntimeError, match=r"Input and parameter tensors are not at the same device, found input "
                                           r"tensor at cpu and parameter tensor at meta"):
        m(torch.randn(5, 2, 3))


def test_a_parameter_of_another_dtype_raises_like_nn_rnn():
    """A float32 bias in a float64 model: nn.RNN raises (inside a matrix product); so do we, naming it."""
    for module in (torch.nn.RNN(3, 4, dtype=torch.float64), rnn_fused.FusedRNN(3, 4, dtype=torch.float64)):
        module.bias_hh_l0 = torch.nn.Parameter(torch.zeros(4))
        with pytest.raises(RuntimeError):
            module(torch.randn(5, 2, 3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"parameter bias_hh_l0 has dtype torch.float32, the input torch.float64"):
        module(torch.randn(5, 2, 3, dtype=torch.float64))


@pytest.mark.gpu
def test_device_mismatch_names_the_argument():
    with pytest.raises(RuntimeError, match=r"h0 must be on the device of w_hh"):
        _bad("cpu", h0=torch.randn(1, 3, 5, device="cuda"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_kernel_rejects_half_with_a_hint_that_is_true(dtype):
    """The C++ op takes Float and Double; its hint names the way the CPU backend takes half types, and that
    way works: the CPU backend's own forward (rnn_fused/backends.py) computes them in float32."""
    xw, w_hh, h0 = torch.randn(4, 3, 1, 5), torch.randn(1, 5, 5) / 5 ** 0.5, torch.randn(1, 3, 5)
    with pytest.raises(RuntimeError, match=r"the CPU kernels take Float and Double, got (Half|BFloat16) \(float16 "
                                           r"and bfloat16 run on backend='cpu' through rnn_fused.functional"):
        _bad("cpu", xw=xw.to(dtype), w_hh=w_hh.to(dtype), h0=h0.to(dtype))
    halves = [t.to(dtype).requires_grad_() for t in (xw, w_hh, h0)]
    for forward in (rnn_fused.backends.recurrence_forward_fn("cpu"),
                    lambda *a: rnn_fused.functional.recurrence(*a, backend="cpu")):
        h_all, h_last = forward(*halves, None, "tanh")
        assert h_all.dtype == h_last.dtype == dtype
        # computed in float32, rounded once: exactly the float32 kernel's result rounded to the dtype
        exact = torch.ops.rnn_fused.recurrence_forward(*(t.detach().float() for t in halves), None, "tanh")
        assert torch.equal(h_all, exact[0].to(dtype)) and torch.equal(h_last, exact[1].to(dtype))
        grads = torch.autograd.grad(h_all.sum() + h_last.sum(), halves)
        assert all(g.dtype == dtype for g in grads)


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton", "meta"])
@pytest.mark.parametrize("shape", [(2**40, 1, 1, 0), (2**40, 0, 1, 3)], ids=["H=0", "B=0"])
def test_an_empty_problem_of_2_to_the_40_steps_does_no_work(backend, shape):
    """A zero-element xw claiming 2^40 steps (H = 0 or B = 0) is no work: no T-long step table (csrc's
    RecurrenceProblem, the reference's step list: MemoryError before) and no loop over T, on every backend;
    the gradient of h_last still passes to h0."""
    _skip_if_unavailable(backend)
    T, B, D, H = shape
    device = "meta" if backend == "meta" else "cpu"
    forward, backward = rnn_fused.bptt.backend_ops("cpu" if backend == "meta" else backend)
    xw = torch.empty(shape, device=device)
    w_hh, h0 = torch.randn(D, H, H, device=device), torch.randn(D, B, H, device=device)
    h_all, h_last = forward(xw, w_hh, h0, None, "tanh")
    assert h_all.shape == xw.shape and h_last.shape == h0.shape
    dh_last = torch.randn_like(h0)
    # clipped, not recording: the norms of 2^40 rows of H = 0 would be a real 4 TiB output
    dz, dh0, grad_norm = backward(w_hh, h_all, h0, None, dh_last, None, "tanh", "norm", 1.0, False)
    assert dz.shape == xw.shape and dh0.shape == h0.shape and grad_norm.shape == (0,)
    if backend != "meta":
        assert torch.equal(dh0, dh_last)
        leaves = [t.clone().requires_grad_() for t in (xw, w_hh, h0)]
        h_all, h_last = rnn_fused.functional.recurrence(*leaves, backend=backend)
        assert torch.equal(torch.autograd.grad(h_last, leaves[2], dh_last)[0], dh_last)


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton", "meta"])
def test_sizes_the_kernels_cannot_index_with_int_are_refused(backend):
    """B >= 2^31 would reach BLAS (csrc/cpu) and the CUDA launches as a negative int: refused by the contract,
    naming the sizes, on every backend alike. Expanded (CPU) or meta tensors: nothing is allocated."""
    _skip_if_unavailable(backend)
    device = "meta" if backend == "meta" else "cpu"
    forward = rnn_fused.bptt.backend_ops("cpu" if backend == "meta" else backend)[0]
    B = 2**31
    xw = torch.zeros(1, 1, 1, 1, device=device).expand(1, B, 1, 1)
    h0 = torch.zeros(1, 1, 1, device=device).expand(1, B, 1)
    message = (r"rnn_fused: B \(2147483648\) and D \* H \(1\) must each be at most 2\^31 - 1 = 2147483647: the "
               r"kernels pass them to BLAS and kernel launches as int")
    with pytest.raises(RuntimeError, match=message):
        forward(xw, torch.ones(1, 1, 1, device=device), h0, None, "tanh")
    packed = torch.zeros(1, 1, 1, device=device).expand(B, 1, 1)
    with pytest.raises(RuntimeError, match=message):
        forward(packed, torch.ones(1, 1, 1, device=device), h0, torch.tensor([B]), "tanh")


def test_the_int_range_rule_of_the_contract():
    """contract.check_index_range on its own (sizes too large to build even on meta): D * H >= 2^31 is
    refused, B = 2^31 - 1 passes, and a problem with no work passes whatever its sizes."""
    from rnn_fused.contract import Problem, check_index_range

    with pytest.raises(RuntimeError, match=r"B \(1\) and D \* H \(2147483648\) must each be at most 2\^31 - 1"):
        check_index_range(Problem(T=1, B=1, D=2, H=2**30, sizes=None))
    check_index_range(Problem(T=1, B=2**31 - 1, D=1, H=2**31 - 1, sizes=None))
    check_index_range(Problem(T=2**40, B=2**40, D=2, H=0, sizes=None))


def test_fakes_check_shapes_while_tracing_packed_input():
    """Under tracing the batch sizes are fake (their sum is unknown), but D and H of a packed xw still are."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        xw, w_hh, h0 = torch.randn(6, 1, 4), torch.randn(1, 5, 5), torch.randn(1, 3, 5)
        batch_sizes = torch.tensor([3, 2, 1])
        with pytest.raises(RuntimeError, match=r"xw must have shape \[N = sum\(batch_sizes\), D, H\] = \[6, 1, 5\]"):
            torch.ops.rnn_fused.recurrence_forward(xw, w_hh, h0, batch_sizes, "tanh")
        h_all, _ = torch.ops.rnn_fused.recurrence_forward(torch.randn(6, 1, 5), w_hh, h0, batch_sizes, "tanh")
        assert h_all.shape == (6, 1, 5)


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
@pytest.mark.parametrize("bptt", [None, rnn_fused.bptt.BPTTOptions("norm", 1.0)], ids=["plain", "options"])
@pytest.mark.parametrize("inplace", ["relu_", "mul_", "add_"])
def test_an_in_place_op_on_the_output_before_backward(backend, bptt, inplace):
    """The kernels' autograd saves the output instead of a copy (the copy's cost: benchmarks/NOTES.md), so an
    in-place op on it before backward raises, saying why and what to write instead (torch's own message named
    neither); the plain reference (autograd through its loop) saves no output and works like nn.RNN."""
    _skip_if_unavailable(backend)
    torch.manual_seed(0)
    rnn = torch.nn.RNN(3, 4)
    x = torch.randn(5, 2, 3)
    params = [p.detach().unsqueeze(0).requires_grad_() for p in rnn.parameters()]

    def apply(out):
        return {"relu_": lambda: torch.nn.functional.relu(out, inplace=True), "mul_": lambda: out.mul_(2),
                "add_": lambda: out.add_(x.sum(-1, keepdim=True))}[inplace]()

    out, _ = rnn_layer(x, *params, backend=backend, bptt=bptt)
    if backend == "reference" and bptt is not None:
        # the options' autograd.Function (rnn_fused/bptt.py) saves h_all on every backend; for the reference
        # (whose h_all is a view) torch refuses the in-place op itself
        with pytest.raises(RuntimeError, match=r"is being modified inplace"):
            apply(out)
        return
    apply(out)
    if backend != "reference":
        with pytest.raises(RuntimeError, match=r"rnn_fused: the recurrence's output \(h_all, the RNN layer's output\) "
                                               r"is saved for its backward and was modified in place.*out = out.clone\(\)"):
            out.sum().backward()
        return
    out.sum().backward()
    expected, _ = rnn(x)
    apply(expected)
    expected.sum().backward()
    for ours, theirs in zip(params, rnn.parameters()):
        torch.testing.assert_close(ours.grad[0], theirs.grad)

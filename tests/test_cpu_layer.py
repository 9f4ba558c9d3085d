"""The CPU layer of the modules' eager fast path (csrc/cpu/layer_cpu.cpp: the projection GEMM, the recurrence
kernels and the backward's GEMMs on buffers of its own, no ATen op) against nn.RNN and float64, and the calls it
must leave to the ATen ops (create_graph, non-contiguous or wrongly shaped parameters)."""

import contextlib

import pytest
import torch
from torch import nn

from rnn_fused import FusedRNN, FusedRNNCell

from .conftest import assert_matches

# (T, B, I, H): one unit; rows (T * B) past the bias sum's block of 64 rows and not a multiple of it; H around
# the AVX-512 step's 64-column panels; I of 1.
SHAPES = [(1, 1, 3, 1), (37, 5, 19, 70), (3, 7, 1, 129), (2, 65, 8, 64)]


def _pair(dtype, I, H, **kwargs):
    torch.manual_seed(0)
    ref = nn.RNN(I, H, dtype=torch.float64, **kwargs)
    ours = FusedRNN(I, H, dtype=dtype, backend="cpu", **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _run(module, x, h0, dtype, outputs=("output", "h_n")):
    """Output, h_n and the gradients of <outputs, fixed random weights> for x, h0 and every parameter that
    requires grad (None for one that does not)."""
    x = x.to(dtype).requires_grad_()
    h0 = h0.to(dtype).requires_grad_()
    out = dict(zip(("output", "h_n"), module(x, h0)))
    g = torch.Generator().manual_seed(1)
    loss = sum((out[k] * torch.randn(out[k].shape, generator=g, dtype=torch.float64).to(dtype)).sum() for k in outputs)
    leaves = [x, h0] + [p for p in module.parameters() if p.requires_grad]
    grads = dict(zip(["x", "h0"] + [n for n, p in module.named_parameters() if p.requires_grad],
                     torch.autograd.grad(loss, leaves)))
    return out, grads


def _in_float32_torch(ref):
    copy = nn.RNN(ref.input_size, ref.hidden_size, ref.num_layers, nonlinearity=ref.nonlinearity, bias=ref.bias,
                  bidirectional=ref.bidirectional, dtype=torch.float32)
    copy.load_state_dict(ref.state_dict())
    return copy


@pytest.mark.parametrize("T,B,I,H", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bidirectional,nonlinearity,bias", [(False, "tanh", True), (True, "relu", True),
                                                              (True, "tanh", False), (False, "relu", False)])
def test_cpu_layer_matches_nn_rnn(T, B, I, H, dtype, bidirectional, nonlinearity, bias):
    kwargs = dict(bidirectional=bidirectional, nonlinearity=nonlinearity, bias=bias, num_layers=2)
    ref, ours = _pair(dtype, I, H, **kwargs)
    x = torch.randn(T, B, I, dtype=torch.float64)
    h0 = 0.5 * torch.randn(2 * (2 if bidirectional else 1), B, H, dtype=torch.float64)
    expected, expected_grads = _run(ref, x, h0, torch.float64)
    got, got_grads = _run(ours, x, h0, dtype)
    yard, yard_grads = (None, {k: None for k in expected_grads}) if dtype == torch.float64 else \
        _run(_in_float32_torch(ref), x, h0, torch.float32)
    for k in expected:
        assert_matches(got[k], expected[k], yard[k] if yard else None, name=k)
    assert got_grads.keys() == expected_grads.keys()
    for k in expected_grads:
        assert_matches(got_grads[k], expected_grads[k], yard_grads[k], name=f"grad {k}")


def test_cpu_layer_runs_no_aten_op():
    """The fast path's CPU layer is really the one taken: its forward and backward dispatch no GEMM, no
    recurrence op (the ATen fallback would show aten::addmm / aten::mm and rnn_fused::recurrence_*)."""
    m = FusedRNN(6, 9, num_layers=2, bidirectional=True, backend="cpu")
    x = torch.randn(4, 3, 6, requires_grad=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out, h_n = m(x)
        (out.sum() + h_n.square().sum()).backward()
    names = {e.name for e in prof.events()}
    assert not {n for n in names if n.startswith("rnn_fused::recurrence") or n in ("aten::addmm", "aten::mm")}, names


@pytest.mark.parametrize("outputs", [("output",), ("h_n",)])
def test_cpu_layer_partial_gradients(outputs):
    """A frozen weight and an unused output: the gradients that exist match nn.RNN's, the frozen one is None."""
    ref, ours = _pair(torch.float64, 5, 7, bidirectional=True)
    for m in (ref, ours):
        m.weight_ih_l0.requires_grad_(False)
        m.bias_hh_l0_reverse.requires_grad_(False)
    x, h0 = torch.randn(6, 3, 5, dtype=torch.float64), torch.randn(2, 3, 7, dtype=torch.float64)
    expected, expected_grads = _run(ref, x, h0, torch.float64, outputs)
    got, got_grads = _run(ours, x, h0, torch.float64, outputs)
    assert got_grads.keys() == expected_grads.keys()
    assert "weight_ih_l0" not in got_grads and "bias_hh_l0_reverse" not in got_grads
    for k in expected_grads:
        assert_matches(got_grads[k], expected_grads[k], name=f"grad {k}")


def test_non_contiguous_parameters_take_the_aten_ops():
    """A transposed-view parameter cannot go to BLAS as it lies: the layer runs as ATen ops, same numbers."""
    ref, ours = _pair(torch.float64, 5, 7)
    w = torch.randn(7, 7, dtype=torch.float64).t()
    ours.weight_hh_l0 = nn.Parameter(w)
    ref.weight_hh_l0 = nn.Parameter(w.contiguous())
    x, h0 = torch.randn(6, 3, 5, dtype=torch.float64), torch.randn(1, 3, 7, dtype=torch.float64)
    expected, expected_grads = _run(ref, x, h0, torch.float64)
    got, got_grads = _run(ours, x, h0, torch.float64)
    for k in expected:
        assert_matches(got[k], expected[k], name=k)
    for k in expected_grads:
        assert_matches(got_grads[k], expected_grads[k], name=f"grad {k}")


@pytest.mark.parametrize("cls,name,shape", [(FusedRNN, "weight_ih_l0", (7, 4)), (FusedRNN, "weight_hh_l0", (7, 5)),
                                            (FusedRNN, "bias_hh_l0", (6,)), (FusedRNNCell, "weight_ih", (7, 4)),
                                            (FusedRNNCell, "weight_hh", (7, 5)), (FusedRNNCell, "bias_ih", (6,))])
def test_wrongly_shaped_parameter_raises(cls, name, shape):
    """A parameter reassigned with a wrong shape raises (as nn.RNN / nn.RNNCell do), never reaches BLAS."""
    m = cls(5, 7, backend="cpu")
    setattr(m, name, nn.Parameter(torch.randn(*shape)))
    x = torch.randn(3, 2, 5) if cls is FusedRNN else torch.randn(2, 5)
    with pytest.raises(RuntimeError):
        m(x)


def _cell_run(cell, x, h, dtype):
    x, h = x.to(dtype).requires_grad_(), h.to(dtype).requires_grad_()
    out = cell(x, h)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    names = ["x", "h"] + [n for n, _ in cell.named_parameters()]
    return out, dict(zip(names, torch.autograd.grad((out * g).sum(), [x, h, *cell.parameters()])))


@pytest.mark.parametrize("B,I,H", [(1, 3, 1), (5, 19, 70), (7, 1, 129)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("nonlinearity,bias", [("tanh", True), ("relu", False)])
def test_cell_backward_on_the_cpu_layer_matches_nn_rnncell(B, I, H, dtype, nonlinearity, bias):
    """FusedRNNCell's backward is the CPU layer's for one step (csrc/rnn_cell.cpp): against nn.RNNCell."""
    torch.manual_seed(0)
    ref = nn.RNNCell(I, H, bias=bias, nonlinearity=nonlinearity, dtype=torch.float64)
    ours = FusedRNNCell(I, H, bias=bias, nonlinearity=nonlinearity, dtype=dtype, backend="cpu")
    ours.load_state_dict(ref.state_dict())
    x, h = torch.randn(B, I, dtype=torch.float64), torch.randn(B, H, dtype=torch.float64)
    expected, expected_grads = _cell_run(ref, x, h, torch.float64)
    got, got_grads = _cell_run(ours, x, h, dtype)
    yard, yard_grads = None, {k: None for k in expected_grads}
    if dtype == torch.float32:
        ref32 = nn.RNNCell(I, H, bias=bias, nonlinearity=nonlinearity)
        ref32.load_state_dict(ref.state_dict())
        yard, yard_grads = _cell_run(ref32, x, h, torch.float32)
    assert_matches(got, expected, yard, name="h'")
    assert got_grads.keys() == expected_grads.keys()
    for k in expected_grads:
        assert_matches(got_grads[k], expected_grads[k], yard_grads[k], name=f"grad {k}")


def test_cell_backward_runs_no_aten_op():
    """The CPU layer's backward is really the one the cell takes: no GEMM op in its backward (the ATen one
    would run four aten::mm)."""
    cell = FusedRNNCell(6, 9, backend="cpu")
    x = torch.randn(3, 6, requires_grad=True)
    h = cell(x)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        h.square().sum().backward()
    names = {e.name for e in prof.events()}
    assert not {n for n in names if n in ("aten::mm", "aten::addmm")}, names


def test_a_dispatch_mode_sees_the_ops():
    """Under a TorchDispatchMode (here FlopCounterMode) the fast path declines: the mode sees the layer's GEMM."""
    from torch.utils.flop_counter import FlopCounterMode

    m = FusedRNN(6, 9, backend="cpu")
    with FlopCounterMode(display=False) as counter:
        m(torch.randn(4, 3, 6))
    assert counter.get_total_flops() >= 2 * 4 * 3 * 6 * 9  # the input projection at least


@pytest.mark.parametrize("cls", [FusedRNN, FusedRNNCell])
def test_saved_tensor_hooks_that_change_the_layout(cls):
    """A saved-tensor hook may hand back the saved output with other strides: the backward still reads it
    right (it leaves the CPU layer for the ATen ops)."""
    torch.manual_seed(0)
    m = cls(5, 7, backend="cpu", dtype=torch.float64)
    x = torch.randn(4, 3, 5, dtype=torch.float64) if cls is FusedRNN else torch.randn(3, 5, dtype=torch.float64)

    def grads(hooks):
        xs = x.clone().requires_grad_()
        with hooks:
            out = m(xs)
        out = out[0] if isinstance(out, tuple) else out
        return torch.autograd.grad(out.square().sum(), [xs, *m.parameters()])

    def strided(t):  # same values, transposed memory
        return t.transpose(0, -1).contiguous().transpose(0, -1) if t.dim() > 1 else t

    plain = grads(contextlib.nullcontext())
    hooked = grads(torch.autograd.graph.saved_tensors_hooks(lambda t: t, strided))
    for a, b in zip(plain, hooked):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _in_a_new_thread(fn):
    """fn's result, run in a thread of its own (whose kept scratch starts empty)."""
    import threading
    result = []
    thread = threading.Thread(target=lambda: result.append(fn()))
    thread.start()
    thread.join()
    return result[0]


def test_the_thread_keeps_the_layers_scratch_between_calls():
    """The backward's dz [T, B, D*H] comes from one buffer the thread keeps (csrc/cpu/scratch_cpu.h):
    allocated and freed per call, glibc handed it back to the kernel, and with the forward's xw a fwd+bwd at
    T128 B64 H256 took ~2,250 page faults (benchmarks/NOTES.md, "Page faults"). The forward needs none: xw is
    made in the output's memory."""
    from rnn_fused import _C
    T, B, H = 9, 7, 33
    model = FusedRNN(H, H, backend="cpu", bidirectional=True)
    x, h0 = torch.randn(T, B, H, requires_grad=True), torch.randn(2, B, H, requires_grad=True)

    def kept_after_calls():
        kept = [_C.kept_scratch_bytes()]
        for _ in range(2):
            out, h_n = model(x, h0)
            kept.append(_C.kept_scratch_bytes())
            torch.autograd.grad((out.sum(), h_n.sum()), [x, h0, *model.parameters()])
            kept.append(_C.kept_scratch_bytes())
        return kept

    dz = T * B * 2 * H * 4
    assert _in_a_new_thread(kept_after_calls) == [0, 0, dz, dz, dz]


def test_a_temporary_above_the_bound_is_not_kept():
    """At most 64 MiB stay with a thread; past that each call allocates its own."""
    from rnn_fused import _C
    T, B, H = 1024, 64, 260  # dz 68 MB
    model = FusedRNN(1, H, backend="cpu")

    def kept_after_calls():
        kept = []
        for t in (2, T):
            x = torch.randn(t, B, 1, requires_grad=True)
            out, _ = model(x)
            grad, = torch.autograd.grad(out.sum(), x)
            kept.append(_C.kept_scratch_bytes())
        return kept, grad

    kept, grad = _in_a_new_thread(kept_after_calls)
    assert kept == [2 * B * H * 4] * 2
    assert torch.isfinite(grad).all()


def test_threads_running_the_layer_at_once_match_one_alone():
    """Each thread leases its own scratch: two threads at different shapes, interleaved, give the results of
    each alone, bit for bit."""
    import threading

    def problem(T, B, H, seed):
        torch.manual_seed(seed)
        return FusedRNN(H, H, backend="cpu"), torch.randn(T, B, H), torch.randn(1, B, H)

    def work(model, x, h0):
        x, h0 = x.clone().requires_grad_(), h0.clone().requires_grad_()
        out, h_n = model(x, h0)
        return [out, h_n, *torch.autograd.grad((out * out).sum() + h_n.sum(), [x, h0, *model.parameters()])]

    problems = [problem(40, 9, 70, 0), problem(23, 31, 129, 1)]
    alone = [work(*p) for p in problems]
    together = [None, None]

    def run(i):
        together[i] = [work(*problems[i]) for _ in range(20)]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        for result in together[i]:
            for got, expected in zip(result, alone[i]):
                assert torch.equal(got, expected)


def _eval_forward(ours, ref, x, h0):
    """ours' forward under no_grad (the call that keeps the packed W_hh^T, csrc/cpu/packed_cache.h) against
    float64 nn.RNN with ref's weights; returns our output."""
    with torch.no_grad():
        out, h_n = ours(x, h0)
        want_out, want_h = ref(x.double(), h0.double())
        yard_out, yard_h = _in_float32_torch(ref)(x, h0)
    assert_matches(out, want_out, yard_out, "output")
    assert_matches(h_n, want_h, yard_h, "h_n")
    return out


@pytest.mark.parametrize("bidirectional", [False, True])
def test_kept_packed_weights_follow_every_change_of_the_weights(bidirectional):
    """Calls that record no graph keep the tile step's packed W_hh^T per thread and reuse it only for the same
    bytes: a change through .data or numpy (no version counter sees it), another model's weights, or the
    first model's again are each computed with the weights they have. T = 37 >= 16 takes the packed step."""
    T, B, I, H = 37, 3, 19, 70
    ref, ours = _pair(torch.float32, I, H, num_layers=2, bidirectional=bidirectional)
    x, h0 = torch.randn(T, B, I), torch.randn(2 * (2 if bidirectional else 1), B, H)
    first = _eval_forward(ours, ref, x, h0)
    assert torch.equal(_eval_forward(ours, ref, x, h0), first)  # the kept form: the same bits
    recorded = ours(x.clone().requires_grad_(), h0)[0]  # a training call packs afresh: the same bits again
    assert recorded.grad_fn is not None and torch.equal(recorded.detach(), first)
    with torch.no_grad():
        ours.weight_hh_l1.data.mul_(0.5)
        ref.weight_hh_l1.mul_(0.5)
        ours.weight_hh_l0.detach().numpy()[3, 5] += 0.25
        ref.weight_hh_l0[3, 5] += 0.25
    changed = _eval_forward(ours, ref, x, h0)
    assert not torch.equal(changed, first)
    other_ref, other = _pair(torch.float32, I, H, num_layers=2, bidirectional=bidirectional)
    with torch.no_grad():
        for p in list(other.parameters()) + list(other_ref.parameters()):
            p.mul_(-1)
    _eval_forward(other, other_ref, x, h0)
    assert torch.equal(_eval_forward(ours, ref, x, h0), changed)

"""The CUDA kernels (csrc/cuda/) on a GPU: both kernel families, forced one at a time with
RNN_FUSED_CUDA_KERNEL, against the float64 reference, on shapes chosen to reach every branch of the
persistent kernel's plan (one CTA per direction, H split over many CTAs, the batch split over CTAs, the
staged state in several chunks), packed and bidirectional layouts, and the half types.

Skipped without a GPU (marker `gpu`); test_ops.py and test_modules.py also run the `cuda` backend
through the automatic choice when a GPU is present. The launch plan's refusal is checked too: forcing the
persistent kernel on a problem it cannot hold raises an error that says why.
"""

import copy

import pytest
import torch

from rnn_fused import FusedRNN
from rnn_fused import reference as R

from .conftest import EXTENSION_ERROR, assert_matches, in_float32

pytestmark = pytest.mark.gpu

KERNELS = ["persistent", "stepwise"]


@pytest.fixture(params=KERNELS)
def kernel(request, monkeypatch):
    """The kernel family the C++ side must take (read from the environment at every call)."""
    monkeypatch.setenv("RNN_FUSED_CUDA_KERNEL", request.param)
    return request.param


def _problem(T, B, H, D, packed, seed=0, device="cuda"):
    torch.manual_seed(seed)
    if packed:  # lengths from 1 to T, sorted longest first, one sequence of each length at least once
        lengths = sorted((torch.arange(B) % T + 1).tolist(), reverse=True)
        lengths[0] = T
        batch_sizes = torch.tensor([sum(n > t for n in lengths) for t in range(T)], dtype=torch.int64)
        rows = (int(batch_sizes.sum()),)
    else:
        batch_sizes, rows = None, (T, B)
    xw = torch.randn(*rows, D, H, dtype=torch.float64, device=device)
    w_hh = torch.randn(D, H, H, dtype=torch.float64, device=device) / H ** 0.5
    h0 = torch.randn(D, B, H, dtype=torch.float64, device=device)
    dh_all, dh_last = torch.randn_like(xw), torch.randn_like(h0)
    return xw, w_hh, h0, batch_sizes, dh_all, dh_last


def _check(T, B, H, D, packed, dtype, activation="tanh"):
    assert EXTENSION_ERROR is None, EXTENSION_ERROR
    # the inputs as the dtype holds them, so the float64 reference judges the computation, not the rounding
    xw, w_hh, h0, bs, dh_all, dh_last = (t.to(dtype).double() if t is not None and t.is_floating_point() else t
                                         for t in _problem(T, B, H, D, packed))
    ref = R.recurrence_forward(xw, w_hh, h0, bs, activation)
    ref += R.recurrence_backward(w_hh, ref[0], h0, dh_all, dh_last, bs, activation)[:2]

    def run(op_forward, op_backward):
        args = [t.to(dtype) for t in (xw, w_hh, h0)]
        h_all, h_last = op_forward(*args, bs, activation)
        dz, dh0, _ = op_backward(args[1], h_all, args[2], dh_all.to(dtype), dh_last.to(dtype), bs, activation)
        return h_all, h_last, dz, dh0

    ours = run(torch.ops.rnn_fused.recurrence_forward, torch.ops.rnn_fused.recurrence_backward)
    torch.cuda.synchronize()
    # torch's own computation in the dtype (tests/conftest.py): for the half types float32, rounded once
    yard = (run(in_float32(R.recurrence_forward), in_float32(R.recurrence_backward, keep_float32=(2,)))
            if dtype != torch.float64 else [None] * 4)
    for name, a, r, y in zip(["h_all", "h_last", "dz", "dh0"], ours, ref, yard):
        assert_matches(a, r, y, name=f"{name} T={T} B={B} H={H} D={D} packed={packed} {dtype}")


# (T, B, H): one CTA per direction; H over many CTAs, not a multiple of 4; batch split over CTAs
# (B >= 2 x 16); the staged state in chunks (B x H too large for one CTA's shared memory); H = 2048, where
# the persistent plan fits only for fp32 with one direction (a 16 x 2048 fp32 W_hh slice per CTA; fp64 or
# two directions need a slice of 256 KiB, more than any GPU's shared memory: stepwise only).
SHAPES = [(5, 1, 7), (33, 3, 257), (17, 70, 64), (9, 256, 1024), (4, 5, 2048)]


@pytest.mark.parametrize("T,B,H", SHAPES)
@pytest.mark.parametrize("D", [1, 2])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernels_match_reference(kernel, T, B, H, D, packed, dtype):
    if kernel == "persistent" and H == 2048 and (dtype == torch.float64 or D == 2):
        pytest.skip("the W_hh slice exceeds shared memory: the stepwise family's case")
    _check(T, B, H, D, packed, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_half_types_match_reference(kernel, dtype, activation):
    _check(40, 6, 96, 2, True, dtype, activation)


def test_relu_float64_long_sequence(kernel):
    _check(300, 4, 48, 2, False, torch.float64, "relu")


def test_forcing_persistent_on_too_large_a_problem_says_why(monkeypatch):
    monkeypatch.setenv("RNN_FUSED_CUDA_KERNEL", "persistent")
    H = 16384  # a 4 x 16384 fp64 W_hh slice alone exceeds any GPU's shared memory per CTA
    xw = torch.randn(2, 1, 1, H, dtype=torch.float64, device="cuda")
    w_hh = torch.randn(1, H, H, dtype=torch.float64, device="cuda")
    h0 = torch.randn(1, 1, H, dtype=torch.float64, device="cuda")
    with pytest.raises(RuntimeError, match="persistent kernel cannot run this problem.*shared memory"):
        torch.ops.rnn_fused.recurrence_forward(xw, w_hh, h0, None, "tanh")


def test_unknown_kernel_choice_is_an_error(monkeypatch):
    monkeypatch.setenv("RNN_FUSED_CUDA_KERNEL", "fastest")
    xw, w_hh, h0, *_ = _problem(3, 2, 8, 1, False)
    with pytest.raises(RuntimeError, match="RNN_FUSED_CUDA_KERNEL must be auto, persistent or stepwise"):
        torch.ops.rnn_fused.recurrence_forward(xw, w_hh, h0, None, "tanh")


def test_cuda_op_rejects_cpu_weights():
    xw, w_hh, h0, *_ = _problem(3, 2, 8, 1, False)
    with pytest.raises(RuntimeError, match="device|CUDA"):
        torch.ops.rnn_fused.recurrence_forward(xw, w_hh.cpu(), h0, None, "tanh")


def _train_step(rnn, x):
    out, h_n = rnn(x)
    (out.pow(2).sum() + h_n.sum()).backward()
    return out, h_n


def test_cuda_graph_capture_and_replay_match_eager(kernel):
    """Forward+backward captured once in a CUDA graph and replayed on new input gives the numbers of an eager
    call (padded input: the packed schedule is uploaded from host memory at call time, which a graph would
    freeze)."""
    torch.manual_seed(0)
    rnn = FusedRNN(16, 96, 2, bidirectional=True, device="cuda", backend="cuda")
    eager = copy.deepcopy(rnn)
    static_x = torch.randn(20, 4, 16, device="cuda", requires_grad=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (lazy init, allocator, plan)
        for _ in range(2):
            _train_step(rnn, static_x)
    torch.cuda.current_stream().wait_stream(side)
    rnn.zero_grad(set_to_none=True)
    static_x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out, static_h = _train_step(rnn, static_x)
    new_x = torch.randn(20, 4, 16, device="cuda")
    with torch.no_grad():
        static_x.copy_(new_x)
    graph.replay()
    torch.cuda.synchronize()
    x = new_x.clone().requires_grad_()
    out, h_n = _train_step(eager, x)
    assert torch.equal(static_out, out) and torch.equal(static_h, h_n)
    assert torch.equal(static_x.grad, x.grad)
    for (name, p), q in zip(rnn.named_parameters(), eager.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_many_calls_keep_cuda_memory_flat(kernel):
    """1000 forward+backward calls: the caching allocator's live bytes return to the same value."""
    torch.manual_seed(0)
    rnn = FusedRNN(8, 64, 2, bidirectional=True, device="cuda", backend="cuda")
    x = torch.randn(32, 16, 8, device="cuda", requires_grad=True)
    for _ in range(10):
        _train_step(rnn, x)
    rnn.zero_grad(set_to_none=True)
    x.grad = None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(1000):
        _train_step(rnn, x)
        rnn.zero_grad(set_to_none=True)
        x.grad = None
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before

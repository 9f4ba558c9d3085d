"""The Triton backend (rnn_fused/triton/): both kernel paths against the float64 reference, forward, backward
and through autograd, padded and packed, one and two directions, every dtype; opcheck on both ops.

Without a GPU the kernels run on CPU tensors under TRITON_INTERPRET=1 (tests/conftest.py sets it too; it must
be set before triton is imported). The interpreter is slow, so the shapes are tiny; the step path (one
launch per step, normally for H above MAX_REGISTER_H) is also run at small H by lowering the threshold.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from rnn_fused import reference as R  # noqa: E402
from rnn_fused.triton import recurrence as K  # noqa: E402

from .conftest import assert_matches, in_float32  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LOW_PRECISION = [torch.bfloat16, torch.float16]
# sorted by decreasing length as PackedSequence requires, with a repeat and a length-1 sequence
LENGTHS = [7, 5, 5, 2, 1]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: torch's intra-op threads only contend (a shared 2-core box made the fp64 reference loop
    300x slower with 2 threads than with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["register", "step"])
def path(request, monkeypatch):
    """Runs a test on each kernel path: 'step' lowers the threshold so that every H takes the step kernels."""
    if request.param == "step":
        monkeypatch.setattr(K, "MAX_REGISTER_H", 0)
    return request.param


def _problem(D, H, T=None, B=None, lengths=None, seed=0):
    """Float64 CPU inputs: padded [T, B, D, H] or, with ``lengths``, packed [N, D, H] + batch_sizes."""
    torch.manual_seed(seed)
    if lengths is not None:
        T, B = max(lengths), len(lengths)
        batch_sizes = torch.tensor([sum(n > t for n in lengths) for t in range(T)])
        rows = (int(batch_sizes.sum()),)
    else:
        batch_sizes, rows = None, (T, B)
    xw = torch.randn(*rows, D, H, dtype=torch.float64)
    w_hh = torch.randn(D, H, H, dtype=torch.float64) / H ** 0.5  # spectral radius ~1: neither dies nor explodes
    h0 = torch.randn(D, B, H, dtype=torch.float64)
    return xw, w_hh, h0, batch_sizes


def _run(forward, problem, grads, activation, dtype, device):
    """(h_all, h_last, dxw, dh0, dW_hh), the gradients through autograd: for our op its rule returns the
    backward op's dz as dxw and its dh0 as they are, and dW_hh = sum_t dz_t h_{t-1}^T (rnn_fused/ops.py)."""
    xw, w_hh, h0, bs = (t.to(device, dtype) if t is not None and t.is_floating_point() else t for t in problem)
    leaves = [t.clone().requires_grad_() for t in (xw, w_hh, h0)]
    h_all, h_last = forward(*leaves, bs, activation)
    d_xw, d_w_hh, d_h0 = torch.autograd.grad([h_all, h_last], leaves, [g.to(device, dtype) for g in grads])
    return h_all.detach(), h_last.detach(), d_xw, d_h0, d_w_hh


def _rounded(tensors, dtype):
    """The float64 values of ``tensors`` as ``dtype`` holds them: the float64 reference then judges the
    computation on the inputs the kernel got, not their rounding."""
    return tuple(t.to(dtype).double() if t is not None and t.is_floating_point() else t for t in tensors)


def _check(dtype, D, H, activation, xw_scale=1.0, **shape):
    xw, *rest = _problem(D, H, **shape)
    problem = _rounded((xw * xw_scale, *rest), dtype)
    xw, w_hh, h0, bs = problem
    torch.manual_seed(1)
    ref_all, ref_last = R.recurrence_forward(xw, w_hh, h0, bs, activation)
    grads = _rounded((torch.randn_like(ref_all), torch.randn_like(ref_last)), dtype)
    ref = _run(R.recurrence_forward, problem, grads, activation, torch.float64, "cpu")
    ours = _run(K.recurrence_forward, problem, grads, activation, dtype, DEVICE)
    # torch's own computation in `dtype` (tests/conftest.py): for the half types float32, rounded once
    yardstick = _run(in_float32(R.recurrence_forward), problem, grads, activation, dtype, "cpu")
    names = ["h_all", "h_last", "dxw (= dz)", "dh0", "dW_hh"]
    if activation == "relu" and dtype != torch.float32:
        # relu' jumps at z = 0: a z within rounding distance of 0 lands on the other side in low precision,
        # and the gradient through that element then differs by O(1) from the float64 one whatever the kernel
        # does. So the forward is judged end to end, the backward on one shared h_all.
        names, ours, ref, yardstick = names[:2], ours[:2], ref[:2], yardstick[:2]
        _check_backward_on(ref_all.to(dtype), problem, grads, activation)
    for name, a, r, y in zip(names, ours, ref, yardstick):
        assert a.dtype == dtype and a.device.type == DEVICE
        assert_matches(a.cpu(), r, y, name=f"{dtype} {name}")


def _check_backward_on(h_all, problem, grads, activation):
    """The backward op given ``h_all`` (any dtype) against the float64 reference given the same values."""
    _, w_hh, h0, bs = problem
    dtype = h_all.dtype

    def run(backward, dt, device):
        args = [None if t is None else t.to(device, dt) for t in (w_hh, h_all, h0, *grads)]
        return backward(*args, bs, activation)

    ours = run(K.recurrence_backward, dtype, DEVICE)[:2]
    for name, a, r, y in zip(["dz", "dh0"], ours, run(R.recurrence_backward, torch.float64, "cpu"),
                             run(in_float32(R.recurrence_backward, keep_float32=(2,)), dtype, "cpu")):
        assert_matches(a.cpu(), r, y, name=f"{dtype} {name} on a shared h_all")


@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("D", [1, 2])
@pytest.mark.parametrize("T", [1, 7])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("H", [1, 5, 33])
def test_padded_float32(H, B, T, D, activation):
    _check(torch.float32, D, H, activation, T=T, B=B)


@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("D", [1, 2])
@pytest.mark.parametrize("H", [1, 5, 33])
def test_packed_float32(H, D, activation):
    _check(torch.float32, D, H, activation, lengths=LENGTHS)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("D", [1, 2])
@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision(dtype, activation, D, packed):
    _check(dtype, D, 33, activation, **(dict(lengths=LENGTHS) if packed else dict(T=7, B=3)))


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_keeps_a_float32_state(path, dtype):
    """256 steps with small inputs (tanh near its linear part, where rounding errors add up instead of being
    squashed): a kernel that rounds its state to bfloat16 every step is 10x outside the bound (measured by
    breaking the register kernel so; the reference run in the half type, the yardstick before, rounded the
    same way and let it pass). float16's 3 more bits keep such a kernel within the bound here."""
    _check(dtype, 1, 33, "tanh", xw_scale=0.1, T=256, B=3)


@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("packed", [False, True])
def test_step_path_below_threshold(monkeypatch, packed, activation):
    """H = 70 with 64-wide tiles under the interpreter: two H tiles and two K blocks, the last one masked."""
    monkeypatch.setattr(K, "MAX_REGISTER_H", 0)
    _check(torch.float32, 2, 70, activation, **(dict(lengths=[4, 2, 2, 1]) if packed else dict(T=3, B=3)))


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_step_path_low_precision(monkeypatch, dtype):
    monkeypatch.setattr(K, "MAX_REGISTER_H", 0)
    _check(dtype, 2, 5, "tanh", lengths=[4, 2, 2, 1])


def test_above_threshold_takes_the_step_path():
    H = K.MAX_REGISTER_H + 1
    assert not K._uses_register_path(H) and K._uses_register_path(K.MAX_REGISTER_H)
    _check(torch.float32, 2, H, "tanh", lengths=[3, 2, 1])  # short: 3 H tiles x 3 K blocks a step


def test_several_batch_tiles(path):
    """More rows than one batch tile (16), with lengths that end inside the second tile."""
    _check(torch.float32, 2, 5, "tanh", lengths=[4] * 3 + [3] * 12 + [2, 2, 1])


@pytest.mark.parametrize("which", ["no dh_all", "no dh_last", "neither"])
def test_backward_optional_gradients(path, which):
    problem = _problem(2, 5, lengths=LENGTHS)
    h_all, h_last = R.recurrence_forward(*problem, "relu")
    grads = (None if which in ("no dh_all", "neither") else torch.randn_like(h_all),
             None if which in ("no dh_last", "neither") else torch.randn_like(h_last))
    _check_backward_on(h_all.float(), problem, grads, "relu")


def test_no_steps_and_empty_batch():
    w_hh = torch.randn(1, 4, 4, device=DEVICE)
    h0 = torch.randn(1, 3, 4, device=DEVICE)
    h_all, h_last = K.recurrence_forward(torch.randn(0, 3, 1, 4, device=DEVICE), w_hh, h0, None, "tanh")
    assert h_all.shape == (0, 3, 1, 4) and torch.equal(h_last, h0) and h_last.data_ptr() != h0.data_ptr()
    dh_last = torch.randn_like(h0)
    dz, dh0, _ = K.recurrence_backward(w_hh, h_all, h0, None, dh_last, None, "tanh")
    assert dz.shape == (0, 3, 1, 4) and torch.equal(dh0, dh_last)
    h_all, h_last = K.recurrence_forward(torch.randn(5, 0, 1, 4, device=DEVICE), w_hh,
                                         torch.randn(1, 0, 4, device=DEVICE), None, "tanh")
    assert h_all.shape == (5, 0, 1, 4) and h_last.shape == (1, 0, 4)


@pytest.mark.parametrize("override,message", [
    (dict(activation="sigmoid"), r"activation must be 'tanh' or 'relu', got 'sigmoid'"),
    (dict(dtype=torch.float64), r"Triton backend supports float32, float16 and bfloat16"),
    (dict(batch_sizes=torch.tensor([3, 4])), r"non-increasing"),
])
def test_bad_inputs_raise_clear_errors(override, message):
    dtype = override.pop("dtype", torch.float32)
    args = dict(xw=torch.randn(4, 3, 1, 5, device=DEVICE, dtype=dtype),
                w_hh=torch.randn(1, 5, 5, device=DEVICE, dtype=dtype),
                h0=torch.randn(1, 3, 5, device=DEVICE, dtype=dtype), batch_sizes=None, activation="tanh")
    if "batch_sizes" in override:
        args["xw"] = torch.randn(7, 1, 5, device=DEVICE)
    args.update(override)
    with pytest.raises(RuntimeError, match=message):
        K.recurrence_forward(**args)


@pytest.mark.parametrize("packed", [False, True])
def test_opcheck(packed):
    xw, w_hh, h0, bs = _problem(2, 5, **(dict(lengths=[3, 2, 2, 1]) if packed else dict(T=3, B=2)))
    xw, w_hh, h0 = (t.to(DEVICE, torch.float32) for t in (xw, w_hh, h0))
    torch.library.opcheck(torch.ops.rnn_fused.triton_recurrence_forward.default,
                          (xw.requires_grad_(), w_hh.requires_grad_(), h0.requires_grad_(), bs, "tanh"))
    h_all, h_last = K.recurrence_forward(xw.detach(), w_hh.detach(), h0.detach(), bs, "tanh")
    backward = torch.ops.rnn_fused.triton_recurrence_backward.default
    grads = (torch.randn_like(h_all), torch.randn_like(h_last)) if packed else (None, None)
    torch.library.opcheck(backward, (w_hh.detach(), h_all, h0.detach(), *grads, bs, "relu"))


def test_torch_compile_fullgraph():
    """The ops trace into one graph with their fake impls and autograd rule (aot_eager: the ops themselves
    run, so results match eager exactly)."""
    xw, w_hh, h0, bs = _problem(2, 5, lengths=[3, 2, 2, 1])
    leaves = [t.to(DEVICE, torch.float32).requires_grad_() for t in (xw, w_hh, h0)]

    def loss(xw, w_hh, h0):
        h_all, h_last = K.recurrence_forward(xw, w_hh, h0, bs, "tanh")
        return (h_all * h_all).sum() + h_last.sum()

    eager = loss(*leaves)
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)(*leaves)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    for a, e in zip(torch.autograd.grad(compiled, leaves), torch.autograd.grad(eager, leaves)):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


def test_an_inf_in_the_state_stays_out_of_the_padded_lanes(path):
    """H = 5 padded to 16 lanes: inf x a zero-padded column of W is NaN in a padded lane, which must not reach
    the real lanes at the next step (it did on the register path: [1, nan, nan] instead of the CPU's numbers)."""
    xw = torch.zeros(3, 1, 1, 5, device=DEVICE)
    w_hh = torch.full((1, 5, 5), 0.1, device=DEVICE)
    h0 = torch.zeros(1, 1, 5, device=DEVICE)
    h0[0, 0, 2] = float("inf")
    h_all, h_last = K.recurrence_forward(xw, w_hh, h0, None, "tanh")
    ref_all, ref_last = R.recurrence_forward(xw.cpu().double(), w_hh.cpu().double(), h0.cpu().double())
    torch.testing.assert_close(h_all.cpu().double(), ref_all)
    torch.testing.assert_close(h_last.cpu().double(), ref_last)


@pytest.mark.parametrize("B,D,H", [
    (20, 2, 3),  # small: the same check where it runs everywhere (the interpreter)
    # i_d * B + row passes 2^31 for the last rows of direction 1 (int32 before: they wrote over other rows)
    pytest.param(2**30 + 16, 2, 1, marks=pytest.mark.gpu),
    # a W_hh row offset o_n * H passes 2^31 (H above 46341; the step path; 4.3 GB of float16 W_hh)
    pytest.param(1, 1, 46342, marks=pytest.mark.gpu),
])
def test_index_math_is_int64_past_2_to_the_31(B, D, H):
    """One step, forward and backward, in float16, against the same step written in torch (float32). The
    large cases need a GPU with tens of GB (tests/conftest.py skips them without one)."""
    torch.manual_seed(0)
    xw = torch.randn(1, B, D, H, device=DEVICE, dtype=torch.float16)
    w_hh = (torch.randn(D, H, H, device=DEVICE, dtype=torch.float16) / H ** 0.5)
    h0 = torch.randn(D, B, H, device=DEVICE, dtype=torch.float16)
    h_all, h_last = K.recurrence_forward(xw, w_hh, h0, None, "tanh")
    expected = torch.tanh(xw[0].float() + torch.einsum("dhk,bdk->bdh", w_hh.float(), h0.transpose(0, 1).float()))
    torch.testing.assert_close(h_all[0].float(), expected, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(h_last.float(), expected.transpose(0, 1), atol=2e-3, rtol=2e-3)
    del expected, h_last
    dh_all = torch.ones_like(h_all)
    dz, dh0, _ = K.recurrence_backward(w_hh, h_all, h0, dh_all, None, None, "tanh")
    dz_expected = 1 - h_all[0].float() ** 2
    torch.testing.assert_close(dz[0].float(), dz_expected, atol=2e-3, rtol=2e-3)
    dh0_expected = torch.einsum("dhk,bdh->dbk", w_hh.float(), dz[0].float())
    torch.testing.assert_close(dh0.float(), dh0_expected, atol=2e-2, rtol=2e-2)


def test_an_older_triton_is_reported_unavailable_and_auto_falls_back(monkeypatch):
    """triton < 3.4 lacks triton.knobs: the backend must say so (and `auto` pick another), not crash."""
    import importlib

    import triton

    import rnn_fused.triton as triton_backend
    from rnn_fused import backends

    monkeypatch.setattr(triton, "__version__", "3.2.0")
    try:
        importlib.reload(triton_backend)
        assert "triton 3.2.0 is older than 3.4" in triton_backend.unavailable_reason()
        assert "older than 3.4" in backends.unavailable_reason("triton", torch.device("cpu"), torch.float32)
        assert backends.resolve("auto", torch.device("cpu"), torch.float32) == "cpu"
    finally:
        monkeypatch.undo()
        importlib.reload(triton_backend)
    assert triton_backend.unavailable_reason() is None

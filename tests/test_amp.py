"""Autocast: FusedRNN runs in the autocast dtype like nn.RNN (outputs in that dtype, float32 parameters
receive gradients through the casts), with fp32 accumulation; GradScaler training works."""

import copy

import pytest
import torch

from rnn_fused import FusedRNN, FusedRNNCell

from .conftest import assert_matches

CPU_AUTOCAST = [torch.bfloat16, torch.float16]


def _pair(backend, **kwargs):
    torch.manual_seed(0)
    ref = torch.nn.RNN(4, 8, 2, **kwargs)
    ours = FusedRNN(4, 8, 2, backend=backend, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _run(module, x, dtype, autocast=True):
    module.zero_grad()
    xi = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=dtype, enabled=autocast):
        out, h_n = module(xi)
    (out.float().sum() + h_n.float().sum()).backward()
    return out, h_n, xi.grad, [p.grad for p in module.parameters()]


@pytest.mark.parametrize("backend", ["auto", "cpu", "reference"])
@pytest.mark.parametrize("dtype", CPU_AUTOCAST)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_autocast_cpu_runs_in_the_autocast_dtype(backend, dtype, bidirectional):
    ref, ours = _pair(backend, bidirectional=bidirectional)
    x = torch.randn(7, 3, 4)
    out, h_n, dx, dparams = _run(ours, x, dtype)
    ref_out, ref_h, ref_dx, ref_dparams = _run(ref, x, dtype)
    assert out.dtype == ref_out.dtype == dtype and h_n.dtype == ref_h.dtype == dtype
    assert dx.dtype == torch.float32 and all(g.dtype == torch.float32 for g in dparams)
    exact = _run(copy.deepcopy(ref).double(), x.double(), dtype, autocast=False)
    for name, a, y, r in [("output", out, ref_out, exact[0]), ("h_n", h_n, ref_h, exact[1]),
                          ("d input", dx, ref_dx, exact[2])] + [
            (f"d param {i}", a, y, r) for i, (a, y, r) in enumerate(zip(dparams, ref_dparams, exact[3]))]:
        assert_matches(a, r, y, name=name, precision=dtype)


@pytest.mark.parametrize("dtype", CPU_AUTOCAST)
def test_autocast_cell(dtype):
    torch.manual_seed(0)
    ref, ours = torch.nn.RNNCell(4, 6), FusedRNNCell(4, 6)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 4)
    with torch.autocast("cpu", dtype=dtype):
        h, ref_h = ours(x), ref(x)
    assert h.dtype == ref_h.dtype == dtype
    exact = copy.deepcopy(ref).double()(x.double())
    assert_matches(h, exact, ref_h, name="cell under autocast")


def test_grad_scaler_training_reduces_the_loss():
    torch.manual_seed(0)
    model = FusedRNN(4, 16, batch_first=True)
    head = torch.nn.Linear(16, 1)
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    x, y = torch.randn(8, 12, 4), torch.randn(8, 1)
    losses = []
    for _ in range(30):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, _ = model(x)
            loss = torch.nn.functional.mse_loss(head(out[:, -1]).float(), y)
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
    assert all(p.dtype == torch.float32 for p in params)
    assert losses[-1] < 0.7 * losses[0], losses

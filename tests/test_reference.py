"""The reference itself: checked by hand on a tiny case, against torch.nn.RNN, and its explicit BPTT
against autograd. Everything else is judged against it, so it is judged first."""

import math

import pytest
import torch

from rnn_fused import reference as R

from .conftest import assert_matches


def test_tiny_case_by_hand():
    # H = I = 1, T = 2: h1 = tanh(0.5*1 + 0.1 + 0.3*0.2 + 0.2), h2 = tanh(0.5*(-1) + 0.1 + 0.3*h1 + 0.2)
    x = torch.tensor([[[1.0]], [[-1.0]]], dtype=torch.float64)
    w_ih, w_hh = torch.tensor([[0.5]], dtype=torch.float64), torch.tensor([[0.3]], dtype=torch.float64)
    b_ih, b_hh = torch.tensor([0.1], dtype=torch.float64), torch.tensor([0.2], dtype=torch.float64)
    h0 = torch.tensor([[0.2]], dtype=torch.float64)
    h1 = math.tanh(0.5 + 0.1 + 0.3 * 0.2 + 0.2)
    h2 = math.tanh(-0.5 + 0.1 + 0.3 * h1 + 0.2)
    out, h_last = R.textbook_rnn(x, w_ih, w_hh, b_ih, b_hh, h0)
    assert out.flatten().tolist() == pytest.approx([h1, h2], abs=1e-15)
    assert h_last.item() == pytest.approx(h2, abs=1e-15)
    # the same through the split form xw = x W_ih^T + b, then the recurrence
    xw = (x @ w_ih.T + b_ih + b_hh).unsqueeze(2)  # [T, B, D=1, H]
    h_all, h_last2 = R.recurrence_forward(xw, w_hh.unsqueeze(0), h0.unsqueeze(0))
    assert h_all.flatten().tolist() == pytest.approx([h1, h2], abs=1e-15)
    # BPTT by hand for L = h2: dz2 = 1 - h2^2, dz1 = 0.3 * dz2 * (1 - h1^2), dh0 = 0.3 * dz1
    dz2 = 1 - h2 ** 2
    dz1 = 0.3 * dz2 * (1 - h1 ** 2)
    dz, dh0, _ = R.recurrence_backward(w_hh.unsqueeze(0), h_all, h0.unsqueeze(0), None, torch.ones_like(h_last2))
    assert dz.flatten().tolist() == pytest.approx([dz1, dz2], abs=1e-15)
    assert dh0.item() == pytest.approx(0.3 * dz1, abs=1e-15)


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_textbook_matches_nn_rnn(nonlinearity):
    torch.manual_seed(0)
    rnn = torch.nn.RNN(3, 6, nonlinearity=nonlinearity, dtype=torch.float64)
    x, h0 = torch.randn(9, 4, 3, dtype=torch.float64), torch.randn(1, 4, 6, dtype=torch.float64)
    out, h_n = rnn(x, h0)
    ours, h_last = R.textbook_rnn(x, rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0, h0[0],
                                  nonlinearity)
    assert_matches(ours, out, name="output")
    assert_matches(h_last, h_n[0], name="h_n")


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("D", [1, 2])
@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_explicit_bptt_matches_autograd(packed, D, activation):
    torch.manual_seed(1)
    T, B, H = 6, 4, 5
    batch_sizes = torch.tensor([4, 4, 3, 2, 2, 1]) if packed else None
    rows = (int(batch_sizes.sum()),) if packed else (T, B)
    xw = torch.randn(*rows, D, H, dtype=torch.float64, requires_grad=True)
    w_hh = (torch.randn(D, H, H, dtype=torch.float64) / H ** 0.5).requires_grad_()
    h0 = torch.randn(D, B, H, dtype=torch.float64, requires_grad=True)
    h_all, h_last = R.recurrence_forward(xw, w_hh, h0, batch_sizes, activation)
    dh_all, dh_last = torch.randn_like(h_all), torch.randn_like(h_last)
    torch.autograd.backward([h_all, h_last], [dh_all, dh_last])
    dz, dh0, _ = R.recurrence_backward(w_hh, h_all.detach(), h0.detach(), dh_all, dh_last, batch_sizes,
                                       activation)
    assert_matches(dz, xw.grad, name="dz")
    assert_matches(dh0, h0.grad, name="dh0")


def test_packed_reference_matches_per_sequence_runs():
    """Packing semantics: each sequence runs alone for its own length; the reverse one starts at its end."""
    torch.manual_seed(2)
    H, lengths = 4, [5, 3, 1]
    seqs = [torch.randn(n, 2, H, dtype=torch.float64) for n in lengths]  # [len, D=2, H]
    w_hh = torch.randn(2, H, H, dtype=torch.float64) / 2
    h0 = torch.randn(2, len(lengths), H, dtype=torch.float64)
    batch_sizes = torch.tensor([sum(n > t for n in lengths) for t in range(max(lengths))])
    packed = torch.cat([torch.stack([s[t] for s in seqs if len(s) > t]) for t in range(max(lengths))])
    h_all, h_last = R.recurrence_forward(packed, w_hh, h0, batch_sizes)
    for b, s in enumerate(seqs):
        alone, alone_last = R.recurrence_forward(s.unsqueeze(1), w_hh, h0[:, b:b + 1])
        rows = [int(batch_sizes[:t].sum()) + b for t in range(len(s))]
        assert_matches(h_all[rows], alone[:, 0], name=f"h_all of sequence {b}")
        assert_matches(h_last[:, b], alone_last[:, 0], name=f"h_last of sequence {b}")

"""Functional API: the recurrence (the op boundary) and one RNN layer on top of it."""

from __future__ import annotations

import torch
from torch import Tensor

from .backends import recurrence_forward_fn, resolve
from .bptt import BPTTOptions


def recurrence(xw: Tensor, w_hh: Tensor, h0: Tensor, batch_sizes: Tensor | None = None,
               activation: str = "tanh", backend: str = "auto",
               bptt: BPTTOptions | None = None) -> tuple[Tensor, Tensor]:
    """``h_t = act(xw_t + W_hh h_{t-1})`` for all steps and directions; returns ``(h_all, h_last)``.

    Shapes as in csrc/ops.cpp: ``xw`` ``[T, B, D, H]`` (or ``[N, D, H]`` packed with ``batch_sizes``),
    ``w_hh`` ``[D, H, H]``, ``h0`` ``[D, B, H]``. Differentiable w.r.t. ``xw``, ``w_hh`` and ``h0``.
    ``bptt``: in-BPTT clipping and gradient-norm recording (rnn_fused/bptt.py).
    """
    forward = recurrence_forward_fn(resolve(backend, xw.device, xw.dtype), bptt)
    return forward(xw, w_hh, h0, batch_sizes, activation)


def input_projection(x: Tensor, w_ih: Tensor, b_ih: Tensor | None, b_hh: Tensor | None) -> Tensor:
    """``xw = x @ W_ih^T + (b_ih + b_hh)`` for every step and direction as one GEMM.

    ``x`` ``[..., I]``, ``w_ih`` ``[D, H, I]``, biases ``[D, H]``; returns ``[..., D, H]``.
    """
    D, H, I = w_ih.shape
    x2d = x.flatten(0, -2)  # not reshape(-1, I): ambiguous for I = 0, which nn.RNN accepts
    w = w_ih.reshape(D * H, I)
    bias = None
    if b_ih is not None:
        bias = b_ih if b_hh is None else b_ih + b_hh
    elif b_hh is not None:
        bias = b_hh
    xw = torch.mm(x2d, w.T) if bias is None else torch.addmm(bias.reshape(D * H), x2d, w.T)
    return xw.view(*x.shape[:-1], D, H)


def rnn_layer(x: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None = None, b_hh: Tensor | None = None,
              h0: Tensor | None = None, batch_sizes: Tensor | None = None, activation: str = "tanh",
              backend: str = "auto", bptt: BPTTOptions | None = None) -> tuple[Tensor, Tensor]:
    """One Elman RNN layer with D directions (D = 2: bidirectional, direction 1 runs backwards in time).

    ``x`` ``[T, B, I]`` (or packed ``[N, I]`` with ``batch_sizes``), ``w_ih`` ``[D, H, I]``, ``w_hh``
    ``[D, H, H]``, ``b_ih``/``b_hh`` ``[D, H]`` or None, ``h0`` ``[D, B, H]`` or None (zeros).
    Returns ``output`` ``[T, B, D*H]`` (or ``[N, D*H]``), the directions side by side as in ``nn.RNN``, and
    ``h_last`` ``[D, B, H]``, each sequence's state at its own last step.
    """
    D, H, _ = w_ih.shape
    if h0 is None:
        B = x.shape[1] if batch_sizes is None else (int(batch_sizes[0]) if len(batch_sizes) else 0)
        h0 = x.new_zeros(D, B, H)
    xw = input_projection(x, w_ih, b_ih, b_hh)
    h_all, h_last = recurrence(xw, w_hh, h0, batch_sizes, activation, backend, bptt)
    return h_all.reshape(*x.shape[:-1], D * H), h_last

"""The Elman RNN in plain PyTorch, written to be read. Every test judges the kernels against this file.

The recurrence (one direction)::

    z_t = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh        (pre-activation)
    h_t = act(z_t)                                      (act = tanh or relu)

Fast implementations split it in two (see ``textbook_rnn`` vs ``recurrence_forward``):

1. ``xw = x @ W_ih^T + (b_ih + b_hh)`` for all T steps at once: one big matrix product with no dependence
   between steps;
2. the sequential part, ``h_t = act(xw_t + W_hh h_{t-1})``: the op boundary every backend implements.

Backpropagation through time (BPTT) runs the recurrence backwards. With ``dh_t`` the gradient of the loss
w.r.t. ``h_t`` arriving from outside (the layer's output) and ``carry_t`` the gradient arriving from step
t+1 through W_hh::

    dz_t      = (dh_t + carry_t) * act'(z_t)          act'(z) = 1 - h^2 (tanh), [not h <= 0] (relu; NaN passes, as in torch)
    carry_t-1 = W_hh^T dz_t
    dW_hh     = sum_t dz_t h_{t-1}^T,  d(xw_t) = dz_t,  dh_0 = carry_0

``dh_t/dh_k`` is the product of the Jacobians ``diag(act'(z_i)) W_hh`` for i = k+1..t: if the spectral radius
of W_hh (times the activation's slope) is below 1 the product shrinks geometrically (vanishing gradients),
above 1 it can grow (exploding gradients). ``recurrence_backward`` below is that loop, step by step.

Layouts (the op boundary's, see csrc/ops.cpp): D directions (1, or 2 for bidirectional: direction 1 runs
backwards in time), ``xw``/``h_all`` ``[T, B, D, H]`` padded or ``[N, D, H]`` packed with ``batch_sizes``
``[T]`` (as in ``torch.nn.utils.rnn.PackedSequence``: sequences sorted by decreasing length, ``batch_sizes[t]``
of them still running at step t), ``w_hh`` ``[D, H, H]``, ``h0``/``h_last`` ``[D, B, H]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import contract


def activation_fn(activation: str):
    if activation == "tanh":
        return torch.tanh
    if activation == "relu":
        return torch.relu
    raise ValueError(f"activation must be 'tanh' or 'relu', got {activation!r}")


def activation_backward(g: Tensor, h: Tensor, activation: str) -> Tensor:
    """``g * act'(z)``, written through ``h = act(z)`` (the backward needs only the stored hidden states):
    ``g * (1 - h^2)`` for tanh; for relu a select, ``0 where h <= 0 else g``, as torch's relu backward, so
    an inf or NaN gradient at a unit that is off gives 0 (a product would give inf * 0 = NaN); NaN h passes g."""
    if activation == "tanh":
        return g * (1 - h * h)
    return torch.where(h <= 0, torch.zeros_like(g), g)


def textbook_rnn(x: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor, h0: Tensor,
                 activation: str = "tanh") -> tuple[Tensor, Tensor]:
    """One direction, padded ``x [T, B, I]``, exactly the formula above, one step at a time."""
    act = activation_fn(activation)
    h = h0
    outputs = []
    for x_t in x:
        h = act(x_t @ w_ih.T + b_ih + h @ w_hh.T + b_hh)
        outputs.append(h)
    return torch.stack(outputs) if outputs else x.new_empty(0, *h0.shape), h


def _steps(batch_sizes: Tensor | None, T: int, B: int):
    """(time, live rows, index of the step's first row in the flat packed layout) for t = 0..T-1."""
    sizes = [B] * T if batch_sizes is None else batch_sizes.tolist()
    begin = 0
    for t, rows in enumerate(sizes):
        yield t, rows, begin
        begin += rows


def _flat(x: Tensor, packed: bool) -> Tensor:
    """[T, B, D, H] -> [T*B, D, H] (padded is packed with batch_sizes = [B] * T)."""
    return x if packed else x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])  # no -1: H = 0 is legal


def recurrence_forward(xw: Tensor, w_hh: Tensor, h0: Tensor, batch_sizes: Tensor | None = None,
                       activation: str = "tanh") -> tuple[Tensor, Tensor]:
    """The op boundary's forward: ``h_t = act(xw_t + W_hh h_{t-1})`` for every direction; differentiable.

    The state ``h`` holds one row per sequence. A step updates only the rows still running, so a finished
    sequence keeps its last state (which is its ``h_last``) and, in the reverse direction, a sequence that
    has not started yet still holds its ``h0`` when it starts at its own last step.
    """
    p = contract.check_forward(xw, w_hh, h0, batch_sizes, activation)
    act = activation_fn(activation)
    if p.B == 0 or p.H == 0:
        # Every tensor has zero elements: no loop over T (such an xw may claim 2^40 steps). One step's
        # expressions on all rows at once, so that autograd reaches xw, w_hh and h0 as from the loop.
        z = xw + torch.einsum("dbk,dhk->dh", h0, w_hh)
        return act(z).contiguous(), act(h0 + torch.einsum("dbk,dhk->dbh", h0, w_hh))
    packed = batch_sizes is not None
    D, B, T = p.D, p.B, p.T
    xw_rows = _flat(xw, packed)
    steps = list(_steps(batch_sizes, T, B))
    outputs, finals = [], []
    for d in range(D):
        h = h0[d]
        out_rows = [None] * T
        for t, rows, begin in (steps if d == 0 else reversed(steps)):
            h_new = act(xw_rows[begin:begin + rows, d] + h[:rows] @ w_hh[d].T)
            h = torch.cat([h_new, h[rows:]])
            out_rows[t] = h_new
        outputs.append(torch.cat(out_rows) if T else xw_rows[:, d])
        finals.append(h)
    h_all = torch.stack(outputs, dim=1).reshape(xw.shape)
    return h_all, torch.stack(finals)


def clip_gradient(g: Tensor, clip_mode: str, clip: float) -> Tensor:
    """The in-BPTT clip rule applied to ``g = dL/dh_t`` ``[rows, H]`` (one row per sequence) before act'.

    ``"value"`` clamps each element to ``[-clip, clip]``; ``"norm"`` rescales each row whose norm exceeds
    ``clip`` to norm ``clip`` (``g * min(1, clip / ||g||)``); ``"none"`` leaves ``g`` as it is. NaN is
    never hidden: a NaN element passes "value", and a row whose norm is NaN becomes all NaN under "norm".
    """
    if clip_mode == "none":
        return g
    if clip_mode == "value":
        if clip > torch.finfo(g.dtype).max:
            return g  # the bound rounds to inf in g's dtype, as in every kernel: it clamps nothing, inf included
        return g.clamp(-clip, clip)
    norm = row_norm(g).unsqueeze(-1)
    return g * (clip / norm.clamp(min=clip)).to(g.dtype)


def row_norm(g: Tensor) -> Tensor:
    """``||g||`` of each row, float64: the squares are summed in float64, so the norm of a vanishing gradient
    (1e-30, whose float32 square is 0) is still right."""
    return g.double().square().sum(-1).sqrt()


def empty_grad_norm(h_all: Tensor, record_norms: bool) -> Tensor:
    """The backward's ``grad_norm`` output, uninitialised: ``h_all``'s shape without H (empty when not
    recording), float64 for float64 input, float32 otherwise (csrc/ops.cpp)."""
    dtype = torch.float64 if h_all.dtype == torch.float64 else torch.float32
    return h_all.new_empty(h_all.shape[:-1] if record_norms else (0,), dtype=dtype)


def recurrence_backward(w_hh: Tensor, h_all: Tensor, h0: Tensor, dh_all: Tensor | None, dh_last: Tensor | None,
                        batch_sizes: Tensor | None = None, activation: str = "tanh", clip_mode: str = "none",
                        clip: float = 0.0, record_norms: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """The op boundary's backward: BPTT, written out. Returns ``(dz, dh0, grad_norm)``.

    ``carry`` is the gradient w.r.t. the state rows. It starts as ``dh_last`` (the gradient of each
    sequence's final state) and walks back through the steps in the opposite order of the forward: a step
    adds the gradient flowing into its outputs (``g = dL/dh_t``), multiplies by act', and sends
    ``W_hh^T dz`` to the previous state of the rows it updated. Rows a step did not touch pass their carry
    through unchanged.

    Options (csrc/ops.cpp states them for every backend): ``clip_mode``/``clip`` apply ``clip_gradient``
    to ``g`` before act'; ``record_norms`` returns ``grad_norm``, ``||g||`` of every row before clipping, in
    h_all's shape without H (an empty tensor otherwise).
    """
    p = contract.check_backward(w_hh, h_all, h0, dh_all, dh_last, batch_sizes, activation, clip_mode, clip)
    if p.empty:
        # No work, no loop over T: the gradient of h_last (= h0) passes to h0; a row of H = 0 has norm 0.
        dh0 = dh_last.clone(memory_format=torch.contiguous_format) if dh_last is not None else \
            torch.zeros_like(h0, memory_format=torch.contiguous_format)
        return (torch.empty_like(h_all, memory_format=torch.contiguous_format), dh0,
                empty_grad_norm(h_all, record_norms).zero_())
    packed = batch_sizes is not None
    D, B, T = p.D, p.B, p.T
    h_rows = _flat(h_all, packed)
    dh_rows = _flat(dh_all, packed) if dh_all is not None else torch.zeros_like(h_rows)
    dz_rows = torch.empty_like(h_rows, memory_format=torch.contiguous_format)
    grad_norm = empty_grad_norm(h_all, record_norms)
    norm_rows = grad_norm.view(-1, D)  # [rows, D], like h_rows
    dh0 = torch.empty_like(h0, memory_format=torch.contiguous_format)
    steps = list(_steps(batch_sizes, T, B))
    for d in range(D):
        carry = dh_last[d].clone() if dh_last is not None else torch.zeros_like(h0[d])
        for t, rows, begin in (reversed(steps) if d == 0 else steps):
            h_t = h_rows[begin:begin + rows, d]
            g = dh_rows[begin:begin + rows, d] + carry[:rows]  # dL/dh_t
            if record_norms:
                norm_rows[begin:begin + rows, d] = row_norm(g)
            dz_t = activation_backward(clip_gradient(g, clip_mode, clip), h_t, activation)
            dz_rows[begin:begin + rows, d] = dz_t
            carry[:rows] = dz_t @ w_hh[d]  # row form of W_hh^T dz_t
        dh0[d] = carry
    return dz_rows.reshape(h_all.shape), dh0, grad_norm

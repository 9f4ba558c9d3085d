"""The recurrence under torch.func transforms (``grad``, ``vjp``, ``jacrev``, ``vmap``, per-sample gradients).

functorch cannot run the C++ autograd rule (csrc/recurrence_autograd.cpp: "cannot use C++
torch::autograd::Function with functorch transforms") nor a ``register_autograd`` rule; it needs an
``autograd.Function`` with ``setup_context``, and for ``vmap`` a batching rule. So while a transform is
active (:func:`active`), the C++ and Triton backends' forward goes through :class:`Recurrence` here: the same
rule (the backward op for dz and dh0, the extension's ``recurrence_weight_grad`` for dW_hh), written the way
functorch takes it. Eager calls never come here.

The batching rule: a vmapped ``xw`` (and ``h0``) with an unbatched ``w_hh`` -- per-sample gradients, vmap
over inputs -- is folded into the batch dimension, one kernel call for all samples (nn.RNN has no batching
rule for rnn_tanh at all); anything else (a batched ``w_hh``, packed input) runs sample by sample.
"""

from __future__ import annotations

import torch
from torch import Tensor


def active() -> bool:
    """Whether a torch.func transform is running (its interpreter stack is not empty).

    Private API (torch._C._functorch); tests/test_func.py fails loudly if torch changes it. False while
    torch.compile traces (dynamo answers it from its own state there)."""
    return not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None


def forward_ad_active() -> bool:
    """Whether a torch.autograd.forward_ad.dual_level is open. The kernels have no forward-mode derivative
    (the C++ and Triton rules are reverse-mode only); the reference's torch ops have one, as nn.RNN's, so the
    recurrence runs there meanwhile (rnn_fused/backends.py) and a tangent is never dropped."""
    return torch.autograd.forward_ad._current_level >= 0


def recurrence(forward_op, backward_op, xw: Tensor, w_hh: Tensor, h0: Tensor, batch_sizes: Tensor | None,
               activation: str) -> tuple[Tensor, Tensor]:
    """``forward_op(xw, w_hh, h0, batch_sizes, activation)`` differentiable under torch.func."""
    return Recurrence.apply(xw, w_hh, h0, batch_sizes, activation, forward_op, backward_op)


class Recurrence(torch.autograd.Function):
    @staticmethod
    def forward(xw, w_hh, h0, batch_sizes, activation, forward_op, backward_op):
        return forward_op(xw, w_hh, h0, batch_sizes, activation)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, w_hh, h0, batch_sizes, activation, _, backward_op = inputs
        ctx.save_for_backward(w_hh, h0, output[0])
        ctx.batch_sizes = None if batch_sizes is None else batch_sizes.clone()
        ctx.activation = activation
        ctx.backward_op = backward_op

    @staticmethod
    def backward(ctx, dh_all, dh_last):
        from .ops import saved_tensors, weight_grad

        w_hh, h0, h_all = saved_tensors(ctx)
        dz, dh0, _ = ctx.backward_op(w_hh, h_all, h0, dh_all, dh_last, ctx.batch_sizes, ctx.activation)
        dw_hh = weight_grad(dz, h_all, h0, ctx.batch_sizes) if ctx.needs_input_grad[1] else None
        return dz, dw_hh, dh0, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, xw, w_hh, h0, batch_sizes, activation, forward_op, backward_op):
        xw_dim, w_dim, h0_dim = in_dims[:3]
        n = info.batch_size
        if w_dim is None and batch_sizes is None:
            # Samples folded into B: xw [T, B, D, H] -> [T, n*B, D, H], h0 [D, B, H] -> [D, n*B, H].
            xw = xw.unsqueeze(1).expand(xw.shape[0], n, *xw.shape[1:]) if xw_dim is None else xw.movedim(xw_dim, 1)
            T, _, B, D, H = xw.shape
            h0 = h0.unsqueeze(1).expand(D, n, B, H) if h0_dim is None else h0.movedim(h0_dim, 1)
            h_all, h_last = Recurrence.apply(xw.reshape(T, n * B, D, H), w_hh, h0.reshape(D, n * B, H),
                                             None, activation, forward_op, backward_op)
            return (h_all.view(T, n, B, D, H), h_last.view(D, n, B, H)), (1, 1)
        outs = [Recurrence.apply(*(a if d is None else a.select(d, i) for a, d in zip((xw, w_hh, h0), in_dims[:3])),
                                 batch_sizes, activation, forward_op, backward_op) for i in range(n)]
        return (torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])), (0, 0)

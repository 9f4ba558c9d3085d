"""BPTT with options: in-BPTT gradient clipping and recording of ||dL/dh_t||, on every backend.

The plain path (``functional.recurrence`` without options) goes through the ops' registered autograd
(rnn_fused/ops.py), which torch.compile can trace. This path wraps the same forward and backward ops of the
chosen backend in an ``autograd.Function`` that passes the backward op its ``clip_mode`` / ``clip`` /
``record_norms`` arguments (semantics in csrc/ops.cpp, reference rule in ``reference.clip_gradient``) and
hands the recorded norms to a Python callback. The callback is a side effect of the backward, so
this path is for eager mode: torch.compile(fullgraph=True) raises; plain torch.compile graph-breaks around
it and runs it eagerly; a double backward (create_graph=True), which the plain path supports, raises.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from . import _extension, contract, ops, reference


@dataclass(frozen=True)
class BPTTOptions:
    """What the backward does besides BPTT.

    clip_mode: ``"none"``, ``"value"`` or ``"norm"``; clip: the bound (> 0 unless clip_mode is "none");
    on_grad_norm: called during backward with ``grad_norm`` (``||dL/dh_t||`` per row and direction, before
    clipping, shaped like ``h_all`` without its last dimension) or None not to record.
    """

    clip_mode: str = "none"
    clip: float = 0.0
    on_grad_norm: Callable[[Tensor], None] | None = None

    def __post_init__(self):
        contract.check_clip(self.clip_mode, self.clip)

    @property
    def active(self) -> bool:
        return self.clip_mode != "none" or self.on_grad_norm is not None


def backend_ops(backend: str):
    """(forward, backward) of a concrete backend's op boundary, without autograd."""
    if backend in ("cpu", "cuda"):
        _extension.load()
        return torch.ops.rnn_fused.recurrence_forward.default, torch.ops.rnn_fused.recurrence_backward.default
    if backend == "triton":
        from . import triton as triton_backend

        return triton_backend.recurrence_forward.default, triton_backend.recurrence_backward.default
    return reference.recurrence_forward, reference.recurrence_backward


class _RecurrenceWithOptions(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xw, w_hh, h0, batch_sizes, activation, backend, options):
        forward_op, backward_op = backend_ops(backend)
        h_all, h_last = forward_op(xw, w_hh, h0, batch_sizes, activation)
        ctx.save_for_backward(w_hh, h0, h_all)
        # A copy of batch_sizes: the caller's tensor may change before the backward runs (rnn_fused/ops.py).
        ctx.batch_sizes = batch_sizes.clone() if batch_sizes is not None else None
        ctx.activation, ctx.options, ctx.backward_op = activation, options, backward_op
        return h_all, h_last

    @staticmethod
    def backward(ctx, dh_all, dh_last):
        if torch.is_grad_enabled():
            # create_graph=True: the clipped BPTT has no derivative of its own (the plain path has one)
            raise RuntimeError("rnn_fused: in-BPTT clipping and gradient-norm recording do not support "
                               "create_graph=True (double backward); build the model without bptt_clip and "
                               "record_grad_norms for gradient penalties")
        w_hh, h0, h_all = ops.saved_tensors(ctx)
        o = ctx.options
        dz, dh0, grad_norm = ctx.backward_op(w_hh, h_all, h0, dh_all, dh_last, ctx.batch_sizes, ctx.activation,
                                           o.clip_mode, float(o.clip), o.on_grad_norm is not None)
        if o.on_grad_norm is not None:
            o.on_grad_norm(grad_norm)
        dw_hh = ops.weight_grad(dz, h_all, h0, ctx.batch_sizes) if ctx.needs_input_grad[1] else None
        return dz, dw_hh, dh0, None, None, None, None


def recurrence_with_options(xw: Tensor, w_hh: Tensor, h0: Tensor, batch_sizes: Tensor | None, activation: str,
                            backend: str, options: BPTTOptions) -> tuple[Tensor, Tensor]:
    """``functional.recurrence`` on the concrete ``backend`` with the backward run under ``options``."""
    if torch.compiler.is_compiling():
        raise RuntimeError("rnn_fused: in-BPTT clipping and gradient-norm recording run in eager mode only "
                           "(their backward calls back into Python); compile the model without them")
    return _RecurrenceWithOptions.apply(xw, w_hh, h0, batch_sizes, activation, backend, options)

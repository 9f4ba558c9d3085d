"""BPTT with options: in-BPTT gradient clipping and recording of ||dL/dh_t||, on every backend.

The options travel with the forward call: the op boundary's ``recurrence_forward`` takes ``clip_mode``,
``clip`` and a ``norm_probe`` (csrc/ops.cpp), and its one registered autograd rule (C++ for the C++ kernels,
the same rule in Python for Triton's) runs the backward op under them and hands the recorded norms back as
the probe's gradient. No Python runs inside the backward, so torch.compile(fullgraph=True) traces a model
with ``bptt_clip`` (tests/test_bptt.py). Recording goes through a hook on the probe, a leaf created by the
forward (diagnostics.GradFlow), so it runs eagerly: under torch.compile, ``record_grad_norms`` raises.

The reference backend (plain torch ops, differentiated by autograd) has no such rule; its options run in an
``autograd.Function`` here that calls the reference's own backward with the same arguments. A double
backward (create_graph=True) with options raises on every backend: clipped BPTT has no derivative.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import _extension, contract, func_transforms, ops, reference


@dataclass(frozen=True)
class BPTTOptions:
    """What the backward does besides BPTT.

    clip_mode: ``"none"``, ``"value"`` or ``"norm"``; clip: the bound (> 0 unless clip_mode is "none");
    norm_probe: None, or a tensor shaped like the recorded norms (``h_all``'s shape without H, float32;
    float64 for float64) that requires grad: the backward sets its gradient to ``||dL/dh_t||`` per row and
    direction, before clipping.
    """

    clip_mode: str = "none"
    clip: float = 0.0
    norm_probe: Tensor | None = None

    def __post_init__(self):
        contract.check_clip(self.clip_mode, self.clip)

    @property
    def active(self) -> bool:
        return self.clip_mode != "none" or self.norm_probe is not None


def backend_ops(backend: str):
    """(forward, backward) of a concrete backend's op boundary, without autograd."""
    if backend in ("cpu", "cuda"):
        _extension.load()
        return torch.ops.rnn_fused.recurrence_forward.default, torch.ops.rnn_fused.recurrence_backward.default
    if backend == "triton":
        from . import triton as triton_backend

        return triton_backend.recurrence_forward.default, triton_backend.recurrence_backward.default
    return reference.recurrence_forward, reference.recurrence_backward


class _ReferenceWithOptions(torch.autograd.Function):
    """The reference backend's options: its forward, and its backward run with the options."""

    @staticmethod
    def forward(ctx, xw, w_hh, h0, batch_sizes, activation, clip_mode, clip, norm_probe):
        h_all, h_last = reference.recurrence_forward(xw, w_hh, h0, batch_sizes, activation)
        ctx.save_for_backward(w_hh, h0, h_all)
        # A copy of batch_sizes: the caller's tensor may change before the backward runs (rnn_fused/ops.py).
        ctx.batch_sizes = batch_sizes.clone() if batch_sizes is not None else None
        ctx.activation, ctx.clip_mode, ctx.clip = activation, clip_mode, clip
        ctx.record_norms = norm_probe is not None
        return h_all, h_last

    @staticmethod
    def backward(ctx, dh_all, dh_last):
        if torch.is_grad_enabled():
            raise RuntimeError(ops.OPTIONS_NOT_TWICE_DIFFERENTIABLE)
        w_hh, h0, h_all = ops.saved_tensors(ctx)
        dz, dh0, grad_norm = reference.recurrence_backward(w_hh, h_all, h0, dh_all, dh_last, ctx.batch_sizes,
                                                           ctx.activation, ctx.clip_mode, ctx.clip, ctx.record_norms)
        dw_hh = ops.weight_grad(dz, h_all, h0, ctx.batch_sizes) if ctx.needs_input_grad[1] else None
        return dz, dw_hh, dh0, None, None, None, None, grad_norm if ctx.record_norms else None


def recurrence_with_options(xw: Tensor, w_hh: Tensor, h0: Tensor, batch_sizes: Tensor | None, activation: str,
                            backend: str, options: BPTTOptions) -> tuple[Tensor, Tensor]:
    """``functional.recurrence`` on the concrete ``backend`` with the backward run under ``options``."""
    if func_transforms.active():
        raise RuntimeError("rnn_fused: in-BPTT clipping and gradient-norm recording are not supported under "
                           "torch.func transforms; build the model without bptt_clip and record_grad_norms there")
    args = (xw, w_hh, h0, batch_sizes, activation, options.clip_mode, float(options.clip), options.norm_probe)
    if backend in ("cpu", "cuda"):
        return torch.ops.rnn_fused.recurrence_forward(*args)
    if backend == "triton":
        from . import triton as triton_backend

        return triton_backend.recurrence_forward(*args)
    if torch.compiler.is_compiling():
        raise RuntimeError("rnn_fused: in-BPTT clipping and gradient-norm recording on backend='reference' run "
                           "in eager mode only; compile with backend='cpu', 'cuda' or 'triton'")
    return _ReferenceWithOptions.apply(*args)

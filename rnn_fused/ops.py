"""Fake (meta) implementations of the op boundary for every backend whose kernels are torch ops (the C++ ops
``rnn_fused::recurrence_forward/backward``, CPU and CUDA, and the Triton ones, rnn_fused/triton/), and the
autograd rule for the Triton ones. Shapes and semantics: csrc/ops.cpp and rnn_fused/reference.py.

The autograd rule is the split described in reference.py: the op's backward gives ``dz`` (which is also the
gradient of ``xw``) and ``dh0``; the gradient of ``W_hh`` is then one large GEMM per direction,
``dW_hh[d] = dz[d]^T @ h_prev[d]`` over all rows, never T small ones. For the C++ ops the rule is C++
(csrc/recurrence_autograd.cpp: a differentiable call is one dispatcher hop); the Triton ops, defined in
Python, register the same rule here, with the same weight gradient op and create_graph path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import contract, reference


# The output layout every backend returns: the inputs' shapes, contiguous whatever the inputs' strides.
_CONTIGUOUS = dict(memory_format=torch.contiguous_format)


def fake_forward(xw: Tensor, w_hh: Tensor, h0: Tensor, batch_sizes: Tensor | None, activation: str,
                 clip_mode: str = "none", clip: float = 0.0, norm_probe: Tensor | None = None):
    # The fakes validate like the kernels: a call sent here because one argument is on the meta device must
    # not return an empty tensor of another device with a grad_fn.
    contract.check_forward(xw, w_hh, h0, batch_sizes, activation)
    contract.check_forward_options(xw, clip_mode, clip, norm_probe)
    return torch.empty_like(xw, **_CONTIGUOUS), torch.empty_like(h0, **_CONTIGUOUS)


def fake_backward(w_hh: Tensor, h_all: Tensor, h0: Tensor, dh_all: Tensor | None, dh_last: Tensor | None,
                  batch_sizes: Tensor | None, activation: str, clip_mode: str = "none", clip: float = 0.0,
                  record_norms: bool = False):
    contract.check_backward(w_hh, h_all, h0, dh_all, dh_last, batch_sizes, activation, clip_mode, clip)
    return (torch.empty_like(h_all, **_CONTIGUOUS), torch.empty_like(h0, **_CONTIGUOUS),
            reference.empty_grad_norm(h_all, record_norms))


def weight_grad(dz: Tensor, h_all: Tensor, h0: Tensor, batch_sizes: Tensor | None) -> Tensor:
    """dW_hh[d] = sum over steps and rows of dz_t h_{t-1}^T: the extension's op (csrc/recurrence_autograd.cpp),
    one rule for every backend's autograd."""
    return torch.ops.rnn_fused.recurrence_weight_grad(dz, h_all, h0, batch_sizes)


# csrc/recurrence_autograd.cpp raises the same words.
OPTIONS_NOT_TWICE_DIFFERENTIABLE = (
    "rnn_fused: in-BPTT clipping and gradient-norm recording do not support create_graph=True (double "
    "backward); build the model without bptt_clip and record_grad_norms for gradient penalties")


def register_fakes(forward_op: str, backward_op: str) -> None:
    """Fake impls of a forward/backward op pair (qualified names), for torch.compile, torch.export, opcheck."""
    torch.library.register_fake(forward_op)(fake_forward)
    torch.library.register_fake(backward_op)(fake_backward)


def register_reference_backward() -> None:
    """The differentiable BPTT the C++ rule calls under create_graph=True (csrc/ops.cpp declares it)."""
    def backward_reference(w_hh, h_all, h0, dh_all, dh_last, batch_sizes, activation):
        dz, dh0, _ = reference.recurrence_backward(w_hh, h_all, h0, dh_all, dh_last, batch_sizes, activation)
        return dz, dh0

    torch.library.impl("rnn_fused::recurrence_backward_reference", "CompositeImplicitAutograd")(backward_reference)


def saved_tensors(ctx) -> tuple[Tensor, ...]:
    """``ctx.saved_tensors`` of the op's autograd, saying what to do when one was modified in place.

    The rule saves ``h_all``, the output the caller gets, rather than a copy of it: a copy would cost 4-6% of
    the CPU forward (2-3% of forward + backward) and T*B*D*H more memory in training (benchmarks/NOTES.md,
    "In-place ops on the output"). So an in-place op on the output before backward (``F.relu(out,
    inplace=True)``, ``out.mul_(2)``, ``out += x``), which nn.RNN's CPU path allows, raises here as it would
    for any torch op that saves its output (torch.tanh, torch.exp): this says why and what to write instead.
    """
    try:
        return ctx.saved_tensors
    except RuntimeError as error:
        if "modified by an inplace operation" not in str(error):
            raise
        raise RuntimeError(
            "rnn_fused: the recurrence's output (h_all, the RNN layer's output) is saved for its backward "
            "and was modified in place before backward (e.g. F.relu(out, inplace=True), out.mul_(2), out += x), "
            "or w_hh / h0 were; apply the op out of place (out = F.relu(out)) or on a copy (out = out.clone())"
        ) from error


def register(forward_op: str, backward_op: str) -> None:
    """Fakes and the autograd rule for ops defined in Python (Triton's): the rule of
    csrc/recurrence_autograd.cpp, step for step, sharing its weight gradient and its create_graph path."""
    register_fakes(forward_op, backward_op)
    backward = _resolve(backward_op)

    def setup_context(ctx, inputs, output):
        xw, w_hh, h0, batch_sizes, activation, clip_mode, clip, norm_probe = inputs
        h_all, _ = output
        ctx.options = (clip_mode, clip, norm_probe is not None)
        ctx.save_for_backward(w_hh, h0, h_all)
        # A copy: the caller's tensor (a PackedSequence's batch_sizes) may change before the backward runs.
        ctx.batch_sizes = batch_sizes.clone() if batch_sizes is not None else None
        ctx.activation = activation

    def backward_rule(ctx, dh_all, dh_last):
        w_hh, h0, h_all = saved_tensors(ctx)
        clip_mode, clip, record_norms = ctx.options
        grad_norm = None
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (dh_all, dh_last, w_hh, h0, h_all)):
            if clip_mode != "none" or record_norms:
                raise RuntimeError(OPTIONS_NOT_TWICE_DIFFERENTIABLE)
            # create_graph=True (gradient penalties differentiate the gradient): the kernels have no
            # derivative of their own, so BPTT runs as the reference's differentiable torch ops instead.
            dz, dh0, _ = reference.recurrence_backward(w_hh, h_all, h0, dh_all, dh_last, ctx.batch_sizes,
                                                       ctx.activation)
        else:
            dz, dh0, grad_norm = backward(w_hh, h_all, h0, dh_all, dh_last, ctx.batch_sizes, ctx.activation,
                                          clip_mode, clip, record_norms)
        dw_hh = weight_grad(dz, h_all, h0, ctx.batch_sizes) if ctx.needs_input_grad[1] else None
        # norm_probe's gradient is the recorded norms (csrc/ops.cpp).
        return dz, dw_hh, dh0, None, None, None, None, grad_norm if record_norms else None

    torch.library.register_autograd(forward_op, backward_rule, setup_context=setup_context)


def _resolve(qualified_name: str):
    namespace, name = qualified_name.split("::")
    return getattr(getattr(torch.ops, namespace), name).default


"""Backends of the op boundary and how one is chosen.

Every backend implements ``recurrence_forward(xw, w_hh, h0, batch_sizes, activation) -> (h_all, h_last)``
(differentiable): ``cpu`` and ``cuda`` are the C++/CUDA kernels of rnn_fused._C, ``triton`` the kernels of
rnn_fused/triton/, ``reference`` the plain PyTorch loop of rnn_fused/reference.py (autograd does its BPTT).
``auto`` takes the fastest one available for the device and dtype.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from . import _extension, func_transforms

BACKENDS = ("auto", "cuda", "triton", "cpu", "reference")

_DTYPES = {
    "cpu": (torch.float32, torch.float64, torch.float16, torch.bfloat16),  # halves in float32 (below)
    "cuda": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
    "triton": (torch.float32, torch.float16, torch.bfloat16),
}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run these inputs; the message says why."""


def check_name(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def unavailable_reason(backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """None if ``backend`` can run on ``device`` with ``dtype``, else a sentence saying why not."""
    check_name(backend)
    if backend == "reference":
        return None
    if backend in _DTYPES and dtype not in _DTYPES[backend]:
        names = ", ".join(str(d).replace("torch.", "") for d in _DTYPES[backend])
        return f"backend '{backend}' supports {names}, got {str(dtype).replace('torch.', '')}"
    if backend == "cpu":
        if device.type != "cpu":
            return f"backend 'cpu' runs on CPU tensors, got a tensor on {device}"
        reason = _extension.load()
        if reason is None and not _extension.has_kernel("recurrence_forward", "CPU"):
            reason = "the extension has no CPU kernel registered"
        return reason
    if backend == "cuda":
        if device.type != "cuda":
            return f"backend 'cuda' runs on CUDA tensors, got a tensor on {device}"
        reason = _extension.load()
        if reason is None and not _extension.has_kernel("recurrence_forward", "CUDA"):
            reason = ("the extension was built without CUDA kernels (build with a CUDA build of torch and the "
                      "CUDA toolkit, RNN_FUSED_CUDA=1 to insist)")
        return reason
    if backend == "triton":
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        if device.type != "cuda" and not (interpreted and device.type == "cpu"):
            return (f"backend 'triton' runs on CUDA tensors (or on the CPU under TRITON_INTERPRET=1), "
                    f"got a tensor on {device}")
        from . import triton as triton_backend

        return triton_backend.unavailable_reason()
    return None


# resolve's answers: the checks behind them import modules and query the dispatcher (~5 us), the same answer
# every call. Keyed by what they read: the names, the device, the dtype, and TRITON_INTERPRET (the one
# setting that may change in a running process, before triton is imported).
_RESOLVED: dict[tuple, str] = {}


@torch.compiler.assume_constant_result
def resolve(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The concrete backend for ``backend`` ('auto' picks); raises BackendUnavailableError if it can't run.

    Under torch.compile this runs once at trace time (its answer is a constant of the graph): the checks
    import modules and query the dispatcher, nothing a graph should contain. Eagerly it is answered from a
    cache after the first call (a refusal is not cached: it raises every time).
    """
    key = (backend, device, dtype, os.environ.get("TRITON_INTERPRET"))
    name = _RESOLVED.get(key)
    if name is None:
        name = _RESOLVED[key] = _resolve_uncached(backend, device, dtype)
    return name


def _resolve_uncached(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    check_name(backend)
    if backend == "auto":
        preference = ("cuda", "triton") if device.type == "cuda" else ("cpu",)
        for candidate in preference:
            if unavailable_reason(candidate, device, dtype) is None:
                return candidate
        return "reference"
    reason = unavailable_reason(backend, device, dtype)
    if reason is not None:
        raise BackendUnavailableError(f"rnn_fused: backend '{backend}' is unavailable: {reason}")
    return backend


def runs_stack_op(backend: str, dtype: torch.dtype) -> bool:
    """Whether a whole FusedRNN / FusedRNNCell call on concrete ``backend`` is one call of ``rnn_fused::rnn``
    (csrc/rnn_stack.cpp): the C++ kernels, in a dtype they take as it is (the CPU computes half types in
    float32 through recurrence_forward_fn instead)."""
    return backend == "cuda" or (backend == "cpu" and dtype in (torch.float32, torch.float64))


# stack_op_for's answers, keyed by what is cheap to read off a tensor: resolve's key needs t.device, a new
# torch.device per call, and os.environ (~5 us together inside a module call, where the kernels have just run
# and Python's caches are cold). The answer depends on the device's type, not its index.
_STACK_OP: dict[tuple, bool] = {}


def stack_op_for(backend: str, t: Tensor) -> bool:
    """runs_stack_op(resolve(backend, t.device, t.dtype), t.dtype), cached; False (not cached) where resolve
    raises: the caller then takes its general path, which raises the same error."""
    key = (backend, t.is_cpu, t.is_cuda, t.dtype)
    answer = _STACK_OP.get(key)
    if answer is None:
        if not (t.is_cpu or t.is_cuda):
            return False
        try:
            answer = runs_stack_op(resolve(backend, t.device, t.dtype), t.dtype)
        except BackendUnavailableError:
            return False
        _STACK_OP[key] = answer
    return answer


def call_runs_stack_op(backend: str, t: Tensor) -> bool:
    """Whether this module call (input ``t``, requested ``backend``) is one ``rnn_fused::rnn`` call: outside
    torch.func transforms (they need the rule of rnn_fused/func_transforms.py, which the stack op's
    recurrence cannot take), and on a backend and dtype of runs_stack_op."""
    return (not func_transforms.active() and not func_transforms.forward_ad_active()
            and runs_stack_op(resolve(backend, t.device, t.dtype), t.dtype))


def recurrence_forward_fn(backend: str, bptt=None):
    """The differentiable forward ``(xw, w_hh, h0, batch_sizes, activation) -> (h_all, h_last)`` of a
    concrete backend, for every dtype the backend lists in ``_DTYPES``; with active ``bptt`` options
    (rnn_fused/bptt.py) its backward runs under them."""
    if bptt is not None and bptt.active:
        from .bptt import recurrence_with_options

        def forward(*args):
            return recurrence_with_options(*args, backend, bptt)
    elif backend in ("cpu", "cuda"):
        forward = _under_func_transforms(torch.ops.rnn_fused.recurrence_forward,
                                         torch.ops.rnn_fused.recurrence_backward)
    elif backend == "triton":
        from . import triton as triton_backend

        forward = _under_func_transforms(triton_backend.recurrence_forward, triton_backend.recurrence_backward)
    else:
        from . import reference

        forward = reference.recurrence_forward
    return _halves_in_float32(forward) if backend == "cpu" else forward


def _under_func_transforms(forward, backward):
    """``forward``, taking the torch.func-ready rule (rnn_fused/func_transforms.py) while a transform runs,
    and the reference's torch ops while forward-mode AD is on (the kernels' rules are reverse-mode only)."""

    def forward_or_func(xw, w_hh, h0, batch_sizes, activation):
        if func_transforms.active():
            return func_transforms.recurrence(forward, backward, xw, w_hh, h0, batch_sizes, activation)
        if func_transforms.forward_ad_active():
            from . import reference

            return reference.recurrence_forward(xw, w_hh, h0, batch_sizes, activation)
        return forward(xw, w_hh, h0, batch_sizes, activation)

    return forward_or_func


def _halves_in_float32(forward):
    """The CPU backend's half types: its kernels take float32 and float64, so float16 and bfloat16 are
    computed in float32 (fp32 accumulation and fp32 carried state, as the GPU kernels do) and only the
    outputs are rounded to the input's dtype. The casts are differentiable: the gradients arrive in the
    input's dtype too."""

    def forward_upcast(xw, w_hh, h0, batch_sizes, activation):
        if xw.dtype not in (torch.float16, torch.bfloat16):
            return forward(xw, w_hh, h0, batch_sizes, activation)
        h_all, h_last = forward(xw.float(), w_hh.float(), h0.float(), batch_sizes, activation)
        return h_all.to(xw.dtype), h_last.to(xw.dtype)

    return forward_upcast

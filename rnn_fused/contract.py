"""The op contract's Python half: the argument checks of the op boundary, in the order and with the words of
its C++ half (csrc/recurrence_args.cpp), for every implementation written in Python: the fake impls
(rnn_fused/ops.py), the Triton ops and the reference. Semantics of the ops: csrc/ops.cpp.

The messages are the C++ ones word for word, so a caller sees one message whichever backend runs: dtypes
print as c10's ScalarType names (``Float``, not ``torch.float32``; see ``dtype_name``), shapes as ``[4, 3]``.

Under torch.compile the batch sizes are fake tensors whose values are unknown; then only what needs no
values is checked (ranks, shapes, dtypes, devices), and the rest is left to the kernel at run time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

ACTIVATIONS = ("tanh", "relu")
INT64_MAX = 2**63 - 1
INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class Problem:
    """T steps, B sequences, D directions, H hidden units; sizes: batch_sizes as a list (packed, values known)
    or None (padded, or packed under tracing)."""

    T: int
    B: int
    D: int
    H: int
    sizes: list | None

    @property
    def empty(self) -> bool:
        """No work (T, B or H is 0): every implementation returns early, without a T-long step table."""
        return self.T == 0 or self.B == 0 or self.H == 0


# c10::toString(ScalarType), the words the C++ checks print for a dtype.
_SCALAR_TYPE_NAMES = {
    torch.float64: "Double", torch.float32: "Float", torch.float16: "Half", torch.bfloat16: "BFloat16",
    torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte",
    torch.bool: "Bool", torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble",
}


def dtype_name(dtype: torch.dtype) -> str:
    """``dtype`` as the C++ checks print it (``Float`` for torch.float32)."""
    return _SCALAR_TYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def fail(message: str):
    raise RuntimeError(f"rnn_fused: {message}")


def check_like(t: Tensor, name: str, ref: Tensor, ref_name: str) -> None:
    if not isinstance(t, Tensor):
        fail(f"{name} must be a tensor, got {'None' if t is None else type(t).__name__}")
    if t.dtype != ref.dtype:
        fail(f"{name} must have the dtype of {ref_name} ({dtype_name(ref.dtype)}), got {dtype_name(t.dtype)}")
    if t.device != ref.device:
        fail(f"{name} must be on the device of {ref_name} ({ref.device}), got {t.device}")


def check_shape(t: Tensor, name: str, expected, letters: str) -> None:
    if tuple(t.shape) != tuple(expected):
        fail(f"{name} must have shape {letters} = {list(expected)}, got {list(t.shape)}")


def check_common(xw_like: Tensor, xw_name: str, w_hh: Tensor, h0: Tensor, batch_sizes: Tensor | None,
                 activation: str) -> Problem:
    """What both ops check (check_common of csrc/recurrence_args.cpp, the same order and messages)."""
    if activation not in ACTIVATIONS:
        fail(f"activation must be 'tanh' or 'relu', got '{activation}'")
    if not isinstance(w_hh, Tensor):
        fail(f"w_hh must be a tensor, got {'None' if w_hh is None else type(w_hh).__name__}")
    if w_hh.dim() != 3 or w_hh.shape[1] != w_hh.shape[2] or w_hh.shape[0] not in (1, 2):
        fail(f"w_hh must have shape [D, H, H] with D in {{1, 2}}, got {list(w_hh.shape)}")
    if not w_hh.dtype.is_floating_point:
        fail(f"w_hh must be floating point, got {dtype_name(w_hh.dtype)}")
    D, H = w_hh.shape[0], w_hh.shape[1]
    check_like(xw_like, xw_name, w_hh, "w_hh")
    check_like(h0, "h0", w_hh, "w_hh")
    if h0.dim() != 3:
        fail(f"h0 must have shape [D, B, H], got {list(h0.shape)}")
    # B is the input's batch size where the input has one (padded), so a wrong h0 is reported as h0's error.
    B = xw_like.shape[1] if batch_sizes is None and xw_like.dim() == 4 else h0.shape[1]
    check_shape(h0, "h0", (D, B, H), "[D, B, H]")
    if batch_sizes is None:
        if xw_like.dim() != 4:
            fail(f"{xw_name} must have shape [T, B, D, H] (padded) when batch_sizes is None, "
                 f"got {list(xw_like.shape)}")
        T = xw_like.shape[0]
        check_shape(xw_like, xw_name, (T, B, D, H), "[T, B, D, H]")
        return check_index_range(Problem(T, B, D, H, None))
    if (not isinstance(batch_sizes, Tensor) or batch_sizes.dim() != 1 or batch_sizes.dtype != torch.int64
            or batch_sizes.device.type != "cpu"):
        desc = (f"{dtype_name(batch_sizes.dtype)} {list(batch_sizes.shape)} on {batch_sizes.device}"
                if isinstance(batch_sizes, Tensor) else type(batch_sizes).__name__)
        fail(f"batch_sizes must be a 1-D int64 CPU tensor [T] (as in PackedSequence), got {desc}")
    T = batch_sizes.shape[0]
    if is_fake(batch_sizes):  # tracing: N = sum(batch_sizes) is unknown, D and H are not
        if xw_like.dim() != 3:
            fail(f"{xw_name} must have shape [N, D, H] (packed) when batch_sizes is given, "
                 f"got {list(xw_like.shape)}")
        check_shape(xw_like, xw_name, (xw_like.shape[0], D, H), "[N = sum(batch_sizes), D, H]")
        return check_index_range(Problem(T, B, D, H, None))
    sizes = batch_sizes.tolist()
    for t, rows in enumerate(sizes):
        if not 0 < rows <= (B if t == 0 else sizes[t - 1]):
            fail(f"batch_sizes must be positive and non-increasing with batch_sizes[0] == B ({B}); "
                 f"got {rows} at step {t}")
    if sizes and sizes[0] != B:
        fail(f"batch_sizes[0] ({sizes[0]}) must equal the batch size of h0 ({B})")
    if xw_like.dim() != 3:
        fail(f"{xw_name} must have shape [N, D, H] (packed) when batch_sizes is given, got {list(xw_like.shape)}")
    n = 0
    for t, rows in enumerate(sizes):
        if rows > INT64_MAX - n:
            fail(f"sum(batch_sizes) overflows int64 at step {t} (batch_sizes[{t}] = {rows})")
        n += rows
    check_shape(xw_like, xw_name, (n, D, H), "[N = sum(batch_sizes), D, H]")
    return check_index_range(Problem(T, B, D, H, sizes))


def check_index_range(p: Problem) -> Problem:
    """The C++ kernels pass a step's rows (at most B) and a row's length D * H to BLAS and to kernel launches
    as int (check_index_range of csrc/recurrence_args.cpp): one limit for every backend, checked where there
    is work (an empty problem reaches no kernel)."""
    if not p.empty and (p.B > INT32_MAX or p.D * p.H > INT32_MAX):
        fail(f"B ({p.B}) and D * H ({p.D * p.H}) must each be at most 2^31 - 1 = {INT32_MAX}: the kernels pass "
             f"them to BLAS and kernel launches as int")
    return p


def check_forward(xw: Tensor, w_hh: Tensor, h0: Tensor, batch_sizes: Tensor | None, activation: str) -> Problem:
    return check_common(xw, "xw", w_hh, h0, batch_sizes, activation)


def check_backward(w_hh: Tensor, h_all: Tensor, h0: Tensor, dh_all: Tensor | None, dh_last: Tensor | None,
                   batch_sizes: Tensor | None, activation: str, clip_mode: str = "none",
                   clip: float = 0.0) -> Problem:
    p = check_common(h_all, "h_all", w_hh, h0, batch_sizes, activation)
    if dh_all is not None:
        check_like(dh_all, "dh_all", w_hh, "w_hh")
        if dh_all.shape != h_all.shape:
            fail(f"dh_all must have the shape of h_all ({list(h_all.shape)}), got {list(dh_all.shape)}")
    if dh_last is not None:
        check_like(dh_last, "dh_last", w_hh, "w_hh")
        check_shape(dh_last, "dh_last", (p.D, p.B, p.H), "[D, B, H]")
    check_clip(clip_mode, clip)
    return p


def norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the recorded gradient norms (grad_norm, norm_probe): float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_forward_options(xw: Tensor, clip_mode: str, clip: float, norm_probe: Tensor | None) -> None:
    """The forward op's backward options (check_forward_options of csrc/recurrence_args.cpp)."""
    check_clip(clip_mode, clip)
    if norm_probe is not None:
        shape, dtype = tuple(xw.shape[:-1]), norm_dtype(xw.dtype)
        if tuple(norm_probe.shape) != shape or norm_probe.dtype != dtype or norm_probe.device != xw.device:
            fail(f"norm_probe must be a {dtype_name(dtype)} tensor of shape {list(shape)} (xw's shape without H) "
                 f"on {xw.device}, got {dtype_name(norm_probe.dtype)} {list(norm_probe.shape)} on "
                 f"{norm_probe.device}")


def check_clip(clip_mode: str, clip: float) -> None:
    """The clip arguments of the backward (check_backward_options of csrc/recurrence_args.cpp): the one rule
    for every backend's backward op and for ``bptt.BPTTOptions``, raising RuntimeError as the C++ op does."""
    if clip_mode not in ("none", "value", "norm"):
        fail(f"clip_mode must be 'none', 'value' or 'norm', got '{clip_mode}'")
    if clip_mode != "none" and not (clip == clip and abs(clip) != float("inf") and clip > 0):
        fail(f"clip must be a positive finite number when clip_mode is '{clip_mode}', got {clip}")

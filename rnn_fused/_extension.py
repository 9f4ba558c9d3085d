"""Lazy loading of the compiled extension: ``import rnn_fused`` never fails, a backend that needs the
extension says how to build it."""

from __future__ import annotations

import importlib
from functools import lru_cache

import torch

BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` (or `make install`) from the rnn-fused checkout"
)


@lru_cache(maxsize=None)
def load() -> str | None:
    """Imports rnn_fused._C (which registers the C++/CUDA ops). Returns None on success, else the reason."""
    try:
        importlib.import_module("rnn_fused._C")
    except ImportError as err:
        return f"the compiled extension rnn_fused._C could not be imported ({err}); {BUILD_HINT}"
    from . import ops

    # The autograd rule is the extension's own (csrc/recurrence_autograd.cpp); Python adds the fakes and
    # the reference BPTT that rule calls under create_graph=True.
    ops.register_fakes("rnn_fused::recurrence_forward", "rnn_fused::recurrence_backward")
    ops.register_reference_backward()

    return None


@lru_cache(maxsize=None)
def compiled():
    """The loaded rnn_fused._C (load() must have succeeded): its sequence_call / cell_call are the modules'
    fast path (csrc/eager_call.cpp)."""
    return importlib.import_module("rnn_fused._C")


def has_kernel(op: str, dispatch_key: str) -> bool:
    """True if the extension registered a kernel of ``rnn_fused::op`` for ``dispatch_key`` (CPU, CUDA)."""
    if load() is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"rnn_fused::{op}", dispatch_key)

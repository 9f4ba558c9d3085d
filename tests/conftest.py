"""Shared test settings: devices, backends, and how a result is judged.

The rule and its table live in the product, rnn_fused/tolerance.py (the benchmark's gate uses them too): in
float64 a result must match the float64 reference to ATOL[float64]; in a lower precision our error against
the float64 reference must be at most FACTOR times torch's own error in that precision (the yardstick)
against the same reference, plus ATOL[dtype] times the result's scale. For the half types the yardstick is
``in_float32(fn)``: torch's float32 on the half inputs, rounded once, never the math run in the half type.
"""

import os

# Triton runs on the CPU through its interpreter when there is no GPU; it must be set before triton loads.
os.environ.setdefault("TRITON_INTERPRET", "0" if os.environ.get("RNN_FUSED_TEST_GPU") == "1" else "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from rnn_fused import _extension, backends  # noqa: E402
from rnn_fused.tolerance import ATOL, FACTOR, bound  # noqa: E402

HALF_TYPES = (torch.float16, torch.bfloat16)

# TF32 would make torch's own float32 numbers (the yardstick) inexact on Ampere+ GPUs.
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
# PyTorch >= 2.9 rules cuDNN's RNN by its own knob, which allow_tf32 does not reach.
if hasattr(getattr(torch.backends.cudnn, "rnn", None), "fp32_precision"):
    torch.backends.cudnn.rnn.fp32_precision = "ieee"

# The compiled extension is part of what is tested: if it does not load, the tests that use it fail with
# this reason (they are never skipped).
EXTENSION_ERROR = _extension.load()



@pytest.fixture
def one_thread():
    """torch at one thread for the test, restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


def available_backends(device: str, dtype: torch.dtype = torch.float32) -> list[str]:
    """Concrete backends that can run on ``device`` in ``dtype`` here (triton on the CPU = interpreter)."""
    dev = torch.device(device)
    return [b for b in backends.BACKENDS if b != "auto" and backends.unavailable_reason(b, dev, dtype) is None]


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    if actual.numel() == 0:
        return 0.0
    return (actual.double() - expected.double()).abs().max().item()


def assert_matches(actual: torch.Tensor, reference64: torch.Tensor, yardstick: torch.Tensor | None = None,
                   name: str = "", precision: torch.dtype | None = None) -> None:
    """``actual`` against the float64 ``reference64`` by the rule above; ``yardstick`` is torch's own result
    in ``actual``'s dtype (needed unless ``actual`` is float64). ``precision``: the dtype the result was
    computed in when it differs from its storage (float32 gradients of a bfloat16 autocast region)."""
    precision = precision or actual.dtype
    assert actual.shape == reference64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(reference64.shape)}"
    assert torch.isfinite(actual).all() == torch.isfinite(reference64).all(), f"{name}: finiteness differs"
    err = max_error(actual, reference64)
    scale = max(1.0, reference64.abs().max().item() if reference64.numel() else 1.0)
    if precision == torch.float64:
        limit = bound(0.0, precision, scale)
        assert err <= limit, f"{name}: float64 error {err:.3e} > {ATOL[precision]} x {scale:.1f}"
        return
    assert yardstick is not None, f"{name}: a {precision} result needs torch's own result as yardstick"
    limit = bound(max_error(yardstick, reference64), precision, scale)
    assert err <= limit, (f"{name}: error {err:.3e} > bound {limit:.3e} "
                          f"(torch's own error x{FACTOR} + atol x scale {scale:.1f})")


def in_float32(fn, keep_float32=()):
    """``fn`` computed as torch computes the half types (the yardstick for them): half tensor arguments in
    float32, each output rounded back to the arguments' half type once (except the output indices in
    ``keep_float32``, which the op returns in float32: the backward's grad_norm). Other dtypes: ``fn``."""

    def run(*args, **kwargs):
        half = next((a.dtype for a in args if isinstance(a, torch.Tensor) and a.dtype in HALF_TYPES), None)
        if half is None:
            return fn(*args, **kwargs)
        up = [a.float() if isinstance(a, torch.Tensor) and a.dtype == half else a for a in args]
        out = fn(*up, **kwargs)
        return type(out)(o if i in keep_float32 else o.to(half) for i, o in enumerate(out))

    return run


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

"""Shared test settings: devices, backends, and the tolerances, stated once.

How a result is judged (the flash-attention rule): in float64 every backend must match the float64
reference to FLOAT64_TOL. In a lower precision, our error against the float64 reference must be at most
LOW_PRECISION_FACTOR times the error that torch's own implementation (nn.RNN, or the same reference math run
in that dtype) makes against the same float64 reference, plus a slack of ATOL[dtype] times the result's
scale (max(1, max |reference|)) for the cases where torch happens to be almost exact, which for a result of
a few elements is a matter of luck. RNN error grows with T, so a fixed tolerance alone is either
too loose or flaky; the ratio scales with the problem.
"""

import os

# Triton runs on the CPU through its interpreter when there is no GPU; it must be set before triton loads.
os.environ.setdefault("TRITON_INTERPRET", "0" if os.environ.get("RNN_FUSED_TEST_GPU") == "1" else "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from rnn_fused import _extension, backends  # noqa: E402

FLOAT64_TOL = 1e-10
LOW_PRECISION_FACTOR = 2.0
ATOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

# TF32 would make torch's own float32 numbers (the yardstick) inexact on Ampere+ GPUs.
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
# PyTorch >= 2.9 rules cuDNN's RNN by its own knob, which allow_tf32 does not reach.
if hasattr(getattr(torch.backends.cudnn, "rnn", None), "fp32_precision"):
    torch.backends.cudnn.rnn.fp32_precision = "ieee"

# The compiled extension is part of what is tested: if it does not load, the tests that use it fail with
# this reason (they are never skipped).
EXTENSION_ERROR = _extension.load()

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
        assert err <= FLOAT64_TOL * scale, f"{name}: float64 error {err:.3e} > {FLOAT64_TOL} x {scale:.1f}"
        return
    assert yardstick is not None, f"{name}: a {precision} result needs torch's own result as yardstick"
    bound = LOW_PRECISION_FACTOR * max_error(yardstick, reference64) + ATOL[precision] * scale
    assert err <= bound, (f"{name}: error {err:.3e} > bound {bound:.3e} "
                          f"(torch's own error x{LOW_PRECISION_FACTOR} + atol x scale {scale:.1f})")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

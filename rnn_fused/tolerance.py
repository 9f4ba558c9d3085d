"""How right a result must be: the one accuracy rule, used by the tests (tests/conftest.py) and by the
benchmark's correctness gate (rnn_fused/bench/gate.py).

The flash-attention rule. ``error`` is the max absolute difference from a float64 result, ``scale`` is
``max(1, max |float64 result|)``. In float64 a result must be within ``ATOL[float64] * scale``. In a lower
precision our error must be at most ``FACTOR`` times the error torch's own computation in that precision
makes against the same float64 result, plus ``ATOL[dtype] * scale`` for the cases where torch happens to be
almost exact (a result of a few elements is a matter of luck). RNN error grows with T, so a fixed tolerance
alone is either too loose or flaky; the ratio scales with the problem.

For the half types "torch's own computation" is torch's arithmetic for them: float32 (the opmath type) on
the half inputs, rounded to the half type once at the end. Not the same math run in the half type: that
rounds the state at every step, and a kernel that lost its float32 state would stay within 2x of it.

The gate uses the same table with ``GATE_MARGIN`` times the bound: it decides whether a provider is timed,
on large benchmark cases, and must not reject a right kernel on noise.
"""

from __future__ import annotations

import torch

FACTOR = 2.0
# about one unit in the last place at 1.0 for the half types (2^-11, 2^-8): what a single rounding may add
ATOL = {torch.float64: 1e-10, torch.float32: 2e-6, torch.float16: 5e-4, torch.bfloat16: 4e-3}
GATE_MARGIN = 2.0


def bound(torch_error: float, dtype: torch.dtype, scale: float, margin: float = 1.0) -> float:
    """The largest error allowed for a ``dtype`` result whose float64 value has ``scale``, where torch's own
    error in ``dtype`` is ``torch_error`` (0 for float64)."""
    return margin * (FACTOR * torch_error + ATOL[dtype] * scale)

"""The benchmark suite: ``python -m rnn_fused.bench`` (see benchmarks/README.md).

One concept per module: cases.py (presets and their case grids), workload.py (weights, inputs and the
timed call), providers.py (what is timed; flashrnn_adapter.py for FlashRNN; peers_jax.py and peers_onnx.py
for the peers JAX, ONNX Runtime and OpenVINO), gate.py (the correctness gate), timing.py (how a call is
timed; interleaved rounds on a CPU), env.py (flags and environment), runner.py (the loop), report.py (JSON,
markdown, table), plots.py, compare.py, __main__.py (the command line).
"""

from .cases import PRESETS, Case, Preset

__all__ = ["PRESETS", "Case", "Preset"]

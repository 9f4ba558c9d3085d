"""rnn-fused: fused Elman RNN kernels for PyTorch (C++ CPU, CUDA, Triton) and drop-ins for nn.RNN.

``import rnn_fused`` never fails: the compiled extension is loaded on first use (rnn_fused/_extension.py).
"""

from . import diagnostics, functional, reference
from .backends import BACKENDS, BackendUnavailableError
from .modules import FusedRNN, FusedRNNCell

__all__ = ["BACKENDS", "BackendUnavailableError", "FusedRNN", "FusedRNNCell", "diagnostics", "functional",
           "reference"]
__version__ = "0.1.0"

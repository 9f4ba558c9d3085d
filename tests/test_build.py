"""The build: the extension loads, and the CUDA kernels are compiled wherever they can be (a CUDA build of
torch plus the toolkit), GPU or not, so CUDA code cannot rot unnoticed on machines without a GPU."""

import os
import shutil
import sys

import pytest
import torch

from rnn_fused import _extension

from .conftest import EXTENSION_ERROR


def test_extension_loads_and_registers_cpu_kernels():
    assert EXTENSION_ERROR is None, EXTENSION_ERROR
    assert _extension.has_kernel("recurrence_forward", "CPU")
    assert _extension.has_kernel("recurrence_backward", "CPU")


def _cuda_toolkit() -> str | None:
    home = os.environ.get("CUDA_HOME") or ("/usr/local/cuda" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return home
    return shutil.which("nvcc")


@pytest.mark.skipif(torch.version.cuda is None, reason="torch is a CPU build: the CUDA kernels cannot be built")
@pytest.mark.skipif(_cuda_toolkit() is None, reason="no CUDA toolkit (nvcc) here")
@pytest.mark.skipif(os.environ.get("RNN_FUSED_CUDA") == "0", reason="CUDA build switched off (RNN_FUSED_CUDA=0)")
def test_cuda_kernels_are_compiled_when_possible():
    assert _extension.has_kernel("recurrence_forward", "CUDA")
    assert _extension.has_kernel("recurrence_backward", "CUDA")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="setup.py builds with OpenMP on Linux only")
def test_cpu_kernels_are_built_with_openmp():
    """at::parallel_for is a header template: in a translation unit built without OpenMP it runs its body on
    one thread, so a layer's directions and oneDNN's GEMM blocks (csrc/cpu) would never use a second thread.
    Built with it, the extension calls OpenMP's parallel entry (GOMP_parallel, named in its dynamic symbols)."""
    import rnn_fused._C as C

    with open(C.__file__, "rb") as f:
        assert b"GOMP_parallel" in f.read()

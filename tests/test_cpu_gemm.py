"""The CPU kernels' float32 GEMMs off BLAS: the small ones on the AVX-512 tile kernels (step_avx512.h,
small_gemm: every operand layout, panels and row blocks cut at odd sizes), and the large ones on oneDNN's
micro-kernel (csrc/cpu/gemm_onednn.cpp): layers whose every GEMM is large enough to take it (blocks of rows,
columns and K that are not multiples of 64 / 256, two directions side by side in a row, a forward of per-step
GEMMs) against float64 nn.RNN, on whichever GEMM this process chose and, in child processes, on each of the
two forced; that oneDNN's kernels really run where chosen (its own verbose log), that torch's oneDNN switch
sends them back to BLAS, that the thread count does not change the bits, and the default rule."""

import os

import pytest
import torch

import rnn_fused._C as C

from .conftest import EXTENSION_ERROR, assert_matches
from .test_cpu_layer import _in_float32_torch, _pair, _run
from .test_cpu_step import _cpu_has_avx512, _run_with

assert EXTENSION_ERROR is None, EXTENSION_ERROR

# (T, B, I, H, bidirectional): rows 333 (five blocks of 64 and 13), K = I = 300 (a chunk of 256 and 44) and
# dW_hh's M = 70 (64 and 6); two directions, D * H = 258 columns (four blocks and 2), dW_hh per direction at
# a column offset of a 258-wide row; T = 3, B = 130: a call too short to pack W_hh, whose forward steps of 130
# rows are GEMMs of their own, accumulating into the projection in place.
SHAPES = [(37, 9, 300, 70, False), (20, 7, 65, 129, True), (3, 130, 64, 64, False)]


def _check_layer(T, B, I, H, bidirectional, nonlinearity):
    """A two-layer FusedRNN of these sizes, float32, against float64 nn.RNN with float32 nn.RNN as yardstick:
    outputs and every gradient."""
    ref, ours = _pair(torch.float32, I, H, bidirectional=bidirectional, nonlinearity=nonlinearity, num_layers=2)
    x = torch.randn(T, B, I, dtype=torch.float64)
    h0 = 0.5 * torch.randn(2 * (2 if bidirectional else 1), B, H, dtype=torch.float64)
    expected, expected_grads = _run(ref, x, h0, torch.float64)
    got, got_grads = _run(ours, x, h0, torch.float32)
    yard, yard_grads = _run(_in_float32_torch(ref), x, h0, torch.float32)
    for k in expected:
        assert_matches(got[k], expected[k], yard[k], name=f"{C.cpu_gemm()} {k}")
    for k in expected_grads:
        assert_matches(got_grads[k], expected_grads[k], yard_grads[k], name=f"{C.cpu_gemm()} grad {k}")


@pytest.mark.parametrize("T,B,I,H,bidirectional", SHAPES)
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_gemm_sized_layers_match_nn_rnn(T, B, I, H, bidirectional, nonlinearity, one_thread):
    _check_layer(T, B, I, H, bidirectional, nonlinearity)


# (T, B, I, H, bidirectional), every GEMM below 2^18 multiply-adds (the small path where the CPU has AVX-512,
# else BLAS): one unit; a projection of 4 rows (dot products along W_ih's rows) and of 6 (BLAS); dx with 65
# and 130 columns (a masked last panel), dW_ih with M = 129 and 258 (row blocks of 6 and a remainder, two
# directions) summed over K = 5 and 7 rows read transposed; I = 1.
SMALL_SHAPES = [(1, 1, 3, 1, False), (1, 4, 65, 64, False), (2, 3, 65, 17, True), (5, 1, 130, 129, True),
                (3, 2, 1, 70, False)]


@pytest.mark.parametrize("T,B,I,H,bidirectional", SMALL_SHAPES)
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_small_gemm_layers_match_nn_rnn(T, B, I, H, bidirectional, nonlinearity, one_thread):
    _check_layer(T, B, I, H, bidirectional, nonlinearity)


@pytest.mark.skipif(not _cpu_has_avx512(), reason="this CPU has no AVX-512")
def test_small_gemms_leave_blas_where_the_cpu_has_avx512():
    """Bits of a small layer's forward and gradients by default and with every GEMM on BLAS
    (RNN_FUSED_CPU_GEMM=blas; the recurrence's kernels are the same in both): the output of a projection of 3
    rows (dot products) and dx (the tile, K = 70) must differ, or small_gemm is not the path taken."""
    code = ("import torch, rnn_fused._C as C\nfrom rnn_fused import FusedRNN\n"
            "torch.set_num_threads(1); torch.manual_seed(0)\n"
            "m = FusedRNN(65, 70, backend='cpu'); x = torch.randn(1, 3, 65, requires_grad=True)\n"
            "out, _ = m(x); dx, = torch.autograd.grad(out.square().sum(), [x])\n"
            "print(C.cpu_gemm(), out.double().sum().item().hex(), dx.double().sum().item().hex())\n")
    default = _run_with({"RNN_FUSED_CPU_GEMM": ""}, "-c", code).split()
    blas = _run_with({"RNN_FUSED_CPU_GEMM": "blas"}, "-c", code).split()
    assert blas[0] == "blas"
    assert default[1] != blas[1], "the projection: the same bits as BLAS's"
    assert default[2] != blas[2], "dx: the same bits as BLAS's"


def _forced_gemm_runs(gemm: str) -> bool:
    return _run_with({"RNN_FUSED_CPU_GEMM": gemm}, "-c", "import rnn_fused._C as C; print(C.cpu_gemm())"
                     ).strip() == gemm


# The micro-kernel needs a torch that has it (at::native::cpublas::brgemm for float32) and runs its JIT code
# from AVX2 up; below that torch's brgemm itself falls back to BLAS.
needs_micro_kernel = pytest.mark.skipif(
    not _forced_gemm_runs("onednn") or not torch.backends.cpu.get_cpu_capability().startswith("AVX"),
    reason="this torch has no oneDNN micro-kernel for float32, or this CPU has no AVX2")


@needs_micro_kernel
@pytest.mark.parametrize("gemm", ["onednn", "blas"])
def test_each_gemm_passes_the_layer_tests(gemm):
    out = _run_with({"RNN_FUSED_CPU_GEMM": gemm}, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                    "tests/test_cpu_gemm.py", "-k", "gemm_sized_layers", timeout=600)
    assert " passed" in out and "failed" not in out and "skipped" not in out


# One GEMM-sized fwd+bwd (the first shape above), run with oneDNN's verbose log on; prints the cpu_gemm() name
# and the bits of the output and of the input's gradient.
_CALL = ("import sys, torch, rnn_fused._C as C\n"
         "from rnn_fused import FusedRNN\n"
         "torch.set_num_threads(1); torch.manual_seed(0)\n"
         "m = FusedRNN(300, 70, backend='cpu'); x = torch.randn(37, 9, 300, requires_grad=True)\n"
         "with torch.backends.mkldnn.flags(enabled=sys.argv[1] == 'on'):\n"
         "    out, _ = m(x); gx, = torch.autograd.grad(out.square().sum(), x)\n"
         "print(C.cpu_gemm(), out.double().sum().item().hex(), gx.double().sum().item().hex())\n")


@needs_micro_kernel
def test_the_onednn_gemm_is_the_one_taken_and_torch_switch_turns_it_off():
    verbose = {"ONEDNN_VERBOSE": "all"}
    onednn = _run_with({**verbose, "RNN_FUSED_CPU_GEMM": "onednn"}, "-c", _CALL, "on")
    switched_off = _run_with({**verbose, "RNN_FUSED_CPU_GEMM": "onednn"}, "-c", _CALL, "off")
    blas = _run_with({**verbose, "RNN_FUSED_CPU_GEMM": "blas"}, "-c", _CALL, "on")
    executed = "ukernel,exec,cpu,brgemm"  # oneDNN's verbose log goes to stdout
    assert executed in onednn, "oneDNN's log shows no micro-kernel run"
    for out in (switched_off, blas):
        assert executed not in out
    last = [out.splitlines()[-1].split() for out in (onednn, switched_off, blas)]
    assert last[0][0] == "onednn" and last[2][0] == "blas"
    assert last[1][1:] == last[2][1:], "torch.backends.mkldnn off: not BLAS's bits"


@needs_micro_kernel
def test_the_thread_count_does_not_change_the_bits():
    code = ("import torch, rnn_fused._C as C\n"
            "from rnn_fused import FusedRNN\n"
            "torch.manual_seed(0)\n"
            "m = FusedRNN(300, 70, bidirectional=True, backend='cpu'); x = torch.randn(37, 9, 300, requires_grad=True)\n"
            "def run(threads):\n"
            "    torch.set_num_threads(threads)\n"
            "    out, h = m(x)\n"
            "    return [out, h, *torch.autograd.grad(out.square().sum() + h.sum(), [x, *m.parameters()])]\n"
            "one, two = run(1), run(2)\n"
            "print(C.cpu_gemm(), all(torch.equal(a, b) for a, b in zip(one, two)))\n")
    assert _run_with({"RNN_FUSED_CPU_GEMM": "onednn"}, "-c", code).split() == ["onednn", "True"]


def test_the_default_is_onednn_exactly_where_mkl_leaves_avx512_unused():
    """oneDNN by default on a CPU with AVX-512 that is not Intel's, where torch's BLAS is MKL (gemm_onednn.h)."""
    try:
        vendor = next(line for line in open("/proc/cpuinfo") if line.startswith("vendor_id")).split(":")[1].strip()
    except (OSError, StopIteration):
        vendor = ""
    expected = ("onednn" if _cpu_has_avx512() and vendor != "GenuineIntel" and torch.backends.mkl.is_available()
                and _forced_gemm_runs("onednn") else "blas")
    # An empty RNN_FUSED_CPU_GEMM forces nothing (gemm_onednn.cpp reads only "onednn" and "blas").
    assert _run_with({"RNN_FUSED_CPU_GEMM": ""}, "-c", "import rnn_fused._C as C; print(C.cpu_gemm())"
                     ).strip() == expected

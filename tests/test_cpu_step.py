"""The CPU kernels' step loops (csrc/cpu): the register-tile step (step_tile.h: AVX-512, step_avx512.cpp, or
AVX2, step_avx2.cpp) at the edges of its panels and row blocks, forward and backward, packed and
bidirectional, against the float64 reference (the AVX2 step also on an AVX-512 CPU, with AVX-512 switched
off); the portable loops (BLAS and the hand loop), which such CPUs no longer take for most float32 steps,
through the op tests with both steps switched off; and that each step is really the one taken where the
CPU has it."""

import os
import pathlib
import subprocess
import sys

import pytest
import torch

from rnn_fused import reference as R

from .conftest import EXTENSION_ERROR, assert_matches

assert EXTENSION_ERROR is None, EXTENSION_ERROR

ROOT = pathlib.Path(__file__).resolve().parents[1]


# One thread: with threads to spare, BLAS-sized steps go to BLAS instead (recurrence_cpu.cpp, use_avx512_step),
# and these tests are about the AVX-512 step.
pytestmark = pytest.mark.usefixtures("one_thread")


def _cpu_flags() -> set:
    try:
        return set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split())
    except (OSError, StopIteration):
        return set()


def _cpu_has_avx512() -> bool:
    return {"avx512f", "avx512dq", "avx512vl", "avx512bw"} <= _cpu_flags()


def _cpu_has_avx2() -> bool:
    return {"avx2", "fma"} <= _cpu_flags()


AVX2_ONLY = {"RNN_FUSED_CPU_AVX512": "0", "RNN_FUSED_CPU_AVX2": "1"}
NO_TILE = {"RNN_FUSED_CPU_AVX512": "0", "RNN_FUSED_CPU_AVX2": "0"}


def _problem(T, B, H, D, packed, seed=0):
    """float64 inputs of one layer: xw [T, B, D, H] (or packed [N, D, H] with lengths T..1), w_hh, h0."""
    g = torch.Generator().manual_seed(seed)
    if packed:
        lengths = sorted((max(1, T - (i * T) // B) for i in range(B)), reverse=True)
        batch_sizes = torch.tensor([sum(n > t for n in lengths) for t in range(T)])
        rows = (int(batch_sizes.sum()),)
    else:
        batch_sizes, rows = None, (T, B)
    xw = torch.randn(*rows, D, H, dtype=torch.float64, generator=g)
    w_hh = torch.randn(D, H, H, dtype=torch.float64, generator=g) / H ** 0.5
    h0 = torch.randn(D, B, H, dtype=torch.float64, generator=g)
    return xw, w_hh, h0, batch_sizes


def _forward_backward(impl, xw, w_hh, h0, batch_sizes, activation, dh_all, dh_last):
    ops = torch.ops.rnn_fused if impl == "cpu" else R
    h_all, h_last = ops.recurrence_forward(xw, w_hh, h0, batch_sizes, activation)
    dz, dh0, _ = ops.recurrence_backward(w_hh, h_all, h0, dh_all, dh_last, batch_sizes, activation)
    return h_all, h_last, dz, dh0


# H around the 64-column panels (1, 63 | 64 | 65, 129, 200), B around the 6-row blocks (1 | 6 | 7, 13);
# T = 40 is long enough for the forward to pack W_hh at every H here.
@pytest.mark.parametrize("H", [1, 63, 64, 65, 129, 200])
@pytest.mark.parametrize("B", [1, 6, 7, 13])
@pytest.mark.parametrize("D,packed", [(1, False), (2, True)], ids=["padded", "packed-bidirectional"])
@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_step_edges_match_the_reference(H, B, D, packed, activation):
    xw, w_hh, h0, bs = _problem(40, B, H, D, packed)
    ref = _forward_backward("reference", xw, w_hh, h0, bs, activation, None, None)
    dh_all, dh_last = torch.randn_like(ref[0]), torch.randn_like(ref[1])
    ref = _forward_backward("reference", xw, w_hh, h0, bs, activation, dh_all, dh_last)
    f32 = [t.float() for t in (xw, w_hh, h0)] + [bs]
    ours = _forward_backward("cpu", *f32, activation, dh_all.float(), dh_last.float())
    torch_own = _forward_backward("reference", *f32, activation, dh_all.float(), dh_last.float())
    for name, a, r, y in zip(["h_all", "h_last", "dz", "dh0"], ours, ref, torch_own):
        assert_matches(a, r, y, name=f"H={H} B={B} {name}")


# A call shorter than 16 steps does not pack W_hh: its forward steps below BLAS's size take the dot-product
# step (step_avx512.cpp, rows_times_transposed), 16 outputs at a time: H around 16 and the panels, B of 1 and 3
# (rows * H * H below the BLAS threshold at every H here).
@pytest.mark.parametrize("H", [1, 15, 16, 17, 63, 64, 65, 129])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("D,packed", [(1, False), (2, True)], ids=["padded", "packed-bidirectional"])
@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_short_call_steps_match_the_reference(H, B, T, D, packed, activation):
    xw, w_hh, h0, bs = _problem(T, B, H, D, packed)
    ref = _forward_backward("reference", xw, w_hh, h0, bs, activation, None, None)
    f32 = [t.float() for t in (xw, w_hh, h0)] + [bs]
    ours = _forward_backward("cpu", *f32, activation, None, None)
    torch_own = _forward_backward("reference", *f32, activation, None, None)
    for name, a, r, y in zip(["h_all", "h_last"], ours, ref, torch_own):
        assert_matches(a, r, y, name=f"T={T} H={H} B={B} {name}")


def _run_with(switches: dict, *args: str, timeout: int = 300) -> str:
    """``python args...`` in the checkout with the step switches set (RNN_FUSED_CPU_AVX512 / _AVX2); its stdout
    (it must succeed)."""
    env = dict(os.environ, **switches)
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    return proc.stdout


def test_portable_loops_pass_the_op_tests_with_the_tile_steps_off():
    out = _run_with(NO_TILE, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_ops.py", "-k",
                           "cpu and dtype0 and (layer_matches or packed_and_bidirectional)",  # dtype0: float32
                           timeout=900)
    assert " passed" in out and "failed" not in out
    # The CPU layer's in-place forward through the portable loops (float32 takes them only with the steps off).
    out = _run_with(NO_TILE, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cpu_layer.py", "-k",
                           "matches_nn_rnn", timeout=900)
    assert " passed" in out and "failed" not in out


@pytest.mark.skipif(not _cpu_has_avx512(), reason="this CPU has no AVX-512")
def test_the_avx512_step_is_the_one_taken_where_the_cpu_has_it():
    """Bits of h_all and dz with the step on and off: the AVX-512 step sums in another order than BLAS, so
    identical bits would mean the switch (or the dispatch) does nothing."""
    code = ("import torch, rnn_fused._extension as E; E.load(); torch.set_num_threads(1)\n"
            "g = torch.Generator().manual_seed(0)\n"
            "xw = torch.randn(40, 16, 1, 128, generator=g); w = torch.randn(1, 128, 128, generator=g) / 12\n"
            "h0 = torch.randn(1, 16, 128, generator=g)\n"
            "h, hl = torch.ops.rnn_fused.recurrence_forward(xw, w, h0, None, 'tanh')\n"
            "dz, _, _ = torch.ops.rnn_fused.recurrence_backward(w, h, h0, torch.ones_like(h), None, None, 'tanh')\n"
            "print(h.double().sum().item().hex(), dz.double().sum().item().hex())\n")
    short = ("xw = torch.randn(5, 2, 1, 64, generator=g); w = torch.randn(1, 64, 64, generator=g) / 8\n"
             "h, _ = torch.ops.rnn_fused.recurrence_forward(xw, w, torch.randn(1, 2, 64, generator=g), None, 'tanh')\n"
             "print(h.double().sum().item().hex())\n")
    # Off is both steps off: the AVX2 step sums in the AVX-512 step's order (one FMA chain per output over k).
    on = _run_with({"RNN_FUSED_CPU_AVX512": "1"}, "-c", code + short).split()
    off = _run_with(NO_TILE, "-c", code + short).split()
    assert on[0] != off[0], "forward: the same bits with the AVX-512 step on and off"
    assert on[1] != off[1], "backward: the same bits with the AVX-512 step on and off"
    if "BLAS_INFO=" in torch.__config__.show():  # without an exported BLAS both take the hand loop
        assert on[2] != off[2], "a short call's forward (the dot-product step): the same bits on and off"


@pytest.mark.skipif(not _cpu_has_avx512(), reason="no AVX-512: the edges test above ran the AVX2 step itself")
@pytest.mark.skipif(not _cpu_has_avx2(), reason="this CPU has no AVX2")
def test_the_avx2_step_matches_the_reference_at_the_edges_on_an_avx512_cpu():
    out = _run_with(AVX2_ONLY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cpu_step.py", "-k",
                    "step_edges_match", timeout=900)
    assert " passed" in out and "failed" not in out


@pytest.mark.skipif(not _cpu_has_avx2(), reason="this CPU has no AVX2")
def test_the_avx2_step_is_the_one_taken_where_the_cpu_has_it():
    """With AVX-512 off (or absent), the AVX2 step is chosen, and its bits differ from the portable loops' in a
    forward of 2 rows at H = 256 (which BLAS takes with the steps off) and a backward of 16 rows at H = 300
    (at H = 128 MKL's sgemm summed in the step's order, one FMA chain over k, and gave the same bits)."""
    code = ("import torch, rnn_fused._extension as E; E.load(); torch.set_num_threads(1)\n"
            "import rnn_fused._C as C\n"
            "g = torch.Generator().manual_seed(0)\n"
            "xw = torch.randn(40, 2, 1, 256, generator=g); w = torch.randn(1, 256, 256, generator=g) / 16\n"
            "h, _ = torch.ops.rnn_fused.recurrence_forward(xw, w, torch.randn(1, 2, 256, generator=g), None, 'tanh')\n"
            "xw = torch.randn(40, 16, 1, 300, generator=g); w = torch.randn(1, 300, 300, generator=g) / 17\n"
            "h0 = torch.randn(1, 16, 300, generator=g)\n"
            "h16, _ = torch.ops.rnn_fused.recurrence_forward(xw, w, h0, None, 'tanh')\n"
            "dz, _, _ = torch.ops.rnn_fused.recurrence_backward(w, h16, h0, torch.ones_like(h16), None, None, 'tanh')\n"
            "print(C.cpu_step_isa(), h.double().sum().item().hex(), dz.double().sum().item().hex())\n")
    on, off = _run_with(AVX2_ONLY, "-c", code).split(), _run_with(NO_TILE, "-c", code).split()
    assert on[0] == "avx2" and off[0] == "none"
    if "BLAS_INFO=" in torch.__config__.show():  # without an exported BLAS the steps off take the hand loop
        assert on[1] != off[1], "forward: the same bits with the AVX2 step on and off"
        assert on[2] != off[2], "backward: the same bits with the AVX2 step on and off"

"""The CUDA kernels of csrc/cuda/ executed on the CPU, in every CI run: the exact kernel files compiled by g++
against the test-only SIMT emulation (tests/simt/simt_cpu.h) from the sources as they are now, each case
of tests/simt/cases.py judged against the float64 reference. A subset runs again under AddressSanitizer
(out-of-bounds global and shared memory) and ThreadSanitizer (a missing __syncthreads, a grid barrier
that lets a CTA read what another has not finished writing): marker ``sanitizer``.

What this proves and what only a GPU run proves: see tests/simt/README.md. "Green here" means "executed in
emulation", never "verified on a GPU"; tests/test_cuda.py stays the authority where a GPU is present.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .simt import build, cases

ROOT = Path(__file__).resolve().parent.parent
UNAVAILABLE = build.unavailable_reason()
# CI must run these: there a missing toolchain is a failure, not a skip.
REQUIRED = os.environ.get("RNN_FUSED_REQUIRE_SIMT") == "1"

pytestmark = pytest.mark.skipif(UNAVAILABLE is not None and not REQUIRED,
                                reason=f"SIMT harness unavailable: {UNAVAILABLE}")

CHILD_TIMEOUT_S = 900  # the emulation's own watchdog (SIMT_TIMEOUT_S, 120 s a launch) fires first


def run_cases(lib: Path, names: list[str], env: dict | None = None) -> dict[str, dict]:
    """Runs the named cases in child processes (python -m tests.simt.cases): a case that kills its process
    (an abort of the emulation, a sanitizer report, the watchdog) fails with that process's stderr, and the
    cases after it run in a fresh process."""
    results: dict[str, dict] = {}
    remaining = list(names)
    while remaining:
        try:
            done = subprocess.run([sys.executable, "-m", "tests.simt.cases", str(lib), *remaining], cwd=ROOT,
                                  env={**os.environ, **(env or {})}, capture_output=True, text=True,
                                  timeout=CHILD_TIMEOUT_S)
            stdout, ending = done.stdout, f"ended with status {done.returncode}:\n{done.stderr[-8000:]}"
        except subprocess.TimeoutExpired as timeout:
            stdout = timeout.stdout.decode() if isinstance(timeout.stdout, bytes) else (timeout.stdout or "")
            ending = f"was stopped after {CHILD_TIMEOUT_S} s"
        for line in stdout.splitlines():
            if line.startswith("{"):
                r = json.loads(line)
                results[r["case"]] = r
        remaining = [n for n in remaining if n not in results]
        if remaining:  # the case the process died in (or timed out in) fails; the others run again
            results[remaining.pop(0)] = {"ok": False, "error": f"the harness process {ending}"}
    return results


def assert_case(results: dict[str, dict], name: str) -> None:
    r = results[name]
    assert r["ok"], r["error"]


@pytest.fixture(scope="module")
def plain_lib() -> Path:
    return build.build("plain")


@pytest.fixture(scope="module")
def plain_results(plain_lib) -> dict[str, dict]:
    return run_cases(plain_lib, [c.name for c in cases.CASES])


@pytest.mark.parametrize("name", [c.name for c in cases.CASES])
def test_kernel_matches_reference(plain_results, name):
    assert_case(plain_results, name)


def test_forced_persistent_refuses_what_does_not_fit(plain_lib):
    """The real planner, against a fake device whose shared memory cannot hold the W_hh slice."""
    import torch

    ops = cases.load(str(plain_lib))
    case = cases.Case("refused", "persistent", 3, 2, 40, 1, False, torch.float32, smem_optin=1024)
    assert not cases.plan_of(ops, case, backward=False)["ok"]
    xw, w_hh, h0, _, _, _ = cases.problem(case)
    with pytest.raises(RuntimeError, match=r"W_hh slice \(12 x 40\).*shared memory per CTA, the device allows 1024"):
        ops.recurrence_forward(xw.float(), w_hh.float(), h0.float(), None, "tanh", "persistent")


# The emulation's own checks (tests/simt/shim_selftest.cpp): each misuse must end the process with its message.
MISUSES = {
    "divergent_shuffle": r"lanes of CTA 0, warp 0 reached different shuffles",
    "exited_lane": r"a lane named in the mask has exited",
    "misaligned_load": r"misaligned __ldcg of 16 bytes",
    "unreachable_barrier": r"watchdog: .*\n  CTA 0: 1 spinning at the grid barrier \(ld.acquire.gpu\), 63 at __syncthreads",
}
# ... and what a GPU runs must run: all CTAs of a cooperative grid alive together (each waits for the
# other), NaN-filled shared memory, and cudaErrorCooperativeLaunchTooLarge (720) for a grid too large.
WELL_FORMED = {"grid_barrier": 0, "unwritten_shared": 0, "cooperative_too_large": 720}


def run_selftest(lib: Path, name: str) -> subprocess.CompletedProcess:
    code = f"import torch; torch.ops.load_library({str(lib)!r}); print(torch.ops.rnn_fused_simt.selftest({name!r}))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "SIMT_TIMEOUT_S": "3"})


@pytest.mark.parametrize("name,message", MISUSES.items())
def test_emulation_stops_what_a_gpu_would_hang_or_fault_on(plain_lib, name, message):
    done = run_selftest(plain_lib, name)
    assert done.returncode != 0, f"{name} ran to the end: {done.stdout}"
    assert re.search(message, done.stderr), done.stderr[-3000:]


@pytest.mark.parametrize("name,status", WELL_FORMED.items())
def test_emulation_runs_what_a_gpu_runs(plain_lib, name, status):
    done = run_selftest(plain_lib, name)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-1] == str(status)


def require_runtime(name: str) -> str:
    """The path of g++'s sanitizer runtime `name`; a skip where it is missing (a failure on CI)."""
    path = build.runtime_library(name)
    if not os.path.isabs(path):  # g++ -print-file-name echoes a name it cannot find
        if REQUIRED:
            pytest.fail(f"{name} is not installed (g++ cannot find it)")
        pytest.skip(f"{name} is not installed")
    return path


@pytest.fixture(scope="module")
def asan_results() -> dict[str, dict]:
    require_runtime("libasan.so")
    lib = build.build("asan")
    # libstdc++ too: Python does not link it, and ASan's __cxa_throw interceptor must find it at start-up.
    preload = f"{build.runtime_library('libasan.so')} {build.runtime_library('libstdc++.so')}"
    env = {"LD_PRELOAD": preload, "ASAN_OPTIONS": "detect_leaks=0"}
    return run_cases(lib, cases.ASAN, env)


@pytest.mark.sanitizer
@pytest.mark.parametrize("name", cases.ASAN)
def test_kernel_under_address_sanitizer(asan_results, name):
    assert_case(asan_results, name)


@pytest.fixture(scope="module")
def tsan_exe() -> Path:
    require_runtime("libtsan.so")
    return build.build("tsan")


@pytest.mark.sanitizer
@pytest.mark.parametrize("name", cases.TSAN)
def test_kernel_under_thread_sanitizer(tsan_exe, name):
    """Persistent against stepwise on one float32 problem, with every memory access checked for races."""
    case = cases.BY_NAME[name]
    args = [case.T, case.B, case.H, case.D, case.activation, case.sms, case.smem_optin]
    bs = cases.batch_sizes_of(case)
    if bs is not None:
        args.append(",".join(str(b) for b in bs.tolist()))
    done = subprocess.run([str(tsan_exe), *map(str, args)], capture_output=True, text=True, timeout=CHILD_TIMEOUT_S,
                          env={**os.environ, "TSAN_OPTIONS": "halt_on_error=1"})
    assert "ThreadSanitizer" not in done.stderr, done.stderr[-8000:]
    assert done.returncode == 0, f"status {done.returncode}: {done.stdout}{done.stderr[-8000:]}"

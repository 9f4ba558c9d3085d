"""The numerical flags a run pins, and the environment it records next to its numbers.

A time means little without the machine, the library versions, the thread count and the precision flags:
TF32 alone changes cuDNN's and cuBLAS's fp32 results and speed several-fold on Ampere and later, so the
flags are set explicitly at the start of a run (exact fp32 unless the preset or --allow-tf32 says
otherwise) and recorded, not left to whatever the process had.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]


def _rnn_precision():
    """torch.backends.cudnn.rnn, whose fp32_precision (PyTorch >= 2.9) rules cuDNN's RNN apart from
    allow_tf32 (its default is 'tf32' in some releases); None where the knob does not exist."""
    rnn = getattr(torch.backends.cudnn, "rnn", None)
    return rnn if rnn is not None and hasattr(rnn, "fp32_precision") else None


def pin_cpus(threads: int) -> list[int]:
    """Restrict this process to ``threads`` of the CPUs it may run on (the lowest-numbered ones); returns them
    (every CPU it may use where the OS has no affinity call). The suite's process (pin_flags) and the JAX
    worker (peers_jax.serve, which inherits the set) both pin so, so every provider of a run is timed on the
    same cores. On a shared machine each core has slow phases of its own: on the 2-core build machine a
    Python loop pinned to one core or the other took 5.1 or 9.5 ms, each core switching independently every
    few seconds; with the JAX worker on core 0 and this process left to the scheduler, a round's samples
    of ours and of JAX came from different cores (benchmarks/NOTES.md, "One core for every provider")."""
    if not hasattr(os, "sched_setaffinity"):
        return list(range(os.cpu_count() or 1))
    cpus = sorted(os.sched_getaffinity(0))[:max(1, threads)]
    os.sched_setaffinity(0, cpus)
    return cpus


def pin_flags(tf32: bool, threads: int | None = None) -> dict:
    """TF32 on or off everywhere torch has a switch for it; with ``threads``, torch's thread count and this
    process's CPUs (pin_cpus)."""
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    rnn = _rnn_precision()
    if rnn is not None:
        rnn.fp32_precision = "tf32" if tf32 else "ieee"
    if threads:
        torch.set_num_threads(threads)
        pin_cpus(threads)
    return flags()


def flags() -> dict:
    out = {
        "torch.backends.cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "torch.backends.cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn.enabled": torch.backends.cudnn.enabled,
        "cudnn.benchmark": torch.backends.cudnn.benchmark,
        "cudnn.deterministic": torch.backends.cudnn.deterministic,
    }
    # The per-backend precision knobs of PyTorch >= 2.9, where they exist ('none' = inherit the parent's).
    knobs = {"fp32_precision": torch.backends, "cuda.matmul.fp32_precision": torch.backends.cuda.matmul,
             "cudnn.fp32_precision": torch.backends.cudnn, "cudnn.rnn.fp32_precision": _rnn_precision(),
             "cudnn.conv.fp32_precision": getattr(torch.backends.cudnn, "conv", None)}
    for name, owner in knobs.items():
        if owner is not None and hasattr(owner, "fp32_precision"):
            out[name] = owner.fp32_precision
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_kernels() -> dict | None:
    """Which CPU step and which GEMM the float32 kernels take on this CPU (csrc/cpu/step_tile.h, gemm_onednn.h):
    the same code runs different instructions on different build machines."""
    from .._extension import compiled, load

    if load() is not None:
        return None
    return {"step": compiled().cpu_step_isa(), "gemm": compiled().cpu_gemm()}


def environment(device: str, argv: list[str] | None = None) -> dict:
    # Dirty = the code that ran differs from the commit: modified or new files, result folders aside.
    status = _git("status", "--porcelain")
    if status is not None:
        status = [line for line in status.splitlines()
                  if not line[3:].startswith(("benchmarks/results/", "bench-out/"))]
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, "-m", "rnn_fused.bench",
                                                      *(sys.argv[1:] if argv is None else argv)]),
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else _cpu_model(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu_affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        # Other processes' load when the run started: on a shared machine it explains noisy CPU numbers.
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": _version("triton"),
        "flashrnn": _version("flashrnn"),
        **{peer: _version(peer) for peer in ("jax", "jaxlib", "onnx", "onnxruntime", "openvino")},  # the peers
        "rnn_fused": _version("rnn-fused"),
        # Where .git did not travel (a lent GPU machine), scripts/gpu_validation.sh passes the commit in.
        "git_commit": _git("rev-parse", "HEAD") or os.environ.get("RNN_FUSED_COMMIT"),
        "git_dirty": bool(status) if status is not None else None,
        "fused_rnn": "rnn_fused.FusedRNN",
        "cpu_kernels": _cpu_kernels(),
        "flags": flags(),
    }
    if os.environ.get("RNN_FUSED_SOURCE_SHA256"):  # the tree that ran, when it may differ from the commit
        env["source_sha256"] = os.environ["RNN_FUSED_SOURCE_SHA256"]
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        env["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                      "memory_GiB": round(props.total_memory / 2**30, 1), "sm_count": props.multi_processor_count}
    return env

"""Compiles the SIMT harness from the current sources with g++, one build per variant, cached by a hash of
every input (sources, flags, compiler, torch), so a kernel change is tested by the next run.

Variants: ``plain`` and ``asan`` are shared libraries of torch ops (``torch.ops.rnn_fused_simt``; the asan
one needs libasan preloaded into Python); ``tsan`` is an executable (tsan_main.cpp), since ThreadSanitizer
cannot be preloaded into Python. Needs the CUDA headers (``$CUDA_HOME/include``), never a GPU or nvcc.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CUDA_INCLUDE = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"
BUILD = ROOT / "build" / "simt"

# The kernel files, the real host code they call, and the harness; each compiled as one translation unit.
UNITS = {
    "recurrence_args": ROOT / "csrc" / "recurrence_args.cpp",
    "kernels_persistent": HERE / "kernels_persistent.cpp",
    "kernels_stepwise": HERE / "kernels_stepwise.cpp",
    "simt_ops": HERE / "simt_ops.cpp",
}
# The emulation's self-tests go into the plain library only; the ThreadSanitizer build is an executable.
EXTRA_UNITS = {"plain": {"shim_selftest": HERE / "shim_selftest.cpp"}, "asan": {},
               "tsan": {"tsan_main": HERE / "tsan_main.cpp"}}
INPUTS = sorted([*(ROOT / "csrc").glob("*.h"), *(ROOT / "csrc").glob("*.cpp"), *(ROOT / "csrc" / "cuda").glob("*"),
                 *HERE.glob("*.h"), *HERE.glob("*.cpp"), Path(__file__)])
SANITIZE = {"plain": [], "asan": ["-fsanitize=address", "-fno-omit-frame-pointer"], "tsan": ["-fsanitize=thread"]}


def unavailable_reason() -> str | None:
    """Why the harness cannot be built here, or None."""
    if shutil.which("g++") is None:
        return "g++ is not installed"
    if not (CUDA_INCLUDE / "cuda_runtime.h").exists():
        return f"no CUDA headers at {CUDA_INCLUDE} (set CUDA_HOME)"
    return None


def _torch_paths():
    import torch
    from torch.utils.cpp_extension import include_paths, library_paths

    return torch.__version__, include_paths(), library_paths()


def _flags(variant: str) -> list[str]:
    _, includes, _ = _torch_paths()
    return (["-std=c++20", "-O1", "-g", "-fPIC", "-DRNN_FUSED_SIMT_CPU", "-Wno-unknown-pragmas", "-pthread"]
            + SANITIZE[variant] + [f"-I{p}" for p in includes] + [f"-I{CUDA_INCLUDE}"])


def _digest(variant: str) -> str:
    version, _, _ = _torch_paths()
    h = hashlib.sha256()
    for path in INPUTS:
        h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    compiler = subprocess.run(["g++", "--version"], capture_output=True, text=True).stdout
    h.update(" ".join(_flags(variant) + [version, compiler]).encode())
    return h.hexdigest()[:16]


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"SIMT harness build failed: {' '.join(cmd[:3])} ... {cmd[-1]}\n{done.stderr[-6000:]}")


def build(variant: str) -> Path:
    """The built artifact of ``variant`` (library or executable), compiling it if its inputs changed."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"cannot build the SIMT harness: {reason}")
    out_dir = BUILD / f"{variant}-{_digest(variant)}"
    artifact = out_dir / ("simt_tsan" if variant == "tsan" else "librnn_fused_simt.so")
    if artifact.exists():
        return artifact
    out_dir.mkdir(parents=True, exist_ok=True)
    flags = _flags(variant)
    units = {**UNITS, **EXTRA_UNITS[variant]}
    objects = {name: out_dir / f"{name}.o" for name in units}
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        jobs = [pool.submit(_run, ["g++", *flags, "-c", str(src), "-o", str(objects[name])])
                for name, src in units.items()]
        for job in jobs:
            job.result()
    _, _, libs = _torch_paths()
    link = ["g++", *SANITIZE[variant], "-pthread", *(str(o) for o in objects.values())]
    link += [f"-L{p}" for p in libs] + [f"-Wl,-rpath,{p}" for p in libs] + ["-lc10", "-ltorch_cpu"]
    tmp = artifact.with_suffix(".tmp")
    _run([*link, *([] if variant == "tsan" else ["-shared"]), "-o", str(tmp)])
    tmp.rename(artifact)  # only a complete build is ever cached
    for obj in objects.values():
        obj.unlink()
    return artifact


def runtime_library(name: str) -> str:
    """The path of g++'s sanitizer runtime ``name`` (e.g. libasan.so), to preload into Python."""
    return subprocess.run(["g++", f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()


if __name__ == "__main__":
    import sys

    for v in sys.argv[1:] or ["plain"]:
        print(build(v))

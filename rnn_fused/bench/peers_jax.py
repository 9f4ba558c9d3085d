"""JAX (XLA on the CPU) as a provider: jax.jit of a lax.scan Elman RNN, jax.vjp for fwd+bwd, in a worker.

The model, per layer and direction: ``xw = x @ W_ih^T + b_ih + b_hh`` for all T at once (hoisted out of the
recurrence, one GEMM), then ``lax.scan`` over T of ``h = act(xw_t + h @ W_hh^T)`` (``reverse=True`` for the
backward direction); directions concatenated on the feature axis, layers stacked, h_n in nn.RNN's order.
Train mode is ``jax.vjp`` of that function pulled back with the suite's upstream gradients (g_out, g_h),
i.e. the gradient of ``<output, g_out> + <h_n, g_h>`` into the input, h0 and every weight: the same scalar
loss the suite's torch call differentiates (workload.py). Packed input is skipped (JAX has no packed
sequences; masking would be a different computation).

Why a worker process: XLA reads its threading flag (XLA_FLAGS: ``--xla_cpu_multi_thread_eigen``) once, when
jax initialises its CPU backend, and keeps its own thread pools; in the suite's process they would sit next
to torch's. The worker sets the flag before importing jax, so nothing leaks into torch, and it is started
once per run and reused for every case (starting Python and importing jax costs seconds).

Why the worker pins its CPU affinity: the flags do not bound XLA's threads. jax 0.10 sizes its CPU thread
pool from the CPUs the process may run on and splits a large dot over it whatever the flags say (measured
on 2 cores: a jit of ``tanh(a @ w.T)``, a [8192, 256] x [256, 256], took 1.89 s of CPU per second with
``--xla_cpu_multi_thread_eigen=false``, and 1.0 with the affinity set; JAX's maintainers name the affinity
as the way to limit it, jax-ml/jax#1539). So ``serve`` restricts itself to ``threads`` of its CPUs before
importing jax, and every row records the cores a provider used (timing.cores_used).

Why the worker times each sample itself but answers over a pipe: a pipe round trip costs tens of
microseconds, as much as a whole T=1 call, so timing from this side would charge JAX for our IPC. Timing
everything inside the worker in one go would be honest per call but could not be interleaved with the other
providers (the suite times providers of a case in rounds, so a drift of the shared machine hits all alike).
So each request makes the worker run one call between two ``perf_counter`` reads (the same clock and the
same garbage-collector pause as timing.py's CPU samples) and send back the milliseconds; this process only
waits in ``recv`` meanwhile, off the CPU.
"""

from __future__ import annotations

import gc
import os
import socket
import subprocess
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import torch

from .cases import Case
from .env import pin_cpus
from .peers_onnx import missing
from .providers import Provider
from .timing import cores_used
from .workload import CallResult, Workload


def xla_flags(threads: int) -> str:
    """XLA's CPU threading flag for ``threads`` threads, appended to whatever XLA_FLAGS already holds (what
    bounds the threads is the worker's affinity, ``env.pin_cpus``)."""
    own = f"--xla_cpu_multi_thread_eigen={'false' if threads <= 1 else 'true'}"
    return " ".join(f for f in (os.environ.get("XLA_FLAGS", ""), own) if f)


# --- the worker (runs in its own process; imports jax only there) ---------------------------------------------

def _elman(jax, jnp, case: dict):
    """f(x, h0, params) -> (output [T, B, D*H], h_n [L*D, B, H]); params: nn.RNN's names -> arrays."""
    act = jnp.tanh if case["nonlinearity"] == "tanh" else jax.nn.relu
    D = 2 if case["bidirectional"] else 1
    suffixes = ["", "_reverse"][:D]

    def f(x, h0, params):
        h_n = []
        for k in range(case["num_layers"]):
            outs = []
            for d, s in enumerate(suffixes):
                w_hh_t = params[f"weight_hh_l{k}{s}"].T
                xw = x @ params[f"weight_ih_l{k}{s}"].T + (params[f"bias_ih_l{k}{s}"] + params[f"bias_hh_l{k}{s}"])

                def step(h, xw_t, w_hh_t=w_hh_t):
                    h = act(xw_t + h @ w_hh_t)
                    return h, h
                h_last, y = jax.lax.scan(step, h0[k * D + d], xw, reverse=d == 1)
                outs.append(y)
                h_n.append(h_last)
            x = outs[0] if D == 1 else jnp.concatenate(outs, axis=-1)
        return x, jnp.stack(h_n)
    return f


def serve(fd: int, threads: int) -> None:
    """The worker's loop, on the connection ``fd`` (started by Worker with XLA_FLAGS already in its env), on
    ``threads`` CPUs."""
    cpus = pin_cpus(threads)  # the suite's own CPUs (it pinned itself first, the worker inherits them)
    import jax
    import jax.numpy as jnp

    conn = Connection(fd)
    fn = None
    while True:
        msg = conn.recv()
        try:
            if msg[0] == "setup":  # ("setup", case dict, mode, x, h0, params, g_out, g_h)
                _, case, mode, x, h0, params, g_out, g_h = msg
                f = _elman(jax, jnp, case)
                args = [jnp.asarray(a) for a in (x, h0)] + [{k: jnp.asarray(v) for k, v in params.items()}]
                if mode == "forward":
                    jitted = jax.jit(f)
                else:
                    cot = (jnp.asarray(g_out), jnp.asarray(g_h))

                    def train(x, h0, params):
                        out, pullback = jax.vjp(f, x, h0, params)
                        return out, pullback(cot)
                    jitted = jax.jit(train)

                def fn(jitted=jitted, args=args):
                    return jax.block_until_ready(jitted(*args))
                conn.send(("ok", None))
            elif msg[0] == "call":  # one call, its results as numpy
                conn.send(("ok", jax.tree_util.tree_map(np.asarray, fn())))
            elif msg[0] == "sample":  # one timed call (ms); the gc pause as timing.py's CPU samples
                gc.disable()
                t0 = time.perf_counter()
                fn()
                ms = (time.perf_counter() - t0) * 1e3
                gc.enable()
                conn.send(("ok", ms))
            elif msg[0] == "cores":  # the cores one call keeps busy (timing.cores_used), measured here
                conn.send(("ok", cores_used(fn)))
            elif msg[0] == "versions":
                conn.send(("ok", {"jax": jax.__version__, "xla_flags": os.environ["XLA_FLAGS"], "cpus": cpus,
                                  "devices": [str(d) for d in jax.devices()]}))
            elif msg[0] == "stop":
                conn.send(("ok", None))
                return
        except Exception as error:  # noqa: BLE001 (reported to the suite, which reports the provider 'error')
            conn.send(("error", f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"))


# --- the suite's side ---------------------------------------------------------------------------------------

class Worker:
    """One jax worker process at a fixed thread count; requests answered in order over a socket.

    A fresh interpreter (subprocess, not multiprocessing's spawn: that re-runs the caller's main module,
    which breaks a script without a ``__main__`` guard), importing this very copy of rnn_fused, with
    XLA_FLAGS in its environment from the start."""

    def __init__(self, threads: int):
        ours, theirs = socket.socketpair()
        package_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, XLA_FLAGS=xla_flags(threads), JAX_PLATFORMS="cpu",
                   PYTHONPATH=os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p))
        self.process = subprocess.Popen(
            [sys.executable, "-c", f"from rnn_fused.bench.peers_jax import serve; serve({theirs.fileno()}, {threads})"],
            pass_fds=(theirs.fileno(),), env=env)
        theirs.close()
        self.conn = Connection(ours.detach())
        self.threads = threads

    def alive(self) -> bool:
        return self.process.poll() is None

    def ask(self, *msg):
        self.conn.send(msg)
        status, value = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"jax worker: {value}")
        return value

    def close(self) -> None:
        if self.alive():
            try:
                self.ask("stop")
            except (EOFError, OSError, RuntimeError):
                pass
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.conn.close()


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


class Jax(Provider):
    name = "jax"

    def __init__(self):
        self.worker: Worker | None = None

    def label(self, device: str) -> str:
        return "JAX jit(lax.scan) Elman, XLA CPU (worker process)"

    def unavailable(self, case: Case) -> str | None:
        if missing("jax"):
            return missing("jax")
        if case.device != "cpu" or case.dtype != "float32":
            return "CPU fp32 peer"
        if case.packed:
            return "packed input: JAX has no packed sequences (masking would be a different computation)"
        return None

    def _worker(self) -> Worker:
        threads = torch.get_num_threads()
        if self.worker is None or self.worker.threads != threads or not self.worker.alive():
            if self.worker is not None:
                self.worker.close()
            self.worker = Worker(threads)
        return self.worker

    def make_call(self, workload: Workload):
        worker = self._worker()
        case = workload.case
        params = {k: _numpy(v) for k, v in workload.baseline.state_dict().items()}
        worker.ask("setup", {"num_layers": case.num_layers, "bidirectional": case.bidirectional,
                             "nonlinearity": case.nonlinearity}, case.mode, _numpy(workload.x),
                   _numpy(workload.h0), params, _numpy(workload.g_out), _numpy(workload.g_h))
        names = list(params)

        def call():
            out = worker.ask("call")
            if case.mode == "forward":
                y, h_n = out
                return CallResult(dict, {"output": torch.from_numpy(y), "h_n": torch.from_numpy(h_n)})
            (y, h_n), (g_x, g_h0, g_params) = out
            tensors = {"output": torch.from_numpy(y), "h_n": torch.from_numpy(h_n),
                       "grad input": torch.from_numpy(g_x), "grad h0": torch.from_numpy(g_h0)}
            tensors.update({f"grad {n}": torch.from_numpy(g_params[n]) for n in names})
            return CallResult(dict, tensors)
        return call

    def sampler(self, call):
        worker = self.worker
        return lambda: worker.ask("sample")

    def cores_used(self, call) -> float:
        return self.worker.ask("cores")

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()
            self.worker = None


__all__ = ["Jax", "Worker", "xla_flags"]

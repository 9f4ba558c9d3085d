"""The implementations that are timed ("providers"), each behind one small interface.

A provider says whether it can run a case (``unavailable(case)`` -> None or the reason, shown in the
report as 'skipped') and builds ``(model, params)`` for a workload: ``model(input, h0) -> (output, h_n)``
with nn.RNN's contract, and ``params`` its leaf parameters under nn.RNN's names (the gate compares their
gradients by name). Every provider starts from the baseline nn.RNN's state_dict, so all run the same
weights.

- ``nn.RNN``: the baseline every speedup is relative to (cuDNN on a GPU, ATen's RNN on a CPU);
- ``cuda``, ``triton``, ``cpu``, ``reference``: ``rnn_fused.FusedRNN(backend=...)``;
- ``cuda-persistent``, ``cuda-stepwise``: ``FusedRNN(backend='cuda')`` with one kernel family forced through
  RNN_FUSED_CUDA_KERNEL (csrc/cuda/recurrence_cuda.cu reads it at every call), so each family is timed
  where the automatic choice would take the other; a problem the persistent plan cannot hold is 'skipped'
  with the plan's reason;
- ``compile``: ``torch.compile`` of FusedRNN(backend='reference'), i.e. the reference loop compiled whole;
- ``flashrnn``: FlashRNN's fused Elman kernel (flashrnn_adapter.py, unverified), GPU only;
- ``jax``, ``onnxruntime``, ``openvino``: the peers a user would pick instead (issue 18), CPU fp32, used when
  installed (``pip install -e .[peers]``), else 'skipped' with that reason: peers_jax.py (a worker process),
  peers_onnx.py (the ONNX RNN operator, forward only). They do not take nn.RNN's module contract: they
  override ``make_call`` (the timed closure returning the gate's tensors) and, for the worker, ``sampler``;
- ``cpu+norms``, ``cpu+clip``, ``cuda+norms``, ``cuda+clip``: the cost of the BPTT options (docs/bptt.md):
  FusedRNN with ``record_grad_norms=True``, or with ``bptt_clip_mode='norm'`` at a bound too large to bind
  (the kernel does the same work whether it binds or not, and the gate can still check the gradients).
  Train mode only: the options change nothing in the forward.
"""

from __future__ import annotations

import contextlib
import os
import time

import torch

from .. import backends
from ..modules import FusedRNN
from . import timing
from .cases import Case
from .workload import DTYPES, Workload, make_call

FUSED_BACKENDS = ("cuda", "triton", "cpu", "reference")
KERNEL_ENV = "RNN_FUSED_CUDA_KERNEL"
FORCED_KERNEL_PROVIDERS = ("cuda-persistent", "cuda-stepwise")
# FusedRNN keyword arguments of the BPTT-option providers, by suffix
BPTT_OPTIONS = {"norms": dict(record_grad_norms=True), "clip": dict(bptt_clip=1e30, bptt_clip_mode="norm")}
OPTION_PROVIDERS = tuple(f"{b}+{o}" for b in ("cpu", "cuda") for o in BPTT_OPTIONS)
PEER_PROVIDERS = ("jax", "onnxruntime", "openvino")
ALL_PROVIDERS = ("nn.RNN", "cuda") + FORCED_KERNEL_PROVIDERS + ("triton", "cpu", "reference", "compile",
                                                                 "flashrnn") + PEER_PROVIDERS + OPTION_PROVIDERS
BASELINE = "nn.RNN"


def _new_fused(case: Case, backend: str, workload: Workload, **options):
    model = FusedRNN(case.I, case.H, case.num_layers, nonlinearity=case.nonlinearity, bidirectional=case.bidirectional,
                device=case.device, dtype=DTYPES[case.dtype], backend=backend, **options)
    model.load_state_dict(workload.baseline.state_dict())
    return model


# --- providers ---------------------------------------------------------------------------------------------------

class Provider:
    name = ""

    def label(self, device: str) -> str:
        return self.name

    def unavailable(self, case: Case) -> str | None:
        return None

    def build(self, workload: Workload):
        raise NotImplementedError

    def make_call(self, workload: Workload):
        """The timed closure for ``workload`` (its case's mode), returning the gate's CallResult."""
        model, params = self.build(workload)
        return self.wrap_call(make_call(workload, model, params, workload.case.mode))

    def sampler(self, call):
        """One timed sample of ``call`` in ms, for the CPU's interleaved rounds (timing.measure_interleaved)."""
        return timing.cpu_sampler(call)

    def cores_used(self, call) -> float:
        """The cores ``call`` keeps busy (timing.cores_used), where its computation runs."""
        return timing.cores_used(call)

    def close(self) -> None:
        """The run is over: release what outlives a case (a worker process)."""

    def wrap_call(self, call):
        """The timed closure (forward, and in train mode the backward too) as this provider must run it."""
        return call

    def first_call_done(self, seconds: float) -> None:
        """Told how long the first (gate) call took: compile-style providers police their budget here."""

    def first_call_failed(self, error: BaseException) -> str | None:
        """A reason to report 'skipped' instead of 'error' (an environment limit, not a wrong kernel)."""
        return None


class TorchRNN(Provider):
    name = BASELINE

    def label(self, device: str) -> str:
        return "torch.nn.RNN (cuDNN)" if device == "cuda" else "torch.nn.RNN (ATen)"

    def build(self, workload: Workload):
        return workload.baseline, dict(workload.baseline.named_parameters())


class Fused(Provider):
    def __init__(self, backend: str):
        self.name = backend
        self.backend = backend

    def label(self, device: str) -> str:
        return f"FusedRNN(backend='{self.backend}')"

    def unavailable(self, case: Case) -> str | None:
        if self.backend == "triton" and case.device == "cpu":
            # The CPU path of Triton is its interpreter (TRITON_INTERPRET=1), a debugging tool: timing it
            # would measure Python, not the kernel.
            return "Triton runs on GPUs; its CPU interpreter is for testing, not timing"
        return backends.unavailable_reason(self.backend, torch.device(case.device), DTYPES[case.dtype])

    def build(self, workload: Workload):
        model = _new_fused(workload.case, self.backend, workload)
        return model, dict(model.named_parameters())


class FusedWithOptions(Fused):
    """FusedRNN with a BPTT option switched on (``<backend>+norms`` / ``<backend>+clip``)."""

    def __init__(self, backend: str, option: str):
        super().__init__(backend)
        self.name = f"{backend}+{option}"
        self.options = BPTT_OPTIONS[option]

    def label(self, device: str) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"FusedRNN(backend='{self.backend}', {args})"

    def unavailable(self, case: Case) -> str | None:
        if case.mode != "train":
            return "BPTT options change only the backward: timed in train mode"
        return super().unavailable(case)

    def build(self, workload: Workload):
        model = _new_fused(workload.case, self.backend, workload, **self.options)
        return model, dict(model.named_parameters())


@contextlib.contextmanager
def _environment(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


class ForcedKernel(Fused):
    """FusedRNN(backend='cuda') with RNN_FUSED_CUDA_KERNEL set around the whole call: the backward runs
    inside torch.autograd.grad, after the model returns, so the model alone cannot carry the setting."""

    REFUSAL = "persistent kernel cannot run this problem"  # csrc/cuda/recurrence_cuda.cu's message

    def __init__(self, kernel: str):
        super().__init__("cuda")
        self.name = f"cuda-{kernel}"
        self.kernel = kernel

    def label(self, device: str) -> str:
        return f"FusedRNN(backend='cuda'), {KERNEL_ENV}={self.kernel}"

    def wrap_call(self, call):
        def forced():
            with _environment(KERNEL_ENV, self.kernel):
                return call()
        return forced

    def first_call_failed(self, error: BaseException) -> str | None:
        if self.REFUSAL in str(error):
            return f"the persistent plan does not fit: {str(error).splitlines()[0][:300]}"
        return None


class Compiled(Provider):
    """torch.compile of the reference loop (FusedRNN(backend='reference')), compiled whole.

    Dynamo unrolls the Python loop over time, so the graph has T x layers x directions steps and inductor can
    fuse across them; the price is compile time that grows with T (on a 2-core CPU ~20 s forward and ~100 s
    fwd+bwd at T=256). The compile happens in the gate call (not timed, recorded as first_call_s). Cases
    beyond ``max_steps`` unrolled steps are skipped; once a compile takes longer than ``budget_s`` or fails,
    the provider is skipped for the rest of the run with that reason.
    """

    name = "compile"

    def __init__(self, budget_s: float = 120.0, max_steps: int = 1024, total_budget_s: float = 1800.0):
        self.budget_s = budget_s
        self.max_steps = max_steps
        self.total_budget_s = total_budget_s  # all compiles of the run together
        self.total_s = 0.0
        self.disabled: str | None = None

    def label(self, device: str) -> str:
        return "torch.compile(reference loop)"

    def unavailable(self, case: Case) -> str | None:
        if self.disabled:
            return self.disabled
        if case.packed:
            return "packed input: batch sizes per step are data (the loop would graph-break or recompile)"
        steps = case.T * case.num_layers * (2 if case.bidirectional else 1)
        if steps > self.max_steps:
            return f"{steps} unrolled steps > {self.max_steps} (compile time grows with the unrolled steps)"
        return None

    def build(self, workload: Workload):
        # A fresh compile per case: dynamo caches per code object (FusedRNN.forward), and past its
        # recompile limit it silently falls back to eager, which would then be timed as 'compile'.
        torch._dynamo.reset()
        model = _new_fused(workload.case, "reference", workload)
        return torch.compile(model, dynamic=False), dict(model.named_parameters())

    def first_call_done(self, seconds: float) -> None:
        self.total_s += seconds
        if seconds > self.budget_s:
            self.disabled = (f"an earlier compile took {seconds:.0f} s > budget {self.budget_s:.0f} s; "
                             f"skipped for the rest of the run")
        elif self.total_s > self.total_budget_s:
            self.disabled = (f"compiles so far took {self.total_s:.0f} s > the run's compile budget "
                             f"{self.total_budget_s:.0f} s; skipped for the rest of the run")

    def first_call_failed(self, error: BaseException) -> str | None:
        self.disabled = f"torch.compile failed earlier: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
        return f"torch.compile failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}"


def make_providers(names=None, *, compile_budget_s: float = 120.0, compile_max_steps: int = 1024,
                   compile_total_budget_s: float = 1800.0) -> list[Provider]:
    """Providers by name, the baseline always first (every speedup is relative to it)."""
    from .flashrnn_adapter import FlashRNN
    from .peers_jax import Jax
    from .peers_onnx import OnnxRuntime, OpenVINO

    names = list(ALL_PROVIDERS if names is None else names)
    unknown = [n for n in names if n not in ALL_PROVIDERS]
    if unknown:
        raise ValueError(f"unknown provider(s) {unknown}; choose from {ALL_PROVIDERS}")
    table = {"nn.RNN": TorchRNN, "compile": lambda: Compiled(compile_budget_s, compile_max_steps, compile_total_budget_s),
             "flashrnn": FlashRNN, "jax": Jax, "onnxruntime": OnnxRuntime, "openvino": OpenVINO, **{b: (lambda b=b: Fused(b)) for b in FUSED_BACKENDS},
             **{n: (lambda n=n: ForcedKernel(n.split("-", 1)[1])) for n in FORCED_KERNEL_PROVIDERS},
             **{n: (lambda n=n: FusedWithOptions(*n.split("+"))) for n in OPTION_PROVIDERS}}
    ordered = [BASELINE] + [n for n in ALL_PROVIDERS if n in names and n != BASELINE]
    return [table[n]() for n in ordered]


def timed_first_call(call):
    t0 = time.perf_counter()
    result = call()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - t0


__all__ = ["ALL_PROVIDERS", "BASELINE", "PEER_PROVIDERS", "Compiled", "ForcedKernel", "Fused", "FusedWithOptions", "Provider",
           "TorchRNN", "make_providers", "timed_first_call"]

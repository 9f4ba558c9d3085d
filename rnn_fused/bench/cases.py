"""The benchmark cases and the named presets that list them, in one place.

A *case* is one workload (shape, structure, dtype, mode) on one device; every provider is timed on it.
A *preset* is a named grid of cases plus how hard to time them. Sweeps are built as "a base point and one
axis varied at a time" rather than a full cross product, so each plot (speedup vs B, vs H, time per step
vs T) has a line and the case count stays small; gpu-full and gpu-quick take the full B x H product their
briefs ask for (gpu-quick a small one: it must fit one stage of the 15-minute first GPU lease).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .timing import TimingPolicy

MODES = ("forward", "train")
DTYPE_SHORT = {"float32": "fp32", "float64": "fp64", "float16": "fp16", "bfloat16": "bf16"}


@dataclass(frozen=True)
class Case:
    """One workload. ``mode``: 'forward' (inference under torch.no_grad) or 'train' (forward + backward
    into the input, h0 and every parameter). ``packed``: sequences of mixed lengths as a PackedSequence."""

    T: int
    B: int
    I: int  # noqa: E741 (the input size, named as in the formulas)
    H: int
    mode: str = "forward"
    num_layers: int = 1
    bidirectional: bool = False
    dtype: str = "float32"
    packed: bool = False
    nonlinearity: str = "tanh"
    device: str = "cpu"
    tags: tuple[str, ...] = ()  # which sweeps the case belongs to ('target', 'sweep-T', ...); not in the id

    @property
    def id(self) -> str:
        """Stable, human-readable key; --compare matches results across runs by it."""
        parts = ["fwd" if self.mode == "forward" else "fwd+bwd", f"T{self.T}", f"B{self.B}", f"I{self.I}",
                 f"H{self.H}"]
        if self.num_layers != 1:
            parts.append(f"L{self.num_layers}")
        if self.bidirectional:
            parts.append("bi")
        if self.packed:
            parts.append("packed")
        if self.nonlinearity != "tanh":
            parts.append(self.nonlinearity)
        parts.append(DTYPE_SHORT.get(self.dtype, self.dtype))
        parts.append(self.device)
        return " ".join(parts)

    @property
    def shape_key(self) -> tuple:
        """Everything but the mode: the cases that share inputs and weights."""
        return (self.T, self.B, self.I, self.H, self.num_layers, self.bidirectional, self.dtype, self.packed,
                self.nonlinearity, self.device)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["tags"] = list(self.tags)
        d["id"] = self.id
        return d


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    device: str  # 'cpu', 'cuda', or 'auto' (cuda if available, else cpu)
    timing: TimingPolicy
    # Cases as a function of the resolved device, because the dtypes worth timing depend on it.
    grid: object  # Callable[[str], list[Case]]
    # Providers left out of this preset and why (shown in the report as skipped).
    exclude: dict = field(default_factory=dict)
    tf32: bool = False  # exact fp32 unless a preset says otherwise
    compile_budget_s: float = 120.0  # a compile slower than this disables the compile provider afterwards
    compile_max_steps: int = 1024  # torch.compile unrolls T * layers * directions steps; skip beyond this
    compile_total_budget_s: float = 1800.0  # all compiles of a run together; the rest is skipped after
    threads: int | None = None  # torch.set_num_threads for the run (None: torch's default); --threads overrides
    latency: bool = False  # also run the per-call latency sweep (rnn_fused/bench/latency.py) after the cases

    def cases(self, device: str) -> list[Case]:
        return self.grid(device)

    def settings(self) -> dict:
        return {"name": self.name, "description": self.description, "device": self.device,
                "timing": dataclasses.asdict(self.timing), "exclude": dict(self.exclude), "tf32": self.tf32,
                "compile_budget_s": self.compile_budget_s, "compile_max_steps": self.compile_max_steps,
                "compile_total_budget_s": self.compile_total_budget_s,
                "threads": self.threads, "latency": self.latency}


def _both_modes(cases: list[Case]) -> list[Case]:
    return [dataclasses.replace(c, mode=m) for c in cases for m in MODES]


def _dedupe(cases: list[Case]) -> list[Case]:
    """Merge cases with the same id (a point shared by two sweeps), keeping the union of their tags."""
    merged: dict[str, Case] = {}
    for c in cases:
        if c.id in merged:
            old = merged[c.id]
            merged[c.id] = dataclasses.replace(old, tags=tuple(dict.fromkeys(old.tags + c.tags)))
        else:
            merged[c.id] = c
    return list(merged.values())


def _sweep(base: Case, axis: str, values, tag: str) -> list[Case]:
    out = []
    for v in values:
        changes = {axis: v}
        if axis == "H" and base.I == base.H:  # hidden-size sweeps keep I = H (a stacked layer's input)
            changes["I"] = v
        out.append(dataclasses.replace(base, tags=(tag,), **changes))
    return out


# --- quick: the CPU preset (< 5 minutes on a 2-core CPU, everything included) -------------------------------

QUICK_TARGETS = ((256, 1, 64, 64), (256, 16, 128, 128), (128, 64, 256, 256))  # (T, B, I, H), 1 layer, fp32
# The rows of the peers comparison (issue 18) that the sweeps below miss: one step and a short window (the
# per-call cost), a large-H matrix-vector recurrence (W_hh 1 MB), a long tiny one.
PEER_ROWS = ((1, 1, 64, 64), (16, 1, 64, 64), (64, 1, 512, 512), (1024, 1, 32, 32))


def _quick_grid(device: str) -> list[Case]:
    cases = [Case(T, B, I, H, device=device, tags=("target",)) for T, B, I, H in QUICK_TARGETS]
    cases += _sweep(Case(256, 1, 64, 64, device=device), "T", (32, 64, 128, 256), "sweep-T")
    cases += _sweep(Case(64, 16, 128, 128, device=device), "B", (1, 4, 16, 64), "sweep-B")
    cases += _sweep(Case(64, 16, 128, 128, device=device), "H", (32, 64, 128, 256), "sweep-H")
    # One multi-layer bidirectional case, so the drop-in's stacking is timed too.
    cases.append(Case(64, 8, 64, 64, num_layers=2, bidirectional=True, device=device, tags=("structure",)))
    cases += [Case(T, B, I, H, device=device, tags=("peers",)) for T, B, I, H in PEER_ROWS]
    return _dedupe(_both_modes(cases))


# --- standard: a broader sweep for a CPU or a GPU (tens of minutes on a CPU) ---------------------------------

def _standard_grid(device: str) -> list[Case]:
    dtypes = ("float32", "bfloat16") if device == "cuda" else ("float32",)
    cases = []
    for dtype in dtypes:
        base = Case(256, 16, 256, 256, dtype=dtype, device=device)
        cases += [dataclasses.replace(c, tags=("target",)) for c in
                  (Case(T, B, I, H, dtype=dtype, device=device) for T, B, I, H in QUICK_TARGETS)]
        cases += _sweep(base, "T", (64, 256, 1024), "sweep-T")
        cases += _sweep(base, "B", (1, 8, 16, 32, 128), "sweep-B")
        cases += _sweep(base, "H", (64, 128, 256, 512, 1024), "sweep-H")
        cases += [dataclasses.replace(base, num_layers=2, tags=("structure",)),
                  dataclasses.replace(base, bidirectional=True, tags=("structure",)),
                  dataclasses.replace(base, num_layers=2, bidirectional=True, tags=("structure",)),
                  dataclasses.replace(base, packed=True, tags=("packed",)),
                  dataclasses.replace(base, nonlinearity="relu", tags=("structure",))]
    return _dedupe(_both_modes(cases))


# --- gpu-full: the H100 grid ---------------------------------------------------------------------------------

GPU_FULL_B = (1, 8, 16, 256)
GPU_FULL_H = (128, 256, 384, 512, 1024, 2048)


def _gpu_full_grid(device: str) -> list[Case]:
    cases = []
    for dtype in ("float32", "bfloat16"):
        for B in GPU_FULL_B:
            for H in GPU_FULL_H:
                cases.append(Case(512, B, H, H, dtype=dtype, device=device, tags=("grid",)))
        # Packed mixed lengths: lengths spread over [T/4, T] (see workload.py).
        for B in (16, 256):
            for H in (128, 512, 2048):
                cases.append(Case(512, B, H, H, dtype=dtype, packed=True, device=device, tags=("packed",)))
        cases += _sweep(Case(512, 16, 512, 512, dtype=dtype, device=device), "T", (64, 128, 256, 512, 1024, 2048),
                        "sweep-T")
    return _dedupe(_both_modes(cases))


# --- gpu-quick: the first GPU lease (one device call; at most ~3 minutes on an H200 with Triton's compiles) ------

GPU_QUICK_B = (1, 16, 64)
GPU_QUICK_H = (256, 512, 1024)


def _gpu_quick_grid(device: str) -> list[Case]:
    cases = [Case(512, B, H, H, dtype=dtype, device=device, tags=("grid",))
             for dtype in ("float32", "bfloat16") for B in GPU_QUICK_B for H in GPU_QUICK_H]
    # One packed and one stacked bidirectional case at the middle of the grid, fp32: the drop-in's layouts.
    base = Case(512, 16, 512, 512, device=device)
    cases += [dataclasses.replace(base, packed=True, tags=("packed",)),
              dataclasses.replace(base, num_layers=2, bidirectional=True, tags=("structure",))]
    return _dedupe(_both_modes(cases))


PRESETS: dict[str, Preset] = {
    "quick": Preset(
        name="quick",
        # The peers (jax, onnxruntime, openvino) on every case when installed: with them and the interleaved
        # rounds the whole preset took 2m12s on the 2-core CPU (benchmarks/NOTES.md, "Peers (issue 18)"), so
        # nothing is left out for them (issue 18 asks for the peers in quick).
        description="CPU smoke benchmark: the three CPU target cases plus small T/B/H sweeps, fp32, with the "
                    "peers (JAX, ONNX Runtime, OpenVINO) on every case when installed, < 5 min",
        device="auto",
        timing=TimingPolicy(warmup=2, min_repeats=7, max_repeats=100, min_time_s=0.5, max_time_s=3.0),
        grid=_quick_grid,
        exclude={"compile": "torch.compile of the unrolled loop takes ~20 s (forward) and ~100 s (fwd+bwd) per "
                            "shape on a 2-core CPU: it alone would blow the 5-minute budget",
                 **{n: "the BPTT-option providers are opt-in here (--backends cpu cpu+norms cpu+clip), to keep "
                       "quick under 5 minutes" for n in ("cpu+norms", "cpu+clip", "cuda+norms", "cuda+clip")}},
        compile_budget_s=60.0,
        # One thread: quick runs on shared 2-core dev and CI machines, where a second busy core turns every
        # per-step OpenMP barrier into a scheduler wait (measured: nn.RNN forward T=256 B=16 H=128 took
        # 2084 ms with 2 threads under load vs 13.8 ms with 1). --threads N for multi-threaded numbers.
        threads=1,
        # The per-call cost of short calls (issue 17): ~30 s more, on the CPU whatever the device.
        latency=True,
    ),
    "standard": Preset(
        name="standard",
        description="T/B/H sweeps around T=256 B=16 H=256 plus layers, bidirectional, packed, relu; "
                    "fp32 (and bf16 on a GPU)",
        device="auto",
        timing=TimingPolicy(warmup=2, min_repeats=10, max_repeats=200, min_time_s=0.5, max_time_s=5.0),
        grid=_standard_grid,
        compile_budget_s=180.0,
        compile_max_steps=512,
        compile_total_budget_s=900.0,
    ),
    "gpu-quick": Preset(
        name="gpu-quick",
        description="the first GPU lease: fp32 and bf16, T=512, B in {1,16,64} x H in {256,512,1024}, one packed "
                    "and one 2-layer bidirectional case; forward and fwd+bwd; nn.RNN, the persistent and the "
                    "stepwise CUDA kernels (each forced), Triton",
        device="cuda",
        # Short measurements: every case runs 4 providers twice (modes) inside one ~3-minute stage of
        # scripts/gpu_validation.sh; 0.1 s of samples still gives >= 5 of them on the slowest provider.
        timing=TimingPolicy(warmup=2, min_repeats=5, max_repeats=200, min_time_s=0.1, max_time_s=0.5),
        grid=_gpu_quick_grid,
        exclude={"cuda": "the automatic kernel choice: timed as cuda-persistent and cuda-stepwise, each forced",
                 "cpu": "CPU kernels: not what a GPU lease is for",
                 "reference": "the plain PyTorch loop: launch-bound, not a contender on a GPU",
                 "compile": "compiling the unrolled T=512 loop takes minutes per case: gpu-full's job",
                 "flashrnn": "not installed on the lent machine",
                 **{n: "CPU peers (issue 18): not what a GPU lease is for" for n in ("jax", "onnxruntime", "openvino")},
                 **{n: "the BPTT options' cost is measured by python -m rnn_fused.bench.overhead"
                    for n in ("cpu+norms", "cpu+clip", "cuda+norms", "cuda+clip")}},
    ),
    "gpu-full": Preset(
        name="gpu-full",
        description="H100 grid: fp32 and bf16, T=512, B in {1,8,16,256} x H in {128..2048}, packed mixed "
                    "lengths, a T sweep; forward and fwd+bwd",
        device="cuda",
        timing=TimingPolicy(warmup=3, min_repeats=20, max_repeats=1000, min_time_s=0.3, max_time_s=3.0),
        grid=_gpu_full_grid,
        compile_budget_s=300.0,
        compile_max_steps=512,  # T=512 unrolled (the grid); the T=1024/2048 sweep points are skipped
        compile_total_budget_s=1800.0,
    ),
}


def resolve_device(preset: Preset, cuda_available: bool) -> str:
    if preset.device == "auto":
        return "cuda" if cuda_available else "cpu"
    return preset.device


def default_preset(cuda_available: bool) -> str:
    """quick on a CPU-only machine (the suite must finish in minutes there), standard on a GPU."""
    return "standard" if cuda_available else "quick"

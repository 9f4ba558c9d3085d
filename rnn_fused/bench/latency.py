"""``python -m rnn_fused.bench.latency``: what one short call costs, FusedRNN against nn.RNN (issue 17).

The main suite times long sequences, where the kernels dominate. A user who calls once per time step
(streaming inference, an RL policy, sampling from a char-RNN, truncated BPTT over short windows) pays the
fixed cost of a call instead: the Python above the op, the dispatcher hops, autograd's bookkeeping. This
sweep measures that cost at T in {1, 2, 4, 8, 16, 64}, B in {1, 8}, H in {64, 256} (I = H, one layer, fp32,
CPU, tanh), and the cell (``nn.RNNCell`` vs ``FusedRNNCell``) at the same B and H, in two modes: forward
under ``torch.no_grad`` and fwd+bwd (forward, then ``torch.autograd.grad`` of ``<outputs, fixed random
weights>`` into the input, h0 and every parameter). In forward mode ONNX Runtime running the ONNX ``RNN``
operator on the same weights is timed too (the deployment a per-step user would otherwise pick), when
``onnx`` and ``onnxruntime`` import.

Method, as ``overhead.py``: the providers of one case run interleaved, each round one sample of each in a
fresh random order, so a drift of the shared machine hits all of them alike; the ratio to torch is the
median over rounds of the per-round ratio, with p20/p80 as its spread. A call of 10 us is below what one
``perf_counter`` pair resolves well and what a preemption leaves alone, so a sample is a small batch of
calls (as many as bring the fastest provider of the case to ``min_sample_us``), reported per call. Before
timing, every provider's outputs (and in fwd+bwd its gradients) are checked against torch's with
``allclose`` (rtol 1e-4, atol 1e-5 x max(1, max|torch|)): a provider that differs is FAILED and not timed.

Writes ``latency.json`` (schema ``rnn-fused-latency/1``: environment, command, settings, and per case and
provider the status, the per-call microseconds of every round, median, p20, p80, and the ratios) and
``latency.md``; ``python -m rnn_fused.bench --preset quick`` runs the sweep after its main cases.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shlex
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from .. import backends
from ..modules import FusedRNN, FusedRNNCell
from . import env
from .timing import gc_paused, percentile

SCHEMA = "rnn-fused-latency/1"
T_VALUES = (1, 2, 4, 8, 16, 64)
B_VALUES = (1, 8)
H_VALUES = (64, 256)
MODES = ("forward", "train")
DEFAULT_ROUNDS = 100
WARMUP_ROUNDS = 3
MIN_SAMPLE_US = 300.0  # a sample of the case's fastest provider lasts at least this long
MAX_INNER_CALLS = 200
RTOL, ATOL = 1e-4, 1e-5
ORT = "onnxruntime"
OK, FAILED, SKIPPED, ERROR = "ok", "FAILED", "skipped", "error"


@dataclass(frozen=True)
class LatencyCase:
    """One shape and mode. ``T`` is None for the cell (one step, no sequence axis)."""

    T: int | None
    B: int
    H: int
    mode: str = "forward"

    @property
    def cell(self) -> bool:
        return self.T is None

    @property
    def id(self) -> str:
        mode = "fwd" if self.mode == "forward" else "fwd+bwd"
        where = "cell" if self.cell else f"T{self.T}"
        return f"latency {mode} {where} B{self.B} H{self.H}"

    @property
    def torch_name(self) -> str:
        return "nn.RNNCell" if self.cell else "nn.RNN"

    @property
    def fused_name(self) -> str:
        return "FusedRNNCell" if self.cell else "FusedRNN"

    def providers(self) -> list[str]:
        """torch first (the baseline); ONNX Runtime in forward mode for the sequence cases."""
        extra = [ORT] if self.mode == "forward" and not self.cell else []
        return [self.torch_name, self.fused_name, *extra]

    def to_json(self) -> dict:
        return {"id": self.id, "kind": "cell" if self.cell else "rnn", "T": self.T, "B": self.B, "I": self.H,
                "H": self.H, "mode": self.mode, "num_layers": 1, "dtype": "float32", "device": "cpu"}


def latency_cases(texts=None) -> list[LatencyCase]:
    """The sweep, sequence cases then the cell, each shape in both modes; ``texts``: as ``--filter``."""
    shapes = [(T, B, H) for T in T_VALUES for B in B_VALUES for H in H_VALUES]
    shapes += [(None, B, H) for B in B_VALUES for H in H_VALUES]
    cases = [LatencyCase(T, B, H, mode) for T, B, H in shapes for mode in MODES]
    return [c for c in cases if all(t in c.id for t in texts or ())]


# --- what one case runs --------------------------------------------------------------------------------------

@dataclass
class Inputs:
    """Sequence: x [T, B, H], h0 [1, B, H], upstream gradients of (output, h_n). Cell: x [B, H], h0 [B, H],
    the upstream gradient of h'."""

    x: torch.Tensor
    h0: torch.Tensor
    grad_outputs: tuple[torch.Tensor, ...]


def build_baseline(case: LatencyCase) -> tuple[nn.Module, Inputs]:
    """torch's module and the inputs, the same numbers on every run (seeded by the shape, not the mode)."""
    seed = zlib.crc32(repr((case.T, case.B, case.H)).encode())
    torch.manual_seed(seed)  # nn.RNN's own initialisation draws from the global generator
    gen = torch.Generator().manual_seed(seed)
    B, H = case.B, case.H
    if case.cell:
        model = nn.RNNCell(H, H)
        x, h0 = torch.randn(B, H, generator=gen), 0.5 * torch.randn(B, H, generator=gen)
        return model, Inputs(x, h0, (torch.randn(B, H, generator=gen),))
    model = nn.RNN(H, H)
    x, h0 = torch.randn(case.T, B, H, generator=gen), 0.5 * torch.randn(1, B, H, generator=gen)
    return model, Inputs(x, h0, (torch.randn(case.T, B, H, generator=gen), torch.randn(1, B, H, generator=gen)))


def fused_module(case: LatencyCase, baseline: nn.Module) -> nn.Module:
    """FusedRNN / FusedRNNCell on the CPU kernels with torch's weights."""
    cls = FusedRNNCell if case.cell else FusedRNN
    model = cls(case.H, case.H, backend="cpu")
    model.load_state_dict(baseline.state_dict())
    return model


def _names(case: LatencyCase) -> tuple[str, ...]:
    return ("h",) if case.cell else ("output", "h_n")


def torch_call(case: LatencyCase, model: nn.Module, inputs: Inputs):
    """(the timed closure, the result of one call as named tensors) for a torch module."""
    outputs = _names(case)
    if case.mode == "forward":
        def timed():
            with torch.no_grad():
                return model(inputs.x, inputs.h0)

        def result():
            out = timed()
            return dict(zip(outputs, out if isinstance(out, tuple) else (out,)))
        return timed, result

    x, h0 = inputs.x.detach().requires_grad_(), inputs.h0.detach().requires_grad_()
    params = dict(model.named_parameters())
    leaves = [x, h0, *params.values()]

    def timed():
        out = model(x, h0)
        out = out if isinstance(out, tuple) else (out,)
        return out, torch.autograd.grad(out, leaves, inputs.grad_outputs)

    def result():
        out, grads = timed()
        tensors = {n: t.detach() for n, t in zip(outputs, out)}
        tensors.update(zip(["grad input", "grad h0", *(f"grad {n}" for n in params)], grads))
        return tensors
    return timed, result


def onnx_unavailable() -> str | None:
    """Why the ONNX Runtime column is skipped (the suite's peer check), None when it can run."""
    from .peers_onnx import missing

    return missing("onnx", "onnxruntime")


def ort_call(case: LatencyCase, baseline: nn.RNN, inputs: Inputs, threads: int):
    """ONNX Runtime running the ONNX ``RNN`` node of the suite's peer (peers_onnx.rnn_model) with nn.RNN's
    weights; X [T, B, I] and the initial state are inputs."""
    from .cases import Case
    from .peers_onnx import ort_session, rnn_model

    session = ort_session(rnn_model(Case(case.T, case.B, case.H, case.H), baseline.state_dict()), threads)
    feeds = {"X": inputs.x.numpy(), "h0_l0": inputs.h0.numpy()}

    def timed():
        return session.run(["output", "h_n"], feeds)

    def result():
        y, y_h = timed()
        return {"output": torch.from_numpy(y), "h_n": torch.from_numpy(y_h)}
    return timed, result


def mismatch(got: dict, want: dict) -> str | None:
    """None if every tensor matches torch's at fp32 tolerance, else which ones do not and by how much."""
    bad = []
    for name, ref in want.items():
        t = got.get(name)
        if t is None or t.shape != ref.shape:
            bad.append(f"{name}: {'missing' if t is None else f'shape {tuple(t.shape)} != {tuple(ref.shape)}'}")
            continue
        scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
        if not torch.allclose(t, ref, rtol=RTOL, atol=ATOL * scale):
            bad.append(f"{name}: max |diff| {(t - ref).abs().max().item():.3g}")
    return "; ".join(bad) or None


# --- timing --------------------------------------------------------------------------------------------------

def _per_call_us(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) * 1e6 / n


def inner_calls(calls: dict, min_sample_us: float) -> int:
    """Calls per sample: enough for the fastest provider's sample to last ``min_sample_us``."""
    fastest = min(min(_per_call_us(fn, 3) for _ in range(2)) for fn in calls.values())
    return max(1, min(MAX_INNER_CALLS, math.ceil(min_sample_us / max(fastest, 1e-3))))


def interleaved(calls: dict, rounds: int, n: int) -> dict[str, list[float]]:
    """Per provider, the per-call microseconds of each round (after WARMUP_ROUNDS untimed ones)."""
    samples = {name: [] for name in calls}
    order = list(calls)
    with gc_paused():
        for r in range(WARMUP_ROUNDS + rounds):
            random.shuffle(order)
            for name in order:
                us = _per_call_us(calls[name], n)
                if r >= WARMUP_ROUNDS:
                    samples[name].append(us)
    return samples


def _spread(values: list[float]) -> dict:
    s = sorted(values)
    return {"median": percentile(s, 50), "p20": percentile(s, 20), "p80": percentile(s, 80)}


def measure_case(case: LatencyCase, rounds: int, threads: int, min_sample_us: float = MIN_SAMPLE_US) -> dict:
    """Build, check and time every provider of ``case``; the case's record for latency.json."""
    record = {"case": case.to_json(), "case_id": case.id, "status": OK, "torch": case.torch_name,
              "fused": case.fused_name, "providers": {}, "ratios": {}}
    baseline, inputs = build_baseline(case)
    calls, results = {}, {}
    for name in case.providers():
        entry = record["providers"][name] = {"status": OK}
        reason = (backends.unavailable_reason("cpu", torch.device("cpu"), torch.float32)
                  if name == case.fused_name else onnx_unavailable() if name == ORT else None)
        if reason:
            entry.update(status=SKIPPED, reason=reason)
            continue
        try:
            if name == case.torch_name:
                timed, result = torch_call(case, baseline, inputs)
            elif name == case.fused_name:
                timed, result = torch_call(case, fused_module(case, baseline), inputs)
            else:
                timed, result = ort_call(case, baseline, inputs, threads)
            results[name] = result()
        except Exception as error:  # noqa: BLE001 (one provider raising must not lose the others' numbers)
            entry.update(status=ERROR, reason=f"{type(error).__name__}: {error}")
            continue
        if name != case.torch_name and case.torch_name in results:
            wrong = mismatch(results[name], results[case.torch_name])
            if wrong:
                entry.update(status=FAILED, reason=f"differs from {case.torch_name}: {wrong}")
                continue
        calls[name] = timed
    if any(p["status"] in (FAILED, ERROR) for p in record["providers"].values()):
        record["status"] = FAILED
    if case.torch_name not in calls:
        return record
    n = inner_calls(calls, min_sample_us)
    record["inner_calls"] = n
    samples = interleaved(calls, rounds, n)
    for name, s in samples.items():
        record["providers"][name].update(samples_us=[round(v, 2) for v in s],
                                         **{f"{k}_us": v for k, v in _spread(s).items()})
    pairs = [(name, case.torch_name) for name in calls if name != case.torch_name]
    if case.fused_name in calls and ORT in calls:
        pairs.append((case.fused_name, ORT))
    for a, b in pairs:
        record["ratios"][f"{a} / {b}"] = _spread([x / y for x, y in zip(samples[a], samples[b])])
    return record


def run_sweep(cases: list[LatencyCase], environment: dict, rounds: int = DEFAULT_ROUNDS,
              min_sample_us: float = MIN_SAMPLE_US, on_case=None) -> dict:
    """Every case at the current torch thread count (ONNX Runtime gets the same): the latency.json document.
    ``environment``: env.environment()'s record of the run (its command is the one that ran the sweep)."""
    threads = torch.get_num_threads()
    random.seed(0)
    t0 = time.perf_counter()
    results = []
    for i, case in enumerate(cases):
        if on_case:
            on_case(i, case)
        results.append(measure_case(case, rounds, threads, min_sample_us))
    ort_reason = onnx_unavailable()
    ort_version = None if ort_reason else __import__("onnxruntime").__version__
    return {"schema": SCHEMA, "environment": environment, "command": environment["command"], "rounds": rounds,
            "warmup_rounds": WARMUP_ROUNDS, "min_sample_us": min_sample_us, "threads": threads, "tolerance": {"rtol": RTOL, "atol": ATOL},
            "onnxruntime": {"version": ort_version, "skipped": ort_reason},
            "wall_time_s": round(time.perf_counter() - t0, 1), "results": results}


# --- reporting -----------------------------------------------------------------------------------------------

COLUMNS = ("case", "torch us", "fused us", "fused / torch (p20-p80)", "ORT us", "ORT / torch (p20-p80)",
           "fused / ORT (p20-p80)")


def _ratio(r: dict | None) -> str:
    return "" if r is None else f"{r['median']:.2f}x ({r['p20']:.2f}-{r['p80']:.2f})"


def _provider_cell(p: dict | None) -> str:
    if p is None:
        return ""
    if p["status"] != OK:
        return p["status"]
    return f"{p['median_us']:.1f}"


def rows(doc: dict) -> list[tuple[str, ...]]:
    out = []
    for r in doc["results"]:
        t, f = r["torch"], r["fused"]
        ratios = r["ratios"]
        out.append((r["case_id"].removeprefix("latency "), _provider_cell(r["providers"].get(t)),
                    _provider_cell(r["providers"].get(f)), _ratio(ratios.get(f"{f} / {t}")),
                    _provider_cell(r["providers"].get(ORT)), _ratio(ratios.get(f"{ORT} / {t}")),
                    _ratio(ratios.get(f"{f} / {ORT}"))))
    return out


def problems(doc: dict) -> list[str]:
    """One line per (provider, status, reason) that kept a provider from being timed, with the cases it hit;
    FAILED first."""
    groups: dict[tuple, list[str]] = {}
    for r in doc["results"]:
        for name, p in r["providers"].items():
            if p["status"] != OK:
                groups.setdefault((p["status"] != FAILED, name, p["status"], p["reason"]), []).append(r["case_id"])
    lines = []
    for (_, name, status, reason), ids in sorted(groups.items(), key=lambda kv: kv[0][0]):
        where = ids[0] if len(ids) == 1 else f"{len(ids)} cases ({ids[0]}, ...)"
        lines.append(f"{name}: {status} in {where}: {reason}")
    return lines


def _legend(doc: dict) -> str:
    return (f"Per-call microseconds (median over {doc['rounds']} interleaved rounds, {doc['threads']} thread(s)); "
            "torch = nn.RNN (nn.RNNCell for `cell`), fused = FusedRNN(backend='cpu') (FusedRNNCell), "
            "ORT = ONNX Runtime's RNN operator (forward, sequence cases). Ratios: median of per-round ratios "
            "(p20-p80); < 1 means the first is faster.")


def markdown(doc: dict) -> str:
    lines = ["## Per-call latency", "", _legend(doc), "", "| " + " | ".join(COLUMNS) + " |",
             "|---|" + "---:|" * (len(COLUMNS) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows(doc)]
    if doc["onnxruntime"]["skipped"]:
        lines += ["", f"ONNX Runtime skipped: {doc['onnxruntime']['skipped']}"]
    issues = problems(doc)
    if issues:
        lines += ["", "Not timed:", ""] + [f"- {line}" for line in issues]
    lines += ["", f"Sweep wall time {doc['wall_time_s']} s."]
    return "\n".join(lines) + "\n"


def print_table(doc: dict, console: Console) -> None:
    table = Table(title="per-call latency (us); ratios < 1: the first is faster")
    for i, col in enumerate(COLUMNS):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in rows(doc):
        table.add_row(*row)
    console.print(table)
    if doc["onnxruntime"]["skipped"]:
        console.print(f"ONNX Runtime skipped: {doc['onnxruntime']['skipped']}")
    for line in problems(doc):
        console.print(f"[red]{line}[/]" if f": {FAILED} in " in line else line, highlight=False)


def write(doc: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "latency.json", out_dir / "latency.md"
    json_path.write_text(json.dumps(doc))  # one line: indented, the raw samples would double the size
    md_path.write_text(markdown(doc))
    return json_path, md_path


def failed(doc: dict) -> bool:
    return any(r["status"] == FAILED for r in doc["results"])


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m rnn_fused.bench.latency", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS,
                   help=f"interleaved rounds per case (after {WARMUP_ROUNDS} warm-up rounds)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--out", type=Path, help="folder for latency.json and latency.md (default: print only)")
    p.add_argument("--filter", nargs="+", metavar="TEXT",
                   help="only cases whose id contains every TEXT (e.g. --filter cell, --filter fwd T1 B1)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 150)  # the table is ~130 columns wide
    cases = latency_cases(args.filter)
    if not cases:
        console.print("no case matches --filter")
        return 2
    env.pin_flags(tf32=False, threads=args.threads or None)
    environment = env.environment("cpu", argv)
    environment["command"] = " ".join(shlex.quote(a) for a in
                                      [sys.executable, "-m", "rnn_fused.bench.latency", *argv])
    progress = Console(stderr=True)
    doc = run_sweep(cases, environment, args.rounds,
                    on_case=lambda i, c: progress.print(f"[{i + 1}/{len(cases)}] {c.id}", highlight=False))
    print_table(doc, console)
    console.print(f"sweep: {len(cases)} cases in {doc['wall_time_s']} s")
    if args.out:
        paths = write(doc, args.out)
        console.print(f"wrote {paths[0]}, {paths[1]}")
    return 1 if failed(doc) else 0


if __name__ == "__main__":
    sys.exit(main())

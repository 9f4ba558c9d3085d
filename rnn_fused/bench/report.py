"""The run's outputs: the JSON document (the record), a markdown report and the rich table.

The JSON is the source of truth (--compare reads it; the markdown and plots are views of it). Schema
``rnn-fused-bench/1``::

    {"schema", "preset": {settings}, "environment": {...}, "wall_time_s", "interrupted",
     "cases": [{id, T, B, I, H, mode, num_layers, bidirectional, dtype, packed, nonlinearity, device, tags}],
     "results": [{case_id, provider, label, status, reason, median_ms, p20_ms, p80_ms, min_ms, mean_ms,
                  repeats, samples_ms, first_call_s, peak_mem_bytes, cores_used, gate, speedup_vs_baseline,
                  us_per_step}]}

status: ok | FAILED (wrong numbers: not timed) | error (raised) | skipped (cannot run here; reason says why).
speedup_vs_baseline = nn.RNN's median / this provider's median on the same case (> 1: faster than nn.RNN).
us_per_step = the median in microseconds / the case's T (the longest sequence when packed): the number the
per-step floors (benchmarks/barrier_floor.cu) are judged against.
cores_used (CPU, ok rows; absent in older files): the cores the provider's call kept busy (timing.cores_used);
a provider above the run's torch_threads (by more than CORES_SLACK) is named in the report: it was not
pinned to the run's threads, and its times are not comparable.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .providers import BASELINE

SCHEMA = "rnn-fused-bench/1"
CORES_SLACK = 0.3  # cores_used above torch_threads + this: more threads than the run allows

REQUIRED_RESULT_KEYS = ("case_id", "provider", "label", "status", "reason", "median_ms", "p20_ms", "p80_ms",
                        "repeats", "first_call_s", "peak_mem_bytes", "gate", "speedup_vs_baseline", "us_per_step")


def build_document(preset: dict, environment: dict, cases, rows, wall_time_s: float, interrupted: bool) -> dict:
    results = [r.to_json() for r in rows]
    add_speedups(results)
    steps = {c.id: c.T for c in cases}
    for r in results:
        T = steps[r["case_id"]]
        r["us_per_step"] = r["median_ms"] * 1e3 / T if r["median_ms"] and T else None
    return {"schema": SCHEMA, "preset": preset, "environment": environment, "wall_time_s": round(wall_time_s, 2),
            "interrupted": interrupted, "cases": [c.to_json() for c in cases], "results": results}


def add_speedups(results: list[dict]) -> None:
    base = {r["case_id"]: r["median_ms"] for r in results if r["provider"] == BASELINE and r["status"] == "ok"}
    for r in results:
        b = base.get(r["case_id"])
        r["speedup_vs_baseline"] = (b / r["median_ms"]) if (b and r["status"] == "ok" and r["median_ms"]) else None


def write_json(doc: dict, path: Path) -> None:
    path.write_text(json.dumps(doc, indent=1) + "\n")


def load(path) -> dict:
    doc = json.loads(Path(path).read_text())
    if doc.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not a {SCHEMA} result file (schema={doc.get('schema')!r})")
    return doc


def _ms(v) -> str:
    return "" if v is None else (f"{v:.3f}" if v < 10 else f"{v:.1f}")


def _us(v) -> str:
    return "" if v is None else (f"{v:.2f}" if v < 100 else f"{v:.0f}")


def _speedup(v) -> str:
    return "" if v is None else f"{v:.2f}x"


def _status_text(r: dict) -> str:
    return "" if r["status"] == "ok" else r["status"].upper() if r["status"] != "skipped" else "skipped"


def rich_table(doc: dict, show_skipped: bool = False) -> Table:
    table = Table(title=f"rnn-fused benchmark: preset {doc['preset']['name']} on "
                        f"{doc['environment']['device_name']} ({doc['environment']['torch_threads']} threads)")
    for col, kw in (("case", {}), ("provider", {}), ("median ms", {"justify": "right"}),
                    ("p20-p80 ms", {"justify": "right"}), ("us/step", {"justify": "right"}),
                    ("speedup vs nn.RNN", {"justify": "right"}), ("status", {})):
        table.add_column(col, **kw)
    last_case = None
    for r in doc["results"]:
        if r["status"] == "skipped" and not show_skipped:
            continue
        if last_case is not None and r["case_id"] != last_case:
            table.add_section()
        spread = f"{_ms(r['p20_ms'])}-{_ms(r['p80_ms'])}" if r["status"] == "ok" else ""
        sp = r["speedup_vs_baseline"]
        sp_text = _speedup(sp)
        if sp is not None and r["provider"] != BASELINE:
            sp_text = f"[green]{sp_text}[/]" if sp >= 1 else f"[red]{sp_text}[/]"
        status = _status_text(r)
        if r["status"] in ("FAILED", "error"):
            status = f"[bold red]{status}[/] {r['reason'][:80]}"
        table.add_row(r["case_id"] if r["case_id"] != last_case else "", r["provider"], _ms(r["median_ms"]),
                      spread, _us(r.get("us_per_step")), sp_text, status)
        last_case = r["case_id"]
    return table


def over_threaded(doc: dict) -> list[dict]:
    """The rows whose provider kept more cores busy than the run's threads (see cores_used above)."""
    threads = doc["environment"].get("torch_threads") or 1
    return [r for r in doc["results"] if r.get("cores_used") is not None and r["cores_used"] > threads + CORES_SLACK]


def _over_threaded_lines(doc: dict) -> list[str]:
    threads = doc["environment"].get("torch_threads")
    return [f"{r['provider']} on {r['case_id']} kept {r['cores_used']:.2f} cores busy at {threads} thread(s): "
            f"not pinned to the run's threads, its time is not comparable" for r in over_threaded(doc)]


def print_summary(doc: dict, console: Console) -> None:
    console.print(rich_table(doc))
    skipped = {}
    for r in doc["results"]:
        if r["status"] == "skipped":
            skipped.setdefault((r["provider"], r["reason"]), []).append(r["case_id"])
    for (provider, reason), ids in skipped.items():
        console.print(f"[dim]skipped {provider} in {len(ids)} case(s): {reason}[/]")
    bad = [r for r in doc["results"] if r["status"] in ("FAILED", "error")]
    for r in bad:
        console.print(f"[bold red]{r['status']}[/] {r['provider']} on {r['case_id']}: {r['reason']}")
    for line in _over_threaded_lines(doc):
        console.print(f"[bold yellow]threads[/] {line}")
    console.print(f"wall time {doc['wall_time_s']:.1f} s" + ("  [bold yellow](interrupted)[/]" if doc["interrupted"]
                                                            else ""))


def markdown(doc: dict, plot_files: list[str] = ()) -> str:
    env, preset = doc["environment"], doc["preset"]
    lines = [f"# rnn-fused benchmark: preset `{preset['name']}`", "",
             f"{preset['description']}.", "",
             "## Environment", "", "| | |", "|---|---|"]
    for key in ("date", "command", "device_name", "cpu_model", "torch_threads", "torch", "cuda", "cudnn", "triton",
                "flashrnn", "python", "git_commit", "git_dirty", "fused_rnn"):
        lines.append(f"| {key} | `{env.get(key)}` |")
    for key, value in env["flags"].items():
        lines.append(f"| {key} | `{value}` |")
    t = preset["timing"]
    lines += ["", f"Timing: {t['warmup']} warm-up calls, then {t['min_repeats']}-{t['max_repeats']} timed repeats "
                  f"(about {t['min_time_s']} s per measurement, at most {t['max_time_s']} s planned); median and "
                  f"p20/p80 of per-call times. Every provider passed the correctness gate against float64 "
                  f"nn.RNN before being timed (see benchmarks/NOTES.md, \"Benchmark method\"). "
                  f"Wall time {doc['wall_time_s']:.0f} s" + (" (interrupted)." if doc["interrupted"] else "."),
              "", "## Results", "",
              "| case | provider | median ms | p20-p80 ms | us/step | speedup vs nn.RNN | peak MiB | cores | status |",
              "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in doc["results"]:
        if r["status"] == "skipped":
            continue
        spread = f"{_ms(r['p20_ms'])}-{_ms(r['p80_ms'])}" if r["status"] == "ok" else ""
        mem = "" if r["peak_mem_bytes"] is None else f"{r['peak_mem_bytes'] / 2**20:.1f}"
        status = r["status"] if r["status"] == "ok" else f"**{r['status']}**: {r['reason']}"
        cores = "" if r.get("cores_used") is None else f"{r['cores_used']:.2f}"
        lines.append(f"| {r['case_id']} | {r['provider']} | {_ms(r['median_ms'])} | {spread} | "
                     f"{_us(r.get('us_per_step'))} | {_speedup(r['speedup_vs_baseline'])} | {mem} | {cores} | "
                     f"{status.replace('|', '/')} |")
    skipped = {}
    for r in doc["results"]:
        if r["status"] == "skipped":
            skipped.setdefault((r["provider"], r["reason"]), []).append(r["case_id"])
    if skipped:
        lines += ["", "## Skipped", ""]
        for (provider, reason), ids in skipped.items():
            lines.append(f"- `{provider}` in {len(ids)} case(s): {reason}")
    if _over_threaded_lines(doc):
        lines += ["", "## Not pinned to the run's threads", ""] + [f"- {line}" for line in _over_threaded_lines(doc)]
    if env["device"] == "cpu":
        lines += ["", "cores: the cores each call kept busy (CPU time of the process per second of wall time, "
                      "rnn_fused/bench/timing.py cores_used), measured after the timing.",
                  "", "Peak memory is not measured on the CPU (null in the JSON): the process's maxrss is a "
                      "lifetime high-water mark that cannot be reset per case."]
    if plot_files:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plot_files]
    return "\n".join(lines) + "\n"

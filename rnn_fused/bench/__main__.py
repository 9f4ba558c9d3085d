"""``python -m rnn_fused.bench``: the command line of the benchmark suite (benchmarks/README.md)."""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import compare as compare_mod, env, latency, report, runner
from .cases import PRESETS, default_preset, resolve_device
from .providers import ALL_PROVIDERS, BASELINE, make_providers


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m rnn_fused.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="named case grid (default: quick without a GPU, standard with one)")
    p.add_argument("--out", type=Path, help="output folder (default: bench-out/<preset>-<timestamp>/)")
    p.add_argument("--compare", metavar="OLD.json", help="also print and write the per-case ratio new/old")
    p.add_argument("--new", metavar="NEW.json",
                   help="with --compare: compare this existing result file instead of running")
    p.add_argument("--dry-run", action="store_true", help="list the preset's cases and providers; time nothing")
    p.add_argument("--backends", nargs="+", metavar="NAME", choices=ALL_PROVIDERS,
                   help=f"providers to time, from {', '.join(ALL_PROVIDERS)} ({BASELINE} is always timed: it is "
                        "the baseline); default: all but those the preset excludes")
    p.add_argument("--filter", nargs="+", metavar="TEXT",
                   help="only the cases whose id contains every TEXT (e.g. --filter fwd+bwd B16)")
    p.add_argument("--threads", type=int,
                   help="torch.set_num_threads before timing, 0 = torch's default (default: the preset's "
                        "setting: 1 for quick, torch's default otherwise); recorded either way")
    p.add_argument("--allow-tf32", action="store_true",
                   help="allow TF32 in cuDNN and cuBLAS fp32 (default: the preset's setting, exact fp32)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    return p.parse_args(argv)


def select_providers(preset, names):
    """The preset's providers: all but its exclusions, unless --backends names them explicitly."""
    requested = names is not None
    names = list(ALL_PROVIDERS) if names is None else list(dict.fromkeys([BASELINE, *names]))
    excluded = {} if requested else {n: why for n, why in preset.exclude.items() if n in names}
    names = [n for n in names if n not in excluded]
    return make_providers(names, compile_budget_s=preset.compile_budget_s, compile_max_steps=preset.compile_max_steps,
                          compile_total_budget_s=preset.compile_total_budget_s), excluded


def filter_cases(cases, texts):
    return [c for c in cases if all(t in c.id for t in texts or ())]


def dry_run(preset, device, cases, providers, excluded, latency_cases, console) -> int:
    table = Table(title=f"preset {preset.name} on {device}: {len(cases)} cases x {len(providers)} providers")
    table.add_column("#", justify="right")
    table.add_column("case")
    table.add_column("tags")
    for i, c in enumerate(cases, 1):
        table.add_row(str(i), c.id, ",".join(c.tags))
    console.print(table)
    console.print(f"providers: {', '.join(p.name for p in providers)}")
    t = preset.timing
    console.print(f"timing: {t.warmup} warm-up calls, {t.min_repeats}-{t.max_repeats} samples of about "
                  f"{t.min_time_s} s per measurement (at most {t.max_time_s} s planned); "
                  f"TF32 {'on' if preset.tf32 else 'off (exact fp32, cudnn.rnn.fp32_precision=ieee where it exists)'}")
    for name, why in excluded.items():
        console.print(f"excluded by the preset: {name}: {why}")
    console.print(f"{len(cases)} cases")
    if latency_cases:
        table = Table(title=f"then the latency sweep (rnn_fused/bench/latency.py, CPU): {len(latency_cases)} cases")
        table.add_column("#", justify="right")
        table.add_column("latency case")
        table.add_column("providers")
        for i, c in enumerate(latency_cases, 1):
            table.add_row(str(i), c.id, ", ".join(c.providers()))
        console.print(table)
        console.print(f"{len(latency_cases)} latency cases, {latency.DEFAULT_ROUNDS} interleaved rounds each")
    return 0


def run_compare(old_path, new_doc, new_path, out_dir, console) -> None:
    result = compare_mod.compare(report.load(old_path), new_doc)
    for key, diff in result["environment_differences"].items():
        console.print(f"[yellow]environment differs[/]: {key}: {diff['old']} -> {diff['new']}")
    console.print(compare_mod.rich_table(result))
    if result["geomean_ratio"] is not None:
        console.print(f"geometric mean new/old over {len(result['rows'])} rows: {result['geomean_ratio']:.3f}")
    compare_mod.write(result, out_dir, str(old_path), str(new_path))
    console.print(f"comparison written to {out_dir / 'compare.md'}")


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    console = Console()
    if args.new:
        if not args.compare:
            console.print("--new needs --compare OLD.json")
            return 2
        out_dir = args.out or Path(args.new).parent
        run_compare(args.compare, report.load(args.new), args.new, out_dir, console)
        return 0

    cuda = torch.cuda.is_available()
    preset = PRESETS[args.preset or default_preset(cuda)]
    device = resolve_device(preset, cuda)
    cases = filter_cases(preset.cases(device), args.filter)
    providers, excluded = select_providers(preset, args.backends)
    latency_cases = latency.latency_cases(args.filter) if preset.latency else []
    if args.dry_run:
        return dry_run(preset, device, cases, providers, excluded, latency_cases, console)
    if device == "cuda" and not cuda:
        console.print(f"preset {preset.name} needs a CUDA GPU (none here); --dry-run lists its cases")
        return 2
    if not cases:
        console.print("no case matches --filter" + (" (for the latency sweep alone: python -m rnn_fused.bench.latency "
                                                    "--filter ...)" if latency_cases else ""))
        return 2

    threads = preset.threads if args.threads is None else (args.threads or None)
    env.pin_flags(tf32=preset.tf32 or args.allow_tf32, threads=threads)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = args.out or Path("bench-out") / f"{preset.name}-{stamp}"
    out_dir.mkdir(parents=True, exist_ok=True)
    environment = env.environment(device, argv)
    settings = preset.settings()
    settings["exclude"] = excluded
    settings["providers"] = [p.name for p in providers]
    settings["filter"] = args.filter

    t0 = time.perf_counter()
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=Console(stderr=True), transient=False)
    with progress:
        task = progress.add_task("starting", total=len(cases) * len(providers))
        started = [False]

        def on_step(case, provider):
            progress.update(task, description=f"{case.id} [bold]{provider.name}[/]",
                            advance=1 if started[0] else 0)
            started[0] = True

        rows, interrupted = runner.run_suite(cases, providers, preset.timing, on_step)
        progress.update(task, advance=1, description="done")
    if hasattr(os, "getloadavg"):
        environment["load_average_1m_end"] = os.getloadavg()[0]  # includes this run's own threads
    doc = report.build_document(settings, environment, cases, rows, time.perf_counter() - t0, interrupted)

    report.write_json(doc, out_dir / "results.json")
    plot_files = [] if args.no_plots else _plots(doc, out_dir, console)
    (out_dir / "report.md").write_text(report.markdown(doc, plot_files))
    report.print_summary(doc, console)
    console.print(f"results: {out_dir / 'results.json'}, {out_dir / 'report.md'}"
                  + (f", {len(plot_files)} plots in {out_dir / 'plots'}" if plot_files else ""))
    latency_failed = bool(latency_cases) and not interrupted and _latency(latency_cases, environment, out_dir,
                                                                          console)
    if args.compare:
        run_compare(args.compare, doc, out_dir / "results.json", out_dir, console)
    bad = [r for r in doc["results"] if r["status"] in (runner.FAILED, runner.ERROR)]
    return 1 if (bad or interrupted or latency_failed) else 0


def _latency(cases, environment, out_dir, console) -> bool:
    """The preset's latency sweep, written next to results.json; True if a provider FAILED its check."""
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=Console(stderr=True), transient=False)
    with progress:
        task = progress.add_task("latency", total=len(cases))
        def on_case(i, case):
            progress.update(task, completed=i, description=f"latency: {case.id.removeprefix('latency ')}")

        doc = latency.run_sweep(cases, environment, latency.DEFAULT_ROUNDS, latency.MIN_SAMPLE_US, on_case)
        progress.update(task, completed=len(cases), description="latency: done")
    latency.print_table(doc, console if console.is_terminal else Console(width=150))  # ~130 columns wide
    json_path, md_path = latency.write(doc, out_dir)
    console.print(f"latency sweep ({len(cases)} cases, {doc['wall_time_s']} s): {json_path}, {md_path}")
    return latency.failed(doc)


def _plots(doc, out_dir, console):
    from . import plots  # matplotlib is imported only when plotting

    try:
        return plots.plot_all(doc, out_dir)
    except Exception as error:  # noqa: BLE001 (a plotting problem must not lose the measured numbers)
        console.print(f"[yellow]plots failed[/]: {type(error).__name__}: {error}")
        return []


if __name__ == "__main__":
    sys.exit(main())

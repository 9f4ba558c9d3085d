"""PNG plots of a result document: speedup vs batch size, speedup vs hidden size, time per step vs T.

A plot needs cases that differ in one quantity only. For each quantity (B, H, T) the results are grouped by
everything else (mode, dtype, the other sizes, layers, directions, packing); a group with two or more
values of the quantity becomes one panel, one line per provider. One file per (quantity, mode, dtype).
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

from .providers import BASELINE  # noqa: E402

AXES = {
    "B": ("batch size B", "speedup vs nn.RNN (x)", "speedup_vs_B"),
    "H": ("hidden size H", "speedup vs nn.RNN (x)", "speedup_vs_H"),
    "T": ("sequence length T", "time per step (us)", "time_per_step_vs_T"),
}
GROUP_FIELDS = ("T", "B", "I", "H", "num_layers", "bidirectional", "packed", "nonlinearity")
# Cases tagged as a sweep of the quantity (cases.py); without such tags every case is considered. Without
# this, points that happen to line up across different sweeps would make extra, accidental panels.
AXIS_TAGS = {"B": ("sweep-B", "grid"), "H": ("sweep-H", "grid"), "T": ("sweep-T",)}


def _group_label(case: dict, axis: str) -> str:
    parts = [f"{k}={case[k]}" for k in ("T", "B", "I", "H") if k != axis and not (axis == "H" and k == "I")]
    if case["num_layers"] != 1:
        parts.append(f"L={case['num_layers']}")
    if case["bidirectional"]:
        parts.append("bidirectional")
    if case["packed"]:
        parts.append("packed")
    if case["nonlinearity"] != "tanh":
        parts.append(case["nonlinearity"])
    return " ".join(parts)


def series(doc: dict, axis: str) -> dict:
    """{(mode, dtype): {group label: {provider: [(x, y), ...]}}} for the groups with >= 2 x values."""
    cases = {c["id"]: c for c in doc["cases"]}
    tagged = {i for i, c in cases.items() if set(c.get("tags", ())) & set(AXIS_TAGS[axis])}
    out: dict = {}
    for r in doc["results"]:
        if r["status"] != "ok":
            continue
        c = cases[r["case_id"]]
        if tagged and r["case_id"] not in tagged:
            continue
        if axis == "T":
            y = r["median_ms"] * 1e3 / c["T"]
        else:
            if r["speedup_vs_baseline"] is None:
                continue
            y = r["speedup_vs_baseline"]
        # I moves with H in the hidden-size sweeps, so it is not part of the group there.
        key = tuple(c[f] for f in GROUP_FIELDS if f != axis and not (axis == "H" and f == "I"))
        panel = out.setdefault((c["mode"], c["dtype"]), {}).setdefault(key, {"label": _group_label(c, axis)})
        panel.setdefault(r["provider"], []).append((c[axis], y))
    result = {}
    for mode_dtype, panels in out.items():
        kept = {}
        for panel in panels.values():
            label = panel.pop("label")
            xs = {x for pts in panel.values() for x, _ in pts}
            if len(xs) >= 2:
                kept[label] = {p: sorted(pts) for p, pts in panel.items()}
        if kept:
            result[mode_dtype] = kept
    return result


plain = FuncFormatter(lambda v, _: f"{v:g}")  # 64 and 0.5 rather than 2^6 and 5x10^-1


def plot_all(doc: dict, out_dir: Path) -> list[str]:
    """Writes the PNGs under out_dir/plots; returns their paths relative to out_dir."""
    files = []
    plot_dir = out_dir / "plots"
    for axis, (xlabel, ylabel, stem) in AXES.items():
        for (mode, dtype), panels in sorted(series(doc, axis).items()):
            n = len(panels)
            cols = min(3, n)
            rows = math.ceil(n / cols)
            fig, axes = plt.subplots(rows, cols, figsize=(max(6.5, 5.2 * cols), 3.8 * rows + 0.4), squeeze=False)
            for ax, (label, lines) in zip(axes.flat, sorted(panels.items())):
                for provider, pts in sorted(lines.items(), key=lambda kv: (kv[0] != BASELINE, kv[0])):
                    if axis != "T" and provider == BASELINE:
                        continue  # its speedup is 1 by definition: drawn as the reference line below
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, marker="o", label=provider)
                if axis != "T":
                    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1, label="nn.RNN (= 1)")
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xticks(sorted({x for pts in lines.values() for x, _ in pts}))
                ax.xaxis.set_major_formatter(plain)
                ax.xaxis.set_minor_formatter(NullFormatter())
                ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))  # 0.5 1 2 5 10 ...
                ax.yaxis.set_major_formatter(plain)
                ax.yaxis.set_minor_formatter(NullFormatter())
                ax.set_xlabel(xlabel)
                ax.set_ylabel(ylabel)
                ax.set_title(label, fontsize=9)
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=8)
            for ax in list(axes.flat)[n:]:
                ax.set_visible(False)
            mode_text = "forward (no_grad)" if mode == "forward" else "forward + backward"
            fig.suptitle(f"{ylabel.split(' (')[0]} vs {xlabel}: {mode_text}, {dtype}\n"
                         f"{doc['environment']['device_name']}, {doc['environment']['torch_threads']} threads",
                         fontsize=10)
            fig.tight_layout()
            plot_dir.mkdir(parents=True, exist_ok=True)
            path = plot_dir / f"{stem}-{mode}-{dtype}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            files.append(str(path.relative_to(out_dir)))
    return files

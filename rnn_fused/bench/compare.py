"""--compare: per-case ratio new/old of the median time, from two result documents.

Rows are matched by (case id, provider). ratio = new median / old median: < 1 faster now, > 1 slower.
A ratio is flagged as noise when the two p20-p80 spreads overlap (the difference is within what repeats
of the same measurement spread over); otherwise it is 'faster' or 'slower'. Environment keys that differ
(device, versions, threads, TF32 flags, ...) are listed first, because a ratio across them measures the
machine as much as the code.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

ENV_KEYS = ("device_name", "torch", "cuda", "cudnn", "triton", "torch_threads", "flags", "git_commit", "fused_rnn")


def compare(old: dict, new: dict) -> dict:
    def ok_rows(doc):
        return {(r["case_id"], r["provider"]): r for r in doc["results"] if r["status"] == "ok"}

    old_rows, new_rows = ok_rows(old), ok_rows(new)
    rows = []
    for key, n in new_rows.items():
        o = old_rows.get(key)
        if o is None:
            continue
        ratio = n["median_ms"] / o["median_ms"]
        overlap = n["p20_ms"] <= o["p80_ms"] and o["p20_ms"] <= n["p80_ms"]
        verdict = "noise" if overlap else ("faster" if ratio < 1 else "slower")
        rows.append({"case_id": key[0], "provider": key[1], "old_ms": o["median_ms"], "new_ms": n["median_ms"],
                     "ratio": ratio, "verdict": verdict})
    env_diff = {k: {"old": old["environment"].get(k), "new": new["environment"].get(k)} for k in ENV_KEYS
                if old["environment"].get(k) != new["environment"].get(k)}
    ratios = [r["ratio"] for r in rows]
    geomean = None
    if ratios:
        import math

        geomean = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
    return {"rows": rows, "only_old": sorted(set(old_rows) - set(new_rows)),
            "only_new": sorted(set(new_rows) - set(old_rows)), "environment_differences": env_diff,
            "geomean_ratio": geomean}


def rich_table(result: dict) -> Table:
    table = Table(title="new / old median time (< 1: faster now)")
    for col in ("case", "provider", "old ms", "new ms", "ratio", "verdict"):
        table.add_column(col, justify="right" if col.endswith(("ms", "ratio")) else "left")
    colour = {"faster": "green", "slower": "red", "noise": "dim"}
    for r in result["rows"]:
        table.add_row(r["case_id"], r["provider"], f"{r['old_ms']:.3f}", f"{r['new_ms']:.3f}", f"{r['ratio']:.3f}",
                      f"[{colour[r['verdict']]}]{r['verdict']}[/]")
    return table


def markdown(result: dict, old_path: str, new_path: str) -> str:
    lines = [f"# Comparison: `{new_path}` / `{old_path}`", ""]
    if result["environment_differences"]:
        lines += ["Environment differences (ratios across them measure the machine too):", ""]
        lines += [f"- {k}: `{v['old']}` -> `{v['new']}`" for k, v in result["environment_differences"].items()]
        lines.append("")
    if result["geomean_ratio"] is not None:
        lines += [f"Geometric mean ratio over {len(result['rows'])} matched rows: {result['geomean_ratio']:.3f}", ""]
    lines += ["| case | provider | old ms | new ms | new/old | verdict |", "|---|---|---:|---:|---:|---|"]
    lines += [f"| {r['case_id']} | {r['provider']} | {r['old_ms']:.3f} | {r['new_ms']:.3f} | {r['ratio']:.3f} | "
              f"{r['verdict']} |" for r in result["rows"]]
    for name, key in (("Only in the old run", "only_old"), ("Only in the new run", "only_new")):
        if result[key]:
            lines += ["", f"{name}: " + ", ".join(f"{c} / {p}" for c, p in result[key])]
    return "\n".join(lines) + "\n"


def write(result: dict, out_dir: Path, old_path: str, new_path: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "compare.json").write_text(json.dumps({"old": old_path, "new": new_path, **{
        k: ([list(x) for x in v] if k.startswith("only") else v) for k, v in result.items()}}, indent=1) + "\n")
    (out_dir / "compare.md").write_text(markdown(result, old_path, new_path))

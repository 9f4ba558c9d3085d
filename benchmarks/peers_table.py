"""The "CPU vs peers" table of benchmarks/NOTES.md from a results.json of the suite (issue 18): per shape,
ours (FusedRNN backend='cpu') against the fastest peer forward (JAX, ONNX Runtime, OpenVINO) and JAX fwd+bwd.

    python benchmarks/peers_table.py RESULTS.json [--targets]     # --targets: the cases tagged 'target'

Times: median (p20-p80) ms. Ratios: the samples of one case are paired by round (the suite's CPU timing
interleaves the providers of a case, one sample each per round), so ours / peer is the median of the
per-round ratios, p20-p80 as its spread; < 1: ours faster.
"""

import json
import statistics
import sys

from rnn_fused.bench.timing import percentile

PEERS = {"jax": "JAX", "onnxruntime": "ORT", "openvino": "OpenVINO"}
OURS = "cpu"


def _ms(v: float) -> str:
    return f"{v:.3f}" if v < 10 else f"{v:.1f}"


def _time(r: dict) -> str:
    return f"{_ms(r['median_ms'])} ({_ms(r['p20_ms'])}-{_ms(r['p80_ms'])})"


def _ratio(a: dict, b: dict) -> tuple[float, str]:
    q = sorted(x / y for x, y in zip(a["samples_ms"], b["samples_ms"]))
    m = statistics.median(q)
    return m, f"{m:.2f} ({percentile(q, 20):.2f}-{percentile(q, 80):.2f})"


def table(doc: dict, targets_only: bool) -> list[str]:
    ok = {}
    for r in doc["results"]:
        if r["status"] == "ok":
            ok.setdefault(r["case_id"], {})[r["provider"]] = r
    lines = ["| T, B, I, H | fwd ours | fwd best peer | fwd ours / peer | fwd+bwd ours | fwd+bwd JAX | "
             "fwd+bwd ours / JAX | nn.RNN fwd, fwd+bwd |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    wins = total = 0
    for c in doc["cases"]:
        if c["mode"] != "forward" or (targets_only and "target" not in c["tags"]):
            continue
        fwd, train = ok.get(c["id"], {}), ok.get("fwd+bwd" + c["id"][len("fwd"):], {})
        peers = [p for p in PEERS if p in fwd]
        if OURS not in fwd or not peers:
            continue
        best = min(peers, key=lambda p: fwd[p]["median_ms"])
        rf, rf_text = _ratio(fwd[OURS], fwd[best])
        row = [f"{c['T']}, {c['B']}, {c['I']}, {c['H']}" + (f" L{c['num_layers']}" if c["num_layers"] > 1 else "")
               + (" bi" if c["bidirectional"] else ""), _time(fwd[OURS]), f"{PEERS[best]} {_time(fwd[best])}", rf_text]
        wins, total = wins + (rf <= 1), total + 1
        if OURS in train and "jax" in train:
            rt, rt_text = _ratio(train[OURS], train["jax"])
            row += [_time(train[OURS]), _time(train["jax"]), rt_text]
            wins, total = wins + (rt <= 1), total + 1
        else:
            row += ["", "", ""]
        base = [_ms(d["nn.RNN"]["median_ms"]) for d in (fwd, train) if "nn.RNN" in d]
        lines.append("| " + " | ".join(row + [", ".join(base)]) + " |")
    lines += ["", f"ours <= the fastest peer in {wins} of {total} case-modes"]
    return lines


if __name__ == "__main__":
    print("\n".join(table(json.load(open(sys.argv[1])), "--targets" in sys.argv[2:])))

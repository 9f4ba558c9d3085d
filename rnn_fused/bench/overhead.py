"""``python -m rnn_fused.bench.overhead``: what the BPTT options cost, measured as a paired A/B.

The main suite times providers one after another; on a shared machine its run-to-run noise (10-30% on
a busy 2-core CPU) is larger than the few percent the options add. Here the variants of one case -- plain
``FusedRNN``, ``+norms`` (``record_grad_norms=True``) and ``+clip`` (norm clip at a bound too large to bind,
the same work as a binding clip) -- run interleaved: every round times one train call (forward plus
gradients, as the suite's train mode) of each variant in a fresh random order, and the cost is the median
over rounds of the per-round ratio ``variant / plain``, so slow drifts of the machine cancel. Before timing,
each variant's gradients are checked to equal the plain ones (the options must not change them; the clip
does not bind): bit for bit on the CPU; on CUDA to rounding, since a plain backward may take the persistent
kernel and an optioned one always runs stepwise (that switch is part of the measured cost). Writes ``overhead.json`` (raw samples, environment, command) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import time
from pathlib import Path

import torch

from . import env
from .cases import PRESETS
from .providers import make_providers
from .timing import percentile
from .workload import build, make_call


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m rnn_fused.bench.overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick", help="whose train-mode cases to run")
    p.add_argument("--backend", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--filter", nargs="+", metavar="TEXT", help="only cases whose id contains every TEXT")
    p.add_argument("--rounds", type=int, default=60, help="interleaved rounds per case (after 3 warm-up rounds)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--out", type=Path, help="folder for overhead.json (default: print only)")
    return p.parse_args(argv)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _same(a: torch.Tensor, b: torch.Tensor, exact: bool) -> bool:
    if exact:
        return torch.equal(a, b)
    scale = max(1.0, b.abs().max().item()) if b.numel() else 1.0
    return torch.allclose(a, b, rtol=1e-4, atol=1e-5 * scale)


def measure_case(case, backend: str, rounds: int) -> dict:
    names = [backend, f"{backend}+norms", f"{backend}+clip"]
    providers = {p.name: p for p in make_providers(names) if p.name in names}
    reason = next((r for r in (providers[n].unavailable(case) for n in names) if r), None)
    if reason:
        return {"case_id": case.id, "status": "skipped", "reason": reason}
    workload = build(case)
    calls = {}
    for name in names:
        model, params = providers[name].build(workload)
        calls[name] = make_call(workload, model, params, "train")
    plain = calls[backend]().tensors
    for name in names[1:]:
        got = calls[name]().tensors
        differs = [k for k in plain if not _same(got[k], plain[k], exact=backend == "cpu")]
        if differs:
            return {"case_id": case.id, "status": "FAILED", "reason": f"{name} changes {differs}"}
    samples = {n: [] for n in names}
    order = list(names)
    for r in range(rounds + 3):
        random.shuffle(order)
        for name in order:
            _sync(case.device)
            t0 = time.perf_counter()
            calls[name]()
            _sync(case.device)
            if r >= 3:
                samples[name].append((time.perf_counter() - t0) * 1e3)
    result = {"case_id": case.id, "status": "ok", "samples_ms": samples,
              "median_ms": {n: percentile(sorted(s), 50) for n, s in samples.items()}}
    for name in names[1:]:
        ratios = sorted(a / b for a, b in zip(samples[name], samples[backend]))
        result[f"{name} / {backend}"] = {"median": percentile(ratios, 50), "p20": percentile(ratios, 20),
                                         "p80": percentile(ratios, 80)}
    return result


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(0)
    preset = PRESETS[args.preset]
    cases = [c for c in preset.cases(args.backend) if c.mode == "train"
             and all(t in c.id for t in args.filter or ())]
    environment = env.environment(args.backend, argv)
    environment["command"] = " ".join(shlex.quote(a) for a in
                                      [sys.executable, "-m", "rnn_fused.bench.overhead", *argv])
    results = []
    print(f"{'case':<40} {'plain ms':>9} {'+norms':>16} {'+clip':>16}")
    for case in cases:
        r = measure_case(case, args.backend, args.rounds)
        results.append(r)
        if r["status"] != "ok":
            print(f"{case.id:<40} {r['status']}: {r['reason']}")
            continue
        b = args.backend
        cells = [f"{r[f'{b}+{o} / {b}']['median']:.3f}x ({r[f'{b}+{o} / {b}']['p20']:.2f}-"
                 f"{r[f'{b}+{o} / {b}']['p80']:.2f})" for o in ("norms", "clip")]
        print(f"{case.id:<40} {r['median_ms'][b]:>9.3f} {cells[0]:>16} {cells[1]:>16}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        record = {"schema": "rnn-fused-overhead/1", "environment": environment, "rounds": args.rounds,
                  "results": results}
        (args.out / "overhead.json").write_text(json.dumps(record, indent=1))
        print(f"wrote {args.out / 'overhead.json'}")
    return 1 if any(r["status"] == "FAILED" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())

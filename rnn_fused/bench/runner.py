"""Runs the suite: for every case, the gate and then the timing of every provider.

Per case: build the workload (weights and inputs, seeded by the case), compute the float64 yardstick, then
for each provider: skip it with the reason if it cannot run the case; otherwise build it, make one call
(which is also its first warm-up and, for compile-style providers, the compile), check that call against
the yardstick (a wrong provider is reported FAILED and not timed), time it, and on a GPU measure the peak
memory of one more call. A provider that raises is reported 'error' with the message (or 'skipped' when
the provider says the exception is an environment limit, e.g. torch.compile failing) and the run goes on.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field

import torch

from . import gate, timing, workload as workload_mod
from .cases import Case
from .providers import Provider, timed_first_call
from .workload import DTYPES

OK, FAILED, ERROR, SKIPPED = "ok", "FAILED", "error", "skipped"


@dataclass
class Row:
    case: Case
    provider: str
    label: str
    status: str
    reason: str = ""
    stats: timing.Stats | None = None
    first_call_s: float | None = None
    peak_mem_bytes: int | None = None
    gate: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d = {"case_id": self.case.id, "provider": self.provider, "label": self.label, "status": self.status,
             "reason": self.reason, "first_call_s": self.first_call_s, "peak_mem_bytes": self.peak_mem_bytes,
             "gate": self.gate}
        keys = ("median_ms", "p20_ms", "p80_ms", "min_ms", "mean_ms", "repeats", "samples_ms")
        d.update(self.stats.to_json() if self.stats else dict.fromkeys(keys))
        return d


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300] if text else ''}"


def run_provider(provider: Provider, wl: workload_mod.Workload, yard: gate.Yardstick,
                 policy: timing.TimingPolicy) -> Row:
    case = wl.case
    row = Row(case, provider.name, provider.label(case.device), SKIPPED)
    reason = provider.unavailable(case)
    if reason:
        row.reason = reason
        return row
    try:
        model, params = provider.build(wl)
        call = provider.wrap_call(workload_mod.make_call(wl, model, params, case.mode))
        try:
            result, row.first_call_s = timed_first_call(call)
        except Exception as error:  # noqa: BLE001 (any failure of a provider is reported, never fatal)
            skip = provider.first_call_failed(error)
            if skip:
                row.reason = skip
                return row
            raise
        provider.first_call_done(row.first_call_s)
        verdict = gate.check(result.tensors, yard, DTYPES[case.dtype])
        row.gate = verdict.details
        del result
        if not verdict.passed:
            row.status, row.reason = FAILED, verdict.message
            return row
        row.stats = timing.measure(call, case.device, policy)
        row.peak_mem_bytes = timing.peak_memory_bytes(call, case.device)
        row.status = OK
    except Exception as error:  # noqa: BLE001
        row.status, row.reason = ERROR, _short(error)
        row.gate.setdefault("traceback", traceback.format_exc(limit=6))
    return row


def run_suite(cases: list[Case], providers: list[Provider], policy: timing.TimingPolicy, on_step=None) -> tuple[
        list[Row], bool]:
    """All rows, and whether the run was interrupted (Ctrl-C keeps what was measured so far)."""
    rows: list[Row] = []
    try:
        for case in cases:
            wl = workload_mod.build(case)
            yard = None
            for provider in providers:
                if on_step:
                    on_step(case, provider)
                if yard is None and provider.unavailable(case) is None:
                    yard = gate.yardstick(wl, case.mode)
                if yard is None:  # only skips so far: no need for the float64 yardstick yet
                    rows.append(Row(case, provider.name, provider.label(case.device), SKIPPED,
                                    provider.unavailable(case)))
                    continue
                rows.append(run_provider(provider, wl, yard, policy))
            del wl, yard
            if case.device == "cuda":
                torch.cuda.empty_cache()
    except KeyboardInterrupt:
        return rows, True
    return rows, False


"""Runs the suite: for every case, the gate and then the timing of every provider.

Per case: build the workload (weights and inputs, seeded by the case), compute the float64 yardstick, then
for each provider: skip it with the reason if it cannot run the case; otherwise build its timed call, make
one call (which is also its first warm-up and, for compile-style providers, the compile) and check it against
the yardstick (a wrong provider is reported FAILED and not timed). Then the providers that passed are timed:
on a CPU together, interleaved in rounds (timing.measure_interleaved: a drift of the shared machine hits all
of them alike), each followed by the cores it kept busy (timing.cores_used), on a GPU one after another with CUDA events, each followed by the peak memory of one more
call. A provider that raises is reported 'error' with the message (or 'skipped' when the provider says the
exception is an environment limit, e.g. torch.compile failing) and the run goes on.
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
    cores_used: float | None = None  # CPU: timing.cores_used, after the timing
    gate: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d = {"case_id": self.case.id, "provider": self.provider, "label": self.label, "status": self.status,
             "reason": self.reason, "first_call_s": self.first_call_s, "peak_mem_bytes": self.peak_mem_bytes,
             "cores_used": self.cores_used, "gate": self.gate}
        keys = ("median_ms", "p20_ms", "p80_ms", "min_ms", "mean_ms", "repeats", "samples_ms")
        d.update(self.stats.to_json() if self.stats else dict.fromkeys(keys))
        return d


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300] if text else ''}"


def gated_call(provider: Provider, wl: workload_mod.Workload, yard: gate.Yardstick) -> tuple[Row, object]:
    """The provider's row after its first call and the gate, and its timed closure if it passed (else None;
    the row then says skipped, FAILED or error)."""
    case = wl.case
    row = Row(case, provider.name, provider.label(case.device), SKIPPED)
    reason = provider.unavailable(case)
    if reason:
        row.reason = reason
        return row, None
    try:
        call = provider.make_call(wl)
        try:
            result, row.first_call_s = timed_first_call(call)
        except Exception as error:  # noqa: BLE001 (any failure of a provider is reported, never fatal)
            skip = provider.first_call_failed(error)
            if skip:
                row.reason = skip
                return row, None
            raise
        provider.first_call_done(row.first_call_s)
        verdict = gate.check(result.tensors, yard, DTYPES[case.dtype])
        row.gate = verdict.details
        del result
        if not verdict.passed:
            row.status, row.reason = FAILED, verdict.message
            return row, None
        return row, call
    except Exception as error:  # noqa: BLE001
        _errored(row, error)
        return row, None


def _errored(row: Row, error: BaseException) -> None:
    row.status, row.reason = ERROR, _short(error)
    row.gate.setdefault("traceback", traceback.format_exc(limit=6))


def run_provider(provider: Provider, wl: workload_mod.Workload, yard: gate.Yardstick,
                 policy: timing.TimingPolicy) -> Row:
    """One provider alone: gate, then time (``measure``), then on a GPU the peak memory."""
    row, call = gated_call(provider, wl, yard)
    if call is None:
        return row
    try:
        row.stats = timing.measure(call, wl.case.device, policy)
        row.peak_mem_bytes = timing.peak_memory_bytes(call, wl.case.device)
        row.status = OK
    except Exception as error:  # noqa: BLE001
        _errored(row, error)
    return row


def time_case(gated: list[tuple[Row, Provider, object]], device: str, policy: timing.TimingPolicy) -> None:
    """Time every provider that passed the gate on one case, filling in its row. CPU: interleaved in rounds
    (timing.measure_interleaved), through each provider's sampler; GPU: one after another (``measure``:
    CUDA events with no host sync between samples, which a round of mixed providers would need)."""
    if device == "cuda":
        for row, _, call in gated:
            try:
                row.stats = timing.measure(call, device, policy)
                row.peak_mem_bytes = timing.peak_memory_bytes(call, device)
                row.status = OK
            except Exception as error:  # noqa: BLE001
                _errored(row, error)
        return
    live = list(gated)
    while live:
        try:
            stats = timing.measure_interleaved({row.provider: provider.sampler(call) for row, provider, call in live},
                                               policy)
        except Exception as error:  # noqa: BLE001 (find who raised, report it, time the others again)
            culprit = _culprit(live, policy, error)
            live = [g for g in live if g is not culprit]
            continue
        for row, provider, call in live:
            row.stats, row.status = stats[row.provider], OK
            try:  # after all the timing: how many cores each provider kept busy (honest pinning, shown)
                row.cores_used = provider.cores_used(call)
            except Exception as error:  # noqa: BLE001 (its samples are kept; the check says why it is missing)
                row.gate["cores_used"] = _short(error)
        return


def _culprit(live, policy, error):
    """The provider whose sampler raises when timed alone (the first one, if none does alone)."""
    for entry in live:
        row, provider, call = entry
        try:
            timing.measure_interleaved({row.provider: provider.sampler(call)},
                                       timing.TimingPolicy(warmup=0, min_repeats=1, max_repeats=1,
                                                           min_time_s=0.0, max_time_s=0.0))
        except Exception as own:  # noqa: BLE001
            _errored(row, own)
            return entry
    _errored(live[0][0], error)
    return live[0]


def run_suite(cases: list[Case], providers: list[Provider], policy: timing.TimingPolicy, on_step=None) -> tuple[
        list[Row], bool]:
    """All rows, and whether the run was interrupted (Ctrl-C keeps what was measured so far)."""
    rows: list[Row] = []
    try:
        for case in cases:
            wl = workload_mod.build(case)
            yard = None
            gated = []
            for provider in providers:
                if on_step:
                    on_step(case, provider)
                if yard is None and provider.unavailable(case) is None:
                    yard = gate.yardstick(wl, case.mode)
                if yard is None:  # only skips so far: no need for the float64 yardstick yet
                    rows.append(Row(case, provider.name, provider.label(case.device), SKIPPED,
                                    provider.unavailable(case)))
                    continue
                row, call = gated_call(provider, wl, yard)
                rows.append(row)
                if call is not None:
                    gated.append((row, provider, call))
            time_case(gated, case.device, policy)
            del wl, yard, gated
            if case.device == "cuda":
                torch.cuda.empty_cache()
    except KeyboardInterrupt:
        return rows, True
    finally:
        for provider in providers:
            provider.close()
    return rows, False

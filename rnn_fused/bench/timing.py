"""How one call is timed, and the statistics reported for it.

Method (benchmarks/NOTES.md, "Benchmark method"):

1. warm-up calls, untimed: first-call costs (allocator growth, cuDNN/Triton autotuning, lazy init) are not
   what a training or serving loop pays every step;
2. a few calls timed together give an estimate of one call; the repeat count is chosen from it so that the
   timed samples take about ``min_time_s`` (clamped to [min_repeats, max_repeats] and to ``max_time_s``);
3. every repeat is one sample: on a GPU a pair of CUDA events around the call (GPU time, launch gaps
   included, host overhead hidden only where the GPU is busy), on a CPU ``time.perf_counter`` around the
   call with the garbage collector paused (a GC pause inside one sample would only add noise);
   On a CPU the providers of one case are timed interleaved (``measure_interleaved``): each round takes one
   sample of every provider in a fresh random order, so a drift of the shared machine (measured at 10-30%
   between providers timed one after another, issue 18) hits all of them alike; every provider gets the
   same number of rounds, planned from the slowest one's estimate. A provider's turn is untimed calls
   (round_warmup_calls: at least ROUND_WARMUP of them, and as many as fill ROUND_WARMUP_MS by its estimate,
   at most ROUND_WARMUP_MAX), then the sample: the sample right after another provider's call runs on the
   caches and allocator that call left (measured: fwd T256 B1 H64, FusedRNN 0.17 ms timed alone, 0.27 ms as
   the first call after the reference loop), a penalty that is no property of the provider and weighs most
   on the shortest calls. One call did not absorb it for calls of ~0.1 ms: fwd+bwd T1 B1 H64 (one
   warm-up call), nn.RNN / FusedRNN / JAX took 0.126 / 0.060 / - ms interleaved without JAX and 0.156 /
   0.075 / 0.068 with it (in-process providers ~25% slower after the JAX worker's turn); with 3 warm-up
   calls 0.137 / 0.063 / 0.069, with 10 0.129 / 0.059 / 0.065 (benchmarks/NOTES.md, "Benchmark method");
4. reported: the median (robust to the odd preempted sample on a shared machine) and the 20th/80th
   percentiles as the spread, plus min, mean and the raw samples.
"""

from __future__ import annotations

import contextlib
import gc
import math
import random
import statistics
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TimingPolicy:
    warmup: int = 2
    min_repeats: int = 10
    max_repeats: int = 200
    min_time_s: float = 0.5  # aim for this much timed work per measurement
    max_time_s: float = 5.0  # but never plan more than this (a slow provider gets min_repeats.. or fewer)


MIN_SAMPLES = 3  # below this a p20/p80 spread means nothing
ROUND_WARMUP = 1  # at least this many untimed calls before each interleaved sample (see 3. above)
ROUND_WARMUP_MS = 0.3  # and as many as fill this long, by the provider's estimate
ROUND_WARMUP_MAX = 10


def round_warmup_calls(estimate_s: float) -> int:
    """Untimed calls before each interleaved sample of a provider whose call takes ``estimate_s``."""
    if estimate_s <= 0:
        return ROUND_WARMUP_MAX
    return max(ROUND_WARMUP, min(ROUND_WARMUP_MAX, math.ceil(ROUND_WARMUP_MS / 1e3 / estimate_s)))


@dataclass
class Stats:
    median_ms: float
    p20_ms: float
    p80_ms: float
    min_ms: float
    mean_ms: float
    repeats: int
    samples_ms: list[float]

    def to_json(self) -> dict:
        return {"median_ms": self.median_ms, "p20_ms": self.p20_ms, "p80_ms": self.p80_ms, "min_ms": self.min_ms,
                "mean_ms": self.mean_ms, "repeats": self.repeats, "samples_ms": self.samples_ms}


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), on an already sorted list."""
    if not sorted_values:
        raise ValueError("percentile of no samples")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(samples_ms: list[float]) -> Stats:
    s = sorted(samples_ms)
    return Stats(median_ms=statistics.median(s), p20_ms=percentile(s, 20), p80_ms=percentile(s, 80),
                 min_ms=s[0], mean_ms=statistics.fmean(s), repeats=len(s), samples_ms=list(samples_ms))


def plan_repeats(estimate_s: float, policy: TimingPolicy) -> int:
    """Repeats for one measurement, given one call's estimated time."""
    if estimate_s <= 0:
        return policy.max_repeats
    n = math.ceil(policy.min_time_s / estimate_s)
    n = max(policy.min_repeats, min(policy.max_repeats, n))
    # A slow call: stay within max_time_s, but keep enough samples for a spread.
    n_cap = max(MIN_SAMPLES, math.floor(policy.max_time_s / estimate_s))
    return max(MIN_SAMPLES, min(n, n_cap))


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(fn, device: str, policy: TimingPolicy, clock=time.perf_counter) -> Stats:
    """Time ``fn()`` by the method above; ``device`` is 'cpu' or 'cuda'."""
    for _ in range(policy.warmup):
        fn()
    _sync(device)
    # Estimate: time calls until 2 of them or 5% of min_time_s have passed (a very fast call would give a
    # perf_counter-resolution estimate from a single call).
    n_est, t0 = 0, clock()
    while True:
        fn()
        n_est += 1
        _sync(device)
        elapsed = clock() - t0
        if n_est >= 2 or elapsed >= 0.05 * policy.min_time_s:
            break
    repeats = plan_repeats(elapsed / n_est, policy)
    if device == "cuda":
        return summarize(_cuda_samples(fn, repeats))
    return summarize(_cpu_samples(fn, repeats, clock, deadline_s=2 * policy.max_time_s))


def cpu_sampler(fn, clock=time.perf_counter):
    """One sample of ``fn()`` in ms: ``clock`` read around the call."""
    def sample() -> float:
        t0 = clock()
        fn()
        return (clock() - t0) * 1e3
    return sample


def measure_interleaved(samplers: dict, policy: TimingPolicy, clock=time.perf_counter,
                        rng: random.Random | None = None) -> dict[str, Stats]:
    """CPU: time several providers of one case in rounds; ``samplers``: name -> a function taking one sample
    (ms). Warm-up and estimate per provider, then R rounds of one turn each (round_warmup_calls untimed
    calls and one sample) in a random order, with R
    planned from the slowest estimate (plan_repeats) and cut short (never below MIN_SAMPLES) once the
    rounds run past ``2 * max_time_s`` per provider, as ``measure`` does for one."""
    rng = rng or random.Random(0)
    estimates = {}
    for name, sample in samplers.items():
        for _ in range(policy.warmup):
            sample()
        n, total_ms = 0, 0.0
        while True:
            total_ms += sample()
            n += 1
            if n >= 2 or total_ms >= 0.05 * policy.min_time_s * 1e3:
                break
        estimates[name] = total_ms / n / 1e3
    if not samplers:
        return {}
    rounds = plan_repeats(max(estimates.values()), policy)
    warm_calls = {name: round_warmup_calls(estimates[name]) for name in samplers}
    deadline_s = 2 * policy.max_time_s * len(samplers) * (1 + ROUND_WARMUP) + sum(
        estimates[name] * (warm_calls[name] - ROUND_WARMUP) * rounds for name in samplers)
    samples = {name: [] for name in samplers}
    order = list(samplers)
    with gc_paused():
        start = clock()
        for r in range(rounds):
            rng.shuffle(order)
            for name in order:
                for _ in range(warm_calls[name]):
                    samplers[name]()
                samples[name].append(samplers[name]())
            if r + 1 >= MIN_SAMPLES and clock() - start > deadline_s:
                break
    return {name: summarize(s) for name, s in samples.items()}


CORES_MIN_TIME_S = 0.05  # cores_used: at least this long (and MIN_SAMPLES calls)


def cores_used(fn, min_time_s: float = CORES_MIN_TIME_S) -> float:
    """The cores ``fn()`` keeps busy: the process's CPU time (every thread, spinning included) per second of
    wall time over untimed calls, at least MIN_SAMPLES of them and ``min_time_s``. About 1 for a call on one
    thread, N for one spread over N busy threads: a provider pinned to the run's threads shows at most that
    many (the JAX worker was not, until it set its affinity: peers_jax.py)."""
    n, cpu0, t0 = 0, time.process_time(), time.perf_counter()
    while n < MIN_SAMPLES or time.perf_counter() - t0 < min_time_s:
        fn()
        n += 1
    return (time.process_time() - cpu0) / (time.perf_counter() - t0)


@contextlib.contextmanager
def gc_paused():
    """The garbage collector off (after one collection) around timed CPU calls: a GC pause inside one sample
    would only add noise. Restored as it was, exception or not."""
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _cpu_samples(fn, repeats: int, clock, deadline_s: float) -> list[float]:
    """``repeats`` samples, or fewer (never below MIN_SAMPLES) once ``deadline_s`` has passed: calls that turn
    out much slower than the estimate (a loaded machine) must not stretch one measurement without bound."""
    samples = []
    with gc_paused():
        start = clock()
        for _ in range(repeats):
            t0 = clock()
            fn()
            samples.append((clock() - t0) * 1e3)
            if len(samples) >= MIN_SAMPLES and clock() - start > deadline_s:
                break
    return samples


def _cuda_samples(fn, repeats: int) -> list[float]:
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    torch.cuda.synchronize()
    for start, end in zip(starts, ends):
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()  # one sync at the end: no host round trip between samples
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def peak_memory_bytes(fn, device: str) -> int | None:
    """Extra memory one call needs at its peak (workspace, saved activations, outputs), on a GPU.

    CPU: None. The only allocator-independent CPU measure, the process's maxrss, is a lifetime high-water
    mark that cannot be reset between cases, so a delta would be 0 for every case after the largest one.
    """
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - before)

"""The benchmark suite's own logic (rnn_fused/bench): case grids, the correctness gate, the result file,
the comparison. Timing numbers themselves are not asserted (they depend on the machine)."""

import dataclasses
import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

from rnn_fused.bench import cases as C, compare, gate, latency, report, runner, timing, workload
from rnn_fused.bench import providers as P
from rnn_fused.bench.__main__ import main
from rnn_fused.bench.flashrnn_adapter import FlashRNN

TINY_POLICY = timing.TimingPolicy(warmup=1, min_repeats=3, max_repeats=5, min_time_s=0.005, max_time_s=0.5)


# --- case grids ------------------------------------------------------------------------------------------------

def test_quick_contains_the_cpu_targets_in_both_modes():
    ids = {c.id for c in C.PRESETS["quick"].cases("cpu")}
    for T, B, I, H in [(256, 1, 64, 64), (256, 16, 128, 128), (128, 64, 256, 256)]:
        for mode in C.MODES:
            assert C.Case(T, B, I, H, mode=mode, device="cpu").id in ids


def test_quick_contains_the_peer_rows_in_both_modes():
    ids = {c.id for c in C.PRESETS["quick"].cases("cpu")}
    for T, B, I, H in C.PEER_ROWS:
        for mode in C.MODES:
            assert C.Case(T, B, I, H, mode=mode, device="cpu").id in ids


def test_quick_is_small_fp32_cpu():
    cases = C.PRESETS["quick"].cases("cpu")
    assert all(c.device == "cpu" and c.dtype == "float32" for c in cases)
    assert len(cases) <= 40  # the < 5 minute budget on a 2-core CPU
    assert "compile" in C.PRESETS["quick"].exclude
    assert C.PRESETS["quick"].threads == 1


def test_gpu_full_grid_is_the_h100_grid():
    cases = C.PRESETS["gpu-full"].cases("cuda")
    ids = {c.id for c in cases}
    assert all(c.device == "cuda" for c in cases)
    for dtype in ("float32", "bfloat16"):
        for mode in C.MODES:
            for B in (1, 8, 16, 256):
                for H in (128, 256, 384, 512, 1024, 2048):
                    assert C.Case(512, B, H, H, mode=mode, dtype=dtype, device="cuda").id in ids
            assert any(c.packed and c.dtype == dtype and c.mode == mode for c in cases)
    assert {c.dtype for c in cases} == {"float32", "bfloat16"}


def test_gpu_quick_is_the_first_lease_grid():
    cases = C.PRESETS["gpu-quick"].cases("cuda")
    ids = {c.id for c in cases}
    assert all(c.device == "cuda" and c.T == 512 for c in cases)
    for mode in C.MODES:
        for dtype in ("float32", "bfloat16"):
            for B in (1, 16, 64):
                for H in (256, 512, 1024):
                    assert C.Case(512, B, H, H, mode=mode, dtype=dtype, device="cuda").id in ids
        assert sum(c.packed and c.mode == mode for c in cases) == 1
        assert sum(c.num_layers == 2 and c.bidirectional and c.mode == mode for c in cases) == 1
    assert len(cases) == 40  # sized for a ~3-minute stage of scripts/gpu_validation.sh
    assert not C.PRESETS["gpu-quick"].tf32


def test_gpu_quick_times_cudnn_both_cuda_kernels_forced_and_triton():
    providers, excluded = __import__("rnn_fused.bench.__main__", fromlist=["x"]).select_providers(
        C.PRESETS["gpu-quick"], None)
    assert [p.name for p in providers] == ["nn.RNN", "cuda-persistent", "cuda-stepwise", "triton"]
    assert "cuda" in excluded and "compile" in excluded


def test_gpu_quick_dry_run_lists_cases_and_providers_without_a_gpu(capsys):
    assert main(["--preset", "gpu-quick", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "40 cases" in out and "providers: nn.RNN, cuda-persistent, cuda-stepwise, triton" in out
    assert "fwd+bwd T512 B64 I1024 H1024 bf16 cuda" in out


@pytest.mark.parametrize("name", sorted(C.PRESETS))
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_case_ids_are_unique(name, device):
    cases = C.PRESETS[name].cases(device)
    assert cases and len({c.id for c in cases}) == len(cases)


@pytest.mark.parametrize("name", sorted(C.PRESETS))
def test_dry_run_lists_every_preset_without_timing(name, capsys):
    assert main(["--preset", name, "--dry-run"]) == 0
    out = capsys.readouterr().out
    device = C.resolve_device(C.PRESETS[name], torch.cuda.is_available())
    assert f"{len(C.PRESETS[name].cases(device))} cases" in out


def test_backends_flag_keeps_the_baseline_and_overrides_exclusions():
    providers, excluded = __import__("rnn_fused.bench.__main__", fromlist=["x"]).select_providers(
        C.PRESETS["quick"], ["compile", "cpu"])
    assert [p.name for p in providers] == ["nn.RNN", "cpu", "compile"] and excluded == {}


# --- the correctness gate -----------------------------------------------------------------------------------------

class _Doubler(torch.autograd.Function):
    """Identity forward, twice the gradient backward: right outputs, wrong gradients."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return 2 * g


class WrongOutput(P.Provider):
    name = "wrong-output"

    def build(self, wl):
        def model(x, h0):
            out, h = wl.baseline(x, h0)
            return out + 1e-3, h
        return model, dict(wl.baseline.named_parameters())


class WrongGradient(P.Provider):
    name = "wrong-grad"

    def build(self, wl):
        def model(x, h0):
            out, h = wl.baseline(x, h0)
            return _Doubler.apply(out), h
        return model, dict(wl.baseline.named_parameters())


TINY = C.Case(5, 3, 4, 6, device="cpu")


@pytest.mark.parametrize("mode", C.MODES)
def test_gate_reports_a_wrong_provider_failed_and_does_not_time_it(mode):
    case = dataclasses.replace(TINY, mode=mode)
    rows, interrupted = runner.run_suite([case], [P.TorchRNN(), WrongOutput(), WrongGradient()], TINY_POLICY)
    status = {r.provider: r for r in rows}
    assert not interrupted
    assert status["nn.RNN"].status == runner.OK and status["nn.RNN"].stats is not None
    assert status["wrong-output"].status == runner.FAILED
    assert status["wrong-output"].stats is None and "output" in status["wrong-output"].reason
    # The gate checks gradients in train mode: right outputs with wrong gradients fail there only.
    expected = runner.OK if mode == "forward" else runner.FAILED
    assert status["wrong-grad"].status == expected
    if mode == "train":
        assert "grad" in status["wrong-grad"].reason


@pytest.mark.parametrize("mode", C.MODES)
def test_the_timed_call_names_its_results_only_when_the_gate_reads_them(mode, monkeypatch):
    """The gate's dict (and the train mode's detaches) is built after the clock, on first read of
    ``tensors``: the timed call returns raw results."""
    case = dataclasses.replace(TINY, mode=mode)
    wl = workload.build(case)
    model, params = P.TorchRNN().build(wl)
    result = workload.make_call(wl, model, params, mode)()
    named = []
    pack = result._pack
    monkeypatch.setattr(result, "_pack", lambda *raw: named.append(1) or pack(*raw), raising=False)
    assert result._tensors is None  # nothing named during the call
    tensors = result.tensors
    assert named == [1] and result.tensors is tensors
    assert {"output", "h_n"} <= set(tensors) and ("grad input" in tensors) == (mode == "train")


def test_gate_bound_scales_with_torch_error():
    ref = {"output": torch.zeros(3, dtype=torch.float64)}
    yard = gate.Yardstick(ref, {"output": 1e-3}, "cpu")
    assert gate.check({"output": torch.full((3,), 3e-3)}, yard, torch.float32).passed
    assert not gate.check({"output": torch.full((3,), 5e-3)}, yard, torch.float32).passed
    assert not gate.check({"output": torch.tensor([0.0, float("nan"), 0.0])}, yard, torch.float32).passed
    assert not gate.check({"output": torch.zeros(4)}, yard, torch.float32).passed
    assert not gate.check({}, yard, torch.float32).passed


def test_packed_and_bidirectional_workloads_pass_the_gate_with_nn_rnn():
    for case in (dataclasses.replace(TINY, packed=True, B=4, mode="train"),
                 dataclasses.replace(TINY, bidirectional=True, num_layers=2, mode="train")):
        rows, _ = runner.run_suite([case], [P.TorchRNN(), P.Fused("reference")], TINY_POLICY)
        assert [r.status for r in rows] == [runner.OK, runner.OK], [r.reason for r in rows]


# --- a tiny real run through the command line -----------------------------------------------------------------------

def _tiny_grid(device):
    return [dataclasses.replace(TINY, B=B, mode=m, tags=("sweep-B",)) for B in (1, 3) for m in C.MODES]


@pytest.fixture
def tiny_preset(monkeypatch):
    preset = C.Preset(name="tiny", description="test", device="cpu", timing=TINY_POLICY, grid=_tiny_grid)
    monkeypatch.setitem(C.PRESETS, "tiny", preset)
    return preset


def test_tiny_run_writes_the_documented_json(tiny_preset, tmp_path):
    out = tmp_path / "run"
    rc = main(["--preset", "tiny", "--backends", "cpu", "reference", "--out", str(out)])
    assert rc == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["schema"] == report.SCHEMA
    assert {"name", "timing", "tf32"} <= set(doc["preset"])
    env = doc["environment"]
    for key in ("date", "command", "device_name", "cpu_model", "torch", "cuda", "triton", "git_commit",
                "torch_threads", "flags"):
        assert key in env
    assert env["torch_threads"] == torch.get_num_threads()
    assert env["flags"]["torch.backends.cuda.matmul.allow_tf32"] is False
    assert env["flags"]["torch.backends.cudnn.allow_tf32"] is False
    if hasattr(getattr(torch.backends.cudnn, "rnn", None), "fp32_precision"):  # PyTorch >= 2.9
        assert env["flags"]["cudnn.rnn.fp32_precision"] == "ieee"
    assert len(doc["cases"]) == 4 and {c["id"] for c in doc["cases"]} == {r["case_id"] for r in doc["results"]}
    assert [r["provider"] for r in doc["results"][:3]] == ["nn.RNN", "cpu", "reference"]
    for r in doc["results"]:
        assert set(report.REQUIRED_RESULT_KEYS) <= set(r)
        assert r["status"] == "ok", r
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["repeats"] == len(r["samples_ms"]) >= timing.MIN_SAMPLES
        assert r["peak_mem_bytes"] is None  # not measured on the CPU
        assert r["speedup_vs_baseline"] > 0
        assert r["us_per_step"] == pytest.approx(r["median_ms"] * 1e3 / TINY.T)
        assert "output" in r["gate"]
        assert r["cores_used"] > 0
    assert (out / "report.md").read_text().startswith("# rnn-fused benchmark")
    assert "Not pinned" not in (out / "report.md").read_text()
    assert (out / "plots" / "speedup_vs_B-forward-float32.png").stat().st_size > 0
    assert (out / "plots" / "speedup_vs_B-train-float32.png").stat().st_size > 0


def test_the_report_names_a_provider_that_used_more_cores_than_the_run_allows():
    doc = {"environment": {"torch_threads": 1},
           "results": [{"case_id": "a", "provider": "jax", "cores_used": 1.9},
                       {"case_id": "a", "provider": "cpu", "cores_used": 1.02},
                       {"case_id": "b", "provider": "cpu", "cores_used": None}]}
    assert [r["provider"] for r in report.over_threaded(doc)] == ["jax"]
    doc["environment"]["torch_threads"] = 2
    assert report.over_threaded(doc) == []


# --- comparison ---------------------------------------------------------------------------------------------------

def _doc(rows, threads=2):
    return {"schema": report.SCHEMA, "environment": {"device_name": "x", "torch_threads": threads},
            "results": [{"case_id": c, "provider": p, "status": s, "median_ms": m, "p20_ms": lo, "p80_ms": hi}
                        for c, p, s, m, lo, hi in rows]}


def test_compare_ratios_noise_and_unmatched():
    old = _doc([("a", "cpu", "ok", 10.0, 9.0, 11.0), ("b", "cpu", "ok", 10.0, 9.9, 10.1),
                ("c", "cpu", "ok", 1.0, 1.0, 1.0), ("d", "cpu", "ok", 4.0, 4.0, 4.0)])
    new = _doc([("a", "cpu", "ok", 10.5, 9.5, 11.5), ("b", "cpu", "ok", 5.0, 4.9, 5.1),
                ("c", "cpu", "FAILED", None, None, None), ("e", "cpu", "ok", 1.0, 1.0, 1.0),
                ("d", "cpu", "ok", 8.0, 7.9, 8.1)], threads=1)
    result = compare.compare(old, new)
    by_case = {r["case_id"]: r for r in result["rows"]}
    assert set(by_case) == {"a", "b", "d"}
    assert by_case["a"]["ratio"] == pytest.approx(1.05) and by_case["a"]["verdict"] == "noise"
    assert by_case["b"]["ratio"] == pytest.approx(0.5) and by_case["b"]["verdict"] == "faster"
    assert by_case["d"]["ratio"] == pytest.approx(2.0) and by_case["d"]["verdict"] == "slower"
    assert result["only_old"] == [("c", "cpu")] and result["only_new"] == [("e", "cpu")]
    assert result["geomean_ratio"] == pytest.approx((1.05 * 0.5 * 2.0) ** (1 / 3))
    assert result["environment_differences"] == {"torch_threads": {"old": 2, "new": 1}}


def test_compare_command_line(tmp_path):
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps(_doc([("a", "cpu", "ok", 10.0, 9.0, 11.0)])))
    new.write_text(json.dumps(_doc([("a", "cpu", "ok", 2.5, 2.0, 3.0)])))
    assert main(["--compare", str(old), "--new", str(new), "--out", str(tmp_path / "cmp")]) == 0
    written = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert written["rows"][0]["ratio"] == pytest.approx(0.25)
    assert "0.250" in (tmp_path / "cmp" / "compare.md").read_text()


def test_load_rejects_other_files(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("{}")
    with pytest.raises(ValueError):
        report.load(path)


# --- timing and providers ------------------------------------------------------------------------------------------

def test_summarize_percentiles():
    s = timing.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s.median_ms, s.p20_ms, s.p80_ms, s.min_ms, s.repeats) == (3.0, 1.8, 4.2, 1.0, 5)


def test_plan_repeats_respects_the_policy():
    policy = timing.TimingPolicy(warmup=0, min_repeats=10, max_repeats=100, min_time_s=1.0, max_time_s=4.0)
    assert timing.plan_repeats(0.001, policy) == 100  # fast call: capped at max_repeats
    assert timing.plan_repeats(0.05, policy) == 20  # min_time_s / estimate
    assert timing.plan_repeats(0.2, policy) == 10  # min_repeats
    assert timing.plan_repeats(1.0, policy) == 4  # min_repeats would take 10 s: capped by max_time_s
    assert timing.plan_repeats(10.0, policy) == timing.MIN_SAMPLES  # very slow: still a spread


def test_measure_counts_warmup_and_samples():
    calls = []
    policy = timing.TimingPolicy(warmup=2, min_repeats=4, max_repeats=4, min_time_s=10.0, max_time_s=100.0)
    stats = timing.measure(lambda: calls.append(1), "cpu", policy)
    assert stats.repeats == 4 and len(stats.samples_ms) == 4
    assert len(calls) == 2 + 2 + 4  # warm-up, the estimate (2 calls), samples


def test_compile_provider_skips_with_reasons():
    compiled = P.Compiled(budget_s=10.0, max_steps=100)
    assert compiled.unavailable(C.Case(64, 2, 4, 4)) is None
    assert "unrolled steps" in compiled.unavailable(C.Case(64, 2, 4, 4, num_layers=2))
    assert "packed" in compiled.unavailable(C.Case(8, 2, 4, 4, packed=True))
    compiled.first_call_done(11.0)
    assert "budget" in compiled.unavailable(C.Case(8, 2, 4, 4))
    # The run's total compile budget: two compiles within the per-compile budget but over the total.
    compiled = P.Compiled(budget_s=10.0, max_steps=100, total_budget_s=15.0)
    compiled.first_call_done(9.0)
    assert compiled.unavailable(C.Case(8, 2, 4, 4)) is None
    compiled.first_call_done(9.0)
    assert "compile budget" in compiled.unavailable(C.Case(8, 2, 4, 4))


def test_flashrnn_and_triton_are_skipped_with_a_reason_on_the_cpu():
    assert "CUDA" in FlashRNN().unavailable(TINY)
    assert "interpreter" in P.Fused("triton").unavailable(TINY)


def test_forced_kernel_sets_the_choice_around_the_whole_call_only(monkeypatch):
    monkeypatch.delenv(P.KERNEL_ENV, raising=False)
    forced = P.make_providers(["cuda-stepwise"])[1]
    assert forced.name == "cuda-stepwise" and "stepwise" in forced.label("cuda")
    assert "CUDA" in forced.unavailable(TINY)
    seen = []
    forced.wrap_call(lambda: seen.append(os.environ.get(P.KERNEL_ENV)))()
    assert seen == ["stepwise"] and P.KERNEL_ENV not in os.environ
    monkeypatch.setenv(P.KERNEL_ENV, "auto")
    with pytest.raises(ValueError):
        forced.wrap_call(lambda: (_ for _ in ()).throw(ValueError("boom")))()
    assert os.environ[P.KERNEL_ENV] == "auto"  # restored after an exception too


def test_forced_persistent_skips_the_plans_refusal_and_reports_other_errors():
    persistent = P.ForcedKernel("persistent")
    refusal = RuntimeError("rnn_fused: RNN_FUSED_CUDA_KERNEL=persistent, but the persistent kernel cannot run "
                           "this problem (T=512, ...): the W_hh slice exceeds shared memory")
    assert "does not fit" in persistent.first_call_failed(refusal)
    assert persistent.first_call_failed(RuntimeError("CUDA error: an illegal memory access")) is None


def test_mixed_lengths_span_a_quarter_to_full():
    lengths = workload.mixed_lengths(64, 8, torch.Generator().manual_seed(0))
    assert lengths.max() == 64 and lengths.min() == 16 and len(set(lengths.tolist())) == 8


# --- the per-call latency sweep (rnn_fused/bench/latency.py) ---------------------------------------------------------

_original_fused = latency.fused_module


def _latency_doc(cases, rounds=3):
    return latency.run_sweep(cases, {"command": "test"}, rounds=rounds, min_sample_us=20.0)


def _check_timed(provider, rounds):
    assert provider["status"] == "ok", provider
    assert len(provider["samples_us"]) == rounds and all(s > 0 for s in provider["samples_us"])
    assert 0 < provider["p20_us"] <= provider["median_us"] <= provider["p80_us"]


def test_latency_grid_is_issue_17s():
    cases = latency.latency_cases()
    assert {(c.T, c.B, c.H) for c in cases if not c.cell} == {(T, B, H) for T in (1, 2, 4, 8, 16, 64)
                                                                for B in (1, 8) for H in (64, 256)}
    assert {(c.B, c.H) for c in cases if c.cell} == {(B, H) for B in (1, 8) for H in (64, 256)}
    assert all({c.mode for c in cases if (c.T, c.B, c.H) == (x.T, x.B, x.H)} == set(C.MODES) for x in cases)
    assert len({c.id for c in cases}) == len(cases) == 56
    # ONNX Runtime: forward of the sequence cases only
    assert latency.LatencyCase(1, 1, 64).providers() == ["nn.RNN", "FusedRNN", "onnxruntime"]
    assert latency.LatencyCase(1, 1, 64, "train").providers() == ["nn.RNN", "FusedRNN"]
    assert latency.LatencyCase(None, 1, 64).providers() == ["nn.RNNCell", "FusedRNNCell"]
    assert [c.id for c in latency.latency_cases(["T1 B1 H64"])] == ["latency fwd T1 B1 H64",
                                                                     "latency fwd+bwd T1 B1 H64"]


def test_latency_sweep_writes_per_round_samples_and_ratios(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    cases = [latency.LatencyCase(3, 2, 8, m) for m in C.MODES] + [latency.LatencyCase(None, 2, 8, m)
                                                                   for m in C.MODES]
    doc = _latency_doc(cases, rounds=4)
    json_path, md_path = latency.write(doc, tmp_path)
    doc = json.loads(json_path.read_text())
    assert doc["schema"] == latency.SCHEMA and doc["command"] == "test" and doc["rounds"] == 4
    assert doc["threads"] == torch.get_num_threads() and doc["onnxruntime"]["skipped"] is None
    assert [r["case_id"] for r in doc["results"]] == [c.id for c in cases]
    for r, case in zip(doc["results"], cases):
        assert r["status"] == "ok" and r["inner_calls"] >= 1
        assert list(r["providers"]) == case.providers()
        for p in r["providers"].values():
            _check_timed(p, 4)
        expected = {f"{case.fused_name} / {case.torch_name}"}
        if "onnxruntime" in case.providers():
            expected |= {f"onnxruntime / {case.torch_name}", f"{case.fused_name} / onnxruntime"}
        assert set(r["ratios"]) == expected
        for ratio in r["ratios"].values():
            assert all(math.isfinite(v) and v > 0 for v in ratio.values())
            assert ratio["p20"] <= ratio["median"] <= ratio["p80"]
    md = md_path.read_text()
    assert "| fwd T3 B2 H8 |" in md and "| fwd+bwd cell B2 H8 |" in md and "FAILED" not in md


def _shifted(build):
    """``build`` whose module's outputs are off by 1e-3: the gate must catch it."""
    def wrong(case, baseline):
        model = build(case, baseline)
        forward = model.forward

        def shifted(x, h0=None):
            out = forward(x, h0)
            return tuple(t + 1e-3 for t in out) if isinstance(out, tuple) else out + 1e-3
        model.forward = shifted
        return model
    return wrong


def _doubled_gradient(build):
    """``build`` whose module's outputs are right and whose gradients are twice too large."""
    def wrong(case, baseline):
        model = build(case, baseline)
        forward = model.forward

        def doubled(x, h0=None):
            out = forward(x, h0)
            return (_Doubler.apply(out[0]), out[1]) if isinstance(out, tuple) else _Doubler.apply(out)
        model.forward = doubled
        return model
    return wrong


@pytest.mark.parametrize("cell", [False, True])
def test_latency_gate_reports_a_wrong_fused_module_failed_and_does_not_time_it(cell, monkeypatch):
    T = None if cell else 2
    cases = [latency.LatencyCase(T, 2, 8, m) for m in C.MODES]
    monkeypatch.setattr(latency, "fused_module", _shifted(latency.fused_module))
    doc = _latency_doc(cases)
    assert latency.failed(doc)
    for r, case in zip(doc["results"], cases):
        fused = r["providers"][case.fused_name]
        assert r["status"] == "FAILED" and fused["status"] == "FAILED" and "samples_us" not in fused
        assert ("h" if cell else "output") in fused["reason"]
        _check_timed(r["providers"][case.torch_name], 3)  # the others are still timed
        assert f"{case.fused_name} / {case.torch_name}" not in r["ratios"]
    assert "FAILED" in latency.markdown(doc)
    # Right outputs, wrong gradients: caught in fwd+bwd only.
    monkeypatch.setattr(latency, "fused_module", _doubled_gradient(_original_fused))
    doc = _latency_doc(cases)
    forward, train = doc["results"]
    assert forward["status"] == "ok" and train["status"] == "FAILED"
    assert "grad" in train["providers"][cases[1].fused_name]["reason"]


def test_latency_gate_checks_onnx_runtime_too(monkeypatch):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    original = latency.ort_call

    def wrong(*args):
        timed, result = original(*args)
        return timed, lambda: {k: v + 1e-3 for k, v in result().items()}
    monkeypatch.setattr(latency, "ort_call", wrong)
    (r,) = _latency_doc([latency.LatencyCase(2, 2, 8)])["results"]
    assert r["status"] == "FAILED" and r["providers"]["onnxruntime"]["status"] == "FAILED"
    _check_timed(r["providers"]["FusedRNN"], 3)
    assert set(r["ratios"]) == {"FusedRNN / nn.RNN"}


def test_latency_reports_onnx_runtime_skipped_with_the_reason(monkeypatch):
    monkeypatch.setattr(latency, "onnx_unavailable", lambda: "onnx and onnxruntime are needed (test)")
    doc = _latency_doc([latency.LatencyCase(1, 1, 8)])
    (r,) = doc["results"]
    assert r["status"] == "ok" and r["providers"]["onnxruntime"] == {"status": "skipped",
                                                                    "reason": "onnx and onnxruntime are needed (test)"}
    assert doc["onnxruntime"]["skipped"] and "ONNX Runtime skipped: onnx and onnxruntime" in latency.markdown(doc)


def test_latency_command_line(tmp_path):
    assert latency.main(["--rounds", "3", "--filter", "fwd T1 B1 H64", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "latency.json").read_text())
    assert [r["case_id"] for r in doc["results"]] == ["latency fwd T1 B1 H64"]
    assert "rnn_fused.bench.latency" in doc["command"] and doc["environment"]["torch_threads"] == 1
    assert doc["threads"] == 1 and (tmp_path / "latency.md").exists()


def test_quick_preset_runs_the_latency_sweep_and_dry_run_lists_it(capsys):
    assert C.PRESETS["quick"].latency and not C.PRESETS["standard"].latency
    assert main(["--preset", "quick", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "56 latency cases" in out
    assert "latency fwd T1 B1 H64" in out and "latency fwd+bwd cell B8 H256" in out
    assert main(["--preset", "gpu-quick", "--dry-run"]) == 0
    assert "latency" not in capsys.readouterr().out


def test_a_preset_with_latency_writes_it_next_to_results_json(monkeypatch, tmp_path):
    preset = C.Preset(name="tiny-latency", description="test", device="cpu", timing=TINY_POLICY,
                      grid=lambda device: [TINY], latency=True)
    monkeypatch.setitem(C.PRESETS, "tiny-latency", preset)
    monkeypatch.setattr(latency, "latency_cases", lambda texts=None: [latency.LatencyCase(None, 1, 8)])
    monkeypatch.setattr(latency, "DEFAULT_ROUNDS", 3)
    monkeypatch.setattr(latency, "MIN_SAMPLE_US", 20.0)
    out = tmp_path / "run"
    assert main(["--preset", "tiny-latency", "--backends", "cpu", "--no-plots", "--out", str(out)]) == 0
    doc = json.loads((out / "latency.json").read_text())
    assert doc["results"][0]["case_id"] == "latency fwd cell B1 H8" and doc["rounds"] == 3
    assert doc["environment"]["command"] == json.loads((out / "results.json").read_text())["environment"]["command"]
    assert (out / "latency.md").read_text().startswith("## Per-call latency")
    # A FAILED latency provider fails the run, as a FAILED suite provider does.
    monkeypatch.setattr(latency, "fused_module", _shifted(_original_fused))
    assert main(["--preset", "tiny-latency", "--backends", "cpu", "--no-plots", "--out", str(out)]) == 1


# --- the peers (issue 18): JAX, ONNX Runtime, OpenVINO --------------------------------------------------------------

from rnn_fused.bench import peers_onnx  # noqa: E402

PEER_MODULES = {"jax": ("jax",), "onnxruntime": ("onnx", "onnxruntime"), "openvino": ("onnx", "openvino")}
# What each peer runs: the ONNX ones forward only. Tiny, but with every structure the RNN node supports.
PEER_CASES = [dataclasses.replace(TINY, num_layers=2, bidirectional=True),
              dataclasses.replace(TINY, nonlinearity="relu")]


def _peer(name):
    reason = peers_onnx.missing(*PEER_MODULES[name])
    if reason:
        pytest.skip(reason)
    return P.make_providers([name])[1]


@pytest.mark.parametrize("name", sorted(PEER_MODULES))
def test_each_peer_passes_the_gate_and_is_timed_on_the_cases_weights(name):
    peer = _peer(name)
    cases = PEER_CASES + [dataclasses.replace(c, mode="train") for c in PEER_CASES]
    rows, interrupted = runner.run_suite(cases, [P.TorchRNN(), peer], TINY_POLICY)
    assert not interrupted
    for row in rows:
        if row.provider != name:
            continue
        if name != "jax" and row.case.mode == "train":
            assert row.status == runner.SKIPPED and "forward only" in row.reason
            continue
        assert row.status == runner.OK, (row.case.id, row.reason)
        assert row.stats.repeats >= timing.MIN_SAMPLES and row.stats.median_ms > 0
        assert row.gate["output"]["error"] <= row.gate["output"]["bound"]
        if row.case.mode == "train":
            last = "weight_hh_l1_reverse" if row.case.bidirectional else "weight_hh_l0"
            assert {"grad input", "grad h0", f"grad {last}"} <= set(row.gate)
    assert peer.unavailable(dataclasses.replace(TINY, packed=True)).startswith("packed input")


def test_the_gate_fails_a_wrong_peer_and_does_not_time_it(monkeypatch):
    peer = _peer("onnxruntime")
    right = peers_onnx.feeds

    def zero_h0(workload):  # the peer forgets the initial state
        return {k: (v * 0 if k.startswith("h0") else v) for k, v in right(workload).items()}
    monkeypatch.setattr(peers_onnx, "feeds", zero_h0)
    rows, _ = runner.run_suite([TINY], [P.TorchRNN(), peer], TINY_POLICY)
    assert rows[1].status == runner.FAILED and "output" in rows[1].reason and rows[1].stats is None


@pytest.mark.parametrize("name", sorted(PEER_MODULES))
def test_a_peer_that_is_not_installed_is_skipped_with_the_reason(name, monkeypatch):
    real = peers_onnx.importlib.util.find_spec
    absent = PEER_MODULES[name][-1]
    monkeypatch.setattr(peers_onnx.importlib.util, "find_spec", lambda m, *a: None if m == absent else real(m, *a))
    rows, _ = runner.run_suite([TINY], P.make_providers([name]), TINY_POLICY)
    assert rows[1].status == runner.SKIPPED
    assert rows[1].reason == f"{absent} is not installed: pip install -e .[peers]"


def test_jax_worker_gets_the_threading_flags_before_jax_imports(monkeypatch):
    from rnn_fused.bench.peers_jax import xla_flags

    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert xla_flags(1) == "--xla_cpu_multi_thread_eigen=false"
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    assert xla_flags(4) == "--xla_dump_to=/tmp/x --xla_cpu_multi_thread_eigen=true"
    assert "XLA_FLAGS" not in os.environ or "multi_thread" not in os.environ["XLA_FLAGS"]  # never set here


def test_the_suite_and_the_jax_worker_are_pinned_to_the_same_cpus_at_one_thread():
    """One core for every provider (env.pin_cpus): each core of a shared machine has slow phases of its own, so
    a peer timed on another core than ours would be compared across them. In a child process: pinning this
    one would hold the rest of the tests to one CPU."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU: nothing to pin against")
    script = (
        "import os\n"
        "from rnn_fused.bench import env\n"
        "env.pin_flags(tf32=False, threads=1)\n"
        "print(sorted(os.sched_getaffinity(0)), env.environment('cpu', [])['cpu_affinity'])\n"
        "from rnn_fused.bench.peers_onnx import missing\n"
        "if not missing('jax'):\n"
        "    from rnn_fused.bench.peers_jax import Worker\n"
        "    worker = Worker(1)\n"
        "    print(worker.ask('versions')['cpus'])\n"
        "    worker.close()\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    lines = out.stdout.strip().splitlines()
    first = [min(os.sched_getaffinity(0))]
    assert lines[0] == f"{first} {first}"
    if len(lines) > 1:  # jax installed: its worker runs on the suite's CPU
        assert lines[1] == str(first)


def test_interleaved_rounds_give_every_provider_the_same_samples_in_shuffled_orders():
    log = []

    def sampler(name, ms):
        return lambda: log.append(name) or ms
    policy = timing.TimingPolicy(warmup=1, min_repeats=5, max_repeats=50, min_time_s=1.0, max_time_s=100.0)
    stats = timing.measure_interleaved({"a": sampler("a", 100.0), "b": sampler("b", 1.0), "c": sampler("c", 2.0)},
                                       policy)
    # The slowest (100 ms) plans the rounds: 1 s / 0.1 s = 10; each got one sample per round.
    assert [s.repeats for s in stats.values()] == [10, 10, 10]
    assert stats["a"].median_ms == 100.0 and stats["b"].median_ms == 1.0
    rounds = log[-60:][1::2]  # each turn: ROUND_WARMUP (1) untimed call, then the sample
    orders = {tuple(rounds[i:i + 3]) for i in range(0, 30, 3)}
    assert all(sorted(o) == ["a", "b", "c"] for o in orders) and len(orders) > 1


def test_a_short_call_gets_more_warm_up_calls_before_each_interleaved_sample():
    """Untimed calls before each sample fill ROUND_WARMUP_MS (one call did not absorb the previous provider's
    penalty for ~0.1 ms calls): at least ROUND_WARMUP, at most ROUND_WARMUP_MAX."""
    assert timing.round_warmup_calls(1e-3) == timing.ROUND_WARMUP
    assert timing.round_warmup_calls(0.05e-3) == 6
    assert timing.round_warmup_calls(1e-7) == timing.ROUND_WARMUP_MAX
    log = []

    def sampler(name, ms):
        return lambda: log.append(name) or ms
    policy = timing.TimingPolicy(warmup=1, min_repeats=5, max_repeats=5, min_time_s=0.001, max_time_s=100.0)
    timing.measure_interleaved({"slow": sampler("slow", 10.0), "fast": sampler("fast", 0.1)}, policy)
    turns = log[4:]  # after each provider's warm-up call and estimate call: 5 rounds of (warm-ups, sample)
    assert turns.count("fast") == 5 * (timing.round_warmup_calls(0.1e-3) + 1)
    assert turns.count("slow") == 5 * (timing.ROUND_WARMUP + 1)


def test_the_jax_worker_computes_on_one_thread_when_the_run_has_one(monkeypatch):
    """At a shape where XLA splits its dots over every CPU it may use (the [4096, 256] x [256, 256]
    projection: 1.9 cores on 2 CPUs with XLA_FLAGS alone), the pinned worker keeps one core busy, by the
    kernel's count (/proc) and by its own (cores_used)."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU: nothing to pin against")
    peer = _peer("jax")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    wl = workload.build(C.Case(16, 256, 256, 256))
    call = peer.make_call(wl)
    sample = peer.sampler(call)
    assert len(peer.worker.ask("versions")["cpus"]) == 1
    pid = peer.worker.process.pid

    def cpu_s():  # user + system time of the worker, from /proc (Linux)
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    try:
        c0, t0 = cpu_s(), time.perf_counter()
        while time.perf_counter() - t0 < 1.0:
            sample()
        assert (cpu_s() - c0) / (time.perf_counter() - t0) < 1.3  # two busy threads would give ~2
        assert peer.cores_used(call) < 1.3
    finally:
        peer.close()


@pytest.mark.parametrize("name", ["nn.RNN", "cpu"] + sorted(PEER_MODULES))
def test_every_cpu_provider_keeps_one_core_busy_at_one_thread_and_the_row_says_so(name, one_thread):
    """Honest pinning, for each provider a run compares: at 1 thread, a GEMM-heavy forward keeps at most ~1
    core busy (cores_used, recorded in the row); the JAX worker kept 1.9 before it set its affinity."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU: nothing to pin against")
    provider = P.TorchRNN() if name == "nn.RNN" else (P.make_providers(["cpu"])[1] if name == "cpu" else _peer(name))
    rows, _ = runner.run_suite([C.Case(16, 256, 256, 256)], [P.TorchRNN(), provider] if name != "nn.RNN" else
                               [provider], TINY_POLICY)
    row = rows[-1]
    assert row.provider == name and row.status == runner.OK, row.reason
    assert 0.5 < row.cores_used < 1.0 + report.CORES_SLACK, row.cores_used

"""The worked examples in examples/ run (in their --smoke sizes) and show what they claim.

examples/ is not a package, so each script is loaded from its path. Each smoke run takes a few seconds;
it runs once per module (module-scoped fixture) and the tests check its returned metrics and files.
"""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_smoke(name: str, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp(name)
    return load_example(name).main(["--smoke", "--out", str(out)]), out


def assert_png(path: Path) -> None:
    assert path.is_file(), f"{path} was not written"
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000, f"{path} is not a plausible PNG ({len(data)} bytes)"


# ------------------------------------------------------------------------------------------------ char_lm
@pytest.fixture(scope="module")
def char_lm(tmp_path_factory):
    return run_smoke("char_lm", tmp_path_factory)


def test_char_lm_learns(char_lm):
    metrics, _ = char_lm
    losses = [metrics["first_loss"], metrics["final_train_loss"], metrics["final_val_loss"]]
    assert all(math.isfinite(x) for x in losses)
    # The first step starts near ln(vocab) (uniform guessing); two short epochs must get well below it.
    assert metrics["first_loss"] == pytest.approx(math.log(metrics["vocab_size"]), abs=0.3)
    assert metrics["final_train_loss"] < metrics["first_loss"] - 0.5
    assert metrics["final_val_loss"] < math.log(metrics["vocab_size"]) - 0.5
    assert metrics["final_val_bpc"] == pytest.approx(metrics["final_val_loss"] / math.log(2))


def test_char_lm_fused_matches_nn_rnn(char_lm):
    """The speed comparison trains FusedRNN and nn.RNN from the same weights: same losses, both timed."""
    metrics, _ = char_lm
    assert metrics["compare_loss_gap"] < 1e-3
    assert metrics["tokens_per_s_fused"] > 0 and metrics["tokens_per_s_nn"] > 0


def test_char_lm_sample_and_plot(char_lm):
    metrics, out = char_lm
    assert len(metrics["sample"]) == 80  # --smoke samples 80 characters
    assert_png(out / "char_lm_loss.png")


# --------------------------------------------------------------------------------------------- noisy_sine
def test_noisy_sine(tmp_path_factory):
    metrics, out = run_smoke("noisy_sine", tmp_path_factory)
    for key in ("train_mse", "test_mse", "naive_test_mse", "initial_test_mse"):
        assert math.isfinite(metrics[key]), key
    # Three short epochs do not reach the naive forecast yet (the full run beats it 3x), but must cut the
    # untrained model's error by more than half, and nothing can beat the noise floor by much.
    assert metrics["test_mse"] < 0.5 * metrics["initial_test_mse"]
    assert metrics["test_mse"] > 0.5 * metrics["noise_floor"]
    assert_png(out / "noisy_sine.png")


# ------------------------------------------------------------------------------------ vanishing_gradients
@pytest.fixture(scope="module")
def vanishing(tmp_path_factory):
    return run_smoke("vanishing_gradients", tmp_path_factory)


def test_gradient_norm_ratio_grows_with_spectral_radius(vanishing):
    metrics, out = vanishing
    radii = metrics["radii"]
    for r, row in radii.items():
        assert row["rho_init"] == pytest.approx(r, rel=1e-6)  # W_hh = r * orthogonal
        assert math.isfinite(row["loss"]) and math.isfinite(row["ratio"]) and row["ratio"] > 0
    ratios = [radii[r]["ratio"] for r in sorted(radii)]
    assert ratios == sorted(ratios), ratios
    # ||g_0|| / ||g_{T-1}||: vanishing at rho = 0.5 (~0.5^(T-1)), exploding at rho = 1.5.
    assert radii[0.5]["ratio"] < 1e-10
    assert radii[1.5]["ratio"] > 10
    for name in ("grad_flow_radii.png", "grad_flow_clipped.png"):
        assert_png(out / name)


def test_bptt_clip_bounds_the_recorded_norms(vanishing):
    metrics, _ = vanishing
    clipped, unclipped = metrics["clipped_sequence_norms"], metrics["unclipped_sequence_norms"]  # [T, batch]
    # Same weights, same batch: the backward starts from the same dL/dh_{T-1}, recorded before any clip.
    torch.testing.assert_close(clipped[-1], unclipped[-1], rtol=1e-12, atol=0)
    # Before step T-1, g_t = W_hh^T diag(tanh') clip(g_{t+1}) with ||W_hh|| = 1.5 and tanh' <= 1, so with
    # bptt_clip=1.0 no sequence's recorded norm can exceed 1.5; without clipping they grow past it.
    assert clipped[:-1].max() <= 1.5 * (1 + 1e-5)  # float32 rounding
    assert unclipped[:-1].max() > 3.0
    assert metrics["clipped_norms"][0] < metrics["unclipped_norms"][0]

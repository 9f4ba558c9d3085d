"""One-step-ahead forecasting of a noisy sine wave with a FusedRNN.

Each example is a window of ``window`` noisy samples of a sine with a random period and phase; the target is
the next noisy sample. The RNN reads the window, and a linear layer maps its last hidden state to the
forecast. The noise sets a floor: even the clean sine itself, used as the forecast, has a mean squared
error of ``noise**2`` against the noisy target.

Printed: the train and test MSE of the model, against the naive "repeat the last value" forecast (which
pays the noise twice, once in its input and once in the target, plus the sine's change over one step)
and the noise floor. Written: a PNG of the forecast along one long test series, with the clean signal,
the noisy observations and the naive forecast.

Run from the repository root::

    python examples/noisy_sine.py                       # full run; writes docs/images/noisy_sine.png
    python examples/noisy_sine.py --smoke --out /tmp/x  # a few seconds
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import rnn_fused  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "docs" / "images"


def sine_series(n: int, length: int, noise: float, gen: torch.Generator, min_period=16.0, max_period=48.0):
    """``n`` series of ``length`` steps: (clean, noisy), each [n, length]; random period and phase per series."""
    period = min_period + (max_period - min_period) * torch.rand(n, 1, generator=gen)
    phase = 2 * math.pi * torch.rand(n, 1, generator=gen)
    t = torch.arange(length, dtype=torch.float32)
    clean = torch.sin(2 * math.pi * t / period + phase)
    noisy = clean + noise * torch.randn(n, length, generator=gen)
    return clean, noisy


def make_windows(noisy: torch.Tensor, window: int):
    """Every window of ``window`` steps and the value after it: inputs [N, window, 1], targets [N]."""
    x = noisy.unfold(1, window, 1)[:, :-1]  # [n, length - window, window]: all windows that have a next value
    y = noisy[:, window:]  # [n, length - window]
    return x.reshape(-1, window, 1), y.reshape(-1)


class Forecaster(nn.Module):
    """FusedRNN over the window (batch-first), then a linear read-out of the last hidden state."""

    def __init__(self, hidden: int, layers: int):
        super().__init__()
        self.rnn = rnn_fused.FusedRNN(1, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, h_n = self.rnn(x)  # h_n: [layers, batch, hidden]
        return self.head(h_n[-1]).squeeze(-1)


@torch.no_grad()
def mse(model: Forecaster, x: torch.Tensor, y: torch.Tensor, chunk: int = 4096) -> float:
    model.eval()
    total = sum(((model(x[i : i + chunk]) - y[i : i + chunk]) ** 2).sum().item() for i in range(0, len(y), chunk))
    model.train()
    return total / len(y)


def naive_mse(x: torch.Tensor, y: torch.Tensor) -> float:
    """The 'last value' forecast: predict y from the last input of the window."""
    return ((x[:, -1, 0] - y) ** 2).mean().item()


def plot_forecast(model: Forecaster, args, gen: torch.Generator, path: Path, metrics: dict) -> None:
    """Roll the one-step forecast along one long test series and plot it against the truth."""
    length = args.window + args.plot_steps
    clean, noisy = sine_series(1, length, args.noise, gen)
    x, y = make_windows(noisy, args.window)
    with torch.no_grad():
        model.eval()
        pred = model(x)
    t = torch.arange(args.window, length)
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot(t, clean[0, args.window :], color="black", lw=1.5, label="clean sine (not seen by the model)")
    ax.plot(t, y, ".", color="tab:gray", ms=4, label=f"noisy observation (noise sd {args.noise})")
    ax.plot(t, x[:, -1, 0], color="tab:orange", lw=1, alpha=0.8, label="naive forecast (last value)")
    ax.plot(t, pred, color="tab:blue", lw=2, label="FusedRNN forecast")
    ax.set_xlabel("time step")
    ax.set_ylabel("value")
    ax.set_title(f"One-step-ahead forecast: test MSE {metrics['test_mse']:.4f} (FusedRNN) vs "
                 f"{metrics['naive_test_mse']:.4f} (naive); noise floor {metrics['noise_floor']:.4f}")
    ax.legend(loc="upper right", fontsize=8, framealpha=0.9)
    ax.set_ylim(-2.0, 2.6)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes and few steps (seconds)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where noisy_sine.png goes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--window", type=int, default=40, help="input steps per example")
    p.add_argument("--noise", type=float, default=0.1, help="standard deviation of the added noise")
    p.add_argument("--train-series", type=int, default=256)
    p.add_argument("--test-series", type=int, default=64)
    p.add_argument("--series-len", type=int, default=200)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--plot-steps", type=int, default=160)
    args = p.parse_args(argv)
    if args.smoke:
        args.train_series, args.test_series, args.series_len = 32, 16, 100
        args.hidden, args.epochs, args.plot_steps = 24, 3, 80
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)

    _, train_noisy = sine_series(args.train_series, args.series_len, args.noise, gen)
    _, test_noisy = sine_series(args.test_series, args.series_len, args.noise, gen)
    x_train, y_train = make_windows(train_noisy, args.window)
    x_test, y_test = make_windows(test_noisy, args.window)
    print(f"{len(y_train):,} training windows, {len(y_test):,} test windows of {args.window} steps; "
          f"noise sd {args.noise}")

    model = Forecaster(args.hidden, args.layers)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    steps_per_epoch = math.ceil(len(y_train) / args.batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs * steps_per_epoch)
    naive_train, naive_test = naive_mse(x_train, y_train), naive_mse(x_test, y_test)
    initial_test = mse(model, x_test, y_test)
    print(f"{'epoch':>5} {'train MSE':>10} {'test MSE':>10}   (naive last-value: train {naive_train:.4f}, "
          f"test {naive_test:.4f}; noise floor {args.noise ** 2:.4f}; untrained model test {initial_test:.4f})")
    history = []
    for epoch in range(1, args.epochs + 1):
        perm = torch.randperm(len(y_train), generator=gen)
        for i in range(0, len(perm), args.batch):
            idx = perm[i : i + args.batch]
            loss = ((model(x_train[idx]) - y_train[idx]) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        train, test = mse(model, x_train, y_train), mse(model, x_test, y_test)
        history.append(dict(epoch=epoch, train_mse=train, test_mse=test))
        print(f"{epoch:>5} {train:>10.4f} {test:>10.4f}")

    metrics = dict(
        train_mse=history[-1]["train_mse"],
        test_mse=history[-1]["test_mse"],
        initial_test_mse=initial_test,
        naive_train_mse=naive_train,
        naive_test_mse=naive_test,
        noise_floor=args.noise**2,
        history=history,
    )
    print(f"test MSE: FusedRNN {metrics['test_mse']:.4f}, naive {naive_test:.4f} "
          f"({naive_test / metrics['test_mse']:.2f}x the model's), noise floor {args.noise ** 2:.4f}")
    path = args.out / "noisy_sine.png"
    plot_forecast(model, args, gen, path, metrics)
    print(f"wrote {path}")
    metrics["plot"] = str(path)
    return metrics


if __name__ == "__main__":
    main()

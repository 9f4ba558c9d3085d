"""Vanishing and exploding gradients in BPTT, measured with ``record_grad_norms=True``.

The task needs a long memory: each sequence is ``T`` random symbols (one-hot), and the model must name the
*first* one after reading all ``T`` of them. The loss sits at the last step only, so the only way a training
signal reaches ``h_0`` is backwards through all ``T - 1`` recurrent steps. BPTT carries
``g_t = dL/dh_t`` back one step by multiplying with the transposed Jacobian ``W_hh^T diag(tanh'(z_t))``,
so ``||g_t||`` shrinks or grows roughly like ``rho(W_hh) ** (T - 1 - t)``, where ``rho`` is the spectral
radius (largest |eigenvalue|) of ``W_hh``.

The script initialises ``W_hh = rho * Q`` (``Q`` a random orthogonal matrix, so every eigenvalue has
modulus ``rho``) for rho in 0.5, 0.9, 1.0, 1.2, 1.5, trains each model briefly, and plots ``||dL/dh_t||``
against ``t`` from ``FusedRNN.grad_flow.step_norms()``, at the first backward and after training
(docs/images/grad_flow_radii.png). Then it repeats rho = 1.5 with ``bptt_clip=1.0, bptt_clip_mode="norm"``,
which rescales each sequence's ``g_t`` to norm <= 1 at every step of the backward
(docs/images/grad_flow_clipped.png); the recorded norms are those *before* the clip at each step.

The model runs in float32, as a real one would: at rho = 0.5 the gradient reaching t = 0 is around 1e-32,
whose float32 square would be 0, so the kernels sum the squares for the recorded norm in float64.

Run from the repository root::

    python examples/vanishing_gradients.py                       # full run, writes docs/images/grad_flow_*.png
    python examples/vanishing_gradients.py --smoke --out /tmp/x  # a few seconds
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import rnn_fused  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "docs" / "images"
RADII = (0.5, 0.9, 1.0, 1.2, 1.5)
DTYPE = torch.float32


def recall_batch(batch: int, T: int, symbols: int, gen: torch.Generator):
    """Inputs [T, batch, symbols] (one-hot random symbols, time-major) and the target: the first symbol."""
    seq = torch.randint(0, symbols, (T, batch), generator=gen)
    return F.one_hot(seq, symbols).to(DTYPE), seq[0]


class Recall(nn.Module):
    """FusedRNN with gradient-norm recording, and a classifier on the last hidden state."""

    def __init__(self, symbols: int, hidden: int, radius: float, bptt_clip: float | None = None):
        super().__init__()
        self.rnn = rnn_fused.FusedRNN(symbols, hidden, record_grad_norms=True, bptt_clip=bptt_clip,
                                      bptt_clip_mode="norm")
        self.head = nn.Linear(hidden, symbols)
        q, _ = torch.linalg.qr(torch.randn(hidden, hidden))  # random orthogonal: all |eigenvalues| = 1
        with torch.no_grad():
            self.rnn.weight_hh_l0.copy_(radius * q)
        self.to(DTYPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[-1])  # the loss only looks at the last step


def train(radius: float, args, bptt_clip: float | None = None) -> dict:
    """Train one model; return the recorded norms at the first and the last backward, and the final loss."""
    torch.manual_seed(args.seed)  # same weights (up to the scale rho) and same batches for every run
    gen = torch.Generator().manual_seed(args.seed)
    model = Recall(args.symbols, args.hidden, radius, bptt_clip)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    first = None
    for _ in range(args.steps):
        x, y = recall_batch(args.batch, args.T, args.symbols, gen)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if first is None:
            first = model.rnn.grad_flow  # filled in by this backward: ||dL/dh_t|| before any clipping
        opt.step()
    last = model.rnn.grad_flow
    with torch.no_grad():  # held-out batch from its own generator: the same for every run
        x, y = recall_batch(args.eval_batch, args.T, args.symbols, torch.Generator().manual_seed(10_000 + args.seed))
        logits = model(x)
        eval_loss = F.cross_entropy(logits, y).item()
        accuracy = (logits.argmax(-1) == y).double().mean().item()
    return dict(
        radius=radius,
        bptt_clip=bptt_clip,
        rho_init=first.spectral_radius[0, 0].item(),
        rho_final=last.spectral_radius[0, 0].item(),
        norms_init=first.step_norms()[0, 0],  # layer 0, direction 0: [T]
        sequence_norms_init=first.sequence_norms()[0, 0],  # the same per sequence: [T, batch]
        norms_final=last.step_norms()[0, 0],
        loss=eval_loss,
        accuracy=accuracy,
    )


def plot_runs(runs: list[dict], labels: list[str], path: Path, title: str, steps: int) -> None:
    """Two panels: ||dL/dh_t|| vs t at the first backward and after ``steps`` training steps."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, when, key, rho_key in ((axes[0], "first backward (initial weights)", "norms_init", "rho_init"),
                                   (axes[1], f"after {steps} training steps", "norms_final", "rho_final")):
        for run, label in zip(runs, labels):
            norms = run[key].numpy()
            ax.semilogy(range(len(norms)), norms, lw=1.8, label=f"{label}, ρ(W_hh) = {run[rho_key]:.2f}")
        ax.set_title(when)
        ax.set_xlabel("time step t")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("||dL/dh_t||")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes and few steps (seconds)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where grad_flow_radii.png / _clipped.png go")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--T", type=int, default=100, help="sequence length: the symbol to recall is T - 1 steps back")
    p.add_argument("--symbols", type=int, default=8)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--eval-batch", type=int, default=1024)
    p.add_argument("--steps", type=int, default=400, help="training steps per radius")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--clip", type=float, default=1.0, help="bptt_clip of the clipped rho = 1.5 run")
    args = p.parse_args(argv)
    if args.smoke:
        args.T, args.hidden, args.batch, args.eval_batch, args.steps = 50, 32, 16, 64, 3
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    chance = math.log(args.symbols)
    print(f"recall the first of {args.T} symbols ({args.symbols} kinds; chance loss ln {args.symbols} = "
          f"{chance:.3f}); FusedRNN hidden {args.hidden}, {args.steps} Adam steps of batch {args.batch}")

    t0 = time.perf_counter()
    runs = [train(r, args) for r in RADII]
    print(f"\n{'':>5}{'first backward (initial weights)':^32} | {'after training':^27} | held-out batch")
    print(f"{'rho':>4} {'||g_0||':>10} {'||g_T-1||':>10} {'ratio':>10} | {'||g_0||':>10} {'||g_T-1||':>10} "
          f"{'rho':>5} | {'loss':>6} {'acc':>5}")
    for run in runs:
        n0, n1 = run["norms_init"], run["norms_final"]
        print(f"{run['radius']:>4.1f} {n0[0]:>10.2e} {n0[-1]:>10.2e} {n0[0] / n0[-1]:>10.2e} | {n1[0]:>10.2e} "
              f"{n1[-1]:>10.2e} {run['rho_final']:>5.2f} | {run['loss']:>6.3f} {run['accuracy']:>5.2f}")
    plot_runs(runs, [f"init ρ = {r['radius']}" for r in runs], args.out / "grad_flow_radii.png",
              f"Recall the first of T = {args.T} symbols: gradient norm through time vs spectral radius",
              args.steps)

    clipped = train(1.5, args, bptt_clip=args.clip)
    unclipped = runs[RADII.index(1.5)]
    print(f"\nrho 1.5 with bptt_clip={args.clip} (norm): first backward ||g_0|| {clipped['norms_init'][0]:.2e} "
          f"(unclipped {unclipped['norms_init'][0]:.2e}); loss after training {clipped['loss']:.3f} "
          f"(unclipped {unclipped['loss']:.3f}), accuracy {clipped['accuracy']:.2f} "
          f"(unclipped {unclipped['accuracy']:.2f})")
    plot_runs([unclipped, clipped], ["no clipping", f"bptt_clip={args.clip}, mode 'norm'"],
              args.out / "grad_flow_clipped.png",
              f"ρ = 1.5: per-step BPTT clipping (norms recorded before each step's clip), T = {args.T}",
              args.steps)
    print(f"wrote {args.out / 'grad_flow_radii.png'} and {args.out / 'grad_flow_clipped.png'} "
          f"({time.perf_counter() - t0:.0f} s)")

    return dict(
        T=args.T,
        chance_loss=chance,
        radii={r["radius"]: dict(norm_t0=r["norms_init"][0].item(), norm_tlast=r["norms_init"][-1].item(),
                                 ratio=(r["norms_init"][0] / r["norms_init"][-1]).item(), loss=r["loss"],
                                 accuracy=r["accuracy"], rho_init=r["rho_init"], rho_final=r["rho_final"])
               for r in runs},
        unclipped_norms=unclipped["norms_init"],
        clipped_norms=clipped["norms_init"],
        unclipped_sequence_norms=unclipped["sequence_norms_init"],
        clipped_sequence_norms=clipped["sequence_norms_init"],
        clipped_loss=clipped["loss"],
        clipped_accuracy=clipped["accuracy"],
        plots=[str(args.out / "grad_flow_radii.png"), str(args.out / "grad_flow_clipped.png")],
    )


if __name__ == "__main__":
    main()

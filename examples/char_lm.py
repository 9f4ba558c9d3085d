"""Character-level language model on Shakespeare, trained with truncated BPTT.

What it shows:

* ``rnn_fused.FusedRNN`` used as a drop-in for ``torch.nn.RNN`` in an ordinary model
  (embedding -> 2-layer RNN with dropout between the layers -> linear read-out over the characters).
* Truncated backpropagation through time (TBPTT): the text is cut into ``batch`` parallel streams and read
  in windows of ``seq_len`` characters. The hidden state is carried from one window to the next, so the
  forward pass sees the whole stream, but it is *detached* at each window boundary, so the backward pass
  (BPTT) runs through at most ``seq_len`` steps.
* The loss in nats per character and in bits per character (nats / ln 2), per epoch, on the training text
  and on held-out text, and the training throughput in tokens (characters) per second.
* At the end, a speed comparison: the same model is trained for the same number of steps from the same
  initial weights (``load_state_dict`` moves them between the two modules) with ``FusedRNN`` and with
  ``torch.nn.RNN``, and the tokens/s of both are printed. Then ~300 characters are sampled.

Run from the repository root::

    python examples/char_lm.py            # full run, under a minute on a 2-core CPU;
                                          # writes docs/images/char_lm_loss.png
    python examples/char_lm.py --smoke --out /tmp/x   # a few seconds, tiny sizes
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import rnn_fused  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE / "data" / "tinyshakespeare.txt"
DEFAULT_OUT = HERE.parent / "docs" / "images"
LN2 = math.log(2.0)


# --------------------------------------------------------------------------------------------------- data
class Vocab:
    """Maps each distinct character of the text to an integer id and back."""

    def __init__(self, text: str):
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([self.index[c] for c in text], dtype=torch.long)

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)


def windows(streams: torch.Tensor, targets: torch.Tensor, seq_len: int):
    """Yield (inputs, targets) windows of at most ``seq_len`` steps, in order."""
    for start in range(0, streams.size(0), seq_len):
        yield streams[start : start + seq_len], targets[start : start + seq_len]


def split_streams(ids: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut a 1-D id sequence into ``batch`` contiguous streams: inputs and next-character targets, [N, batch].

    Column b is the b-th slice of the text (time-major); reading the rows in order reads every slice in
    order, which is what lets the hidden state be carried from one window to the next.
    """
    n = (len(ids) - 1) // batch
    x = ids[: n * batch].view(batch, n).t().contiguous()
    y = ids[1 : n * batch + 1].view(batch, n).t().contiguous()
    return x, y


# -------------------------------------------------------------------------------------------------- model
class CharRNN(nn.Module):
    """Embedding -> Elman RNN -> linear read-out. ``rnn_cls`` is ``FusedRNN`` or ``torch.nn.RNN``."""

    def __init__(self, vocab_size: int, embed: int, hidden: int, layers: int, dropout: float = 0.0,
                 rnn_cls=rnn_fused.FusedRNN):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed)
        # time-major: [T, B, features]; dropout acts between stacked layers, as in nn.RNN
        self.rnn = rnn_cls(embed, hidden, num_layers=layers, dropout=dropout if layers > 1 else 0.0)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, x: torch.Tensor, h: torch.Tensor | None = None):
        out, h = self.rnn(self.embed(x), h)
        return self.head(out), h


def step_loss(model: CharRNN, x, y, h):
    logits, h = model(x, h)
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
    return loss, h


def train_step(model, opt, x, y, h, clip: float):
    """One TBPTT step: forward over the window from the carried state, backward through the window only."""
    if h is not None:
        h = h.detach()  # the truncation: no gradient flows into the previous window
    loss, h = step_loss(model, x, y, h)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    return loss.item(), h


@torch.no_grad()
def evaluate(model: CharRNN, x_streams, y_streams, seq_len: int) -> float:
    """Mean cross-entropy (nats/char) over the held-out streams, state carried across windows."""
    model.eval()
    h, total, count = None, 0.0, 0
    for x, y in windows(x_streams, y_streams, seq_len):
        loss, h = step_loss(model, x, y, h)
        total += loss.item() * y.numel()
        count += y.numel()
    model.train()
    return total / count


@torch.no_grad()
def sample(model: CharRNN, vocab: Vocab, prime: str, length: int, temperature: float, gen: torch.Generator):
    """Generate ``length`` characters after ``prime``, one step at a time, sampling softmax(logits / T)."""
    model.eval()
    ids = vocab.encode(prime).view(-1, 1)  # [T, B=1]
    logits, h = model(ids)
    out = []
    for _ in range(length):
        probs = torch.softmax(logits[-1, 0] / temperature, dim=-1)
        nxt = torch.multinomial(probs, 1, generator=gen)
        out.append(int(nxt))
        logits, h = model(nxt.view(1, 1), h)
    model.train()
    return vocab.decode(out)


# ------------------------------------------------------------------------------------------------ compare
def compare_speed(models: dict, x_streams, y_streams, seq_len: int, steps: int, lr: float, clip: float,
                  seed: int):
    """Train every model in lockstep on the same windows and time each of its steps.

    The models take turns (in alternating order), so a change in the machine's load hits all of them alike,
    and the RNG is reseeded before every step, so dropout draws the same masks for all of them. The first
    step (allocations, lazy initialisation) is not counted. Returns ({name: losses}, {name: step seconds}).
    """
    opts = {name: torch.optim.Adam(m.parameters(), lr=lr) for name, m in models.items()}
    full = [(x, y) for x, y in windows(x_streams, y_streams, seq_len) if x.size(0) == seq_len]
    state = dict.fromkeys(models)
    losses, times = {name: [] for name in models}, {name: [] for name in models}
    for step in range(steps + 1):
        x, y = full[step % len(full)]
        if step % len(full) == 0:
            state = dict.fromkeys(models)  # back at the start of the streams: fresh hidden state
        order = list(models) if step % 2 == 0 else list(models)[::-1]
        for name in order:
            torch.manual_seed(seed + step)
            t0 = time.perf_counter()
            loss, state[name] = train_step(models[name], opts[name], x, y, state[name], clip)
            if step > 0:
                times[name].append(time.perf_counter() - t0)
                losses[name].append(loss)
    return losses, times


# --------------------------------------------------------------------------------------------------- plot
def plot_history(history: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    epochs = [r["epoch"] for r in history]
    ax.plot(epochs, [r["train_bpc"] for r in history], "o-", label="train (mean over the epoch's steps)")
    ax.plot(epochs, [r["val_bpc"] for r in history], "s-", label="validation (held-out 10%, end of epoch)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (bits per character)")
    ax.set_title("Character-level FusedRNN on Shakespeare (truncated BPTT)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------- main
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes and few steps (seconds)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the loss-curve PNG goes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--embed", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.25, help="between stacked layers (needs --layers >= 2)")
    p.add_argument("--seq-len", type=int, default=128, help="TBPTT window: backward runs through this many steps")
    p.add_argument("--batch", type=int, default=32, help="number of parallel text streams")
    p.add_argument("--epochs", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--clip", type=float, default=5.0, help="clip_grad_norm_ of all parameters")
    p.add_argument("--compare-steps", type=int, default=50, help="timed steps per module in the comparison")
    p.add_argument("--sample-len", type=int, default=300)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--prime", default="MENENIUS:\n")
    args = p.parse_args(argv)
    if args.smoke:
        args.hidden, args.embed, args.seq_len, args.batch = 48, 16, 32, 8
        args.epochs, args.compare_steps, args.sample_len = 2, 3, 80
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)

    text = args.data.read_text(encoding="utf-8")
    if args.smoke:
        text = text[:12_000]
    vocab = Vocab(text)
    ids = vocab.encode(text)
    n_val = len(ids) // 10  # the last 10% of the text is held out
    train_x, train_y = split_streams(ids[:-n_val], args.batch)
    val_x, val_y = split_streams(ids[-n_val:], args.batch)
    steps_per_epoch = math.ceil(train_x.size(0) / args.seq_len)
    print(f"text: {len(text):,} characters, vocabulary {len(vocab)}; train {train_x.numel():,} / "
          f"validation {val_x.numel():,} characters; {args.batch} streams x {args.seq_len} steps per window, "
          f"{steps_per_epoch} steps per epoch")

    model = CharRNN(len(vocab), args.embed, args.hidden, args.layers, args.dropout)
    init_state = {k: v.clone() for k, v in model.state_dict().items()}  # for the nn.RNN comparison below
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    print(f"model: Embedding({len(vocab)}, {args.embed}) -> {model.rnn} -> Linear({args.hidden}, {len(vocab)}); "
          f"{sum(p.numel() for p in model.parameters()):,} parameters")
    print(f"{'epoch':>5} {'train nats':>10} {'train bpc':>9} {'val nats':>9} {'val bpc':>8} {'tokens/s':>9}")

    first_loss, history = None, []
    for epoch in range(1, args.epochs + 1):
        h, total, count, seconds = None, 0.0, 0, 0.0
        for x, y in windows(train_x, train_y, args.seq_len):
            t0 = time.perf_counter()
            loss, h = train_step(model, opt, x, y, h, args.clip)
            seconds += time.perf_counter() - t0
            first_loss = loss if first_loss is None else first_loss
            total += loss * y.numel()
            count += y.numel()
        train_loss = total / count
        val_loss = evaluate(model, val_x, val_y, args.seq_len)
        row = dict(epoch=epoch, train_loss=train_loss, train_bpc=train_loss / LN2, val_loss=val_loss,
                   val_bpc=val_loss / LN2, tokens_per_s=count / seconds)
        history.append(row)
        print(f"{epoch:>5} {train_loss:>10.3f} {row['train_bpc']:>9.3f} {val_loss:>9.3f} {row['val_bpc']:>8.3f} "
              f"{row['tokens_per_s']:>9.0f}")

    plot_path = args.out / "char_lm_loss.png"
    plot_history(history, plot_path)

    # Same model, same initial weights, same batches: FusedRNN vs torch.nn.RNN.
    print(f"\nspeed: {args.compare_steps} TBPTT steps ({args.batch} x {args.seq_len} tokens each) per module, "
          "from the same initial weights, taking turns")
    models = {}
    for name, cls in [("FusedRNN", rnn_fused.FusedRNN), ("nn.RNN", nn.RNN)]:
        models[name] = CharRNN(len(vocab), args.embed, args.hidden, args.layers, args.dropout, rnn_cls=cls)
        models[name].load_state_dict(init_state)  # same parameter names: checkpoints move both ways
    losses, times = compare_speed(models, train_x, train_y, args.seq_len, args.compare_steps, args.lr, args.clip,
                                  args.seed)
    results = {}
    for name in models:
        step = statistics.median(times[name])
        results[name] = dict(losses=losses[name], step_s=step, tokens_per_s=args.batch * args.seq_len / step)
        print(f"  {name:<9} median {step * 1e3:7.1f} ms/step  {results[name]['tokens_per_s']:9.0f} tokens/s  "
              f"loss after {args.compare_steps} steps {losses[name][-1]:.4f}")
    speedup = results["FusedRNN"]["tokens_per_s"] / results["nn.RNN"]["tokens_per_s"]
    loss_gap = max(abs(a - b) for a, b in zip(results["FusedRNN"]["losses"], results["nn.RNN"]["losses"]))
    print(f"  FusedRNN / nn.RNN throughput: {speedup:.2f}x; largest loss difference along the way {loss_gap:.2e}")

    gen = torch.Generator().manual_seed(args.seed)
    text_out = sample(model, vocab, args.prime, args.sample_len, args.temperature, gen)
    print(f"\nsample (temperature {args.temperature}):\n{args.prime}{text_out}")

    final = history[-1]
    return dict(
        vocab_size=len(vocab),
        steps_per_epoch=steps_per_epoch,
        first_loss=first_loss,
        final_train_loss=final["train_loss"],
        final_val_loss=final["val_loss"],
        final_val_bpc=final["val_bpc"],
        history=history,
        tokens_per_s_fused=results["FusedRNN"]["tokens_per_s"],
        tokens_per_s_nn=results["nn.RNN"]["tokens_per_s"],
        speedup=speedup,
        compare_loss_gap=loss_gap,
        sample=text_out,
        plot=str(plot_path),
    )


if __name__ == "__main__":
    main()

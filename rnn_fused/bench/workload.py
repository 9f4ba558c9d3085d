"""What one case runs: the nn.RNN whose weights every provider copies, the inputs, and the timed call.

Every provider is a callable ``model(input, h0) -> (output, h_n)`` with ``nn.RNN``'s contract plus a dict
of its leaf parameters under ``nn.RNN``'s names. ``run_call`` is the exact work that is timed:

- forward: one call under ``torch.no_grad()`` (inference; no graph is recorded);
- train: one call with autograd, then ``torch.autograd.grad`` of
  ``loss = <output, g_out> + <h_n, g_h>`` w.r.t. the input, h0 and every parameter. Fixed random
  ``g_out``/``g_h`` (rather than ``output.sum()``) give every output element a different weight, so a
  provider that permutes or mixes up outputs cannot get the right gradients by symmetry. ``autograd.grad``
  rather than ``.backward()`` so nothing accumulates into ``.grad`` between repeats.

Packing the input (PackedSequence) is done once, outside the timed call, as a training loop would do it in
its data loader.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from .cases import Case

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}


def case_seed(case: Case) -> int:
    """Same case, same numbers, on every run (the mode is left out: forward and train share weights)."""
    return zlib.crc32(repr(case.shape_key).encode())


def mixed_lengths(T: int, B: int, generator: torch.Generator) -> torch.Tensor:
    """B lengths spread evenly over [max(1, T//4), T], the longest = T, in a shuffled batch order (so the
    sort/unsort permutation of PackedSequence is exercised, as with real data)."""
    lo = max(1, T // 4)
    lengths = torch.linspace(T, lo, B).round().long() if B > 1 else torch.tensor([T])
    return lengths[torch.randperm(B, generator=generator)]


@dataclass
class Workload:
    case: Case
    baseline: nn.RNN  # the weights every provider copies; also the nn.RNN provider itself
    x: torch.Tensor | PackedSequence  # [T, B, I] (seq-first) or packed
    h0: torch.Tensor  # [L*D, B, H]
    g_out: torch.Tensor  # upstream gradient of the output (padded shape, or packed data shape)
    g_h: torch.Tensor  # upstream gradient of h_n

    def to(self, dtype: torch.dtype, device: str | None = None) -> "Workload":
        """A float64 (or other) copy with the same numbers: the correctness gate's yardstick."""
        device = device or self.case.device
        base = nn.RNN(self.case.I, self.case.H, self.case.num_layers, nonlinearity=self.case.nonlinearity,
                      bidirectional=self.case.bidirectional, device=device, dtype=dtype)
        base.load_state_dict(self.baseline.state_dict())
        if isinstance(self.x, PackedSequence):
            x = PackedSequence(self.x.data.to(device, dtype), self.x.batch_sizes,  # batch_sizes stay on the CPU
                               self.x.sorted_indices.to(device), self.x.unsorted_indices.to(device))
        else:
            x = self.x.to(device, dtype)
        return Workload(self.case, base, x, self.h0.to(device, dtype), self.g_out.to(device, dtype),
                        self.g_h.to(device, dtype))


def build(case: Case) -> Workload:
    gen = torch.Generator().manual_seed(case_seed(case))
    dtype, device = DTYPES[case.dtype], case.device
    D = 2 if case.bidirectional else 1
    torch.manual_seed(case_seed(case))  # nn.RNN's own init (uniform +-1/sqrt(H)) draws from the global RNG
    baseline = nn.RNN(case.I, case.H, case.num_layers, nonlinearity=case.nonlinearity,
                      bidirectional=case.bidirectional, dtype=torch.float32)
    baseline = baseline.to(device=device, dtype=dtype)
    # Draw in float32 on the CPU and convert, so every dtype and device sees the same numbers.
    x = torch.randn(case.T, case.B, case.I, generator=gen)
    h0 = 0.5 * torch.randn(case.num_layers * D, case.B, case.H, generator=gen)
    if case.packed:
        lengths = mixed_lengths(case.T, case.B, gen)
        x = pack_padded_sequence(x, lengths, enforce_sorted=False)
        g_out = torch.randn(x.data.shape[0], D * case.H, generator=gen)
        x = PackedSequence(x.data.to(device, dtype), x.batch_sizes, x.sorted_indices.to(device),
                           x.unsorted_indices.to(device))
    else:
        g_out = torch.randn(case.T, case.B, D * case.H, generator=gen)
        x = x.to(device, dtype)
    g_h = torch.randn(case.num_layers * D, case.B, case.H, generator=gen)
    return Workload(case, baseline, x, h0.to(device, dtype), g_out.to(device, dtype), g_h.to(device, dtype))


def _data(t):
    return t.data if isinstance(t, PackedSequence) else t


def _with_grad(x):
    """A leaf copy of the input that requires grad (PackedSequence: its data)."""
    if isinstance(x, PackedSequence):
        return PackedSequence(x.data.detach().requires_grad_(), x.batch_sizes, x.sorted_indices,
                              x.unsorted_indices)
    return x.detach().requires_grad_()


class CallResult:
    """What the gate compares: outputs, and in train mode the gradients, by name. A timed call returns its raw
    results and how to name them (``pack(*raw) -> {name: tensor}``); the naming runs when ``tensors`` is first
    read, after the clock has stopped, so no provider is charged for the suite's bookkeeping (at a T=1
    fwd+bwd the dict and detaches were ~3 us of ~55, while the JAX worker's clock never covered its own)."""
    __slots__ = ("_pack", "_raw", "_tensors")

    def __init__(self, pack, *raw):
        self._pack, self._raw, self._tensors = pack, raw, None

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        if self._tensors is None:
            self._tensors, self._raw = self._pack(*self._raw), None
        return self._tensors


def make_call(workload: Workload, model, params: dict[str, torch.Tensor], mode: str):
    """The timed closure for ``model`` on ``workload``; returns a CallResult when called."""
    if mode == "forward":
        x, h0 = workload.x, workload.h0

        def pack(out, h_n):
            return {"output": _data(out), "h_n": h_n}

        def call():
            with torch.no_grad():
                out, h_n = model(x, h0)
            return CallResult(pack, out, h_n)
        return call

    x, h0 = _with_grad(workload.x), workload.h0.detach().requires_grad_()
    names = list(params)
    leaves = [_data(x), h0] + [params[n] for n in names]

    grad_outputs = (workload.g_out, workload.g_h)

    def pack(out, h_n, grads):
        tensors = {"output": _data(out).detach(), "h_n": h_n.detach(), "grad input": grads[0], "grad h0": grads[1]}
        tensors.update({f"grad {n}": g for n, g in zip(names, grads[2:])})
        return tensors

    def call():
        out, h_n = model(x, h0)
        return CallResult(pack, out, h_n, torch.autograd.grad((_data(out), h_n), leaves, grad_outputs,
                                                              allow_unused=True))
    return call

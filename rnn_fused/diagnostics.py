"""Gradient-flow diagnostics: ``||dL/dh_t||`` per layer, direction and time step, as BPTT computed it.

BPTT carries ``g_t = dL/dh_t`` backwards through time; ``g_k`` holds ``g_t`` multiplied by the Jacobians
``dh_{j}/dh_{j-1} = diag(act'(z_j)) W_hh`` of every step in between, so its norm shrinks geometrically when
the spectral radius of ``W_hh`` (times the typical act') is below 1 and grows when it is above 1: vanishing
and exploding gradients. The fused backward already holds every ``g_t``; with
``FusedRNN(..., record_grad_norms=True)`` it also writes ``||g_t||`` per row (csrc/ops.cpp,
``record_norms``; squares summed in float64, so a vanishing 1e-30 reads 1e-30 in a float32 model), which this
module collects and plots.

    rnn = FusedRNN(32, 64, num_layers=2, record_grad_norms=True)
    out, _ = rnn(x)
    out[-1].sum().backward()
    rnn.grad_flow.step_norms()          # [layers, directions, T] float64
    plot_grad_flow(rnn.grad_flow, "grad_flow.png")

The norms are taken before any in-BPTT clipping (``bptt_clip``), so they show what the clip acted on.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence


def spectral_radius(w: Tensor) -> float:
    """max |eigenvalue| of a square matrix (computed in float64 on the CPU)."""
    if w.dim() != 2 or w.shape[0] != w.shape[1]:
        raise ValueError(f"spectral_radius: w must be a square matrix [H, H], got shape {tuple(w.shape)}")
    if w.numel() == 0:
        return 0.0
    return torch.linalg.eigvals(w.detach().to("cpu", torch.float64)).abs().max().item()


class GradFlow:
    """What one forward call's backward recorded: ``||dL/dh_t||`` of every row, layer and direction.

    Created by ``FusedRNN.forward`` when ``record_grad_norms=True`` (``module.grad_flow``) and filled in
    when the backward reaches each layer; a second backward through the same graph overwrites it. Norms are
    indexed by time (``t`` of ``h_t``), for both directions.
    """

    def __init__(self, num_layers: int, num_directions: int, T: int, B: int, packed: PackedSequence | None,
                 w_hh: Sequence[Tensor]):
        """``packed``: the forward's PackedSequence input, or None; only its batch_sizes and permutation are
        kept (with empty data, so the input is not held alive)."""
        self.num_layers, self.num_directions, self.T, self.B = num_layers, num_directions, T, B
        self._packed = None
        if packed is not None:  # on the CPU, where the norms are read
            self._packed = PackedSequence(torch.empty(len(packed.data), 0), packed.batch_sizes.cpu(),
                                          *(None if i is None else i.cpu()
                                            for i in (packed.sorted_indices, packed.unsorted_indices)))
        self._w_hh = [w.detach().clone() for w in w_hh]  # [D, H, H] per layer, as the forward used them
        self._grad_norm: list[Tensor | None] = [None] * num_layers
        self._radius: Tensor | None = None

    def probe(self, layer: int, shape, dtype: torch.dtype, device) -> Tensor:
        """Layer ``layer``'s norm probe (bptt.BPTTOptions): a zero leaf whose gradient the backward sets to
        the recorded norms; a hook keeps that gradient (overwritten by a second backward, not summed). It only
        keeps the tensor: copying it to the CPU here would synchronise a CUDA backward once per layer."""
        probe = torch.zeros(shape, dtype=dtype, device=device, requires_grad=True)

        def record(grad_norm: Tensor) -> None:
            self._grad_norm[layer] = grad_norm.detach()

        probe.register_hook(record)
        return probe

    @property
    def complete(self) -> bool:
        """True once the backward has reached every layer."""
        return all(n is not None for n in self._grad_norm)

    def _present(self) -> Tensor:
        """[T, B] bool in the caller's batch order: whether sequence b has a step t (always, unless packed)."""
        if self._packed is None:
            return torch.ones(self.T, self.B, dtype=torch.bool)
        lengths = pad_packed_sequence(self._packed)[1]  # in the caller's order
        return torch.arange(self.T)[:, None] < lengths[None, :]

    def _per_step(self, norms: Tensor) -> Tensor:
        """[D, T, B] float64 CPU norms in the caller's batch order, NaN where a packed sequence has no step t."""
        norms = norms.to("cpu", torch.float64)
        if self._packed is None:
            return norms.reshape(self.T, self.B, self.num_directions).permute(2, 0, 1)
        padded, _ = pad_packed_sequence(self._packed._replace(data=norms), padding_value=math.nan)  # [T, B, D]
        return padded.permute(2, 0, 1)

    def _recorded(self) -> list[Tensor | None]:
        if not any(n is not None for n in self._grad_norm):
            raise RuntimeError("rnn_fused: no gradient norms recorded yet: call backward() through the output "
                               "of the forward call that created this GradFlow first")
        return self._grad_norm

    def sequence_norms(self) -> Tensor:
        """``||dL/dh_t||`` of each sequence: float64 ``[num_layers, num_directions, T, B]``, in the caller's
        batch order; NaN where a packed sequence is shorter than ``t``, for layers the backward did not reach
        (FusedRNN's backward reaches every layer once it reaches any: a layer the loss does not use records
        zeros), and wherever the gradient itself is NaN."""
        rows = []
        for norms in self._recorded():
            per = torch.full((self.num_directions, self.T, self.B), math.nan, dtype=torch.float64)
            rows.append(per if norms is None else self._per_step(norms))
        return torch.stack(rows)

    def step_norms(self) -> Tensor:
        """``||dL/dh_t||`` over the whole batch (the Frobenius norm of the ``[B, H]`` gradient of ``h_t``):
        float64 ``[num_layers, num_directions, T]``; NaN for layers the backward did not reach. A NaN or inf
        gradient in any sequence makes its step NaN or inf: only the steps a packed sequence does not have
        are left out of the sum."""
        squares = self.sequence_norms().square()
        return torch.where(self._present(), squares, 0.0).sum(-1).sqrt()

    @property
    def spectral_radius(self) -> Tensor:
        """ρ(W_hh) of every layer and direction at forward time: float64 ``[num_layers, num_directions]``."""
        if self._radius is None:
            self._radius = torch.tensor([[spectral_radius(w[d]) for d in range(w.shape[0])] for w in self._w_hh],
                                        dtype=torch.float64)
        return self._radius

    def __repr__(self) -> str:
        reached = sum(n is not None for n in self._grad_norm)
        return (f"GradFlow(layers={self.num_layers}, directions={self.num_directions}, T={self.T}, B={self.B}, "
                f"recorded={reached}/{self.num_layers} layers)")


def plot_grad_flow(flow: GradFlow, path=None, title: str | None = None, ax=None):
    """Plots ``flow.step_norms()`` against the time step on a log scale, one line per layer and direction,
    with ρ(W_hh) in the legend. Saves a PNG to ``path`` if given; returns the matplotlib Figure.

    Reading it: the loss usually sits at the last steps, so the curve starts there; a line falling
    steadily towards t = 0 is a vanishing gradient (ρ small, or saturated tanh), one rising is exploding.
    """
    if ax is None:
        # A Figure outside pyplot: no GUI backend needed, nothing kept alive in pyplot's figure registry.
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7, 4))
        ax = fig.subplots()
    else:
        fig = ax.figure
    norms = flow.step_norms()
    radius = flow.spectral_radius
    steps = torch.arange(flow.T)
    for layer in range(flow.num_layers):
        for d in range(flow.num_directions):
            name = f"layer {layer}" + ("" if flow.num_directions == 1 else (" forward" if d == 0 else " reverse"))
            ax.semilogy(steps.numpy(), norms[layer, d].numpy(), label=f"{name}, ρ(W_hh) = {radius[layer, d]:.2f}")
    ax.set_xlabel("time step t")
    ax.set_ylabel("||dL/dh_t||")
    ax.set_title(title or "Gradient flow through time (BPTT)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig

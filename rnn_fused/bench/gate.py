"""The correctness gate: a provider is timed only if its numbers are right.

Yardstick: ``nn.RNN`` in float64 with the same weights and inputs (on the case's device; the CPU if that
fails). Rule, per tensor (output, h_n, and in train mode the gradient of the input, h0 and every
parameter), the rule of the tests (rnn_fused/tolerance.py, one table) with GATE_MARGIN times their bound,
because it gates, it does not test:

    error(provider) <= GATE_MARGIN * (FACTOR * error(nn.RNN in the case's dtype) + ATOL[dtype] * scale)

where error is the max absolute difference from the float64 result and scale = max(1, max |float64|).
Measuring against torch's own error in the same dtype makes the bound scale with T, H and the dtype (and
with TF32, if a preset enables it) instead of a fixed tolerance that is too loose for small cases or flaky
for long ones; ATOL covers the cases where torch happens to be almost exact. A provider that returns
NaN/inf where float64 is finite, a wrong shape, or no gradient fails outright.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..tolerance import GATE_MARGIN, bound
from .workload import Workload, make_call


@dataclass
class Yardstick:
    reference: dict[str, torch.Tensor]  # float64 results
    torch_error: dict[str, float]  # nn.RNN's own error in the case's dtype, per tensor
    reference_device: str


@dataclass
class Verdict:
    passed: bool
    details: dict[str, dict] = field(default_factory=dict)  # tensor -> {error, bound, torch_error}
    message: str = ""


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    if actual.numel() == 0:
        return 0.0
    return (actual.double() - expected.double()).abs().max().item()


def _reference(workload: Workload, mode: str, device: str) -> dict[str, torch.Tensor]:
    w64 = workload.to(torch.float64, device)
    result = make_call(w64, w64.baseline, dict(w64.baseline.named_parameters()), mode)().tensors
    return {k: v.detach().to(workload.case.device) for k, v in result.items()}


def yardstick(workload: Workload, mode: str) -> Yardstick:
    device = workload.case.device
    try:
        reference = _reference(workload, mode, device)
    except RuntimeError:  # e.g. no float64 RNN kernel on this device: compute it on the CPU
        device = "cpu"
        reference = _reference(workload, mode, device)
    own = make_call(workload, workload.baseline, dict(workload.baseline.named_parameters()), mode)().tensors
    torch_error = {k: max_error(own[k], reference[k]) for k in reference}
    return Yardstick(reference, torch_error, device)


def check(tensors: dict[str, torch.Tensor | None], yard: Yardstick, dtype: torch.dtype) -> Verdict:
    details, failures = {}, []
    for name, ref in yard.reference.items():
        got = tensors.get(name)
        if got is None:
            failures.append(f"{name}: missing (no gradient computed)")
            continue
        if tuple(got.shape) != tuple(ref.shape):
            failures.append(f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}")
            continue
        if bool(torch.isfinite(got).all()) != bool(torch.isfinite(ref).all()):
            failures.append(f"{name}: non-finite values")
            continue
        scale = max(1.0, ref.abs().max().item() if ref.numel() else 1.0)
        err = max_error(got, ref)
        limit = bound(yard.torch_error[name], dtype, scale, GATE_MARGIN)
        details[name] = {"error": err, "bound": limit, "torch_error": yard.torch_error[name]}
        if not err <= limit:  # `not <=` so that a NaN error fails
            failures.append(f"{name}: error {err:.3g} > bound {limit:.3g} (nn.RNN's own error "
                            f"{yard.torch_error[name]:.3g})")
    return Verdict(passed=not failures, details=details, message="; ".join(failures))

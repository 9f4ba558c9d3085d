"""FlashRNN's fused Elman kernel as a provider (https://github.com/NX-AI/flashrnn, `pip install flashrnn`).

UNVERIFIED: written from FlashRNN's README and source (flashrnn/flashrnn/flashrnn.py, vanilla/elman.py),
never run: the machine this suite was written on has neither a GPU nor the package. The correctness gate
still protects the report: if the mapping below is wrong, the provider shows as FAILED, not as a time.

Mapping (FlashRNN, function="elman", one head, one gate; its default layouts):
    Wx     [B, T, 1, 1, H]  = x @ W_ih^T + b_ih      (FlashRNN leaves the input projection to the caller)
    R      [1, 1, H, H]     = W_hh                   ("GHDP": gate, head, new hidden, previous hidden)
    b      [1, 1, H]        = b_hh
    states [1, B, 1, 1, H]  = h0                     ("SBTHD")
    returns states [1, B, T, 1, H], last [1, B, 1, 1, H]; elman is y_t = tanh(Wx_t + R y_{t-1} + b).
Only what that covers: one layer, one direction, tanh, padded input, float32/bfloat16/float16 on CUDA.
"""

from __future__ import annotations

import torch

from .cases import Case
from .providers import Provider
from .workload import Workload

_DTYPE_NAMES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def _import_error() -> str | None:
    try:
        import flashrnn  # noqa: F401
    except Exception as error:  # ImportError, or a broken install failing at import
        return f"the optional package flashrnn is not importable ({type(error).__name__}: {error})"
    return None


class FlashRNN(Provider):
    name = "flashrnn"

    def label(self, device: str) -> str:
        return "FlashRNN elman cuda_fused (unverified adapter)"

    def unavailable(self, case: Case) -> str | None:
        if case.device != "cuda":
            return "FlashRNN runs on CUDA GPUs only"
        if case.num_layers != 1 or case.bidirectional or case.packed or case.nonlinearity != "tanh":
            return "the adapter maps one unidirectional tanh layer on padded input only"
        if case.dtype not in _DTYPE_NAMES:
            return f"FlashRNN has no {case.dtype} kernel"
        return _import_error()

    def build(self, workload: Workload):
        from flashrnn import flashrnn

        base = workload.baseline
        params = {n: p.detach().clone().requires_grad_() for n, p in base.named_parameters()}
        H, dtype_name = workload.case.H, _DTYPE_NAMES[workload.case.dtype]

        def model(x, h0):
            T, B, _ = x.shape
            wx = torch.nn.functional.linear(x, params["weight_ih_l0"], params["bias_ih_l0"])  # [T, B, H]
            wx = wx.transpose(0, 1).reshape(B, T, 1, 1, H)
            R = params["weight_hh_l0"].reshape(1, 1, H, H)
            b = params["bias_hh_l0"].reshape(1, 1, H)
            states = h0.reshape(1, B, 1, 1, H)
            h_all, h_last = flashrnn(wx, R, b, states=states, function="elman", backend="cuda_fused",
                                     dtype=dtype_name)
            out = h_all[0].reshape(B, T, H).transpose(0, 1)
            return out, h_last[0].reshape(1, B, H)

        return model, params

    def first_call_failed(self, error: BaseException) -> str | None:
        # FlashRNN JIT-compiles its kernels for each config and rejects some sizes; that is a limit of the
        # comparison, not a wrong result.
        return f"flashrnn raised {type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"

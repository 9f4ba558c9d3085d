"""A small forward+backward of every CUDA kernel path, for compute-sanitizer (scripts/gpu_validation.sh).

Runs FusedRNN(backend="cuda") on padded and packed input, uni- and bidirectional, fp32 and bf16, with
whichever kernel family RNN_FUSED_CUDA_KERNEL selects (plus, unless the persistent family is forced, a
backward with the BPTT options, whose kernel is stepwise only), and checks the result against nn.RNN loosely (the
real accuracy checks are tests/test_cuda.py; this is about memory errors, races and barrier misuse).
"""
import os

import torch
from torch.nn.utils.rnn import pack_padded_sequence

from rnn_fused import FusedRNN


def run(dtype, bidirectional, packed, **options):
    torch.manual_seed(0)
    ref = torch.nn.RNN(12, 72, 2, bidirectional=bidirectional, device="cuda", dtype=dtype)
    ours = FusedRNN(12, 72, 2, bidirectional=bidirectional, device="cuda", dtype=dtype, backend="cuda", **options)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(9, 37, 12, device="cuda", dtype=dtype, requires_grad=True)
    lengths = torch.randint(1, 10, (37,))
    lengths[0] = 9
    inp = pack_padded_sequence(x, lengths, enforce_sorted=False) if packed else x
    out, h_n = ours(inp)
    out = out.data if packed else out
    (out.float().pow(2).sum() + h_n.float().sum()).backward()
    with torch.no_grad():
        ref_out, ref_h = ref(inp)
        ref_out = ref_out.data if packed else ref_out
    err = max((out - ref_out).abs().max().item(), (h_n - ref_h).abs().max().item())
    assert err < (1e-3 if dtype == torch.float32 else 1e-1), f"{dtype} bi={bidirectional} packed={packed}: {err}"


if __name__ == "__main__":
    for dtype in (torch.float32, torch.bfloat16):
        for bidirectional in (False, True):
            for packed in (False, True):
                run(dtype, bidirectional, packed)
                if os.environ.get("RNN_FUSED_CUDA_KERNEL") != "persistent":
                    run(dtype, bidirectional, packed, record_grad_norms=True, bptt_clip=0.5)
    torch.cuda.synchronize()
    print("sanitize_case: ok")

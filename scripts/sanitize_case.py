"""Tiny forward+backward runs of every GPU kernel family, for compute-sanitizer (scripts/gpu_validation.sh).

    compute-sanitizer --tool memcheck python3 scripts/sanitize_case.py [--family persistent stepwise triton]
    python3 scripts/sanitize_case.py --dry-run     # the run list, without a GPU (CI)

Families, each a few FusedRNN(2 layers, I=12, H=72, T=9, B=37) forward+backward calls, fp32 and bf16, one and
two directions, padded and packed:
- persistent, stepwise: backend 'cuda' with RNN_FUSED_CUDA_KERNEL forcing the family (the C++ side reads it
  at every call); stepwise also with the BPTT options (record_grad_norms, bptt_clip), whose backward is
  stepwise only;
- triton: the register path (H=72 pads to BLOCK_H=128), and the step path (MAX_REGISTER_H lowered to 0, as
  tests/test_triton.py does) once with the smallest and once with the largest tile of its autotune list,
  each set as the only config so that the autotuner does not benchmark under the sanitizer.
Results are checked loosely against nn.RNN in fp32 (the accuracy checks are tests/); the point here is
memory errors, races and barrier misuse. It runs with PYTORCH_NO_CUDA_MEMORY_CACHING=1 (set on import):
every tensor is its own cudaMalloc, and memcheck sees an access past a tensor's end instead of
landing in a neighbour inside the caching allocator's block. Each family prints 'family NAME: ok' or its
error; the next family still runs (after a kernel fault the context is gone, and the later families report
that too). Exit status: 1 if any family failed.
"""
import argparse
import os
import sys
import traceback

os.environ.setdefault("PYTORCH_NO_CUDA_MEMORY_CACHING", "1")  # read at the first CUDA allocation

import torch  # noqa: E402
from torch.nn.utils.rnn import pack_padded_sequence  # noqa: E402

from rnn_fused import FusedRNN  # noqa: E402
from rnn_fused.triton import recurrence as K  # noqa: E402

FAMILIES = ("persistent", "stepwise", "triton")
DTYPES = (torch.float32, torch.bfloat16)
LAYOUTS = ((False, False), (False, True), (True, False), (True, True))  # (bidirectional, packed)
OPTIONS = dict(record_grad_norms=True, bptt_clip=0.5)
STEP_KERNELS = ("_forward_step_kernel", "_backward_step_kernel")
DEVICE = "cuda"


def run(backend, dtype, bidirectional, packed, **options):
    torch.manual_seed(0)
    ref = torch.nn.RNN(12, 72, 2, bidirectional=bidirectional, device=DEVICE)
    ours = FusedRNN(12, 72, 2, bidirectional=bidirectional, device=DEVICE, dtype=dtype, backend=backend, **options)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(9, 37, 12, device=DEVICE)
    lengths = torch.randint(1, 10, (37,))
    lengths[0] = 9
    x_ours = x.to(dtype).requires_grad_()
    inp = pack_padded_sequence(x_ours, lengths, enforce_sorted=False) if packed else x_ours
    out, h_n = ours(inp)
    out = out.data if packed else out
    (out.float().pow(2).sum() + h_n.float().sum()).backward()
    with torch.no_grad():
        ref_inp = pack_padded_sequence(x, lengths, enforce_sorted=False) if packed else x
        ref_out, ref_h = ref(ref_inp)
        ref_out = ref_out.data if packed else ref_out
    err = max((out.float() - ref_out).abs().max().item(), (h_n.float() - ref_h).abs().max().item())
    bound = 1e-3 if dtype == torch.float32 else 1e-1
    assert err < bound, f"{backend} {dtype} bi={bidirectional} packed={packed} {options}: error {err:.3g}"


def cuda_runs(kernel):
    runs = [(dtype, bi, packed, {}) for dtype in DTYPES for bi, packed in LAYOUTS]
    if kernel == "stepwise":  # the forced persistent backward refuses the options (tests/test_bptt.py)
        runs += [(dtype, bi, packed, OPTIONS) for dtype in DTYPES for bi, packed in LAYOUTS]
    return runs


def triton_runs():
    """(label, max_register_h, step config or None, dtype, bidirectional, packed, options)."""
    missing = [n for n in STEP_KERNELS if not hasattr(getattr(K, n, None), "configs")]
    assert not missing, f"rnn_fused.triton.recurrence: {missing} are no longer autotuned kernels with .configs"
    configs = K._step_configs()
    smallest = min(configs, key=lambda c: c.kwargs["BLOCK_B"] * c.kwargs["BLOCK_N"])
    largest = max(configs, key=lambda c: c.kwargs["BLOCK_B"] * c.kwargs["BLOCK_N"])
    runs = [("register", K.MAX_REGISTER_H, None, dtype, bi, packed, {})
            for dtype in DTYPES for bi, packed in ((False, False), (True, True))]
    runs.append(("register", K.MAX_REGISTER_H, None, torch.float32, True, True, OPTIONS))
    for config in (smallest, largest):
        kw = config.kwargs
        label = f"step tile {kw['BLOCK_B']}x{kw['BLOCK_N']}x{kw['BLOCK_K']} warps={config.num_warps}"
        runs += [(label, 0, config, torch.float32, True, True, {}),
                 (label, 0, config, torch.bfloat16, False, False, {})]
    return runs


def run_triton(max_register_h, config, dtype, bi, packed, options):
    saved = K.MAX_REGISTER_H, {n: getattr(K, n).configs for n in STEP_KERNELS}
    K.MAX_REGISTER_H = max_register_h
    try:
        if config is not None:
            for n in STEP_KERNELS:
                getattr(K, n).configs = [config]
        run("triton", dtype, bi, packed, **options)
    finally:
        K.MAX_REGISTER_H = saved[0]
        for n, configs in saved[1].items():
            getattr(K, n).configs = configs


def family(name, dry_run):
    if name == "triton":
        runs = triton_runs()
        for label, max_h, config, dtype, bi, packed, options in runs:
            print(f"  triton {label} {dtype} bi={bi} packed={packed} {options or ''}", flush=True)
            if not dry_run:
                run_triton(max_h, config, dtype, bi, packed, options)
    else:
        runs = cuda_runs(name)
        os.environ["RNN_FUSED_CUDA_KERNEL"] = name
        try:
            for dtype, bi, packed, options in runs:
                print(f"  {name} {dtype} bi={bi} packed={packed} {options or ''}", flush=True)
                if not dry_run:
                    run("cuda", dtype, bi, packed, **options)
        finally:
            del os.environ["RNN_FUSED_CUDA_KERNEL"]
    if not dry_run:
        torch.cuda.synchronize()
    return len(runs)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    p.add_argument("--dry-run", action="store_true", help="list the runs; touch no GPU")
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("sanitize_case: needs a CUDA GPU (--dry-run lists the runs)")
        return 2
    # Exact fp32 in the nn.RNN yardstick: with TF32 its own error would be near the fp32 bound.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    if hasattr(getattr(torch.backends.cudnn, "rnn", None), "fp32_precision"):
        torch.backends.cudnn.rnn.fp32_precision = "ieee"
    failed = []
    for name in args.family:
        try:
            n = family(name, args.dry_run)
            print(f"family {name}: ok ({n} runs{', dry run' if args.dry_run else ''})", flush=True)
        except Exception:  # noqa: BLE001 (report the family and go on to the next)
            failed.append(name)
            print(f"family {name}: FAILED\n{traceback.format_exc()}", flush=True)
    print("sanitize_case: " + ("ok" if not failed else f"FAILED: {', '.join(failed)}"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

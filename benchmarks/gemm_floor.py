"""How far a GEMM-bound CPU call is from its GEMM floor (issue 18: within 1.2x), FusedRNN(backend='cpu')
against the float32 GEMMs of its flops, each as one large GEMM (what no Elman layer beats on one core: the
recurrence's T small GEMMs are slower than one large one):
  forward (under no_grad): [T*B, I] x [I, H] (the input projection) and [T*B, H] x [H, H] (the recurrence);
  --train (forward, then torch.autograd.grad into the input, h0 and every parameter): those two, and the
  backward's [T*B, H] x [H, H] (BPTT's dz W_hh), [T*B, H] x [H, I] (dx), [H, T*B] x [T*B, I] (dW_ih) and
  [H, T*B] x [T*B, H] (dW_hh).
Each GEMM of the floor runs on the faster of torch's BLAS (torch.mm) and oneDNN (torch._C._nn.mkldnn_linear on
tensors already in oneDNN's layout), chosen by a short calibration: on an AMD EPYC with AVX-512, MKL's sgemm
runs AVX2 kernels at under half of oneDNN's rate (benchmarks/NOTES.md, "GEMMs on an AMD EPYC with AVX-512").
Interleaved: each round one sample of each after one untimed call each; the ratio is the median of the
per-round ratios (p20-p80).

    python benchmarks/gemm_floor.py [T B H] [--train] [--threads N] [--rounds R]   # default 128 64 256, 1 thread
"""

import argparse
import statistics
import time

import torch

from rnn_fused import FusedRNN
from rnn_fused.bench.timing import percentile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", nargs="*", type=int, default=[128, 64, 256], help="T B H (I = H)")
    parser.add_argument("--train", action="store_true", help="fwd+bwd instead of the forward")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    T, B, H = args.shape
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = FusedRNN(H, H, backend="cpu")
    x, h0 = torch.randn(T, B, H), torch.randn(1, B, H)
    a, w, out = torch.randn(T * B, H), torch.randn(H, H), torch.empty(T * B, H)

    x_grad, h0_grad = x.clone().requires_grad_(), h0.clone().requires_grad_()
    leaves = [x_grad, h0_grad, *model.parameters()]
    grads = (torch.randn(T, B, H), torch.randn(1, B, H))

    def floor_blas():
        torch.mm(a, w.t(), out=out)  # the projection
        torch.mm(a, w.t(), out=out)  # the recurrence
        if args.train:
            torch.mm(a, w, out=out)  # BPTT's dz W_hh
            torch.mm(a, w, out=out)  # dx
            torch.mm(a.t(), a)       # dW_ih
            torch.mm(a.t(), a)       # dW_hh

    floors = {"BLAS (torch.mm)": floor_blas}
    if torch.backends.mkldnn.is_available():
        a_d, w_d, w_t_d = a.to_mkldnn(), w.to_mkldnn(), w.t().contiguous().to_mkldnn()
        a_t_d = a.t().contiguous().to_mkldnn()
        linear = torch._C._nn.mkldnn_linear  # X W^T

        def floor_onednn():
            linear(a_d, w_d)  # the projection
            linear(a_d, w_d)  # the recurrence
            if args.train:
                linear(a_d, w_t_d)  # BPTT's dz W_hh
                linear(a_d, w_t_d)  # dx
                linear(a_t_d, a_t_d)  # dW_ih = a^T a
                linear(a_t_d, a_t_d)  # dW_hh

        floors["oneDNN (mkldnn_linear)"] = floor_onednn

    def median_ms(fn, n=5):
        fn()
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    calibration = {name: median_ms(fn) for name, fn in floors.items()}
    floor_name = min(calibration, key=calibration.get)
    floor = floors[floor_name]

    def ours():
        if args.train:
            torch.autograd.grad(model(x_grad, h0_grad), leaves, grads)
        else:
            with torch.no_grad():
                model(x, h0)

    label = "FusedRNN fwd+bwd" if args.train else "FusedRNN forward"
    samples = {"GEMM floor": [], label: []}
    for _ in range(args.rounds):
        for name, fn in (("GEMM floor", floor), (label, ours)):
            fn()
            t0 = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t0) * 1e3)
    ratios = sorted(o / f for o, f in zip(samples[label], samples["GEMM floor"]))
    print(f"T={T} B={B} I=H={H}, {args.threads} thread(s), {args.rounds} rounds, torch {torch.__version__}")
    print("  floor's GEMMs on " + floor_name + " (calibration: "
          + ", ".join(f"{name} {ms:.2f} ms" for name, ms in calibration.items()) + ")")
    for name, ms in samples.items():
        print(f"  {name:17s} {statistics.median(ms):8.2f} ms")
    print(f"  ours / floor      {statistics.median(ratios):8.3f}x (p20 {percentile(ratios, 20):.3f}, "
          f"p80 {percentile(ratios, 80):.3f})")


if __name__ == "__main__":
    main()

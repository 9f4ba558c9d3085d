"""What saving a copy of h_all for the backward would cost (so that in-place ops on the output could work):
the CPU forward, forward + backward and one h_all.clone(), interleaved, 1 thread, medians.

    python benchmarks/output_copy_cost.py [T B I H [rounds]]      # default 256 16 128 128 200
"""

import statistics
import sys
import time

import torch

from rnn_fused.functional import rnn_layer

torch.set_num_threads(1)
T, B, I, H = map(int, sys.argv[1:5]) if len(sys.argv) > 4 else (256, 16, 128, 128)
ROUNDS = int(sys.argv[5]) if len(sys.argv) > 5 else 200
torch.manual_seed(0)
x = torch.randn(T, B, I)
w_ih = (torch.randn(1, H, I) / H ** 0.5).requires_grad_()
w_hh = (torch.randn(1, H, H) / H ** 0.5).requires_grad_()
bias = torch.zeros(1, H)
h_all = torch.randn(T, B, 1, H)


def forward():
    with torch.no_grad():
        rnn_layer(x, w_ih, w_hh, bias, bias, backend="cpu")


def forward_backward():
    out, _ = rnn_layer(x, w_ih, w_hh, bias, bias, backend="cpu")
    out.sum().backward()


calls = {"forward": forward, "forward+backward": forward_backward, "h_all.clone()": h_all.clone}
times = {name: [] for name in calls}
for call in calls.values():
    call()
for _ in range(ROUNDS):
    for name, call in calls.items():
        start = time.perf_counter()
        call()
        times[name].append(time.perf_counter() - start)
ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
print(f"T={T} B={B} I={I} H={H}: " + ", ".join(f"{name} {v:.3f} ms" for name, v in ms.items()))
print(f"copy / forward = {ms['h_all.clone()'] / ms['forward']:.1%}, "
      f"copy / (forward + backward) = {ms['h_all.clone()'] / ms['forward+backward']:.1%}")

"""What PyTorch's autograd costs a short training call before any arithmetic (issue 18's fwd+bwd rows at B=1):
a layer with FusedRNN's inputs and outputs (x, h0 and the four parameters in; the output and h_n out; the
same tensors saved) whose forward and backward only allocate their results, recorded two ways: as a C++
torch::autograd::Function (a CppNode), and as a bare torch::autograd::Node (as torch's own ops record, and
FusedRNN's layer since csrc/recorded_node.h), each timed through the suite's train call
(`torch.autograd.grad` of both outputs into all six leaves), against FusedRNN itself on the same call. The
difference from the bare node is what our module call and kernels add; the no-ops are what any layer built
on torch's autograd pays, whatever its kernels. Interleaved: each round one sample of each, after one untimed
call each; medians and p20-p80 of batches of calls.

    python benchmarks/autograd_floor.py [T B H] [--rounds R]     # default 1 1 64, 1 thread

Builds the no-ops once with torch.utils.cpp_extension (ninja; ~30 s the first time).
"""

import argparse
import gc
import statistics
import time

import torch
from torch.utils.cpp_extension import load_inline

from rnn_fused import FusedRNN
from rnn_fused.bench.timing import percentile

NO_OP = r"""
#include <torch/extension.h>
#include <torch/csrc/autograd/functions/utils.h>
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The layer's autograd interface with no work: allocates the outputs and the gradients, nothing else.
class NoOpLayer : public torch::autograd::Function<NoOpLayer> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& h0,
                               at::TensorList params) {
    at::Tensor out, h_n;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      out = at::empty({x.size(0), x.size(1), h0.size(2)}, x.options());
      h_n = at::empty(h0.sizes(), h0.options());
    }
    ctx->save_for_backward({x, h0, params[0], params[1]});
    return {out, h_n};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    return {at::empty_like(s[0]), at::empty_like(s[1]), at::empty_like(s[2]), at::empty_like(s[3]),
            at::empty({s[3].size(0)}, s[3].options()), at::empty({s[3].size(0)}, s[3].options())};
  }
};

// The same as a bare Node: edges, SavedVariables, history on the outputs; no Function bookkeeping.
struct BareNoOpBackward : torch::autograd::Node {
  torch::autograd::SavedVariable x_, h0_, w_ih_, w_hh_;
  variable_list apply(variable_list&& grads) override {
    const at::Tensor x = x_.unpack(), h0 = h0_.unpack(), w_ih = w_ih_.unpack(), w_hh = w_hh_.unpack();
    return {at::empty_like(x), at::empty_like(h0), at::empty_like(w_ih), at::empty_like(w_hh),
            at::empty({w_hh.size(0)}, w_hh.options()), at::empty({w_hh.size(0)}, w_hh.options())};
  }
  std::string name() const override { return "BareNoOpBackward"; }
  void release_variables() override {
    x_.reset_data(); h0_.reset_data(); w_ih_.reset_data(); w_hh_.reset_data();
  }
};

std::vector<at::Tensor> bare_no_op_layer(const at::Tensor& x, const at::Tensor& h0, std::vector<at::Tensor> params) {
  at::Tensor out, h_n;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    out = at::empty({x.size(0), x.size(1), h0.size(2)}, x.options());
    h_n = at::empty(h0.sizes(), h0.options());
  }
  auto node = c10::make_intrusive<BareNoOpBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(x, h0, params));
  torch::autograd::set_history(out, node);
  torch::autograd::set_history(h_n, node);
  node->x_ = torch::autograd::SavedVariable(x, false);
  node->h0_ = torch::autograd::SavedVariable(h0, false);
  node->w_ih_ = torch::autograd::SavedVariable(params[0], false);
  node->w_hh_ = torch::autograd::SavedVariable(params[1], false);
  return {out, h_n};
}

std::vector<at::Tensor> no_op_layer(const at::Tensor& x, const at::Tensor& h0, std::vector<at::Tensor> params) {
  return NoOpLayer::apply(x, h0, at::TensorList(params));
}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", nargs="*", type=int, default=[1, 1, 64], help="T B H (I = H)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--calls", type=int, default=200, help="calls per sample")
    args = parser.parse_args()
    T, B, H = args.shape
    torch.set_num_threads(1)
    ext = load_inline("rnn_fused_autograd_floor", cpp_sources=NO_OP, functions=["no_op_layer", "bare_no_op_layer"],
                      extra_cflags=["-O3"])
    torch.manual_seed(0)
    model = FusedRNN(H, H, backend="cpu")
    params = list(model.parameters())
    x, h0 = torch.randn(T, B, H).requires_grad_(), torch.randn(1, B, H).requires_grad_()
    leaves = [x, h0, *params]
    grads = (torch.randn(T, B, H), torch.randn(1, B, H))

    def no_op():
        out, h_n = ext.no_op_layer(x, h0, params)
        return torch.autograd.grad((out, h_n), leaves, grads, allow_unused=True)

    def bare_no_op():
        out, h_n = ext.bare_no_op_layer(x, h0, params)
        return torch.autograd.grad((out, h_n), leaves, grads, allow_unused=True)

    def ours():
        out, h_n = model(x, h0)
        return torch.autograd.grad((out, h_n), leaves, grads, allow_unused=True)

    samples = {"no-op autograd Function": [], "no-op bare Node": [], "FusedRNN": []}
    gc.collect()
    gc.disable()  # as the suite's timed loops (rnn_fused/bench/timing.py)
    try:
        for _ in range(args.rounds):
            for name, fn in (("no-op autograd Function", no_op), ("no-op bare Node", bare_no_op), ("FusedRNN", ours)):
                fn()
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    fn()
                samples[name].append((time.perf_counter() - t0) / args.calls * 1e6)
    finally:
        gc.enable()
    print(f"T={T} B={B} I=H={H}, fwd+bwd (torch.autograd.grad into x, h0 and the 4 parameters), 1 thread, "
          f"{args.rounds} rounds x {args.calls} calls, torch {torch.__version__}")
    for name, us in samples.items():
        us = sorted(us)
        print(f"  {name:24s} {statistics.median(us):7.2f} us (p20 {percentile(us, 20):.2f}, p80 {percentile(us, 80):.2f})")
    extra = sorted(o - f for o, f in zip(samples["FusedRNN"], samples["no-op bare Node"]))
    print(f"  ours - bare no-op        {statistics.median(extra):7.2f} us (p20 {percentile(extra, 20):.2f}, "
          f"p80 {percentile(extra, 80):.2f})")
    ratio = sorted(o / f for o, f in zip(samples["FusedRNN"], samples["no-op bare Node"]))
    print(f"  ours / bare no-op        {statistics.median(ratio):7.3f}    (p20 {percentile(ratio, 20):.3f}, "
          f"p80 {percentile(ratio, 80):.3f})")


if __name__ == "__main__":
    main()

"""FusedRNN inside torch.compile(fullgraph=True): no graph breaks in our code, same numbers as eager."""

import pytest
import torch

from rnn_fused import FusedRNN

from .conftest import assert_matches, available_backends

BACKENDS = [b for b in available_backends("cpu") if b in ("cpu", "reference")]


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fullgraph_compile_matches_eager(compiler, backend):
    torch.manual_seed(0)
    model = FusedRNN(3, 8, 2, nonlinearity="relu", bidirectional=True, batch_first=True, backend=backend,
                     dtype=torch.float64)
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    hx = torch.randn(4, 2, 8, dtype=torch.float64)

    def run(m):
        xi, hi = x.clone().requires_grad_(), hx.clone().requires_grad_()
        model.zero_grad()
        out, h_n = m(xi, hi)
        (out.sin().sum() + h_n.cos().sum()).backward()
        return [out, h_n, xi.grad, hi.grad] + [p.grad.clone() for p in model.parameters()]

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    for got, expected in zip(run(compiled), run(model)):
        assert_matches(got, expected, name=f"{compiler}/{backend}")

"""torch.func on FusedRNN: grad through functional_call (as nn.RNN supports), and per-sample gradients with
vmap(grad(...)), which nn.RNN cannot do (no batching rule for rnn_tanh). Judged in float64 against nn.RNN's
own autograd, sample by sample for vmap (FLOAT64_TOL of tests/conftest.py)."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from rnn_fused import FusedRNN, FusedRNNCell, func_transforms

from .conftest import EXTENSION_ERROR, assert_matches, available_backends

F64 = torch.float64
BACKENDS = [b for b in available_backends("cpu", F64) if b != "reference"] + ["reference"]
CONFIGS = [dict(), dict(num_layers=2, bidirectional=True, batch_first=True, nonlinearity="relu")]


def _pair(cfg, backend):
    torch.manual_seed(0)
    ref = nn.RNN(3, 5, **cfg).double()
    ours = FusedRNN(3, 5, backend=backend, **cfg).double()
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def _loss(params, model, x):
    out, h = functional_call(model, params, (x,))
    return out.square().sum() + h.sum()


def _autograd_grads(ref, x):
    out, h = ref(x)
    return dict(zip(dict(ref.named_parameters()), torch.autograd.grad(out.square().sum() + h.sum(),
                                                                        list(ref.parameters()))))


def test_the_transform_probe_sees_transforms():
    """func_transforms.active reads a private torch API: if torch changes it, this fails (not the users)."""
    assert not func_transforms.active()
    seen = []
    grad(lambda x: (seen.append(func_transforms.active()), x.sum())[1])(torch.randn(3))
    vmap(lambda x: (seen.append(func_transforms.active()), x)[1])(torch.randn(2, 3))
    assert seen == [True, True]


@pytest.mark.skipif(EXTENSION_ERROR is not None, reason=f"extension: {EXTENSION_ERROR}")
@pytest.mark.parametrize("cfg", CONFIGS, ids=["plain", "2layer-bi-batchfirst-relu"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_func_grad_matches_autograd_of_nn_rnn(backend, cfg):
    ours, ref = _pair(cfg, backend)
    x = torch.randn(2, 7, 3, dtype=F64) if cfg.get("batch_first") else torch.randn(7, 2, 3, dtype=F64)
    params = {k: v.detach() for k, v in ours.named_parameters()}
    got = grad(_loss)(params, ours, x)
    expected = _autograd_grads(ref, x)
    for name in expected:
        assert_matches(got[name], expected[name], name=f"{backend} {name}")


@pytest.mark.skipif(EXTENSION_ERROR is not None, reason=f"extension: {EXTENSION_ERROR}")
@pytest.mark.parametrize("cfg", CONFIGS, ids=["plain", "2layer-bi-batchfirst-relu"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sample_gradients_with_vmap_match_one_backward_per_sample(backend, cfg):
    ours, ref = _pair(cfg, backend)
    n = 4
    xs = torch.randn(n, 1, 6, 3, dtype=F64) if cfg.get("batch_first") else torch.randn(n, 6, 1, 3, dtype=F64)
    params = {k: v.detach() for k, v in ours.named_parameters()}
    per_sample = vmap(grad(_loss), in_dims=(None, None, 0))(params, ours, xs)
    for i in range(n):
        expected = _autograd_grads(ref, xs[i])
        for name in expected:
            assert_matches(per_sample[name][i], expected[name], name=f"{backend} sample {i} {name}")


@pytest.mark.skipif(EXTENSION_ERROR is not None, reason=f"extension: {EXTENSION_ERROR}")
def test_func_grad_through_the_cell():
    torch.manual_seed(0)
    ref, ours = nn.RNNCell(3, 4).double(), FusedRNNCell(3, 4).double()
    ours.load_state_dict(ref.state_dict())
    x, h = torch.randn(2, 3, dtype=F64), torch.randn(2, 4, dtype=F64)
    params = {k: v.detach() for k, v in ours.named_parameters()}
    got = grad(lambda p: functional_call(ours, p, (x, h)).square().sum())(params)
    expected = torch.autograd.grad(ref(x, h).square().sum(), list(ref.parameters()))
    for (name, g), e in zip(got.items(), expected):
        assert_matches(g, e, name=name)



@pytest.mark.skipif(EXTENSION_ERROR is not None, reason=f"extension: {EXTENSION_ERROR}")
def test_vmap_over_an_ensemble_of_weights_matches_each_model():
    """vmap over the parameters (torch.func.stack_module_state): the batching rule's sample-by-sample branch."""
    torch.manual_seed(0)
    refs = [nn.RNN(3, 5).double() for _ in range(3)]
    models = [FusedRNN(3, 5).double() for _ in refs]
    for m, r in zip(models, refs):
        m.load_state_dict(r.state_dict())
    params, buffers = torch.func.stack_module_state(models)
    x = torch.randn(6, 2, 3, dtype=F64)
    out, h = vmap(lambda p, b: functional_call(models[0], (p, b), (x,)))(params, buffers)
    for i, r in enumerate(refs):
        with torch.no_grad():
            expected_out, expected_h = r(x)
        assert_matches(out[i], expected_out, name=f"model {i} output")
        assert_matches(h[i], expected_h, name=f"model {i} h_n")


@pytest.mark.parametrize("grad_mode", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_mode_ad_tangents_match_nn_rnn(backend, grad_mode):
    """torch.autograd.forward_ad: the tangent of the output and h_n, as nn.RNN gives it (the kernels have no
    forward-mode derivative, so the modules run such calls on the reference's torch ops); never dropped."""
    import torch.autograd.forward_ad as fwAD

    ours, ref = _pair(CONFIGS[1], backend)
    cell_ours, cell_ref = FusedRNNCell(3, 5, backend=backend).double(), nn.RNNCell(3, 5).double()
    cell_ours.load_state_dict(cell_ref.state_dict())
    x, t = torch.randn(2, 4, 3, dtype=F64), torch.randn(2, 4, 3, dtype=F64)
    with torch.set_grad_enabled(grad_mode), fwAD.dual_level():
        for name, a, b in [("sequence", ours, ref), ("cell", cell_ours, cell_ref)]:
            inp = fwAD.make_dual(x if name == "sequence" else x[0], t if name == "sequence" else t[0])
            got, want = a(inp), b(inp)
            for g, w in zip(*(o if isinstance(o, tuple) else (o,) for o in (got, want))):
                tangent = fwAD.unpack_dual(g).tangent
                assert tangent is not None, f"{name}: the tangent was dropped"
                assert_matches(tangent, fwAD.unpack_dual(w).tangent, name=f"{name} tangent")


@pytest.mark.skipif(EXTENSION_ERROR is not None, reason=f"extension: {EXTENSION_ERROR}")
def test_the_op_under_no_grad_never_drops_a_tangent():
    """Called directly, the C++ ops skip autograd when nothing is recorded, but not for a dual input: they raise
    (no forward-mode derivative) instead of returning a primal without its tangent."""
    import torch.autograd.forward_ad as fwAD

    xw, w_hh, h0 = torch.randn(3, 2, 1, 4), torch.randn(1, 4, 4), torch.zeros(1, 2, 4)
    with torch.no_grad(), fwAD.dual_level():
        with pytest.raises(RuntimeError, match="jvp"):
            torch.ops.rnn_fused.recurrence_forward(fwAD.make_dual(xw, torch.ones_like(xw)), w_hh, h0, None, "tanh")

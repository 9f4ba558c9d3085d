"""FusedRNN among the rest of PyTorch: DistributedDataParallel, bitwise determinism, hostile inputs
(property-based, against nn.RNN), 64-bit row indexing, and memory that stays flat over many calls.

torch.library.opcheck is covered in test_ops.py, torch.compile in test_compile.py, autocast in test_amp.py.
What needs a GPU (CUDA graphs, compute-sanitizer, autocast on CUDA, DDP over NCCL) is not covered here.

Every comparison with nn.RNN uses the rule of conftest.py: float64 results match the float64 nn.RNN to
ATOL[float64] (rnn_fused/tolerance.py); lower precisions are judged against the float64 nn.RNN with nn.RNN
in the same dtype as the yardstick (``assert_matches``). Errors: where nn.RNN raises, FusedRNN raises the same exception type.
"""

import copy
import datetime
import gc
import os
import resource
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from rnn_fused import FusedRNN
from rnn_fused.ops import weight_grad

from .conftest import EXTENSION_ERROR, assert_matches, available_backends

F64 = torch.float64
# Backends that run on this machine's CPU: cpu (C++), reference, and triton under TRITON_INTERPRET=1.
CPU_BACKENDS_F32 = available_backends("cpu", torch.float32)
TRITON_ON_CPU = "triton" in CPU_BACKENDS_F32
HALF_TYPES = (torch.float16, torch.bfloat16)


def _dtypes_of(backend: str) -> list[torch.dtype]:
    """The dtypes a backend runs on the CPU ('auto' and 'reference' run them all)."""
    all_types = [torch.float32, F64, *HALF_TYPES]
    if backend == "auto":
        return all_types
    return [d for d in all_types if backend in available_backends("cpu", d)]


def _raised(fn):
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - we compare whatever was raised
        return err
    return None


# Bounded and reproducible: the same examples on every run (CI included), no example database written.
PROPERTY = settings(max_examples=40, deadline=None, derandomize=True, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ==== 1. DistributedDataParallel: 2 processes (gloo, CPU) == 1 process on the global batch ==============

DDP_WORLD = 2
DDP_BATCH = 8  # global batch; each rank trains on DDP_BATCH // DDP_WORLD sequences
DDP_STEPS = 3


class _SequenceRegressor(nn.Module):
    """FusedRNN (cpu backend, float64, 2 layers, bidirectional, batch_first) and a linear head on the final
    states of both directions; also returns each sequence's mean squared output (so the output path's
    gradient takes part). Takes a padded batch or a PackedSequence."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.rnn = FusedRNN(3, 6, 2, batch_first=True, bidirectional=True, dtype=F64, backend="cpu")
        self.head = nn.Linear(12, 1, dtype=F64)

    def forward(self, x):
        out, h_n = self.rnn(x)
        if isinstance(out, PackedSequence):
            out, lengths = pad_packed_sequence(out, batch_first=True)
        else:
            lengths = torch.full((out.shape[0],), out.shape[1])
        energy = out.pow(2).sum(dim=(1, 2)) / (lengths.to(F64) * out.shape[2])
        return self.head(torch.cat([h_n[-2], h_n[-1]], dim=1)).squeeze(1), energy


def _ddp_batch(step: int):
    """Step ``step``'s global batch; step 1 is packed (unsorted lengths), steps 0 and 2 padded."""
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(DDP_BATCH, 7, 3, generator=g, dtype=F64)
    y = torch.randn(DDP_BATCH, generator=g, dtype=F64)
    lengths = torch.randint(1, 8, (DDP_BATCH,), generator=g) if step == 1 else None
    return x, y, lengths


def _train(model: nn.Module, rows: slice) -> list[float]:
    """DDP_STEPS of SGD with momentum on rows ``rows`` of each global batch; the loss is a per-sequence mean,
    so the average of the ranks' gradients (what DDP computes) is the gradient of the global batch."""
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    losses = []
    for step in range(DDP_STEPS):
        x, y, lengths = _ddp_batch(step)
        x, y = x[rows], y[rows]
        inp = x if lengths is None else pack_padded_sequence(x, lengths[rows], batch_first=True,
                                                             enforce_sorted=False)
        pred, energy = model(inp)
        loss = ((pred - y).pow(2) + 0.1 * energy).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _ddp_worker(rank: int, store_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # two processes on a shared box
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=DDP_WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        model = _SequenceRegressor(seed=rank)  # rank 1 starts elsewhere: DDP must broadcast rank 0's weights
        per_rank = DDP_BATCH // DDP_WORLD
        losses = _train(DistributedDataParallel(model), slice(rank * per_rank, (rank + 1) * per_rank))
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        torch.save({"params": params, "losses": losses}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo in this torch")
def test_ddp_two_processes_match_one_process_on_the_global_batch(tmp_path):
    assert EXTENSION_ERROR is None, EXTENSION_ERROR
    ctx = mp.spawn(_ddp_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=DDP_WORLD, join=False)
    deadline = time.monotonic() + 90
    try:
        while not ctx.join(timeout=1):  # raises if a worker failed
            assert time.monotonic() < deadline, "DDP workers still running after 90 s (hang)"
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()
                proc.join()
    single = _SequenceRegressor(seed=0)
    initial = {n: p.detach().clone() for n, p in single.named_parameters()}
    losses = _train(single, slice(None))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(DDP_WORLD)]
    for name, p in single.named_parameters():
        assert not torch.equal(p.detach(), initial[name]), f"{name} did not train"
        for r, result in enumerate(ranks):
            assert_matches(result["params"][name], p.detach(), name=f"rank {r} {name} after {DDP_STEPS} steps")
    for step in range(DDP_STEPS):
        mean_of_ranks = sum(result["losses"][step] for result in ranks) / DDP_WORLD
        assert mean_of_ranks == pytest.approx(losses[step], rel=1e-12, abs=1e-12), f"loss at step {step}"


# ==== 2. Determinism: the same call twice gives bitwise-identical outputs and gradients ==================

DETERMINISM_CASES = [("cpu", torch.float32), ("cpu", F64), ("reference", F64)]
if TRITON_ON_CPU:
    DETERMINISM_CASES.append(("triton", torch.float32))


def _determinism_run(backend, dtype, kind):
    # cpu: H=64, B=32 takes the BLAS path on full steps and the hand loop on the packed tail; the Triton
    # interpreter gets a small problem.
    T, B, I, H = (5, 3, 4, 8) if backend == "triton" else (6, 32, 5, 64)
    D = 1 if kind == "padded" else 2
    torch.manual_seed(0)
    rnn = FusedRNN(I, H, 2, bidirectional=D == 2, dtype=dtype, backend=backend)
    x = torch.randn(T, B, I, dtype=dtype, requires_grad=True)
    hx = torch.randn(2 * D, B, H, dtype=dtype, requires_grad=True)
    lengths = torch.randint(1, T + 1, (B,), generator=torch.Generator().manual_seed(2))
    lengths[0] = T
    inp = pack_padded_sequence(x, lengths, enforce_sorted=False) if kind == "packed" else x
    out, h_n = rnn(inp, hx)
    out = out.data if kind == "packed" else out
    g = torch.Generator().manual_seed(1)
    torch.autograd.backward([out, h_n], [torch.randn(out.shape, generator=g, dtype=dtype),
                                         torch.randn(h_n.shape, generator=g, dtype=dtype)])
    return {"output": out, "h_n": h_n, "d input": x.grad, "d hx": hx.grad,
            **{f"d {n}": p.grad for n, p in rnn.named_parameters()}}


@pytest.mark.parametrize("backend,dtype", DETERMINISM_CASES)
@pytest.mark.parametrize("kind", ["padded", "packed", "bidirectional"])
def test_forward_and_backward_are_bitwise_deterministic(backend, dtype, kind):
    first, second = _determinism_run(backend, dtype, kind), _determinism_run(backend, dtype, kind)
    for name, value in first.items():
        assert value is not None and torch.equal(value, second[name]), f"{name} differs between two runs"


# ==== 3. Hostile input, property-based: each case matches nn.RNN or raises what nn.RNN raises ==========

# Memory layouts of an input: (shape of the storage tensor, view of it with the logical shape).
LAYOUTS = ("contiguous", "transposed", "strided", "expanded", "swapped")


def _layout(shape, layout, expand_dim):
    n = len(shape)
    if layout == "transposed":  # every dimension reversed
        return tuple(reversed(shape)), lambda t: t.permute(*reversed(range(n)))
    if layout == "strided":  # every other element along every dimension
        return tuple(2 * s for s in shape), lambda t: t[(slice(None, None, 2),) * n]
    if layout == "expanded":  # stride 0 along expand_dim (e.g. one sequence broadcast over the batch)
        base = list(shape)
        base[expand_dim] = 1
        return tuple(base), lambda t: t.expand(*shape)
    if layout == "swapped":  # first two dims swapped: batch_first input that is a view of a time-major one
        return (shape[1], shape[0], *shape[2:]), lambda t: t.transpose(0, 1)
    return tuple(shape), lambda t: t


def _rounded_randn(shape, dtype, seed):
    """Standard normal values representable in ``dtype``, held in float64."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype).to(F64)


def _module_trio(backend, dtype, I, H, L, nonlinearity, bias, batch_first, bidirectional, seed):
    """(ours, nn.RNN in dtype, nn.RNN in float64) with the same (dtype-rounded) weights."""
    torch.manual_seed(seed)
    same = nn.RNN(I, H, L, nonlinearity, bias, batch_first, 0.0, bidirectional, dtype=dtype)
    ref64 = copy.deepcopy(same).to(F64)
    ours = FusedRNN(I, H, L, nonlinearity, bias, batch_first, 0.0, bidirectional, dtype=dtype, backend=backend)
    ours.load_state_dict(same.state_dict(), strict=True)
    return ours, same, ref64


def _forward_backward(module, dtype, case_dtype, make_input, x_storage, hx_storage, grads, seed):
    """Runs ``module`` on fresh leaves (``x_storage``/``hx_storage`` in ``dtype``), then a backward from
    fixed output gradients (rounded to the case's dtype). Returns {name: tensor or None}, requires_grad."""
    for name, p in module.named_parameters():
        p.requires_grad_(grads == "all" or grads == "params_only" or
                         (grads == "frozen_hh" and not name.startswith("weight_hh")))
    module.zero_grad(set_to_none=True)
    x_leaf = x_storage.to(dtype).requires_grad_(grads in ("all", "frozen_hh"))
    hx_leaf = hx_storage.to(dtype).requires_grad_(grads == "all") if hx_storage is not None else None
    out, h_n = module(*make_input(x_leaf, hx_leaf))
    packed = isinstance(out, PackedSequence)
    out_t = out.data if packed else out
    result = {"output": out_t, "h_n": h_n}
    if packed:
        result["batch_sizes"] = out.batch_sizes
    if out_t.requires_grad:
        g = torch.Generator().manual_seed(seed + 1)
        d_out = torch.randn(out_t.shape, generator=g, dtype=F64).to(case_dtype).to(dtype)
        d_hn = torch.randn(h_n.shape, generator=g, dtype=F64).to(case_dtype).to(dtype)
        torch.autograd.backward([out_t, h_n], [d_out, d_hn])
    result["d input"] = x_leaf.grad
    result["d hx"] = hx_leaf.grad if hx_leaf is not None else None
    result.update({f"d {n}": p.grad for n, p in module.named_parameters()})
    return result, out_t.requires_grad


def _check_trio(case, ours, same, ref64, dtype, make_input, x_storage, hx_storage, grads, seed):
    runs = [_forward_backward(m, d, dtype, make_input, x_storage, hx_storage, grads, seed)
            for m, d in ((ours, dtype), (same, dtype), (ref64, F64))]
    (a, a_rg), (y, y_rg), (r, _) = runs
    assert a_rg == y_rg, f"{case}: output.requires_grad {a_rg}, nn.RNN's {y_rg}"
    assert a.keys() == r.keys()
    for name in r:
        assert (a[name] is None) == (r[name] is None), f"{case}: {name} is {a[name]}, nn.RNN's {r[name]}"
        if a[name] is None:
            continue
        if name == "batch_sizes":
            assert torch.equal(a[name], r[name]), case
            continue
        assert a[name].dtype == y[name].dtype, f"{case}: {name} dtype {a[name].dtype}, nn.RNN's {y[name].dtype}"
        assert_matches(a[name], r[name], y[name], name=f"{case}: {name}")


@st.composite
def _padded_cases(draw):
    backend = draw(st.sampled_from(["auto", "cpu", "reference"] + (["triton"] if TRITON_ON_CPU else [])))
    dtype = draw(st.sampled_from(_dtypes_of(backend)))
    T, B = draw(st.integers(1, 5)), draw(st.integers(0, 4))
    I, H, L = draw(st.integers(1, 5)), draw(st.integers(1, 6)), draw(st.integers(1, 3))
    bidirectional, batch_first, bias = draw(st.booleans()), draw(st.booleans()), draw(st.booleans())
    nonlinearity = draw(st.sampled_from(["tanh", "relu"]))
    batched = B != 1 or draw(st.booleans())  # an unbatched (2-D) input is one sequence
    x_layout = draw(st.sampled_from(LAYOUTS if batched else LAYOUTS[:-1]))
    hx_layout = draw(st.sampled_from((None,) + (LAYOUTS if batched else LAYOUTS[:-1])))
    grads = draw(st.sampled_from(["all", "params_only", "frozen_hh", "none"]))
    seed = draw(st.integers(0, 2**16))
    return (backend, dtype, T, B, I, H, L, bidirectional, batch_first, bias, nonlinearity, batched, x_layout,
            hx_layout, grads, seed)


@PROPERTY
@given(_padded_cases())
def test_property_shapes_dtypes_strides_match_nn_rnn(case):
    """T >= 1, B >= 0, any I/H/layers/direction/batch_first/bias/activation, float32/float64/float16/
    bfloat16, unbatched input, non-contiguous input and hx (transposed, strided, expanded over the batch,
    batch_first views of time-major data), frozen parameters: outputs, gradients and requires_grad as
    nn.RNN's."""
    (backend, dtype, T, B, I, H, L, bidirectional, batch_first, bias, nonlinearity, batched, x_layout,
     hx_layout, grads, seed) = case
    D = 2 if bidirectional else 1
    ours, same, ref64 = _module_trio(backend, dtype, I, H, L, nonlinearity, bias, batch_first, bidirectional, seed)
    x_shape = ((B, T, I) if batch_first else (T, B, I)) if batched else (T, I)
    hx_shape = (L * D, B, H) if batched else (L * D, H)
    x_base, x_view = _layout(x_shape, x_layout, (0 if batch_first else 1) if batched else 1)
    x_storage = _rounded_randn(x_base, dtype, seed)
    hx_storage, hx_view = None, None
    if hx_layout is not None:
        hx_base, hx_view = _layout(hx_shape, hx_layout, 1)
        hx_storage = _rounded_randn(hx_base, dtype, seed + 2)

    def make_input(x_leaf, hx_leaf):
        return x_view(x_leaf), (hx_view(hx_leaf) if hx_leaf is not None else None)

    _check_trio(case, ours, same, ref64, dtype, make_input, x_storage, hx_storage, grads, seed)


@st.composite
def _packed_cases(draw):
    backend = draw(st.sampled_from(["auto", "cpu", "reference"] + (["triton"] if TRITON_ON_CPU else [])))
    dtype = draw(st.sampled_from([d for d in (torch.float32, F64) if d in _dtypes_of(backend)]))
    B, T_max = draw(st.integers(1, 6)), draw(st.integers(1, 8))
    kind = draw(st.sampled_from(["all equal", "all 1", "one long, many short", "any"]))
    if kind == "all equal":
        lengths = [T_max] * B
    elif kind == "all 1":
        lengths = [1] * B
    elif kind == "one long, many short":
        lengths = [T_max] + [draw(st.integers(1, max(1, T_max // 4)))] * (B - 1)
    else:
        lengths = draw(st.lists(st.integers(1, T_max), min_size=B, max_size=B))
    order = draw(st.sampled_from(["sorted", "ascending", "shuffled"]))
    if order == "sorted":
        lengths = sorted(lengths, reverse=True)
    elif order == "ascending":
        lengths = sorted(lengths)
    else:
        lengths = draw(st.permutations(lengths))
    enforce_sorted = lengths == sorted(lengths, reverse=True) and draw(st.booleans())
    I, H, L = draw(st.integers(1, 4)), draw(st.integers(1, 6)), draw(st.integers(1, 3))
    bidirectional, batch_first, with_hx = draw(st.booleans()), draw(st.booleans()), draw(st.booleans())
    nonlinearity = draw(st.sampled_from(["tanh", "relu"]))
    seed = draw(st.integers(0, 2**16))
    return (backend, dtype, list(lengths), enforce_sorted, I, H, L, bidirectional, batch_first, with_hx,
            nonlinearity, seed)


@PROPERTY
@given(_packed_cases())
def test_property_packed_sequences_with_unusual_lengths_match_nn_rnn(case):
    """PackedSequence with lengths all equal, all 1, one long and many short, or arbitrary, in sorted,
    ascending or shuffled order (enforce_sorted=False unless sorted): outputs, h_n (in the caller's order)
    and every gradient as nn.RNN's."""
    (backend, dtype, lengths, enforce_sorted, I, H, L, bidirectional, batch_first, with_hx, nonlinearity,
     seed) = case
    D, B, T = 2 if bidirectional else 1, len(lengths), max(lengths)
    ours, same, ref64 = _module_trio(backend, dtype, I, H, L, nonlinearity, True, batch_first, bidirectional, seed)
    x_storage = _rounded_randn((B, T, I) if batch_first else (T, B, I), dtype, seed)
    hx_storage = _rounded_randn((L * D, B, H), dtype, seed + 2) if with_hx else None

    def make_input(x_leaf, hx_leaf):
        return pack_padded_sequence(x_leaf, lengths, batch_first=batch_first, enforce_sorted=enforce_sorted), hx_leaf

    _check_trio(case, ours, same, ref64, dtype, make_input, x_storage, hx_storage, "all", seed)


def _assert_same_non_finite_pattern(actual, expected, name):
    for what, test in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        assert torch.equal(test(actual), test(expected)), (
            f"{name}: {what} at {test(actual).nonzero().tolist()}, nn.RNN's at {test(expected).nonzero().tolist()}")


@st.composite
def _poisoned_cases(draw):
    backend = draw(st.sampled_from(["auto", "cpu", "reference"] + (["triton"] if TRITON_ON_CPU else [])))
    dtype = draw(st.sampled_from([d for d in (torch.float32, F64) if d in _dtypes_of(backend)]))
    T, B, I, H = draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 5))
    L, bidirectional = draw(st.integers(1, 2)), draw(st.booleans())
    nonlinearity = draw(st.sampled_from(["tanh", "relu"]))
    poison = st.sampled_from([float("nan"), float("inf"), float("-inf")])
    x_poison = draw(st.lists(st.tuples(st.integers(0, T - 1), st.integers(0, B - 1), st.integers(0, I - 1), poison),
                             min_size=1, max_size=3))
    hx_poison = draw(st.lists(st.tuples(st.integers(0, L * (1 + bidirectional) - 1), st.integers(0, B - 1),
                                        st.integers(0, H - 1), poison), min_size=0, max_size=2))
    seed = draw(st.integers(0, 2**16))
    return backend, dtype, T, B, I, H, L, bidirectional, nonlinearity, x_poison, hx_poison, seed


@PROPERTY
@given(_poisoned_cases())
def test_property_nan_and_inf_in_input_and_hx_propagate_like_nn_rnn(case):
    """NaN/+Inf/-Inf in the input and in hx: NaN, +Inf and -Inf sit at the same places as in nn.RNN's
    outputs and gradients (a NaN that vanishes hides a diverged run from the user, from anomaly detection and
    from GradScaler), and the finite values match."""
    backend, dtype, T, B, I, H, L, bidirectional, nonlinearity, x_poison, hx_poison, seed = case
    D = 2 if bidirectional else 1
    ours, same, ref64 = _module_trio(backend, dtype, I, H, L, nonlinearity, True, False, bidirectional, seed)
    x_storage = _rounded_randn((T, B, I), dtype, seed)
    for t, b, i, value in x_poison:
        x_storage[t, b, i] = value
    hx_storage = _rounded_randn((L * D, B, H), dtype, seed + 2)
    for layer, b, h, value in hx_poison:
        hx_storage[layer, b, h] = value

    def make_input(x_leaf, hx_leaf):
        return x_leaf, hx_leaf

    a, _ = _forward_backward(ours, dtype, dtype, make_input, x_storage, hx_storage, "all", seed)
    y, _ = _forward_backward(same, dtype, dtype, make_input, x_storage, hx_storage, "all", seed)
    r, _ = _forward_backward(ref64, F64, dtype, make_input, x_storage, hx_storage, "all", seed)
    for name in r:
        _assert_same_non_finite_pattern(a[name], y[name], f"{case}: {name}")
        finite = torch.isfinite(a[name]) & torch.isfinite(r[name]) & torch.isfinite(y[name])
        assert_matches(a[name][finite], r[name][finite], y[name][finite], name=f"{case}: {name} (finite part)")


@pytest.mark.parametrize("backend,dtype", [(b, d) for b in ["cpu", "reference", "triton"] for d in (torch.float32, F64)
                                           if b in available_backends("cpu", d)])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_nan_in_the_input_reaches_the_output_like_nn_rnn(backend, dtype, nonlinearity):
    """The smallest case of the property above, one test per backend, dtype and activation."""
    torch.manual_seed(0)
    ref = nn.RNN(2, 3, nonlinearity=nonlinearity, dtype=dtype)
    ours = FusedRNN(2, 3, nonlinearity=nonlinearity, dtype=dtype, backend=backend)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 1, 2, dtype=dtype)
    x[1, 0, 0] = float("nan")
    expected_out, expected_h = ref(x)
    assert torch.isnan(expected_out[1:]).all() and torch.isnan(expected_h).all()  # nn.RNN: NaN from step 1 on
    out, h_n = ours(x)
    _assert_same_non_finite_pattern(out, expected_out, f"{backend} {dtype} {nonlinearity} output")
    _assert_same_non_finite_pattern(h_n, expected_h, f"{backend} {dtype} {nonlinearity} h_n")


@st.composite
def _bad_input_cases(draw):
    backend = draw(st.sampled_from(["auto", "cpu", "reference"]))
    module_dtype = draw(st.sampled_from([torch.float32, F64]))
    T, B, I, H, L = (draw(st.integers(1, 3)) for _ in range(5))
    bidirectional, batch_first = draw(st.booleans()), draw(st.booleans())
    batched = draw(st.booleans())
    packed = batched and draw(st.booleans())
    D = 2 if bidirectional else 1
    x_shape = list(((B, T, I) if batch_first else (T, B, I)) if batched else (T, I))
    hx_shape = list((L * D, B, H) if batched else (L * D, H))
    x_dtype, hx_dtype = module_dtype, module_dtype
    fault = draw(st.sampled_from(["hx size", "hx rank", "hx dtype", "input size", "input rank", "input dtype",
                                  "hx device"]))
    if fault == "hx size":
        dim = draw(st.integers(0, len(hx_shape) - 1))
        hx_shape[dim] += draw(st.sampled_from([-1, 1, 2])) if hx_shape[dim] > 1 else 1
    elif fault == "hx rank":
        hx_shape = hx_shape[1:] if draw(st.booleans()) else [1] + hx_shape
    elif fault == "hx dtype":
        hx_dtype = draw(st.sampled_from([d for d in (torch.float32, F64, torch.float16, torch.bfloat16,
                                                     torch.int64, torch.complex64) if d != module_dtype]))
    elif fault == "input size":
        x_shape[-1] += draw(st.sampled_from([1, 2]))
    elif fault == "input rank":
        packed = False
        x_shape = x_shape[1:] if len(x_shape) == 2 and draw(st.booleans()) else x_shape + [1]
    elif fault == "input dtype":
        x_dtype = draw(st.sampled_from([d for d in (torch.float32, F64, torch.float16, torch.int32)
                                        if d != module_dtype]))
    seed = draw(st.integers(0, 2**16))
    return (backend, module_dtype, I, H, L, bidirectional, batch_first, packed, tuple(x_shape), x_dtype,
            tuple(hx_shape), hx_dtype, fault, seed)


def _make_tensor(shape, dtype, device="cpu"):
    t = torch.randn(shape, dtype=F64, device=device) if device != "meta" else torch.empty(shape, device="meta")
    return t.to(dtype)


@PROPERTY
@given(_bad_input_cases())
def test_property_malformed_input_and_hx_raise_like_nn_rnn(case):
    """hx of the wrong size, rank, dtype or device, input of the wrong size, rank or dtype (padded, packed or
    unbatched): FusedRNN raises the exception type nn.RNN raises, or, where nn.RNN accepts the input, gives
    its result. Never a crash."""
    (backend, module_dtype, I, H, L, bidirectional, batch_first, packed, x_shape, x_dtype, hx_shape, hx_dtype,
     fault, seed) = case
    torch.manual_seed(seed)
    x = _make_tensor(x_shape, x_dtype)
    hx = _make_tensor(hx_shape, hx_dtype, "meta" if fault == "hx device" else "cpu")
    if packed:
        T_dim, B_dim = (1, 0) if batch_first else (0, 1)
        lengths = sorted(torch.randint(1, x_shape[T_dim] + 1, (x_shape[B_dim],)).tolist(), reverse=True)
        lengths[0] = x_shape[T_dim]
        x = pack_padded_sequence(x, lengths, batch_first=batch_first)
    ref = nn.RNN(I, H, L, bidirectional=bidirectional, batch_first=batch_first, dtype=module_dtype)
    ours = FusedRNN(I, H, L, bidirectional=bidirectional, batch_first=batch_first, dtype=module_dtype,
                    backend=backend)
    ours.load_state_dict(ref.state_dict())
    expected = _raised(lambda: ref(x, hx))
    with torch.no_grad():
        got = _raised(lambda: ours(x, hx))
    if expected is None:
        assert got is None, f"{case}: nn.RNN accepts this, FusedRNN raised {got!r}"
        with torch.no_grad():
            out, h_n = ours(x, hx)
            ref_out, ref_h = ref(x, hx)
        if isinstance(out, PackedSequence):
            out, ref_out = out.data, ref_out.data
        tolerance = {} if module_dtype == F64 else dict(rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out, ref_out, equal_nan=True, **tolerance)
        torch.testing.assert_close(h_n, ref_h, equal_nan=True, **tolerance)
    else:
        assert type(got) is type(expected), f"{case}: nn.RNN raised {expected!r}, FusedRNN {got!r}"


@pytest.mark.parametrize("backend", [b for b in ["cpu", "reference", "triton"] if b in CPU_BACKENDS_F32])
def test_double_backward_matches_nn_rnn(backend):
    """A gradient penalty (WGAN-GP, input-gradient regularisers) differentiates the gradient w.r.t. the input.
    nn.RNN supports it on the CPU; so does FusedRNN on every backend (under create_graph the op's backward
    runs the reference's differentiable BPTT, rnn_fused/ops.py), with the same second-order gradients."""
    dtype = torch.float32 if backend == "triton" else F64
    torch.manual_seed(0)
    ref = nn.RNN(2, 3, 2, dtype=dtype)
    ours = FusedRNN(2, 3, 2, dtype=dtype, backend=backend)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, 2, 2, dtype=dtype)

    def penalty_grads(module):
        module.zero_grad()
        xi = x.to(next(module.parameters()).dtype).requires_grad_()
        out, _ = module(xi)
        (dx,) = torch.autograd.grad(out.pow(2).sum(), xi, create_graph=True)
        dx.pow(2).sum().backward()
        return {n: p.grad for n, p in module.named_parameters()}

    expected = penalty_grads(ref)
    got = penalty_grads(ours)
    ref64 = copy.deepcopy(ref).double()
    exact = penalty_grads(ref64) if dtype != F64 else expected
    for name in expected:
        assert got[name] is not None, f"{name}: no second-order gradient"
        assert_matches(got[name], exact[name], expected[name] if dtype != F64 else None,
                       name=f"{backend} second-order d {name}")


# ==== 4. 64-bit row indexing ===========================================================================
# A real overflow test needs more than 2^31 elements (8 GiB in float32): too much for CI. What is proved
# here: (a) the packed-layout row arithmetic of the weight gradient (recurrence_weight_grad,
# csrc/recurrence_autograd.cpp, every backend's dW_hh) is correct on small analogues (its indices are
# int64: the op contract takes int64 batch_sizes only); (b) the C++ argument checks count packed rows
# in int64 (a sum of batch_sizes beyond 2^32 reaches the shape check intact, shown with an expanded
# zero-memory h0); (c) the Triton step table, which the kernels read row offsets from, keeps offsets beyond
# 2^31. The C++ kernels' pointer arithmetic (row_begin * row_stride etc., csrc/cpu/recurrence_cpu.cpp) is
# int64 by reading, not by execution.


def _previous_rows_by_walking(batch_sizes, direction):
    """The (rows, prev_rows, start_rows, start_batch) of _previous_rows, by walking the packed layout."""
    begin, rows, prev_rows, starts, start_batch = [], [], [], [], []
    n = 0
    for size in batch_sizes:
        begin.append(n)
        n += size
    T = len(batch_sizes)
    for t in range(T):
        for b in range(batch_sizes[t]):
            neighbour = t - 1 if direction == 0 else t + 1
            if 0 <= neighbour < T and b < batch_sizes[neighbour]:
                rows.append(begin[t] + b)
                prev_rows.append(begin[neighbour] + b)
            else:
                starts.append(begin[t] + b)
                start_batch.append(b)
    return rows, prev_rows, starts, start_batch


@pytest.mark.skipif(EXTENSION_ERROR is not None, reason=f"extension: {EXTENSION_ERROR}")
@pytest.mark.parametrize("batch_sizes", [[5, 3, 3, 1], [4, 4, 4], [1], [6, 1, 1, 1, 1], [3]])
def test_packed_weight_grad_matches_a_walk_of_the_layout(batch_sizes):
    """dW_hh[d] = sum over rows of dz[row] h_prev[row]^T, with h_prev found by walking the layout."""
    N, D, H, B = sum(batch_sizes), 2, 3, batch_sizes[0]
    g = torch.Generator().manual_seed(len(batch_sizes))
    dz, h_all = torch.randn(N, D, H, generator=g, dtype=F64), torch.randn(N, D, H, generator=g, dtype=F64)
    h0 = torch.randn(D, B, H, generator=g, dtype=F64)
    got = weight_grad(dz, h_all, h0, torch.tensor(batch_sizes))
    for d in range(D):
        rows, prev_rows, starts, start_batch = _previous_rows_by_walking(batch_sizes, d)
        expected = torch.zeros(H, H, dtype=F64)
        for r, p in zip(rows, prev_rows):
            expected += torch.outer(dz[r, d], h_all[p, d])
        for r, b in zip(starts, start_batch):
            expected += torch.outer(dz[r, d], h0[d, b])
        assert torch.allclose(got[d], expected, rtol=1e-12, atol=1e-12), (batch_sizes, d)


def test_cpu_op_counts_packed_rows_in_int64():
    """sum(batch_sizes) = 3 * 2^31 + 5 rows (beyond int32 and uint32) must reach the shape check of
    csrc/ops.cpp intact. h0 [1, 2^31 + 5, 1] is an expanded zero-memory view; the op stops at the shape
    check of the (deliberately tiny) xw, before touching any data."""
    assert EXTENSION_ERROR is None, EXTENSION_ERROR
    B = 2**31 + 5
    batch_sizes = torch.tensor([B, B, B], dtype=torch.int64)
    h0 = torch.zeros(1, 1, 1).expand(1, B, 1)
    xw, w_hh = torch.zeros(1, 1, 1), torch.zeros(1, 1, 1)
    with pytest.raises(RuntimeError, match=rf"\[N = sum\(batch_sizes\), D, H\] = \[{3 * B}, 1, 1\]"):
        torch.ops.rnn_fused.recurrence_forward(xw, w_hh, h0, batch_sizes, "tanh")


@pytest.mark.skipif(not TRITON_ON_CPU, reason="triton backend unavailable here")
def test_triton_step_table_keeps_row_offsets_beyond_int32():
    """The Triton kernels read each step's first row (row_begin) from the step table and only then widen to
    int64; a packed batch of more than 2^31 rows must not wrap there. Sizes [2^30] * 3: the third step
    starts at row 2^31."""
    from rnn_fused.triton import recurrence as triton_recurrence

    sizes = [2**30] * 3
    table = triton_recurrence._step_table(sizes, 2, torch.device("cpu"))
    forward_row_begin = table[0, :, 1].tolist()
    assert forward_row_begin == [0, 2**30, 2**31], f"row_begin of the forward steps: {forward_row_begin}"
    assert table[1, 0, 1].item() == 2**31, "row_begin of the reverse direction's first step"


# ==== 5. No leaks: many calls keep the process's resident memory flat =================================

def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


LEAK_CALLS = 10_000  # ~25 s on the 2-core CI machine
# T*B*H*4 bytes = 64 KiB per call: a tensor of that size retained per call would add 625 MiB.
LEAK_T, LEAK_B, LEAK_I, LEAK_H = 32, 16, 8, 32
LEAK_SLACK = 16 * 2**20


def _leak_loop(rnn, x_padded, x_packed, calls):
    for i in range(calls):
        out, h_n = rnn(x_packed if i % 2 else x_padded)
        out = out.data if isinstance(out, PackedSequence) else out
        (out.sum() + h_n.sum()).backward()


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc/self/statm (Linux)")
def test_many_forward_backward_calls_keep_memory_flat():
    """LEAK_CALLS forward+backward calls (padded and packed, bidirectional, 2 layers) on the cpu backend: the
    resident set grows by less than LEAK_SLACK after a warm-up, where a leak of one T*B*H tensor per call
    would grow it by 625 MiB."""
    assert EXTENSION_ERROR is None, EXTENSION_ERROR
    torch.manual_seed(0)
    rnn = FusedRNN(LEAK_I, LEAK_H, 2, bidirectional=True, backend="cpu")
    x = torch.randn(LEAK_T, LEAK_B, LEAK_I, requires_grad=True)
    lengths = torch.randint(1, LEAK_T + 1, (LEAK_B,), generator=torch.Generator().manual_seed(0))
    x_packed = pack_padded_sequence(x.detach(), lengths, enforce_sorted=False)
    x_packed = x_packed._replace(data=x_packed.data.requires_grad_())  # a leaf: every call has its own graph
    _leak_loop(rnn, x, x_packed, 200)  # warm-up: allocator caches, thread pools, lazy init
    gc.collect()
    before = _rss_bytes()
    _leak_loop(rnn, x, x_packed, LEAK_CALLS)
    gc.collect()
    grown = _rss_bytes() - before
    assert grown < LEAK_SLACK, f"resident memory grew by {grown / 2**20:.1f} MiB over {LEAK_CALLS} calls"

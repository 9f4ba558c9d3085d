"""The SIMT harness's case table and its check against the float64 reference.

Each case runs one forward and one backward of a kernel family of csrc/cuda/ under the emulation
(simt_cpu.h) on a fake device chosen so the launch plan reaches a given branch, and judges h_all, h_last,
dz, dh0 (and grad_norm with backward options) by the rule of tests/conftest.py against
rnn_fused.reference in float64. ``main`` is also this module's command line (``python -m tests.simt.cases
LIB NAME...``): tests/test_simt.py runs it in a child process, so that a kernel that aborts or hangs fails
its cases instead of killing pytest, and so that the AddressSanitizer build can be preloaded.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import torch

F32, F64, F16, BF16 = torch.float32, torch.float64, torch.float16, torch.bfloat16
DTYPE_NAMES = {F32: "f32", F64: "f64", F16: "f16", BF16: "bf16"}


@dataclasses.dataclass(frozen=True)
class Case:
    what: str             # the branch it reaches
    kernel: str           # "persistent" or "stepwise"
    T: int
    B: int
    H: int
    D: int
    packed: bool
    dtype: torch.dtype
    activation: str = "tanh"
    sms: int = 4          # the fake device
    smem_optin: int = 48 * 1024
    clip_mode: str = "none"
    clip: float = 0.0
    record_norms: bool = False
    grads: str = "both"   # which output gradients the backward gets: "both", "all" (dh_last None), "last"
    inf_where_off: bool = False  # relu: dh_all is inf at every unit that is off (its gradient must be 0)
    expect: tuple = ()    # (plan field, forward value or None, backward value or None) the plan must have

    @property
    def name(self) -> str:
        opts = f"-{self.clip_mode}" if self.clip_mode != "none" else ""
        opts += "-norms" if self.record_norms else ""
        opts += f"-dh-{self.grads}-only" if self.grads != "both" else ""
        opts += "-inf-where-off" if self.inf_where_off else ""
        return (f"{self.kernel}-{self.what}-T{self.T}B{self.B}H{self.H}D{self.D}"
                f"{'-packed' if self.packed else ''}-{self.activation}-{DTYPE_NAMES[self.dtype]}{opts}")


PLAN_FIELDS = ["ok", "rows_per_cta", "ctas_out", "ctas_batch", "batch_per_cta", "stage_rows", "blocks", "smem"]
ALL_DTYPES = [F32, F64, F16, BF16]


def _persistent(what, T, B, H, D, packed, dtypes, activation="tanh", **kw):
    return [Case(what, "persistent", T, B, H, D, packed, dt, activation, **kw) for dt in dtypes]


def _stepwise(what, T, B, H, D, packed, dtypes, activation="tanh", **kw):
    return [Case(what, "stepwise", T, B, H, D, packed, dt, activation, **kw) for dt in dtypes]


# Sizes are small (a launch of 8 CTAs is 2048 OS threads) but every branch of the plan and the kernels is hit:
# R = round_up(max(ceil(H / (sms / D)), 8), 4) outputs per CTA, the batch split only at >= 16 rows per CTA.
CASES = [
    # one CTA per direction (H = 8 <= R); one step (no grid barrier at all); one sequence
    *_persistent("one-cta", 5, 3, 8, 1, False, ALL_DTYPES, expect=(("blocks", 1, 1),)),
    *_persistent("one-step", 1, 3, 40, 2, False, [F32], sms=8),
    *_persistent("one-sequence", 7, 1, 24, 1, False, [F32], "relu"),
    # a backward without dh_last, and one without dh_all (the kernels' nullptr branches)
    *_persistent("grads", 5, 3, 24, 2, True, [F32], sms=8, grads="all"),
    *_persistent("grads", 5, 3, 24, 2, True, [F32], sms=8, grads="last"),
    # 8 x 3 warp tiles per CTA on 8 warps: each warp loops over several tiles
    *_persistent("tiles-per-warp", 3, 6, 64, 1, False, [F32, BF16], sms=2, expect=(("rows_per_cta", 32, 32),)),
    # H = 13 on 2 CTAs: the last CTA owns 5 of its 8 rows; 13 is no multiple of 16 bytes (scalar staging)
    *_persistent("partial-cta", 6, 3, 13, 1, False, ALL_DTYPES, "relu", expect=(("ctas_out", 2, 2),)),
    # H = 40 split over 4 CTAs of 12 rows (the last has 4), 16-byte vector staging
    *_persistent("h-split", 5, 4, 40, 1, False, ALL_DTYPES, expect=(("ctas_out", 4, 4),)),
    # two directions, two barrier counters, 3 CTAs each
    *_persistent("bidirectional", 5, 3, 24, 2, False, [F32, F64], "relu", sms=8, expect=(("blocks", 6, 6),)),
    # ragged lengths incl. 1: rows that stop (h_last), reverse rows that start at their own end (h0)
    *_persistent("packed", 6, 5, 16, 2, True, ALL_DTYPES, expect=(("blocks", 4, 4),)),
    *_persistent("packed", 6, 5, 13, 1, True, [F32], "relu", sms=2),
    # 40 rows over 2 CTAs of 20: CTA 1 idles (st.rows - b0 <= 0) in the packed steps with <= 20 rows
    *_persistent("batch-split", 4, 40, 8, 1, False, [F32, BF16], expect=(("ctas_batch", 2, 2),)),
    *_persistent("batch-split", 5, 40, 8, 2, True, [F32], sms=8, expect=(("ctas_batch", 2, 2),)),
    # shared memory for only a few staged rows: the state goes through shared memory in chunks
    *_persistent("chunked", 4, 12, 16, 1, False, [F32], smem_optin=1536, sms=2,
                 expect=(("stage_rows", 10, 4), ("batch_per_cta", 12, 12))),
    *_persistent("chunked", 5, 12, 16, 2, True, [F64], "relu", smem_optin=2816, sms=4,
                 expect=(("stage_rows", 8, 2), ("batch_per_cta", 12, 12))),
    # the stepwise path: per-step launches (CTAs one at a time), its GEMM on the CPU
    *_stepwise("padded", 5, 3, 13, 1, False, ALL_DTYPES),
    *_stepwise("grid-stride", 4, 4, 70, 1, False, [F32], "relu"),
    *_stepwise("grads", 5, 3, 13, 2, True, [F32], grads="all"),
    # relu's backward is a select: an inf gradient at a unit that is off gives 0 there, not inf * 0 = NaN
    *_persistent("relu-off", 5, 3, 24, 2, True, [F32, BF16], "relu", sms=8, inf_where_off=True),
    *_stepwise("relu-off", 5, 3, 24, 2, True, [F32], "relu", inf_where_off=True),
    *_stepwise("relu-off", 5, 3, 24, 1, False, [F64], "relu", clip_mode="value", clip=0.5, inf_where_off=True),
    *_stepwise("grads", 5, 3, 13, 2, True, [F32], grads="last"),
    *_stepwise("packed", 6, 5, 16, 2, True, ALL_DTYPES, "relu"),
    # the backward options' kernel: one CTA per row, a block reduction in double through static __shared__
    *_stepwise("options", 5, 3, 13, 2, False, [F32, F64], clip_mode="norm", clip=0.5, record_norms=True),
    *_stepwise("options", 6, 5, 40, 2, True, [F32], "relu", clip_mode="value", clip=0.3),
    *_stepwise("options", 6, 5, 40, 1, True, [F64, BF16], record_norms=True),
]
BY_NAME = {c.name: c for c in CASES}
assert len(BY_NAME) == len(CASES), "case names must be unique"

# The sanitizer subsets: every kernel family and staging path once, at most 8 CTAs (2048 threads).
ASAN = [c.name for c in CASES if (c.what, c.dtype) in {
    ("partial-cta", F32), ("partial-cta", F16), ("h-split", F32), ("packed", F32), ("batch-split", F32),
    ("chunked", F32), ("chunked", F64), ("padded", F16), ("options", F32)}]
TSAN = [c.name for c in CASES if c.kernel == "persistent" and (c.what, c.dtype, c.D) in {
    ("h-split", F32, 1), ("packed", F32, 2), ("batch-split", F32, 2)}]


def batch_sizes_of(case: Case) -> torch.Tensor | None:
    """Packed: lengths 1..T cycling over the batch, sorted longest first (so a length-1 sequence whenever
    B >= 2), the longest exactly T; as PackedSequence's batch_sizes."""
    if not case.packed:
        return None
    lengths = sorted((torch.arange(case.B) % case.T + 1).tolist(), reverse=True)
    lengths[0] = case.T
    return torch.tensor([sum(n > t for n in lengths) for t in range(case.T)], dtype=torch.int64)


def problem(case: Case, seed: int = 0):
    """float64 inputs: xw, w_hh (spectral radius about 1), h0, batch_sizes, dh_all, dh_last."""
    g = torch.Generator().manual_seed(seed)
    bs = batch_sizes_of(case)
    rows = (int(bs.sum()),) if bs is not None else (case.T, case.B)
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    xw = randn(*rows, case.D, case.H)
    w_hh = randn(case.D, case.H, case.H) / case.H ** 0.5
    h0 = randn(case.D, case.B, case.H)
    return xw, w_hh, h0, bs, randn(*xw.shape), randn(*h0.shape)


def plan_of(ops, case: Case, backward: bool) -> dict:
    xw, w_hh, h0, bs, _, _ = problem(case)
    ops.configure(case.sms, case.smem_optin)
    values = ops.plan(xw.to(case.dtype), w_hh.to(case.dtype), h0.to(case.dtype), bs, case.activation, backward)
    return dict(zip(PLAN_FIELDS, values))


def check(ops, case: Case) -> None:
    """Raises AssertionError unless the emulated kernels match the float64 reference (and the plan is the
    one the case was chosen for)."""
    from tests.conftest import assert_matches, in_float32
    from rnn_fused import reference as R

    if case.kernel == "persistent":
        for field, fwd, bwd in case.expect:
            for backward, want in ((False, fwd), (True, bwd)):
                got = plan_of(ops, case, backward)
                assert got["ok"], f"the persistent plan refuses {case.name}"
                assert want is None or got[field] == want, (
                    f"{'backward' if backward else 'forward'} plan has {field}={got[field]}, the case is for {want}: {got}")
    ops.configure(case.sms, case.smem_optin)
    # the inputs as the dtype holds them, so the float64 reference judges the computation, not the rounding
    xw, w_hh, h0, bs, dh_all, dh_last = (t.to(case.dtype).double() if isinstance(t, torch.Tensor) and
                                         t.is_floating_point() else t for t in problem(case))
    opts = dict(clip_mode=case.clip_mode, clip=case.clip, record_norms=case.record_norms)
    ref = R.recurrence_forward(xw, w_hh, h0, bs, case.activation)
    dh_all = dh_all if case.grads in ("both", "all") else None
    dh_last = dh_last if case.grads in ("both", "last") else None
    if case.inf_where_off:
        dh_all = dh_all.masked_fill(ref[0] == 0, float("inf"))
    ref += R.recurrence_backward(w_hh, ref[0], h0, dh_all, dh_last, bs, case.activation, **opts)
    # The backward is judged on the reference's h_all (rounded to the dtype), not on the forward's own: in a
    # low precision a relu unit whose z is near 0 can land on the other side of 0 than in float64, which
    # flips act' and moves dz by a whole gradient for the yardstick and us alike, whatever the backward does.
    h_for_backward = ref[0].to(case.dtype)

    def run(op_forward, op_backward, *kernel):
        args = [t.to(case.dtype) for t in (xw, w_hh, h0)]
        h_all, h_last = op_forward(*args, bs, case.activation, *kernel)
        dh = [t.to(case.dtype) if t is not None else None for t in (dh_all, dh_last)]
        grads = op_backward(args[1], h_for_backward, args[2], *dh, bs, case.activation, *kernel, **opts)
        return (h_all, h_last, *grads)

    ours = run(ops.recurrence_forward, ops.recurrence_backward, case.kernel)
    # torch's own computation in the dtype (tests/conftest.py): for the half types float32, rounded once
    yard = (run(in_float32(R.recurrence_forward), in_float32(R.recurrence_backward, keep_float32=(2,)))
            if case.dtype != F64 else [None] * 5)
    names = ["h_all", "h_last", "dz", "dh0"] + (["grad_norm"] if case.record_norms else [])
    for name, a, r, y in zip(names, ours, ref, yard):
        assert_matches(a, r, y, name=f"{name} of {case.name}")


def load(lib: str):
    torch.ops.load_library(lib)
    return torch.ops.rnn_fused_simt


def main(argv: list[str]) -> int:
    """``LIB NAME...``: runs the named cases with the harness library LIB, one JSON line per case."""
    ops = load(argv[0])
    torch.set_num_threads(1)
    for name in argv[1:]:
        try:
            check(ops, BY_NAME[name])
            result = {"case": name, "ok": True}
        except Exception as e:  # noqa: BLE001 - every failure of a case is its result
            result = {"case": name, "ok": False, "error": f"{type(e).__name__}: {e}"}
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

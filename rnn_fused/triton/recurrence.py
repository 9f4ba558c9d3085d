"""Triton kernels of the op boundary (csrc/ops.cpp): the fused recurrence and its BPTT backward.

Two kernel families, chosen per call by the padded hidden size ``BLOCK_H = next_pow2(max(H, 16))``:

Register path (``BLOCK_H <= MAX_REGISTER_H``), one launch per call. One program per (batch tile of
``BLOCK_B`` rows, direction) loads W_hh[d] (forward: as W^T; backward: as W, since ``carry = dz W`` in row
form) into registers once, keeps the state of its rows in fp32 registers and loops over all T steps inside
the kernel. Per step it reads xw_t (or h_t, dh_t) from global, does one ``[BLOCK_B, BLOCK_H] x [BLOCK_H,
BLOCK_H]`` tl.dot and writes h_t (or dz_t). Rows of a step that are not alive (row >= rows_t) keep their
state untouched, which is exactly the variable-length semantics: a forward sequence keeps its final state
(its h_last, stored once at the end), a reverse sequence still holds h0 when it starts at its own last step,
and in the backward a row not yet reached still holds dh_last, a row already finished holds its dh0. Rows are
independent, so no barrier is needed anywhere.

Step path (``BLOCK_H > MAX_REGISTER_H``), one launch per step: W_hh no longer fits one program, and the
alternative, a persistent grid of co-resident programs that syncs every step on an atomic-counter grid
barrier, deadlocks unless every program is resident and cannot run under TRITON_INTERPRET (programs run one
after the other), so it could not be tested here. Instead each visited step s is one launch of a fused
GEMM + activation kernel over a grid of (H tiles, batch tiles, directions): both directions share each
launch, so a call is T launches for the forward and T for the backward. The fp32 state lives in two global
ping-pong buffers [2, D, B, H] (read the previous step's, write this step's); the kernel boundary is the
grid-wide barrier. The backward step fuses ``dz = (dh + carry) * act'(h)`` into the GEMM's K loop
(recomputed per output tile, cheap next to the W_hh tile loads), so dz never makes a round trip before the
product. The cost is a launch per step (GPU launch latency plus Triton's host-side launch path, tens of
microseconds in Python; not yet measured): capture a whole call in a CUDA graph, e.g.
``torch.compile(mode="reduce-overhead")``, to remove it (padded input only: the packed step table is copied
from the host each call). The threshold is ``MAX_REGISTER_H``, a module constant, so the crossover can be
measured by moving it (the tests lower it to run the step path at small H).

Index math is int64 wherever a product can pass 2^31 (i_d * B + row with B near 2^31, a W_hh row times H
for H above 46340); the contract (rnn_fused/contract.py) keeps B and D * H themselves within int.

Variable lengths: the host builds the per-direction step table ``steps [D, T, 4]`` int64 on the device,
(rows, row_begin, carried, continuing) per visited step as in csrc/recurrence_args.h Step; padded input
passes no table (VARLEN=False) and the kernels derive rows = B, row_begin = t*B. Every accumulation and
every carried state is fp32 whatever the storage dtype; tl.dot runs with input_precision="ieee" so float32
is not silently TF32. Floor: per step 2*B*H*H flops and one pass over xw_t / h_t; for small H the register
path is latency bound (one dependent dot + activation per step), for large H the step path is bound by
reading W_hh (from L2) once per batch tile per step.
"""

import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import contract
from .. import ops as _ops
from .. import reference

# Largest padded hidden size whose W_hh one program keeps in registers: 128x128 fp32 is 64 KiB, 64 registers
# per thread at 8 warps, leaving room for the state, the dot operands and the product under the 255-register
# limit; 256 would need 256 per thread just for W_hh and spill. Not yet measured on a GPU: move it to find
# the crossover with the step path.
MAX_REGISTER_H = 128

# tl.dot needs every dimension >= 16 on NVIDIA GPUs; a batch tile of 16 rows is the smallest, and smaller
# tiles mean more programs, i.e. more SMs stepping independent rows at once.
MIN_DOT = 16
REGISTER_BLOCK_B = MIN_DOT

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---- activations -------------------------------------------------------------------------------------


@triton.jit
def _tanh(x):
    # The [13/6] rational minimax tanh of csrc/cpu (Eigen's form): < 1e-7 abs error, 2 ulp near 0, no exp.
    # (libdevice's tanh would do on a GPU but does not exist under TRITON_INTERPRET.)
    # Clamped with comparisons that are false for NaN, so NaN passes through as in torch.tanh
    # (tl.minimum/tl.maximum drop NaN operands on a GPU by default).
    x = tl.where(x < -7.90531110763549805, -7.90531110763549805, x)
    x = tl.where(x > 7.90531110763549805, 7.90531110763549805, x)
    x2 = x * x
    p = x2 * -2.76076847742355e-16 + 2.00018790482477e-13
    p = p * x2 + -8.60467152213735e-11
    p = p * x2 + 5.12229709037114e-08
    p = p * x2 + 1.48572235717979e-05
    p = p * x2 + 6.37261928875436e-04
    p = p * x2 + 4.89352455891786e-03
    q = x2 * 1.19825839466702e-06 + 1.18534705686654e-04
    q = q * x2 + 2.26843463243900e-03
    q = q * x2 + 4.89352518554385e-03
    return x * p / q


@triton.jit
def _activate(z, ACTIVATION: tl.constexpr):
    if ACTIVATION == "tanh":
        return _tanh(z)
    else:
        return tl.where(z < 0.0, 0.0, z)  # NaN stays NaN, as torch.relu


@triton.jit
def _activation_backward(g, h, ACTIVATION: tl.constexpr):
    # g * act'(z) through h = act(z), so the backward needs only h_all. For relu a select, as torch's relu
    # backward: an inf or NaN g at a unit that is off gives 0 (a product would give NaN); NaN h passes g.
    if ACTIVATION == "tanh":
        return g * (1.0 - h * h)
    else:
        return tl.where(h <= 0.0, 0.0, g)


# CLIP_MODE values: the op's clip_mode "none" / "value" / "norm" (csrc/ops.cpp states the rule).
CLIP_NONE: tl.constexpr = 0
CLIP_VALUE: tl.constexpr = 1
CLIP_NORM: tl.constexpr = 2


@triton.jit
def _clip(b_g, b_norm, clip, CLIP_MODE: tl.constexpr):
    """The in-BPTT clip of g = dL/dh_t [BLOCK_B, BLOCK] (b_norm: each row's ||g|| over all of H, float64,
    for "norm"). Written with comparisons, which are false for NaN: a NaN element passes "value" as in
    torch.clamp, and a row whose norm is NaN becomes NaN under "norm" (clip / max(norm, clip))."""
    if CLIP_MODE == CLIP_VALUE:
        b_g = tl.where(b_g > clip, clip, b_g)
        b_g = tl.where(b_g < -clip, -clip, b_g)
    elif CLIP_MODE == CLIP_NORM:
        # `clip` arrives as fp32 (Triton types a Python float by its range), so it may be inf or 0 where the
        # host's double was not: dividing only where norm > clip keeps inf/inf and 0/0 out.
        b_keep = b_norm <= clip
        b_scale = tl.where(b_keep, 1.0, clip / tl.where(b_keep, 1.0, b_norm))
        b_g = b_g * b_scale.to(tl.float32)[:, None]
    return b_g


@triton.jit
def _row_sq(b_g):
    """Sum of squares of each row of an fp32 tile, in float64: a float32 square underflows below ~1e-19,
    and a vanishing gradient of 1e-30 must be recorded as 1e-30, not 0."""
    b_g64 = b_g.to(tl.float64)
    return tl.sum(b_g64 * b_g64, axis=1)


@triton.jit
def _step(steps, i_d, s, T, B, VARLEN: tl.constexpr):
    """(rows, row_begin, carried, continuing) of visited step s of direction i_d (see the module doc)."""
    if VARLEN:
        p_step = steps + (i_d.to(tl.int64) * T + s) * 4
        return tl.load(p_step), tl.load(p_step + 1), tl.load(p_step + 2), tl.load(p_step + 3)
    else:
        t = tl.where(i_d == 0, s, T - 1 - s)
        return B, t.to(tl.int64) * B, tl.where(s > 0, B, 0), tl.where(s < T - 1, B, 0)  # row_begin int64


# ---- register path: one program per (batch tile, direction), the whole sequence inside -----------------


@triton.heuristics({"VARLEN": lambda args: args["steps"] is not None})
@triton.jit(do_not_specialize=["T", "B"])
def _forward_register_kernel(
    xw,      # [N, D, H] (padded: N = T*B)
    w_hh,    # [D, H, H]
    h0,      # [D, B, H]
    h_all,   # [N, D, H] out
    h_last,  # [D, B, H] out
    steps,   # [D, T, 4] int64, or None (padded)
    T, B, D, H,
    ACTIVATION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, VARLEN: tl.constexpr,
):
    i_b, i_d = tl.program_id(0), tl.program_id(1)
    o_b = i_b * BLOCK_B + tl.arange(0, BLOCK_B)
    o_h = tl.arange(0, BLOCK_H)
    m_b, m_h = o_b < B, o_h < H
    # b_wt[k, n] = W_hh[d, n, k], zero outside H, so padded columns of the state stay 0
    p_wt = w_hh + i_d.to(tl.int64) * H * H + o_h[None, :].to(tl.int64) * H + o_h[:, None]
    b_wt = tl.load(p_wt, mask=m_h[:, None] & m_h[None, :], other=0.0).to(tl.float32)
    p_state = (i_d.to(tl.int64) * B + o_b[:, None]) * H + o_h[None, :]
    m_state = m_b[:, None] & m_h[None, :]
    b_h = tl.load(h0 + p_state, mask=m_state, other=0.0).to(tl.float32)  # [BLOCK_B, BLOCK_H] fp32 state
    for s in range(T):
        rows, row_begin, _, _ = _step(steps, i_d, s, T, B, VARLEN)
        m_r = o_b < rows
        m = m_r[:, None] & m_h[None, :]
        i_row = (row_begin + o_b[:, None]).to(tl.int64) * D + i_d
        p_x = i_row * H + o_h[None, :]
        b_z = tl.load(xw + p_x, mask=m, other=0.0).to(tl.float32)
        b_z += tl.dot(b_h, b_wt, input_precision="ieee")
        b_new = _activate(b_z, ACTIVATION)
        tl.store(h_all + p_x, b_new.to(h_all.dtype.element_ty), mask=m)
        # Padded lanes keep their 0: an inf in a real lane times a zero-padded column of W is NaN there,
        # which would reach the real lanes through the next step's product.
        b_h = tl.where(m, b_new, b_h)
    tl.store(h_last + p_state, b_h.to(h_last.dtype.element_ty), mask=m_state)


@triton.heuristics({
    "VARLEN": lambda args: args["steps"] is not None,
    "HAS_DH_ALL": lambda args: args["dh_all"] is not None,
    "HAS_DH_LAST": lambda args: args["dh_last"] is not None,
    "RECORD": lambda args: args["grad_norm"] is not None,
})
@triton.jit(do_not_specialize=["T", "B", "clip"])
def _backward_register_kernel(
    w_hh,     # [D, H, H]
    h_all,    # [N, D, H]
    dh_all,   # [N, D, H] or None
    dh_last,  # [D, B, H] or None
    dz,       # [N, D, H] out
    dh0,      # [D, B, H] out
    grad_norm,  # [N, D] fp32 out, ||dL/dh_t|| per row, or None
    steps,    # [D, T, 4] int64, or None (padded)
    T, B, D, H, clip,
    ACTIVATION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, VARLEN: tl.constexpr,
    HAS_DH_ALL: tl.constexpr, HAS_DH_LAST: tl.constexpr, RECORD: tl.constexpr, CLIP_MODE: tl.constexpr,
):
    i_b, i_d = tl.program_id(0), tl.program_id(1)
    o_b = i_b * BLOCK_B + tl.arange(0, BLOCK_B)
    o_h = tl.arange(0, BLOCK_H)
    m_b, m_h = o_b < B, o_h < H
    # b_w[k, n] = W_hh[d, k, n]: the carry W^T dz in row form is dz @ W
    p_w = w_hh + i_d.to(tl.int64) * H * H + o_h[:, None].to(tl.int64) * H + o_h[None, :]
    b_w = tl.load(p_w, mask=m_h[:, None] & m_h[None, :], other=0.0).to(tl.float32)
    p_state = (i_d.to(tl.int64) * B + o_b[:, None]) * H + o_h[None, :]
    m_state = m_b[:, None] & m_h[None, :]
    if HAS_DH_LAST:
        b_c = tl.load(dh_last + p_state, mask=m_state, other=0.0).to(tl.float32)  # fp32 carried gradient
    else:
        b_c = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
    for s_back in range(T):
        s = T - 1 - s_back  # the forward schedule, visited in reverse
        rows, row_begin, _, _ = _step(steps, i_d, s, T, B, VARLEN)
        m_r = o_b < rows
        m = m_r[:, None] & m_h[None, :]
        i_row = (row_begin + o_b[:, None]).to(tl.int64) * D + i_d
        p_x = i_row * H + o_h[None, :]
        b_g = b_c
        if HAS_DH_ALL:
            b_g += tl.load(dh_all + p_x, mask=m, other=0.0).to(tl.float32)
        b_g = tl.where(m, b_g, 0.0)  # b_g = dL/dh_t
        if RECORD or CLIP_MODE == CLIP_NORM:
            b_norm = tl.sqrt(_row_sq(b_g))
            if RECORD:
                tl.store(grad_norm + (row_begin + o_b).to(tl.int64) * D + i_d, b_norm.to(tl.float32), mask=m_r)
        if CLIP_MODE == CLIP_NORM:
            b_g = _clip(b_g, b_norm, clip, CLIP_MODE)
        elif CLIP_MODE == CLIP_VALUE:
            b_g = _clip(b_g, None, clip, CLIP_MODE)
        b_h = tl.load(h_all + p_x, mask=m, other=0.0).to(tl.float32)
        b_dz = _activation_backward(b_g, b_h, ACTIVATION)
        tl.store(dz + p_x, b_dz.to(dz.dtype.element_ty), mask=m)
        b_c = tl.where(m_r[:, None], tl.dot(b_dz, b_w, input_precision="ieee"), b_c)
    tl.store(dh0 + p_state, b_c.to(dh0.dtype.element_ty), mask=m_state)


# ---- step path: one launch per visited step, grid (H tiles, batch tiles, directions) -------------------


def _step_configs():
    # Under the interpreter there is nothing to time: one config. On a GPU the tile shape is what matters:
    # small batches want narrow batch tiles and wide H tiles (enough programs to fill the SMs from few rows),
    # large batches the reverse. Untuned on real hardware.
    if triton.knobs.runtime.interpret:
        return [triton.Config({"BLOCK_B": 16, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4)]
    return [
        triton.Config({"BLOCK_B": bb, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
        for bb, bn, bk, w, st in [
            (16, 32, 128, 4, 3), (16, 64, 64, 4, 3), (16, 128, 64, 4, 3),
            (32, 64, 64, 4, 3), (64, 64, 64, 4, 3), (64, 128, 32, 8, 3), (128, 128, 32, 8, 3),
        ]
    ]


@triton.autotune(configs=_step_configs(), key=["H", "B"])
@triton.heuristics({"VARLEN": lambda args: args["steps"] is not None})
@triton.jit(do_not_specialize=["s", "T", "B"])
def _forward_step_kernel(
    xw,       # [N, D, H]
    w_hh,     # [D, H, H]
    h_src,    # [D, B, H] fp32, the state after the previous visited step (h0 where not yet written)
    h_dst,    # [D, B, H] fp32 out, the state after this step
    h_all,    # [N, D, H] out
    h_last,   # [D, B, H] out
    steps,    # [D, T, 4] int64, or None (padded)
    s, T, B, D, H,
    ACTIVATION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    VARLEN: tl.constexpr,
):
    i_n, i_b, i_d = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows, row_begin, _, continuing = _step(steps, i_d, s, T, B, VARLEN)
    o_b = i_b * BLOCK_B + tl.arange(0, BLOCK_B)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_r, m_n = o_b < rows, o_n < H
    p_state = (i_d.to(tl.int64) * B + o_b[:, None]) * H
    b_z = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < H
        b_h = tl.load(h_src + p_state + o_k[None, :], mask=m_r[:, None] & m_k[None, :], other=0.0)
        # b_wt[k, n] = W_hh[d, n, k]
        p_wt = w_hh + i_d.to(tl.int64) * H * H + o_n[None, :].to(tl.int64) * H + o_k[:, None]
        b_wt = tl.load(p_wt, mask=m_k[:, None] & m_n[None, :], other=0.0).to(tl.float32)
        b_z += tl.dot(b_h, b_wt, input_precision="ieee")
    m = m_r[:, None] & m_n[None, :]
    p_x = ((row_begin + o_b[:, None]).to(tl.int64) * D + i_d) * H + o_n[None, :]
    b_z += tl.load(xw + p_x, mask=m, other=0.0).to(tl.float32)
    b_h = _activate(b_z, ACTIVATION)
    tl.store(h_all + p_x, b_h.to(h_all.dtype.element_ty), mask=m)
    tl.store(h_dst + p_state + o_n[None, :], b_h, mask=m)
    m_end = m & (o_b >= continuing)[:, None]  # sequences whose last step this is
    tl.store(h_last + p_state + o_n[None, :], b_h.to(h_last.dtype.element_ty), mask=m_end)


@triton.jit
def _g_tile(h_all, dh_all, dh_last, c_src, p_x, p_state, m, m_carry, m_end, HAS_DH_ALL: tl.constexpr,
            HAS_DH_LAST: tl.constexpr):
    """(g, h_t) on one tile: g = dL/dh_t = dh_t + the carry (continuing rows) or dh_last (ending
    rows); zero outside the mask."""
    b_g = tl.load(c_src + p_state, mask=m_carry, other=0.0)
    if HAS_DH_LAST:
        b_g += tl.load(dh_last + p_state, mask=m_end, other=0.0).to(tl.float32)
    if HAS_DH_ALL:
        b_g += tl.load(dh_all + p_x, mask=m, other=0.0).to(tl.float32)
    b_h = tl.load(h_all + p_x, mask=m, other=0.0).to(tl.float32)
    return tl.where(m, b_g, 0.0), b_h


@triton.autotune(configs=_step_configs(), key=["H", "B"])
@triton.heuristics({
    "VARLEN": lambda args: args["steps"] is not None,
    "HAS_DH_ALL": lambda args: args["dh_all"] is not None,
    "HAS_DH_LAST": lambda args: args["dh_last"] is not None,
    "RECORD": lambda args: args["grad_norm"] is not None,
})
@triton.jit(do_not_specialize=["s", "T", "B", "clip"])
def _backward_step_kernel(
    w_hh,     # [D, H, H]
    h_all,    # [N, D, H]
    dh_all,   # [N, D, H] or None
    dh_last,  # [D, B, H] or None
    c_src,    # [D, B, H] fp32, W^T dz of the step visited before (valid for this step's continuing rows)
    c_dst,    # [D, B, H] fp32 out, W^T dz of this step
    dz,       # [N, D, H] out
    dh0,      # [D, B, H] out
    grad_norm,  # [N, D] fp32 out, ||dL/dh_t|| per row, or None
    steps,    # [D, T, 4] int64, or None (padded)
    s, T, B, D, H, clip,
    ACTIVATION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    VARLEN: tl.constexpr, HAS_DH_ALL: tl.constexpr, HAS_DH_LAST: tl.constexpr, RECORD: tl.constexpr,
    CLIP_MODE: tl.constexpr,
):
    # The K loop reads whole rows of g_t (it needs all of dz_t for W^T dz_t), so every program knows each
    # row's ||g_t|| by its end; the norm clip, a per-row factor, is applied to the product afterwards.
    i_n, i_b, i_d = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows, row_begin, carried, continuing = _step(steps, i_d, s, T, B, VARLEN)
    o_b = i_b * BLOCK_B + tl.arange(0, BLOCK_B)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_r, m_n = o_b < rows, o_n < H
    m_carry_r = (o_b < continuing)[:, None]
    m_end_r = (m_r & (o_b >= continuing))[:, None]
    p_state = (i_d.to(tl.int64) * B + o_b[:, None]) * H
    i_row = (row_begin + o_b[:, None]).to(tl.int64) * D + i_d
    b_c = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
    b_sq = tl.zeros([BLOCK_B], dtype=tl.float64)
    for k0 in range(0, H, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k[None, :] < H
        b_g, b_h = _g_tile(h_all, dh_all, dh_last, c_src, i_row * H + o_k[None, :], p_state + o_k[None, :],
                           m_r[:, None] & m_k, m_carry_r & m_k, m_end_r & m_k, HAS_DH_ALL, HAS_DH_LAST)
        if RECORD or CLIP_MODE == CLIP_NORM:
            b_sq += _row_sq(b_g)
        if CLIP_MODE == CLIP_VALUE:
            b_g = _clip(b_g, None, clip, CLIP_MODE)
        # b_w[k, n] = W_hh[d, k, n]: carry = dz @ W
        p_w = w_hh + i_d.to(tl.int64) * H * H + o_k[:, None].to(tl.int64) * H + o_n[None, :]
        b_w = tl.load(p_w, mask=(o_k < H)[:, None] & m_n[None, :], other=0.0).to(tl.float32)
        b_c += tl.dot(_activation_backward(b_g, b_h, ACTIVATION), b_w, input_precision="ieee")
    b_norm = tl.sqrt(b_sq)
    if CLIP_MODE == CLIP_NORM:
        b_c = _clip(b_c, b_norm, clip, CLIP_MODE)  # W^T (s g act') = s W^T (g act'), s per row
    if RECORD:
        tl.store(grad_norm + (row_begin + o_b).to(tl.int64) * D + i_d, b_norm.to(tl.float32),
                 mask=m_r & (i_n == 0))
    m = m_r[:, None] & m_n[None, :]
    p_x = i_row * H + o_n[None, :]
    b_g, b_h = _g_tile(h_all, dh_all, dh_last, c_src, p_x, p_state + o_n[None, :], m, m_carry_r & m_n[None, :],
                       m_end_r & m_n[None, :], HAS_DH_ALL, HAS_DH_LAST)
    b_dz = _activation_backward(_clip(b_g, b_norm, clip, CLIP_MODE), b_h, ACTIVATION)
    tl.store(dz + p_x, b_dz.to(dz.dtype.element_ty), mask=m)
    tl.store(c_dst + p_state + o_n[None, :], b_c, mask=m)
    m_start = m & (o_b >= carried)[:, None]  # sequences that started here hand their carry to dh0
    tl.store(dh0 + p_state + o_n[None, :], b_c.to(dh0.dtype.element_ty), mask=m_start)


# ---- host side -------------------------------------------------------------------------------------------


def _check_dtype(w_hh: Tensor) -> None:
    """This backend's dtypes, checked after the op contract (rnn_fused/contract.py)."""
    if w_hh.dtype not in _DTYPES:
        contract.fail("the Triton backend supports float32, float16 and bfloat16, got "
                      f"{contract.dtype_name(w_hh.dtype)}")


def _step_table(sizes: list, D: int, device: torch.device) -> Tensor:
    """[D, T, 4] int64 (rows, row_begin, carried, continuing) per visited step: RecurrenceProblem::schedule.
    int64 because row_begin passes 2^31 for packed batches of more than 2^31 rows."""
    bs = torch.tensor(sizes, dtype=torch.int64)
    row_begin = torch.cumsum(bs, 0) - bs
    zero = bs.new_zeros(1)
    before = torch.minimum(bs, torch.cat([zero, bs[:-1]]))  # rows shared with step t-1
    after = torch.minimum(bs, torch.cat([bs[1:], zero]))    # rows shared with step t+1
    forward = torch.stack([bs, row_begin, before, after], dim=1)
    # the reverse direction visits t = T-1..0: its previous step is t+1 and its next step t-1
    reverse = torch.stack([bs, row_begin, after, before], dim=1).flip(0)
    table = torch.stack([forward, reverse][:D])
    return table.to(device, non_blocking=True)


def _uses_register_path(H: int) -> bool:
    return _block_h(H) <= MAX_REGISTER_H


def _block_h(H: int) -> int:
    return max(MIN_DOT, triton.next_power_of_2(H))


def _register_warps(H: int) -> int:
    # W_hh's tile is spread over the program's threads: 4 warps hold a 64x64 fp32 tile in 32 registers a
    # thread; 128x128 needs 8 warps to stay at 64.
    return 4 if _block_h(H) <= 64 else 8


def _output_like(proto: Tensor) -> Tensor:
    """An output shaped like proto, contiguous whatever proto's strides: the op contract's output layout
    (rnn_fused/ops.py's fake impls promise it; the C++ and CUDA kernels and the reference return it too)."""
    return torch.empty_like(proto, memory_format=torch.contiguous_format)


def _device_guard(t: Tensor):
    # Triton launches on the current CUDA device: make it the tensors' one
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _step_grid(B: int, D: int, H: int):
    return lambda meta: (triton.cdiv(H, meta["BLOCK_N"]), triton.cdiv(B, meta["BLOCK_B"]), D)


@torch.library.custom_op("rnn_fused::triton_recurrence_forward", mutates_args=())
def triton_recurrence_forward(xw: Tensor, w_hh: Tensor, h0: Tensor, batch_sizes: Optional[Tensor],
                              activation: str, clip_mode: str = "none", clip: float = 0.0,
                              norm_probe: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    # clip_mode, clip, norm_probe: the options of this call's backward (csrc/ops.cpp); the forward ignores them.
    p = contract.check_forward(xw, w_hh, h0, batch_sizes, activation)
    contract.check_forward_options(xw, clip_mode, clip, norm_probe)
    _check_dtype(w_hh)
    T, B, D, H, sizes = p.T, p.B, p.D, p.H, p.sizes
    h_all, h_last = _output_like(xw), _output_like(h0)
    if T == 0 or B == 0 or H == 0:
        return h_all, h_last.copy_(h0)  # no step: each sequence stays at h0
    xw, w_hh, h0 = xw.contiguous(), w_hh.contiguous(), h0.contiguous()
    with _device_guard(xw):
        steps = None if sizes is None else _step_table(sizes, D, xw.device)
        if _uses_register_path(H):
            grid = (triton.cdiv(B, REGISTER_BLOCK_B), D)
            _forward_register_kernel[grid](xw, w_hh, h0, h_all, h_last, steps, T, B, D, H,
                                           ACTIVATION=activation, BLOCK_B=REGISTER_BLOCK_B, BLOCK_H=_block_h(H),
                                           num_warps=_register_warps(H))
        else:
            state = h0.float().unsqueeze(0).repeat(2, 1, 1, 1)  # ping-pong [2, D, B, H], h0 in both
            grid = _step_grid(B, D, H)
            for s in range(T):
                _forward_step_kernel[grid](xw, w_hh, state[s % 2], state[(s + 1) % 2], h_all, h_last,
                                           steps, s, T, B, D, H, ACTIVATION=activation)
    return h_all, h_last


@torch.library.custom_op("rnn_fused::triton_recurrence_backward", mutates_args=())
def triton_recurrence_backward(w_hh: Tensor, h_all: Tensor, h0: Tensor, dh_all: Optional[Tensor],
                               dh_last: Optional[Tensor], batch_sizes: Optional[Tensor], activation: str,
                               clip_mode: str = "none", clip: float = 0.0,
                               record_norms: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    p = contract.check_backward(w_hh, h_all, h0, dh_all, dh_last, batch_sizes, activation, clip_mode, clip)
    _check_dtype(w_hh)
    T, B, D, H, sizes = p.T, p.B, p.D, p.H, p.sizes
    dz, dh0 = _output_like(h_all), _output_like(h0)
    grad_norm = reference.empty_grad_norm(h_all, record_norms)
    if T == 0 or B == 0 or H == 0:
        return dz, (dh0.copy_(dh_last) if dh_last is not None else dh0.zero_()), grad_norm.zero_()
    clip_args = dict(CLIP_MODE=("none", "value", "norm").index(clip_mode))
    norm_arg = grad_norm if record_norms else None
    w_hh, h_all = w_hh.contiguous(), h_all.contiguous()
    dh_all = dh_all.contiguous() if dh_all is not None else None
    dh_last = dh_last.contiguous() if dh_last is not None else None
    with _device_guard(h_all):
        steps = None if sizes is None else _step_table(sizes, D, h_all.device)
        if _uses_register_path(H):
            grid = (triton.cdiv(B, REGISTER_BLOCK_B), D)
            _backward_register_kernel[grid](w_hh, h_all, dh_all, dh_last, dz, dh0, norm_arg, steps,
                                            T, B, D, H, clip, ACTIVATION=activation, BLOCK_B=REGISTER_BLOCK_B,
                                            BLOCK_H=_block_h(H), num_warps=_register_warps(H), **clip_args)
        else:
            # ping-pong [2, D, B, H] fp32; every row a step reads from it was written by the step before
            # (rows that end there read dh_last instead), so it needs no initialisation
            carry = torch.empty(2, D, B, H, dtype=torch.float32, device=h_all.device)
            grid = _step_grid(B, D, H)
            for i, s in enumerate(reversed(range(T))):
                _backward_step_kernel[grid](w_hh, h_all, dh_all, dh_last, carry[i % 2], carry[(i + 1) % 2],
                                            dz, dh0, norm_arg, steps, s, T, B, D, H, clip,
                                            ACTIVATION=activation, **clip_args)
    return dz, dh0, grad_norm


_ops.register("rnn_fused::triton_recurrence_forward", "rnn_fused::triton_recurrence_backward")

recurrence_forward = torch.ops.rnn_fused.triton_recurrence_forward
recurrence_backward = torch.ops.rnn_fused.triton_recurrence_backward

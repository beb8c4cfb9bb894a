"""Fused Triton shift-add (forward and backward); semantics in :mod:`largekernel.ops.shiftadd`.

Both directions are gathers over one channel's planes, so no atomics: the forward tile of output channel c
reads its nk input planes at 2*G shifted windows (plus G identity planes) and writes the three terms once;
the backward tile of input plane c*nk+j reads the three output-gradient planes of channel c at the same
shifts. The shifted re-reads of a plane hit L1/L2, so HBM traffic is ~ one read of the big tensor plus one
write of the small one (forward) or the reverse (backward).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from largekernel.ops._launch import (
    cached,
    cdiv,
    launch,
    next_pow2,
    plane_descriptor,
    stacked_planes_descriptor,
    tma_planes,
)


@triton.jit
def _tile_coords(pid, n_th, n_tw, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    # 1-D grid with the tiles of one plane adjacent: neighbours share that plane's data in L2
    tw = pid % n_tw
    th = (pid // n_tw) % n_th
    rows = th * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
    cols = tw * BLOCK_W + tl.arange(0, BLOCK_W)[None, :]
    return pid // (n_tw * n_th), rows, cols


@triton.jit
def _gather_terms(y_ptr, pad_ptr, ident_ptr, bc, c, hs, ws, inside, Hp, Wp,
                  NK: tl.constexpr, G: tl.constexpr, E: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, F64: tl.constexpr):
    """The three terms of output channel c (batch-channel index bc) on a tile, in the accumulator dtype."""
    plane = Hp * Wp
    y_c = y_ptr + bc.to(tl.int64) * NK * plane
    if F64:
        acc0 = tl.zeros([BLOCK_H, BLOCK_W], dtype=tl.float64)
    else:
        acc0 = tl.zeros([BLOCK_H, BLOCK_W], dtype=tl.float32)
    acc1 = acc0
    acc2 = acc0
    row_h = (hs + E) * Wp
    for j in range(NK):
        y_j = y_c + j * plane
        for g in tl.static_range(G):
            s_h = tl.load(pad_ptr + (c * NK + j) * (2 * G) + g)
            s_v = tl.load(pad_ptr + (c * NK + j) * (2 * G) + G + g)
            col = ws - s_h
            m0 = inside & (col >= 0) & (col < Wp)
            acc0 += tl.load(y_j + row_h + col, mask=m0, other=0.0).to(acc0.dtype)
            row = hs - s_v
            m1 = inside & (row >= 0) & (row < Hp)
            acc1 += tl.load(y_j + row * Wp + ws + E, mask=m1, other=0.0).to(acc1.dtype)
    y_b = y_ptr + (bc - c).to(tl.int64) * NK * plane  # plane 0 of batch b
    for g in tl.static_range(G):
        k = tl.load(ident_ptr + c * G + g)  # global plane index c*nk + r
        acc2 += tl.load(y_b + k * plane + row_h + ws + E, mask=inside, other=0.0).to(acc2.dtype)
    return acc0, acc1, acc2


@triton.jit
def _store_terms(out, term_stride, acc0, acc1, acc2, inside):
    """The three terms of a tile into the (3, B, R, H, W) output (``out``: term 0's pointers)."""
    ty = out.dtype.element_ty
    tl.store(out, acc0.to(ty), mask=inside)
    tl.store(out + term_stride, acc1.to(ty), mask=inside)
    tl.store(out + 2 * term_stride, acc2.to(ty), mask=inside)


@triton.jit
def _shift_add_fwd(y_ptr, pad_ptr, ident_ptr, out_ptr, R, H, W, Hp, Wp, term_stride, n_th, n_tw,
                   NK: tl.constexpr, G: tl.constexpr, E: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, F64: tl.constexpr):
    bc, hs, ws = _tile_coords(tl.program_id(0), n_th, n_tw, BLOCK_H, BLOCK_W)  # bc = b * R + c
    c = bc % R
    inside = (hs < H) & (ws < W)
    acc0, acc1, acc2 = _gather_terms(y_ptr, pad_ptr, ident_ptr, bc, c, hs, ws, inside, Hp, Wp,
                                     NK, G, E, BLOCK_H, BLOCK_W, F64)
    out = out_ptr + bc.to(tl.int64) * H * W + hs * W + ws
    _store_terms(out, term_stride, acc0, acc1, acc2, inside)


@triton.jit
def _shift_add_eval(y_ptr, pad_ptr, ident_ptr, scale_ptr, bias_ptr, x_ptr, rep_ptr, out_ptr,
                    R, C, H, W, Hp, Wp, n_th, n_tw,
                    NK: tl.constexpr, G: tl.constexpr, E: tl.constexpr,
                    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, F64: tl.constexpr):
    """Inference epilogue: out[b, c] = s0*t0 + s1*t1 + s2*t2 + bias + x[b, rep[c]] into a (B, C, H, W) output."""
    bc, hs, ws = _tile_coords(tl.program_id(0), n_th, n_tw, BLOCK_H, BLOCK_W)
    c = bc % R
    b = bc // R
    inside = (hs < H) & (ws < W)
    acc0, acc1, acc2 = _gather_terms(y_ptr, pad_ptr, ident_ptr, bc, c, hs, ws, inside, Hp, Wp,
                                     NK, G, E, BLOCK_H, BLOCK_W, F64)
    s0 = tl.load(scale_ptr + c)
    s1 = tl.load(scale_ptr + R + c)
    s2 = tl.load(scale_ptr + 2 * R + c)
    src = tl.load(rep_ptr + c)
    res = tl.load(x_ptr + (b.to(tl.int64) * C + src) * H * W + hs * W + ws, mask=inside, other=0.0)
    val = s0 * acc0 + s1 * acc1 + s2 * acc2 + tl.load(bias_ptr + c) + res.to(acc0.dtype)
    out = out_ptr + (b.to(tl.int64) * C + c) * H * W + hs * W + ws
    tl.store(out, val.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _shift_add_bwd(gout_ptr, pad_ptr, ident_ptr, gy_ptr, R, H, W, Hp, Wp, term_stride, n_th, n_tw,
                   NK: tl.constexpr, G: tl.constexpr, E: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, F64: tl.constexpr):
    # the nk planes of one channel are adjacent in the grid too: they share its gout planes in L2
    plane_id, us, vs = _tile_coords(tl.program_id(0), n_th, n_tw, BLOCK_H, BLOCK_W)  # (b * R + c) * NK + j
    j = plane_id % NK
    bc = plane_id // NK
    c = bc % R
    inside = (us < Hp) & (vs < Wp)
    g_c = gout_ptr + bc.to(tl.int64) * H * W
    if F64:
        acc = tl.zeros([BLOCK_H, BLOCK_W], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK_H, BLOCK_W], dtype=tl.float32)
    row0 = us - E
    row0_ok = inside & (row0 >= 0) & (row0 < H)
    col1 = vs - E
    col1_ok = inside & (col1 >= 0) & (col1 < W)
    hits = 0
    for g in tl.static_range(G):
        s_h = tl.load(pad_ptr + (c * NK + j) * (2 * G) + g)
        s_v = tl.load(pad_ptr + (c * NK + j) * (2 * G) + G + g)
        col = vs + s_h
        m0 = row0_ok & (col >= 0) & (col < W)
        acc += tl.load(g_c + row0 * W + col, mask=m0, other=0.0).to(acc.dtype)
        row = us + s_v
        m1 = col1_ok & (row >= 0) & (row < H)
        acc += tl.load(g_c + term_stride + row * W + col1, mask=m1, other=0.0).to(acc.dtype)
        k = tl.load(ident_ptr + c * G + g)
        hits += (k == c * NK + j).to(tl.int32)
    m2 = row0_ok & col1_ok & (hits > 0)
    acc += hits.to(acc.dtype) * tl.load(g_c + 2 * term_stride + row0 * W + col1, mask=m2, other=0.0).to(acc.dtype)
    gy = gy_ptr + plane_id.to(tl.int64) * Hp * Wp + us * Wp + vs
    tl.store(gy, acc.to(gy_ptr.dtype.element_ty), mask=inside)


# ---------------------------------------------------------------------------------------------------------------
# Shape-specialised kernels (tuner candidates). The plane sizes are constexpr, so index math folds into
# constants. Loads never need a row/column "inside" mask: the tile's coordinates are clamped into the plane
# (rows/columns past the edge re-read the last one; their results are never stored), so the horizontal term is
# masked by a per-column predicate (computed once per shift on a [1, BW] slice and shared by all rows a thread
# holds) and the vertical term by a per-row one. Addresses are loop-invariant pointer tensors plus one uniform
# scalar offset per shift: per shifted element ~ a 64-bit add, the load, a zero-select and an add (sm_90 SASS:
# 183 instructions per 32 shifted loads in the forward loop, against 349 for the runtime-shape kernel).
# "tile": a [BLOCK_H, BLOCK_W] tile of one plane (whole plane, or row strips over the full width);
# "flat": NPL planes per program, each a [BLOCK] run of its flattened plane (no power-of-2 padding of W; several
# small planes per program for the 7x7 stage). The tables then load as [NPL, 1] vectors.
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _tile_xy(t, H: tl.constexpr, W: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """Tile t of an H x W plane: clamped rows [BH, 1], clamped columns [1, BW], inside mask [BH, BW]."""
    n_tw: tl.constexpr = (W + BLOCK_W - 1) // BLOCK_W
    rows = (t // n_tw) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
    cols = (t % n_tw) * BLOCK_W + tl.arange(0, BLOCK_W)[None, :]
    inside = (rows < H) & (cols < W)
    return tl.minimum(rows, H - 1), tl.minimum(cols, W - 1), inside


@triton.jit
def _flat_xy(pid, n_planes, n_t, H: tl.constexpr, W: tl.constexpr, NPL: tl.constexpr, BLOCK: tl.constexpr):
    """Program pid's NPL planes [NPL, 1] (clamped) and chunk of BLOCK flattened positions: rows, cols [NPL, BLOCK]
    (clamped), inside mask."""
    planes = (pid // n_t) * NPL + tl.arange(0, NPL)[:, None]
    p = (pid % n_t) * BLOCK + tl.arange(0, BLOCK)[None, :]
    inside = (p < H * W) & (planes < n_planes)
    p = tl.minimum(p, H * W - 1)
    return tl.minimum(planes, n_planes - 1), p // W, p % W, inside


@triton.jit
def _gather_c(y_ptr, pad_ptr, ident_ptr, bc, c, hs, ws,
              NK: tl.constexpr, G: tl.constexpr, E: tl.constexpr, HP: tl.constexpr, WP: tl.constexpr,
              F64: tl.constexpr, PF: tl.constexpr):
    """The three forward terms at clamped output coordinates (hs, ws) of channel c (bc = b * R + c); bc, c are
    scalars or [NPL, 1] vectors. Returns fp32 (fp64) accumulators of the broadcast shape."""
    PLANE: tl.constexpr = HP * WP
    y_c = y_ptr + bc.to(tl.int64) * (NK * PLANE)
    off_h = (hs + E) * WP + ws  # horizontal term, before the column shift
    off_v = hs * WP + (ws + E)  # vertical term, before the row shift
    acc0 = tl.zeros((off_h + off_v + c * 0).shape, dtype=tl.float64 if F64 else tl.float32)
    acc1 = acc0
    acc2 = acc0
    tab = pad_ptr + c * (NK * 2 * G)
    p_h = y_c + off_h  # loop-invariant pointer tensors: each load adds one uniform scalar offset
    p_v = y_c + off_v
    if PF:  # software pipelining: plane j+1's first (vertical, g=0) load is issued one iteration early, so its
        # first touch of HBM overlaps plane j's L1-bound work
        s_v = tl.load(tab + G)
        row = hs - s_v
        pre = tl.load(p_v - s_v * WP, mask=(row >= 0) & (row < HP), other=0.0)
    for j in range(NK):
        if PF:
            jn = tl.minimum(j + 1, NK - 1)  # the last iteration re-reads plane NK-1 (unused)
            s_v = tl.load(tab + jn * (2 * G) + G)
            row = hs - s_v
            nxt = tl.load(p_v + (jn * PLANE - s_v * WP), mask=(row >= 0) & (row < HP), other=0.0)
        for g in tl.static_range(G):
            s_h = tl.load(tab + j * (2 * G) + g)
            col = ws - s_h
            v = tl.load(p_h + (j * PLANE - s_h), mask=(col >= 0) & (col < WP), other=0.0)
            acc0 += v.to(acc0.dtype)
            if PF and g == 0:
                v = pre
            else:
                s_v = tl.load(tab + j * (2 * G) + G + g)
                row = hs - s_v
                v = tl.load(p_v + (j * PLANE - s_v * WP), mask=(row >= 0) & (row < HP), other=0.0)
            acc1 += v.to(acc1.dtype)
        if PF:
            pre = nxt
    y_b = y_ptr + (bc - c).to(tl.int64) * (NK * PLANE)  # plane 0 of batch b
    for g in tl.static_range(G):
        k = tl.load(ident_ptr + c * G + g)  # global plane index c*nk + r
        acc2 += tl.load(y_b + k.to(tl.int64) * PLANE + (off_h + E)).to(acc2.dtype)
    return acc0, acc1, acc2


@triton.jit
def _fwd_tile(y_ptr, pad_ptr, ident_ptr, out_ptr, R, term_stride, n_t,
              NK: tl.constexpr, G: tl.constexpr, E: tl.constexpr, H: tl.constexpr, W: tl.constexpr,
              BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, F64: tl.constexpr, PF: tl.constexpr):
    pid = tl.program_id(0)
    bc = pid // n_t
    c = bc % R
    hs, ws, inside = _tile_xy(pid % n_t, H, W, BLOCK_H, BLOCK_W)
    acc0, acc1, acc2 = _gather_c(y_ptr, pad_ptr, ident_ptr, bc, c, hs, ws, NK, G, E, H + 2 * E, W + 2 * E, F64, PF)
    out = out_ptr + bc.to(tl.int64) * (H * W) + (hs * W + ws)
    _store_terms(out, term_stride, acc0, acc1, acc2, inside)


@triton.jit
def _fwd_flat(y_ptr, pad_ptr, ident_ptr, out_ptr, R, term_stride, n_planes, n_t,
              NK: tl.constexpr, G: tl.constexpr, E: tl.constexpr, H: tl.constexpr, W: tl.constexpr,
              NPL: tl.constexpr, BLOCK: tl.constexpr, F64: tl.constexpr, PF: tl.constexpr):
    bc, hs, ws, inside = _flat_xy(tl.program_id(0), n_planes, n_t, H, W, NPL, BLOCK)
    c = bc % R
    acc0, acc1, acc2 = _gather_c(y_ptr, pad_ptr, ident_ptr, bc, c, hs, ws, NK, G, E, H + 2 * E, W + 2 * E, F64, PF)
    out = out_ptr + bc.to(tl.int64) * (H * W) + (hs * W + ws)
    _store_terms(out, term_stride, acc0, acc1, acc2, inside)


@triton.jit
def _eval_epilogue(acc0, acc1, acc2, scale_ptr, bias_ptr, x_ptr, rep_ptr, out_ptr, bc, R, C, hs, ws, inside,
                   H: tl.constexpr, W: tl.constexpr):
    c = bc % R
    b = bc // R
    s0 = tl.load(scale_ptr + c)
    s1 = tl.load(scale_ptr + R + c)
    s2 = tl.load(scale_ptr + 2 * R + c)
    src = tl.load(rep_ptr + c)
    pos = hs * W + ws
    res = tl.load(x_ptr + (b.to(tl.int64) * C + src) * (H * W) + pos)
    val = s0 * acc0 + s1 * acc1 + s2 * acc2 + tl.load(bias_ptr + c) + res.to(acc0.dtype)
    tl.store(out_ptr + (b.to(tl.int64) * C + c) * (H * W) + pos, val.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _eval_tile(y_ptr, pad_ptr, ident_ptr, scale_ptr, bias_ptr, x_ptr, rep_ptr, out_ptr, R, C, n_t,
               NK: tl.constexpr, G: tl.constexpr, E: tl.constexpr, H: tl.constexpr, W: tl.constexpr,
               BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, F64: tl.constexpr, PF: tl.constexpr):
    pid = tl.program_id(0)
    bc = pid // n_t
    hs, ws, inside = _tile_xy(pid % n_t, H, W, BLOCK_H, BLOCK_W)
    acc0, acc1, acc2 = _gather_c(y_ptr, pad_ptr, ident_ptr, bc, bc % R, hs, ws, NK, G, E, H + 2 * E, W + 2 * E,
                                 F64, PF)
    _eval_epilogue(acc0, acc1, acc2, scale_ptr, bias_ptr, x_ptr, rep_ptr, out_ptr, bc, R, C, hs, ws, inside, H, W)


@triton.jit
def _eval_flat(y_ptr, pad_ptr, ident_ptr, scale_ptr, bias_ptr, x_ptr, rep_ptr, out_ptr, R, C, n_planes, n_t,
               NK: tl.constexpr, G: tl.constexpr, E: tl.constexpr, H: tl.constexpr, W: tl.constexpr,
               NPL: tl.constexpr, BLOCK: tl.constexpr, F64: tl.constexpr, PF: tl.constexpr):
    bc, hs, ws, inside = _flat_xy(tl.program_id(0), n_planes, n_t, H, W, NPL, BLOCK)
    acc0, acc1, acc2 = _gather_c(y_ptr, pad_ptr, ident_ptr, bc, bc % R, hs, ws, NK, G, E, H + 2 * E, W + 2 * E,
                                 F64, PF)
    _eval_epilogue(acc0, acc1, acc2, scale_ptr, bias_ptr, x_ptr, rep_ptr, out_ptr, bc, R, C, hs, ws, inside, H, W)


@triton.jit
def _scatter_c(gout_ptr, pad_ptr, ident_ptr, plane_id, R, term_stride, us, vs,
               NK: tl.constexpr, G: tl.constexpr, E: tl.constexpr, H: tl.constexpr, W: tl.constexpr,
               F64: tl.constexpr):
    """Gradient of y plane plane_id = (b * R + c) * NK + j at clamped padded coordinates (us, vs)."""
    j = plane_id % NK
    bc = plane_id // NK
    c = bc % R
    g_c = gout_ptr + bc.to(tl.int64) * (H * W)
    r0 = us - E  # output row read by the horizontal term
    c1 = vs - E  # output column read by the vertical term
    r0_ok = (r0 >= 0) & (r0 < H)
    c1_ok = (c1 >= 0) & (c1 < W)
    off0 = tl.minimum(tl.maximum(r0, 0), H - 1) * W + vs  # row clamped: a safe address, masked by r0_ok
    off1 = us * W + tl.minimum(tl.maximum(c1, 0), W - 1)
    acc = tl.zeros((off0 + off1 + j * 0).shape, dtype=tl.float64 if F64 else tl.float32)
    tab = pad_ptr + (c * NK + j) * (2 * G)
    hits = 0
    p0 = g_c + off0  # loop-invariant pointer tensors: each load adds one uniform scalar offset
    p1 = g_c + term_stride + off1
    for g in tl.static_range(G):
        s_h = tl.load(tab + g)
        s_v = tl.load(tab + G + g)
        col = vs + s_h
        v = tl.load(p0 + s_h, mask=r0_ok & (col >= 0) & (col < W), other=0.0)
        acc += v.to(acc.dtype)
        row = us + s_v
        v = tl.load(p1 + s_v * W, mask=c1_ok & (row >= 0) & (row < H), other=0.0)
        acc += v.to(acc.dtype)
        k = tl.load(ident_ptr + c * G + g)
        hits += (k == c * NK + j).to(tl.int32)
    off2 = tl.minimum(tl.maximum(r0, 0), H - 1) * W + tl.minimum(tl.maximum(c1, 0), W - 1)
    v = tl.load(g_c + 2 * term_stride + off2, mask=r0_ok & c1_ok & (hits > 0), other=0.0)
    return acc + hits.to(acc.dtype) * v.to(acc.dtype)


@triton.jit
def _bwd_tile(gout_ptr, pad_ptr, ident_ptr, gy_ptr, R, term_stride, n_t,
              NK: tl.constexpr, G: tl.constexpr, E: tl.constexpr, H: tl.constexpr, W: tl.constexpr,
              BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, F64: tl.constexpr, PF: tl.constexpr):
    HP: tl.constexpr = H + 2 * E
    WP: tl.constexpr = W + 2 * E
    pid = tl.program_id(0)
    plane_id = pid // n_t
    us, vs, inside = _tile_xy(pid % n_t, HP, WP, BLOCK_H, BLOCK_W)
    acc = _scatter_c(gout_ptr, pad_ptr, ident_ptr, plane_id, R, term_stride, us, vs, NK, G, E, H, W, F64)
    gy = gy_ptr + plane_id.to(tl.int64) * (HP * WP) + (us * WP + vs)
    tl.store(gy, acc.to(gy_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _bwd_flat(gout_ptr, pad_ptr, ident_ptr, gy_ptr, R, term_stride, n_planes, n_t,
              NK: tl.constexpr, G: tl.constexpr, E: tl.constexpr, H: tl.constexpr, W: tl.constexpr,
              NPL: tl.constexpr, BLOCK: tl.constexpr, F64: tl.constexpr, PF: tl.constexpr):
    HP: tl.constexpr = H + 2 * E
    WP: tl.constexpr = W + 2 * E
    plane_id, us, vs, inside = _flat_xy(tl.program_id(0), n_planes, n_t, HP, WP, NPL, BLOCK)
    acc = _scatter_c(gout_ptr, pad_ptr, ident_ptr, plane_id, R, term_stride, us, vs, NK, G, E, H, W, F64)
    gy = gy_ptr + plane_id.to(tl.int64) * (HP * WP) + (us * WP + vs)
    tl.store(gy, acc.to(gy_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _dot1(a, m, acc, DATA_LEFT: tl.constexpr, EMULATE: tl.constexpr):
    # (if / else, not an early return: the compiler also builds the code after a constexpr-taken return)
    if EMULATE:  # Triton's interpreter mishandles bf16 dots: the same (exactly representable) values in fp32
        if DATA_LEFT:
            acc = tl.dot(a.to(acc.dtype), m.to(acc.dtype), acc, input_precision="ieee")
        else:
            acc = tl.dot(m.to(acc.dtype), a.to(acc.dtype), acc, input_precision="ieee")
    elif DATA_LEFT:
        acc = tl.dot(a, m, acc)
    else:
        acc = tl.dot(m, a, acc)
    return acc


@triton.jit
def _dot_data(d, m, acc, DATA_LEFT: tl.constexpr, F64: tl.constexpr, SPLIT: tl.constexpr, EMULATE: tl.constexpr):
    """acc + d @ m (DATA_LEFT) or acc + m @ d, m a matrix of small integer counts (exact in any float type).
    fp32 data is split into three bf16 parts (8 + 8 + 8 significand bits, exact), so every tensor-core product is
    exact and the result is an fp32-accumulated sum like the other kernels'."""
    if F64:
        acc = _dot1(d.to(tl.float64), m.to(tl.float64), acc, DATA_LEFT, False)
    elif SPLIT:
        mm = m.to(tl.bfloat16)
        hi = d.to(tl.bfloat16)
        rest = d - hi.to(tl.float32)
        mid = rest.to(tl.bfloat16)
        lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
        acc = _dot1(hi, mm, acc, DATA_LEFT, EMULATE)
        acc = _dot1(mid, mm, acc, DATA_LEFT, EMULATE)
        acc = _dot1(lo, mm, acc, DATA_LEFT, EMULATE)
    else:
        acc = _dot1(d, m.to(d.dtype), acc, DATA_LEFT, EMULATE)
    return acc


@triton.jit
def _count_matrix(diff, tab, G: tl.constexpr, SIGN: tl.constexpr):
    """[P, P] int32: m[u, w] = #{g < G: diff[u, w] == SIGN * tab[g]}."""
    m = diff * 0
    for g in tl.static_range(G):
        m += (diff == SIGN * tl.load(tab + g)).to(tl.int32)
    return m


@triton.jit
def _identity_term(p_b, ident_ptr, c, mask, dtype: tl.constexpr, G: tl.constexpr, PLANE: tl.constexpr):
    """The identity term of channel c: the sum of its G planes idx_identity[c, g] (global plane indices c*nk + r)
    at the pointers ``p_b`` into plane 0 of the image, as ``dtype``; zero where ``mask`` is false."""
    acc = tl.zeros(p_b.shape, dtype=dtype)
    for g in tl.static_range(G):
        k = tl.load(ident_ptr + c * G + g)
        acc += tl.load(p_b + k.to(tl.int64) * PLANE, mask=mask, other=0.0).to(dtype)
    return acc


@triton.jit
def _channel_idents(ident_ptr, c, G: tl.constexpr):
    """Channel c's G identity planes (global plane numbers c*nk + r), loaded once, before a loop over its planes."""
    ids = ()
    for g in tl.static_range(G):
        ids = ids + (tl.load(ident_ptr + c * G + g),)
    return ids


@triton.jit
def _hits(ids, plane, G: tl.constexpr):
    """How many of the identity planes ``ids`` are ``plane`` (int32): its weight in the identity term."""
    hits = 0
    for g in tl.static_range(G):
        hits += (ids[g] == plane).to(tl.int32)
    return hits


@triton.jit
def _rotated_plane(jj, b, NK: tl.constexpr, S: tl.constexpr):
    """Plane index of loop step jj for the program whose first image is b: the programs of one channel start at
    different planes (b // S mod nk), so the ones running together read different count matrices (many programs
    reading the same L2 lines at once is slower: H200, stage-2 backward 0.128 -> 0.117 ms)."""
    j = jj + (b // S) % NK
    return tl.where(j >= NK, j - NK, j)


@triton.jit
def _gather_dot(y_ptr, pad_ptr, ident_ptr, bc, c, r, q,
                NK: tl.constexpr, G: tl.constexpr, E: tl.constexpr, H: tl.constexpr, W: tl.constexpr,
                F64: tl.constexpr, SPLIT: tl.constexpr, EMULATE: tl.constexpr):
    """The three forward terms of one plane as [P, P] tiles (r: rows [P, 1], q: columns [1, P]) with the shifts
    as matrix products: horizontal = sum_j Y_j[h+e, :] @ Mh_j, Mh_j[v, w] = #{g: v + s_h = w}; vertical =
    sum_j Mv_j @ Y_j[:, w+e], Mv_j[h, u] = #{g: u + s_v = h}. Each y plane is read unshifted (twice, the second
    an L1 hit); out-of-range shifts simply match no row/column of the zero-padded tile."""
    HP: tl.constexpr = H + 2 * E
    WP: tl.constexpr = W + 2 * E
    PLANE: tl.constexpr = HP * WP
    y_c = y_ptr + bc.to(tl.int64) * (NK * PLANE)
    p_h = y_c + ((r + E) * WP + q)
    m_h = (r < H) & (q < WP)
    p_v = y_c + (r * WP + (q + E))
    m_v = (r < HP) & (q < W)
    acc0 = tl.zeros((r + q).shape, dtype=tl.float64 if F64 else tl.float32)
    acc1 = acc0
    tab = pad_ptr + c * (NK * 2 * G)
    diff = q - r  # Mh[v, w] counts s_h == w - v; Mv[h, u] counts s_v == h - u
    for j in range(NK):
        yh = tl.load(p_h + j * PLANE, mask=m_h, other=0.0)
        yv = tl.load(p_v + j * PLANE, mask=m_v, other=0.0)
        mh = _count_matrix(diff, tab + j * (2 * G), G, 1)
        mv = _count_matrix(diff, tab + j * (2 * G) + G, G, -1)
        acc0 = _dot_data(yh, mh.to(tl.float32), acc0, True, F64, SPLIT, EMULATE)
        acc1 = _dot_data(yv, mv.to(tl.float32), acc1, False, F64, SPLIT, EMULATE)
    inside = (r < H) & (q < W)
    p_b = y_ptr + (bc - c).to(tl.int64) * (NK * PLANE) + ((r + E) * WP + (q + E))
    return acc0, acc1, _identity_term(p_b, ident_ptr, c, inside, acc0.dtype, G, PLANE), inside


@triton.jit
def _fwd_dot(y_ptr, pad_ptr, ident_ptr, out_ptr, R, term_stride,
             NK: tl.constexpr, G: tl.constexpr, E: tl.constexpr, H: tl.constexpr, W: tl.constexpr,
             P: tl.constexpr, F64: tl.constexpr, SPLIT: tl.constexpr, EMULATE: tl.constexpr):
    bc = tl.program_id(0)
    r = tl.arange(0, P)[:, None]
    q = tl.arange(0, P)[None, :]
    acc0, acc1, acc2, inside = _gather_dot(y_ptr, pad_ptr, ident_ptr, bc, bc % R, r, q, NK, G, E, H, W, F64, SPLIT,
                                                  EMULATE)
    out = out_ptr + bc.to(tl.int64) * (H * W) + (tl.minimum(r, H - 1) * W + tl.minimum(q, W - 1))
    _store_terms(out, term_stride, acc0, acc1, acc2, inside)


@triton.jit
def _eval_dot(y_ptr, pad_ptr, ident_ptr, scale_ptr, bias_ptr, x_ptr, rep_ptr, out_ptr, R, C,
              NK: tl.constexpr, G: tl.constexpr, E: tl.constexpr, H: tl.constexpr, W: tl.constexpr,
              P: tl.constexpr, F64: tl.constexpr, SPLIT: tl.constexpr, EMULATE: tl.constexpr):
    bc = tl.program_id(0)
    r = tl.arange(0, P)[:, None]
    q = tl.arange(0, P)[None, :]
    acc0, acc1, acc2, inside = _gather_dot(y_ptr, pad_ptr, ident_ptr, bc, bc % R, r, q, NK, G, E, H, W, F64, SPLIT,
                                                  EMULATE)
    _eval_epilogue(acc0, acc1, acc2, scale_ptr, bias_ptr, x_ptr, rep_ptr, out_ptr, bc, R, C,
                   tl.minimum(r, H - 1), tl.minimum(q, W - 1), inside, H, W)


@triton.jit
def _bwd_dot(gout_ptr, pad_ptr, ident_ptr, gy_ptr, R, term_stride,
             NK: tl.constexpr, G: tl.constexpr, E: tl.constexpr, H: tl.constexpr, W: tl.constexpr,
             P: tl.constexpr, F64: tl.constexpr, SPLIT: tl.constexpr, EMULATE: tl.constexpr):
    """Gradient of one y plane (b * R + c) * NK + j as matrix products on a [P, P] tile of the padded plane:
    gy = G0 @ Bh + Bv @ G1 + hits * G2, with G0[u, w] = gout0[u-e, w], Bh[w, v] = #{g: w = v + s_h},
    G1[t, v] = gout1[t, v-e], Bv[u, t] = #{g: t = u + s_v}, G2[u, v] = gout2[u-e, v-e]."""
    HP: tl.constexpr = H + 2 * E
    WP: tl.constexpr = W + 2 * E
    plane_id = tl.program_id(0)
    j = plane_id % NK
    bc = plane_id // NK
    c = bc % R
    r = tl.arange(0, P)[:, None]
    q = tl.arange(0, P)[None, :]
    g_c = gout_ptr + bc.to(tl.int64) * (H * W)
    r0 = r - E
    c1 = q - E
    r0_ok = (r0 >= 0) & (r0 < H)
    c1_ok = (c1 >= 0) & (c1 < W)
    g0 = tl.load(g_c + (tl.minimum(tl.maximum(r0, 0), H - 1) * W + tl.minimum(q, W - 1)), mask=r0_ok & (q < W),
                 other=0.0)
    g1 = tl.load(g_c + term_stride + (tl.minimum(r, H - 1) * W + tl.minimum(tl.maximum(c1, 0), W - 1)),
                 mask=(r < H) & c1_ok, other=0.0)
    diff = r - q  # Bh[w, v] counts s_h == w - v; Bv[u, t] counts s_v == t - u
    tab = pad_ptr + (c * NK + j) * (2 * G)
    bh = _count_matrix(diff, tab, G, 1)
    bv = _count_matrix(diff, tab + G, G, -1)
    hits = 0
    for g in tl.static_range(G):
        hits += (tl.load(ident_ptr + c * G + g) == c * NK + j).to(tl.int32)
    acc = tl.zeros((r + q).shape, dtype=tl.float64 if F64 else tl.float32)
    acc = _dot_data(g0, bh.to(tl.float32), acc, True, F64, SPLIT, EMULATE)
    acc = _dot_data(g1, bv.to(tl.float32), acc, False, F64, SPLIT, EMULATE)
    off2 = tl.minimum(tl.maximum(r0, 0), H - 1) * W + tl.minimum(tl.maximum(c1, 0), W - 1)
    v = tl.load(g_c + 2 * term_stride + off2, mask=r0_ok & c1_ok & (hits > 0), other=0.0)
    acc += hits.to(acc.dtype) * v.to(acc.dtype)
    inside = (r < HP) & (q < WP)
    gy = gy_ptr + plane_id.to(tl.int64) * (HP * WP) + (tl.minimum(r, HP - 1) * WP + tl.minimum(q, WP - 1))
    tl.store(gy, acc.to(gy_ptr.dtype.element_ty), mask=inside)


# "dotb": the "dot" kernels with NB images of one channel per program, as batched [NB, P, P] products: the count
# matrices depend on the channel and the small kernel only, so each is built once for NB images (at P = 64 building
# them costs more instructions than the loads and the products together).


@triton.jit
def _batched(m, NB: tl.constexpr, P: tl.constexpr):
    return tl.broadcast_to(m.to(tl.float32)[None, :, :], (NB, P, P))


@triton.jit
def _gather_dotb(y_ptr, pad_ptr, ident_ptr, b, b_ok, c, R, r, q,
                 NK: tl.constexpr, G: tl.constexpr, E: tl.constexpr, H: tl.constexpr, W: tl.constexpr,
                 NB: tl.constexpr, P: tl.constexpr, F64: tl.constexpr, SPLIT: tl.constexpr, EMULATE: tl.constexpr):
    """_gather_dot for the NB images b [NB, 1, 1] of channel c (r: rows [1, P, 1], q: columns [1, 1, P])."""
    HP: tl.constexpr = H + 2 * E
    WP: tl.constexpr = W + 2 * E
    PLANE: tl.constexpr = HP * WP
    y_c = y_ptr + (b * R + c).to(tl.int64) * (NK * PLANE)
    p_h = y_c + ((r + E) * WP + q)
    m_h = b_ok & (r < H) & (q < WP)
    p_v = y_c + (r * WP + (q + E))
    m_v = b_ok & (r < HP) & (q < W)
    acc0 = tl.zeros((NB, P, P), dtype=tl.float64 if F64 else tl.float32)
    acc1 = acc0
    tab = pad_ptr + c * (NK * 2 * G)
    diff = tl.arange(0, P)[None, :] - tl.arange(0, P)[:, None]   # [P, P]: w - v (columns minus rows)
    for j in range(NK):
        yh = tl.load(p_h + j * PLANE, mask=m_h, other=0.0)
        yv = tl.load(p_v + j * PLANE, mask=m_v, other=0.0)
        mh = _batched(_count_matrix(diff, tab + j * (2 * G), G, 1), NB, P)
        mv = _batched(_count_matrix(diff, tab + j * (2 * G) + G, G, -1), NB, P)
        acc0 = _dot_data(yh, mh, acc0, True, F64, SPLIT, EMULATE)
        acc1 = _dot_data(yv, mv, acc1, False, F64, SPLIT, EMULATE)
    inside = b_ok & (r < H) & (q < W)
    p_b = y_ptr + (b * R).to(tl.int64) * (NK * PLANE) + ((r + E) * WP + (q + E))
    return acc0, acc1, _identity_term(p_b, ident_ptr, c, inside, acc0.dtype, G, PLANE), inside


@triton.jit
def _dotb_coords(B, R, NB: tl.constexpr, P: tl.constexpr):
    """Program -> channel c, its NB images b [NB, 1, 1] (clamped) and their mask, rows r [1, P, 1], columns
    q [1, 1, P]."""
    pid = tl.program_id(0)
    c = pid % R
    b = (pid // R) * NB + tl.arange(0, NB)[:, None, None]
    b_ok = b < B
    return c, tl.minimum(b, B - 1), b_ok, tl.arange(0, P)[None, :, None], tl.arange(0, P)[None, None, :]


@triton.jit
def _fwd_dotb(y_ptr, pad_ptr, ident_ptr, out_ptr, R, term_stride, B,
              NK: tl.constexpr, G: tl.constexpr, E: tl.constexpr, H: tl.constexpr, W: tl.constexpr,
              P: tl.constexpr, NB: tl.constexpr, F64: tl.constexpr, SPLIT: tl.constexpr, EMULATE: tl.constexpr):
    c, b, b_ok, r, q = _dotb_coords(B, R, NB, P)
    acc0, acc1, acc2, inside = _gather_dotb(y_ptr, pad_ptr, ident_ptr, b, b_ok, c, R, r, q, NK, G, E, H, W, NB, P,
                                            F64, SPLIT, EMULATE)
    out = out_ptr + (b * R + c).to(tl.int64) * (H * W) + (tl.minimum(r, H - 1) * W + tl.minimum(q, W - 1))
    _store_terms(out, term_stride, acc0, acc1, acc2, inside)


@triton.jit
def _eval_dotb(y_ptr, pad_ptr, ident_ptr, scale_ptr, bias_ptr, x_ptr, rep_ptr, out_ptr, R, C, B,
               NK: tl.constexpr, G: tl.constexpr, E: tl.constexpr, H: tl.constexpr, W: tl.constexpr,
               P: tl.constexpr, NB: tl.constexpr, F64: tl.constexpr, SPLIT: tl.constexpr, EMULATE: tl.constexpr):
    c, b, b_ok, r, q = _dotb_coords(B, R, NB, P)
    acc0, acc1, acc2, inside = _gather_dotb(y_ptr, pad_ptr, ident_ptr, b, b_ok, c, R, r, q, NK, G, E, H, W, NB, P,
                                            F64, SPLIT, EMULATE)
    _eval_epilogue(acc0, acc1, acc2, scale_ptr, bias_ptr, x_ptr, rep_ptr, out_ptr, b * R + c, R, C,
                   tl.minimum(r, H - 1), tl.minimum(q, W - 1), inside, H, W)


@triton.jit
def _bwd_dotb(gout_ptr, pad_ptr, ident_ptr, gy_ptr, R, term_stride, B,
              NK: tl.constexpr, G: tl.constexpr, E: tl.constexpr, H: tl.constexpr, W: tl.constexpr,
              P: tl.constexpr, NB: tl.constexpr, F64: tl.constexpr, SPLIT: tl.constexpr, EMULATE: tl.constexpr):
    """_bwd_dot for plane j of channel c in NB images: the programs of one image group and channel are adjacent
    (j fastest), so they share its gout planes in L2."""
    HP: tl.constexpr = H + 2 * E
    WP: tl.constexpr = W + 2 * E
    pid = tl.program_id(0)
    j = pid % NK
    c = (pid // NK) % R
    b = (pid // (NK * R)) * NB + tl.arange(0, NB)[:, None, None]
    b_ok = b < B
    b = tl.minimum(b, B - 1)
    r = tl.arange(0, P)[None, :, None]
    q = tl.arange(0, P)[None, None, :]
    g_c = gout_ptr + (b * R + c).to(tl.int64) * (H * W)
    r0 = r - E
    c1 = q - E
    r0_ok = b_ok & (r0 >= 0) & (r0 < H)
    c1_ok = b_ok & (c1 >= 0) & (c1 < W)
    g0 = tl.load(g_c + (tl.minimum(tl.maximum(r0, 0), H - 1) * W + tl.minimum(q, W - 1)), mask=r0_ok & (q < W),
                 other=0.0)
    g1 = tl.load(g_c + term_stride + (tl.minimum(r, H - 1) * W + tl.minimum(tl.maximum(c1, 0), W - 1)),
                 mask=b_ok & (r < H) & c1_ok, other=0.0)
    diff = tl.arange(0, P)[:, None] - tl.arange(0, P)[None, :]   # [P, P]: rows minus columns
    tab = pad_ptr + (c * NK + j) * (2 * G)
    bh = _batched(_count_matrix(diff, tab, G, 1), NB, P)
    bv = _batched(_count_matrix(diff, tab + G, G, -1), NB, P)
    hits = 0
    for g in tl.static_range(G):
        hits += (tl.load(ident_ptr + c * G + g) == c * NK + j).to(tl.int32)
    acc = tl.zeros((NB, P, P), dtype=tl.float64 if F64 else tl.float32)
    acc = _dot_data(g0, bh, acc, True, F64, SPLIT, EMULATE)
    acc = _dot_data(g1, bv, acc, False, F64, SPLIT, EMULATE)
    off2 = tl.minimum(tl.maximum(r0, 0), H - 1) * W + tl.minimum(tl.maximum(c1, 0), W - 1)
    v = tl.load(g_c + 2 * term_stride + off2, mask=r0_ok & c1_ok & (hits > 0), other=0.0)
    acc += hits.to(acc.dtype) * v.to(acc.dtype)
    inside = b_ok & (r < HP) & (q < WP)
    gy = gy_ptr + ((b * R + c) * NK + j).to(tl.int64) * (HP * WP) + (tl.minimum(r, HP - 1) * WP
                                                                     + tl.minimum(q, WP - 1))
    tl.store(gy, acc.to(gy_ptr.dtype.element_ty), mask=inside)


# "tc2" / "tc3": the tensor-core kernels with the count matrices built once per table on the host side
# (:func:`count_matrices`, kept per ``pad_hv`` tensor) instead of per program. All of a program's [P, P] tiles
# index the padded plane (u, v) of y, the output sitting at (u - e, v - CO - e) (CO: y's pad columns per row side);
# the matrices carry the e offset: M[c, j, d][k, n] = #{g: n - k == pad_hv[c*nk+j, d*G+g] + e}.
# "tc2": NB images of one channel stacked along the product's rows. Forward: out0 = Y @ Mh (rows (b, u),
# contracting v), out1 transposed = Y^T @ Mv (rows (b, v), contracting u), so one load of each y plane feeds both
# directions. Backward: gy = G0 @ Mh^T + (G1^T @ Mv^T)^T, the three gradient planes loaded once per program and the
# nk input planes written from it.


@triton.jit
def _channel_major(B, NB: tl.constexpr):
    """Program -> channel c and its first image b0, the programs of one channel adjacent (they share its count
    matrices in L2 while they run)."""
    pid = tl.program_id(0)
    n_bg = (B + NB - 1) // NB
    return pid // n_bg, (pid % n_bg) * NB


@triton.jit
def _tc_coords(B, NB: tl.constexpr, P: tl.constexpr):
    """Program -> channel c, its first image b0, its NB images b [NB, 1, 1] (clamped) and their mask, padded rows
    u [1, P, 1] and columns v [1, 1, P] (:func:`_channel_major` order)."""
    c, b0 = _channel_major(B, NB)
    b = b0 + tl.arange(0, NB)[:, None, None]
    b_ok = b < B
    return c, b0, tl.minimum(b, B - 1), b_ok, tl.arange(0, P)[None, :, None], tl.arange(0, P)[None, None, :]


@triton.jit
def _rows(t, NB: tl.constexpr, P: tl.constexpr):
    return tl.reshape(t, (NB * P, P))


@triton.jit
def _planes(t, NB: tl.constexpr, P: tl.constexpr, TRANS: tl.constexpr):
    t = tl.reshape(t, (NB, P, P))
    if TRANS:
        t = tl.permute(t, (0, 2, 1))
    return t


@triton.jit
def _channel_mats(mat_ptr, c, NK: tl.constexpr, P: tl.constexpr):
    """Pointers [P, P] to channel c's first count matrix, row-major (matrix i of small kernel j at offset (2j + i) *
    P * P). A transposed operand is loaded as stored and transposed as a tile (a view of the shared-memory copy: the
    loads stay 16-byte)."""
    k = tl.arange(0, P)[:, None]
    n = tl.arange(0, P)[None, :]
    return mat_ptr + c.to(tl.int64) * (NK * 2 * P * P) + (k * P + n)


@triton.jit
def _grid_2d(b0, B, NB: tl.constexpr, P: tl.constexpr):
    """The [NB*P, P] product grid of images b0..b0+NB: rows (image, r) [NB*P, 1], columns [1, P], each row's image
    (clamped) and whether it exists."""
    rows = tl.arange(0, NB * P)[:, None]
    b_r = b0 + rows // P
    return rows % P, tl.arange(0, P)[None, :], tl.minimum(b_r, B - 1), b_r < B


@triton.jit
def _inside_output(ok, u, q, E: tl.constexpr, H: tl.constexpr, W: tl.constexpr, CO: tl.constexpr):
    """The output positions of y's padded grid (rows u, columns q): u in [e, H+e), q in [CO+e, CO+W+e)."""
    return ok & (u >= E) & (u < H + E) & (q >= CO + E) & (q < CO + W + E)


@triton.jit
def _products_2d(y_ptr, mat, ident_ptr, b0, c, R, B, NK: tl.constexpr, G: tl.constexpr, E: tl.constexpr,
                 H: tl.constexpr, W: tl.constexpr, NB: tl.constexpr, P: tl.constexpr, F64: tl.constexpr,
                 SPLIT: tl.constexpr, EMULATE: tl.constexpr, CO: tl.constexpr):
    """The two shifted terms as [NB*P, P] products: acc0[(b, u), n] (out0 at (u-e, n-CO-e)) and acc1[(b, v), n]
    (out1 at (n-e, v-CO-e)), and the identity term acc2 on acc0's grid (each plane, weighted by its hits, as it
    passes: no second read of the identity planes; fp32 data reads them after the loop instead). Each plane is
    loaded directly as the products' operand (the compiler stages such loads in shared memory ahead of use): once
    for one image (the second operand is its transpose), else twice (the second load an L1/L2 hit). CO: the zero
    columns on each side of y's rows (rows of RS = W + 2e + 2*CO elements; with RS == P the column mask folds away
    and whole rows load unmasked: a 16-byte-aligned RS gives 16-byte copies)."""
    HP: tl.constexpr = H + 2 * E
    RS: tl.constexpr = W + 2 * E + 2 * CO
    PLANE: tl.constexpr = HP * RS
    r, cols, b_r, ok = _grid_2d(b0, B, NB, P)
    base = y_ptr + (b_r * R + c).to(tl.int64) * (NK * PLANE)
    p_0 = base + (r * RS + cols)
    p_1 = base + (cols * RS + r)
    m_0 = ok & (r < HP) & (cols < RS)
    m_1 = ok & (r < RS) & (cols < HP)
    acc0 = tl.zeros((NB * P, P), dtype=tl.float64 if F64 else tl.float32)
    acc1 = acc0
    acc2 = acc0
    ids = _channel_idents(ident_ptr, c, G)
    for jj in range(NK):
        j = _rotated_plane(jj, b0, NK, NB)
        a0 = tl.load(p_0 + j * PLANE, mask=m_0, other=0.0)
        if NB == 1:
            a1 = tl.trans(a0)
        else:
            a1 = tl.load(p_1 + j * PLANE, mask=m_1, other=0.0)
        mh = tl.load(mat + (2 * j) * (P * P))
        mv = tl.load(mat + (2 * j + 1) * (P * P))
        acc0 = _dot_data(a0, mh, acc0, True, F64, SPLIT, EMULATE)
        acc1 = _dot_data(a1, mv, acc1, True, F64, SPLIT, EMULATE)
        if not SPLIT:
            acc2 += _hits(ids, c * NK + j, G).to(acc2.dtype) * a0.to(acc2.dtype)
    if SPLIT:   # fp32: a third accumulator beside the split products spills; the G identity planes are read again
        acc2 = _identity_term(y_ptr + (b_r * R).to(tl.int64) * (NK * PLANE) + (r * RS + cols), ident_ptr, c, m_0,
                              acc2.dtype, G, PLANE)
    return acc0, acc1, acc2


@triton.jit
def _gather_tc(y_ptr, mat_ptr, ident_ptr, b0, b, b_ok, c, R, B, u, v,
               NK: tl.constexpr, G: tl.constexpr, E: tl.constexpr, H: tl.constexpr, W: tl.constexpr,
               NB: tl.constexpr, P: tl.constexpr, F64: tl.constexpr, SPLIT: tl.constexpr, EMULATE: tl.constexpr):
    """The three forward terms of channel c for the NB images b (plain rows), as [NB, P, P] tiles of the padded
    grid (the products of :func:`_products_2d`, the vertical one permuted)."""
    mat = _channel_mats(mat_ptr, c, NK, P)
    acc0, acc1, acc2 = _products_2d(y_ptr, mat, ident_ptr, b0, c, R, B, NK, G, E, H, W, NB, P, F64, SPLIT, EMULATE, 0)
    inside = _inside_output(b_ok, u, v, E, H, W, 0)
    return _planes(acc0, NB, P, False), _planes(acc1, NB, P, True), _planes(acc2, NB, P, False), inside


@triton.jit
def _fwd_tc(y_ptr, mat_ptr, ident_ptr, out_ptr, R, term_stride, B,
            NK: tl.constexpr, G: tl.constexpr, E: tl.constexpr, H: tl.constexpr, W: tl.constexpr,
            P: tl.constexpr, NB: tl.constexpr, F64: tl.constexpr, SPLIT: tl.constexpr, EMULATE: tl.constexpr,
            CO: tl.constexpr):
    """The three terms stored straight from the [NB*P, P] products (no layout conversion)."""
    c, b0, _, _, _, _ = _tc_coords(B, NB, P)
    mat = _channel_mats(mat_ptr, c, NK, P)
    acc0, acc1, acc2 = _products_2d(y_ptr, mat, ident_ptr, b0, c, R, B, NK, G, E, H, W, NB, P, F64, SPLIT, EMULATE,
                                    CO)
    r, cols, b_r, ok = _grid_2d(b0, B, NB, P)
    o_c = out_ptr + (b_r * R + c).to(tl.int64) * (H * W)
    ty = out_ptr.dtype.element_ty
    in0 = _inside_output(ok, r, cols, E, H, W, CO)
    tl.store(o_c + ((r - E) * W + (cols - (CO + E))), acc0.to(ty), mask=in0)
    in1 = _inside_output(ok, cols, r, E, H, W, CO)
    tl.store(o_c + term_stride + ((cols - E) * W + (r - (CO + E))), acc1.to(ty), mask=in1)
    tl.store(o_c + 2 * term_stride + ((r - E) * W + (cols - (CO + E))), acc2.to(ty), mask=in0)


@triton.jit
def _eval_tc(y_ptr, mat_ptr, ident_ptr, scale_ptr, bias_ptr, x_ptr, rep_ptr, out_ptr, R, C, B,
             NK: tl.constexpr, G: tl.constexpr, E: tl.constexpr, H: tl.constexpr, W: tl.constexpr,
             P: tl.constexpr, NB: tl.constexpr, F64: tl.constexpr, SPLIT: tl.constexpr, EMULATE: tl.constexpr):
    c, b0, b, b_ok, u, v = _tc_coords(B, NB, P)
    acc0, acc1, acc2, inside = _gather_tc(y_ptr, mat_ptr, ident_ptr, b0, b, b_ok, c, R, B, u, v, NK, G, E, H, W,
                                          NB, P, F64, SPLIT, EMULATE)
    _eval_epilogue(acc0, acc1, acc2, scale_ptr, bias_ptr, x_ptr, rep_ptr, out_ptr, b * R + c, R, C,
                   tl.minimum(tl.maximum(u - E, 0), H - 1), tl.minimum(tl.maximum(v - E, 0), W - 1), inside, H, W)


@triton.jit
def _bwd_tc(gout_ptr, mat_ptr, ident_ptr, gy_ptr, R, term_stride, B,
            NK: tl.constexpr, G: tl.constexpr, E: tl.constexpr, H: tl.constexpr, W: tl.constexpr,
            P: tl.constexpr, NB: tl.constexpr, F64: tl.constexpr, SPLIT: tl.constexpr, EMULATE: tl.constexpr,
            CO: tl.constexpr):
    """Gradient of the nk y planes of channel c for NB images: G0[u, n] = gout0[u-e, n-CO-e], G1t[v, n] =
    gout1[n-e, v-CO-e] (a transposed load), G2[u, v] = gout2[u-e, v-CO-e]; plane j = G0 @ Mh_j^T + (G1t @ Mv_j^T)^T
    + hits_j * G2, hits_j = #{g: idx_identity[c, g] == c*nk + j}; the CO pad columns of each side of a row get
    zeros (Mh_j's rows are zero there)."""
    HP: tl.constexpr = H + 2 * E
    RS: tl.constexpr = W + 2 * E + 2 * CO
    c, b0, b, b_ok, u, v = _tc_coords(B, NB, P)
    g_c = gout_ptr + (b * R + c).to(tl.int64) * (H * W)
    inside = _inside_output(b_ok, u, v, E, H, W, CO)
    off = (u - E) * W + (v - (CO + E))   # (outside the plane only where masked)
    g0 = tl.load(g_c + off, mask=inside, other=0.0)
    # rows index (padded) columns and vice versa
    inside_t = _inside_output(b_ok, v, u, E, H, W, CO)
    g1t = tl.load(g_c + term_stride + (tl.minimum(tl.maximum(v - E, 0), H - 1) * W
                                       + tl.minimum(tl.maximum(u - (CO + E), 0), W - 1)), mask=inside_t, other=0.0)
    g2 = tl.load(g_c + 2 * term_stride + off, mask=inside, other=0.0)
    g2 = g2.to(tl.float64 if F64 else tl.float32)
    a0 = _rows(g0, NB, P)
    a1 = _rows(g1t, NB, P)
    mat = _channel_mats(mat_ptr, c, NK, P)
    p_gy = gy_ptr + ((b * R + c) * NK).to(tl.int64) * (HP * RS) + (u * RS + v)
    m_gy = b_ok & (u < HP) & (v < RS)
    zero = tl.zeros((NB * P, P), dtype=tl.float64 if F64 else tl.float32)
    ids = _channel_idents(ident_ptr, c, G)
    for jj in range(NK):
        j = _rotated_plane(jj, b0, NK, NB)
        mh_t = tl.trans(tl.load(mat + (2 * j) * (P * P)))
        mv_t = tl.trans(tl.load(mat + (2 * j + 1) * (P * P)))
        acc = _planes(_dot_data(a0, mh_t, zero, True, F64, SPLIT, EMULATE), NB, P, False)
        acc += _planes(_dot_data(a1, mv_t, zero, True, F64, SPLIT, EMULATE), NB, P, True)
        acc += _hits(ids, c * NK + j, G).to(acc.dtype) * g2
        tl.store(p_gy + j * (HP * RS), acc.to(gy_ptr.dtype.element_ty), mask=m_gy)


# "tc3": every term on the padded grid (u, q) of y, so no transposes: out0 = Y @ Mh (Y the product's left
# operand), out1 = Mv^T @ Y (Y the right operand: the same shared-memory tile), stored row by row like y; backward
# gy_j = G0 @ Mh_j^T + Mv_j @ G1 + hits_j * G2 with the three gradient planes on the same grid. Planes narrower than
# 64 are stacked: S = 64 / P images' planes one above the other in one [S*P, P] tile, so every product has 64 rows
# (the tensor cores' warpgroup tile); the vertical shift then takes the block-diagonal BD_S(Mv) (S copies of Mv on
# the diagonal, loaded as such: zeros off the blocks). One or two such groups per program (two: each matrix tile serves
# both). "tc3d": y's planes (forward) and gy's (backward) moved by the tensor memory accelerator (TMA, Hopper) as [S, 1,
# P, P] boxes straight into / out of shared memory (rows past the plane, and images past the batch, arrive as zeros /
# are clipped); needs y's rows 16-byte aligned (the padded training layout).


@triton.jit
def _stacked_mats(mat_ptr, mat_desc, c, j, NK: tl.constexpr, P: tl.constexpr, S: tl.constexpr):
    """Mh_j [P, P] and BD_S(Mv_j) [S*P, S*P] of channel c, as stored ([k, n]; a transposed operand is the loaded
    tile's transposed view). ``mat_desc`` (not None): Mh, and Mv when S == 1, through the TMA."""
    p_mh = _channel_mats(mat_ptr, c, NK, P) + j * (2 * P * P)   # Mv_j: P * P further
    if mat_desc is None:
        mh = tl.load(p_mh)
    else:
        mh = mat_desc.load([(c * NK + j) * 2, 0, 0]).reshape(P, P)
    if S == 1:
        if mat_desc is None:
            mv = tl.load(p_mh + P * P)
        else:
            mv = mat_desc.load([(c * NK + j) * 2 + 1, 0, 0]).reshape(P, P)
    else:
        rr = tl.arange(0, S * P)[:, None]
        cc = tl.arange(0, S * P)[None, :]
        p_mv = mat_ptr + (c * NK + j).to(tl.int64) * (2 * P * P) + P * P
        mv = tl.load(p_mv + ((rr % P) * P + cc % P), mask=rr // P == cc // P, other=0.0)
    return mh, mv


@triton.jit
def _stacked_planes(y_ptr, y_desc, b, B, c, R, j, NK: tl.constexpr, HP: tl.constexpr, RS: tl.constexpr,
                    P: tl.constexpr, S: tl.constexpr):
    """Plane j of channel c for images b .. b+S-1, stacked [S*P, P] (zeros past the plane and the batch)."""
    if y_desc is None:
        u, q, bi, ok = _grid_2d(b, B, S, P)
        p = y_ptr + ((bi * R + c) * NK + j).to(tl.int64) * (HP * RS) + (u * RS + q)
        a = tl.load(p, mask=ok & (u < HP) & (q < RS), other=0.0)
    else:
        a = y_desc.load([b, c * NK + j, 0, 0]).reshape(S * P, P)
    return a


@triton.jit
def _tc3_products(y_ptr, y_desc, mat_ptr, mat_desc, ident_ptr, c, b, B, R, NK: tl.constexpr, G: tl.constexpr,
                  E: tl.constexpr, H: tl.constexpr, W: tl.constexpr, P: tl.constexpr, S: tl.constexpr, NB: tl.constexpr,
                  F64: tl.constexpr, SPLIT: tl.constexpr, EMULATE: tl.constexpr, CO: tl.constexpr):
    """acc0 = sum_j Y_j @ Mh_j, acc1 = sum_j BD(Mv_j)^T @ Y_j and the identity term acc2 = sum_j hits_j * Y_j [S*P, P]
    for the S images from b (and, NB == 2 * S, acc0b / acc1b / acc2b for the next S), all at (u - e, q - CO - e) of
    the output."""
    HP: tl.constexpr = H + 2 * E
    RS: tl.constexpr = W + 2 * E + 2 * CO
    acc0 = tl.zeros((S * P, P), dtype=tl.float64 if F64 else tl.float32)
    acc1 = acc0
    acc2 = acc0
    acc0b = acc0
    acc1b = acc0
    acc2b = acc0
    ids = _channel_idents(ident_ptr, c, G)
    for jj in range(NK):
        j = _rotated_plane(jj, b, NK, S)
        mh, mv = _stacked_mats(mat_ptr, mat_desc, c, j, NK, P, S)
        mvt = tl.trans(mv)
        hits = _hits(ids, c * NK + j, G).to(acc0.dtype)
        a = _stacked_planes(y_ptr, y_desc, b, B, c, R, j, NK, HP, RS, P, S)
        acc0 = _dot_data(a, mh, acc0, True, F64, SPLIT, EMULATE)
        acc1 = _dot_data(a, mvt, acc1, False, F64, SPLIT, EMULATE)
        acc2 += hits * a.to(acc2.dtype)
        if NB == 2 * S:
            a2 = _stacked_planes(y_ptr, y_desc, b + S, B, c, R, j, NK, HP, RS, P, S)
            acc0b = _dot_data(a2, mh, acc0b, True, F64, SPLIT, EMULATE)
            acc1b = _dot_data(a2, mvt, acc1b, False, F64, SPLIT, EMULATE)
            acc2b += hits * a2.to(acc2b.dtype)
    return acc0, acc1, acc2, acc0b, acc1b, acc2b


@triton.jit
def _tc3_store(out_ptr, c, b, B, R, term_stride, acc0, acc1, acc2, E: tl.constexpr, H: tl.constexpr,
               W: tl.constexpr, P: tl.constexpr, S: tl.constexpr, CO: tl.constexpr):
    """The three terms of the S images from b (stacked tiles on y's padded grid) into the (3, B, R, H, W) output."""
    u, q, bi, ok = _grid_2d(b, B, S, P)
    inside = _inside_output(ok, u, q, E, H, W, CO)
    o = out_ptr + (bi * R + c).to(tl.int64) * (H * W) + ((u - E) * W + (q - (CO + E)))
    ty = out_ptr.dtype.element_ty
    tl.store(o, acc0.to(ty), mask=inside)
    tl.store(o + term_stride, acc1.to(ty), mask=inside)
    tl.store(o + 2 * term_stride, acc2.to(ty), mask=inside)


@triton.jit
def _fwd_tc3(y_ptr, y_desc, mat_ptr, mat_desc, ident_ptr, out_ptr, R, term_stride, B,
             NK: tl.constexpr, G: tl.constexpr, E: tl.constexpr, H: tl.constexpr, W: tl.constexpr,
             P: tl.constexpr, S: tl.constexpr, NB: tl.constexpr, F64: tl.constexpr, SPLIT: tl.constexpr,
             EMULATE: tl.constexpr, CO: tl.constexpr):
    c, b = _channel_major(B, NB)
    acc0, acc1, acc2, acc0b, acc1b, acc2b = _tc3_products(y_ptr, y_desc, mat_ptr, mat_desc, ident_ptr, c, b, B, R,
                                                          NK, G, E, H, W, P, S, NB, F64, SPLIT, EMULATE, CO)
    _tc3_store(out_ptr, c, b, B, R, term_stride, acc0, acc1, acc2, E, H, W, P, S, CO)
    if NB == 2 * S:
        _tc3_store(out_ptr, c, b + S, B, R, term_stride, acc0b, acc1b, acc2b, E, H, W, P, S, CO)


@triton.jit
def _tc3_eval_store(scale_ptr, bias_ptr, x_ptr, rep_ptr, out_ptr, c, b, B, R, C, acc0, acc1, acc2,
                    E: tl.constexpr, H: tl.constexpr, W: tl.constexpr, P: tl.constexpr, S: tl.constexpr):
    u, q, bi, ok = _grid_2d(b, B, S, P)
    inside = _inside_output(ok, u, q, E, H, W, 0)
    _eval_epilogue(acc0, acc1, acc2, scale_ptr, bias_ptr, x_ptr, rep_ptr, out_ptr, bi * R + c, R, C,
                   tl.minimum(tl.maximum(u - E, 0), H - 1), tl.minimum(tl.maximum(q - E, 0), W - 1), inside, H, W)


@triton.jit
def _eval_tc3(y_ptr, y_desc, mat_ptr, mat_desc, ident_ptr, scale_ptr, bias_ptr, x_ptr, rep_ptr, out_ptr, R, C, B,
              NK: tl.constexpr, G: tl.constexpr, E: tl.constexpr, H: tl.constexpr, W: tl.constexpr,
              P: tl.constexpr, S: tl.constexpr, NB: tl.constexpr, F64: tl.constexpr, SPLIT: tl.constexpr,
              EMULATE: tl.constexpr):
    c, b = _channel_major(B, NB)
    acc0, acc1, acc2, acc0b, acc1b, acc2b = _tc3_products(y_ptr, y_desc, mat_ptr, mat_desc, ident_ptr, c, b, B, R,
                                                          NK, G, E, H, W, P, S, NB, F64, SPLIT, EMULATE, 0)
    _tc3_eval_store(scale_ptr, bias_ptr, x_ptr, rep_ptr, out_ptr, c, b, B, R, C, acc0, acc1, acc2, E, H, W, P, S)
    if NB == 2 * S:
        _tc3_eval_store(scale_ptr, bias_ptr, x_ptr, rep_ptr, out_ptr, c, b + S, B, R, C, acc0b, acc1b, acc2b,
                        E, H, W, P, S)


@triton.jit
def _tc3_grad_planes(gout_ptr, c, b, B, R, term_stride, E: tl.constexpr, H: tl.constexpr, W: tl.constexpr,
                     P: tl.constexpr, S: tl.constexpr, CO: tl.constexpr, F64: tl.constexpr):
    """G0, G1, G2 [S*P, P] of the S images from b, stacked, on y's padded grid: Gt[(s, u), q] = gout_t[b + s, c,
    u - e, q - CO - e] (zero outside)."""
    u, q, bi, ok = _grid_2d(b, B, S, P)
    inside = _inside_output(ok, u, q, E, H, W, CO)
    g = gout_ptr + (bi * R + c).to(tl.int64) * (H * W) + ((u - E) * W + (q - (CO + E)))
    g0 = tl.load(g, mask=inside, other=0.0)
    g1 = tl.load(g + term_stride, mask=inside, other=0.0)
    g2 = tl.load(g + 2 * term_stride, mask=inside, other=0.0).to(tl.float64 if F64 else tl.float32)
    return g0, g1, g2


@triton.jit
def _tc3_grad_store(gy_ptr, gy_desc, acc, c, b, B, R, j, NK: tl.constexpr, HP: tl.constexpr, RS: tl.constexpr,
                    P: tl.constexpr, S: tl.constexpr):
    """Plane j of channel c's input gradient for the S images from b, from the stacked tile."""
    if gy_desc is None:
        u, q, bi, ok = _grid_2d(b, B, S, P)
        p = gy_ptr + ((bi * R + c) * NK + j).to(tl.int64) * (HP * RS) + (u * RS + q)
        tl.store(p, acc.to(gy_ptr.dtype.element_ty), mask=ok & (u < HP) & (q < RS))
    else:
        gy_desc.store([b, c * NK + j, 0, 0], acc.to(gy_desc.dtype).reshape(S, 1, P, P))


@triton.jit
def _bwd_tc3(gout_ptr, gy_desc, mat_ptr, mat_desc, ident_ptr, gy_ptr, R, term_stride, B,
             NK: tl.constexpr, G: tl.constexpr, E: tl.constexpr, H: tl.constexpr, W: tl.constexpr,
             P: tl.constexpr, S: tl.constexpr, NB: tl.constexpr, F64: tl.constexpr, SPLIT: tl.constexpr,
             EMULATE: tl.constexpr, CO: tl.constexpr):
    """gy_j = G0 @ Mh_j^T + BD(Mv_j) @ G1 + hits_j * G2 for the S images from b (and the next S), hits_j =
    #{g: idx_identity[c, g] == c*nk + j}; zero in the pad columns (Mh_j's rows are zero there, the G planes too)."""
    HP: tl.constexpr = H + 2 * E
    RS: tl.constexpr = W + 2 * E + 2 * CO
    c, b = _channel_major(B, NB)
    g0, g1, g2 = _tc3_grad_planes(gout_ptr, c, b, B, R, term_stride, E, H, W, P, S, CO, F64)
    if NB == 2 * S:
        g0b, g1b, g2b = _tc3_grad_planes(gout_ptr, c, b + S, B, R, term_stride, E, H, W, P, S, CO, F64)
    zero = tl.zeros((S * P, P), dtype=tl.float64 if F64 else tl.float32)
    ids = _channel_idents(ident_ptr, c, G)
    for jj in range(NK):
        j = _rotated_plane(jj, b, NK, S)
        mh, mv = _stacked_mats(mat_ptr, mat_desc, c, j, NK, P, S)
        mht = tl.trans(mh)
        hits = _hits(ids, c * NK + j, G).to(zero.dtype)
        acc = _dot_data(g1, mv, _dot_data(g0, mht, zero, True, F64, SPLIT, EMULATE), False, F64, SPLIT, EMULATE)
        _tc3_grad_store(gy_ptr, gy_desc, acc + hits * g2, c, b, B, R, j, NK, HP, RS, P, S)
        if NB == 2 * S:
            acc = _dot_data(g1b, mv, _dot_data(g0b, mht, zero, True, F64, SPLIT, EMULATE), False, F64, SPLIT, EMULATE)
            _tc3_grad_store(gy_ptr, gy_desc, acc + hits * g2b, c, b + S, B, R, j, NK, HP, RS, P, S)


def count_matrices(pad_hv: torch.Tensor, nk: int, extra_pad: int, p: int, dtype: torch.dtype,
                   col_pad: int = 0, width: int | None = None) -> torch.Tensor:
    """The "tc" kernels' count matrices (R, nk, 2, P, P) for the shift table ``pad_hv`` (R*nk, 2G): entry [c, j, d,
    k, n] = #{g: n - k == pad_hv[c*nk + j, d*G + g] + extra_pad} (small integers, exact in ``dtype``). With
    ``width`` (the rows' data columns, after ``col_pad`` pad columns), the horizontal matrices' (d = 0) rows k outside
    the data [col_pad, col_pad + width) are zero (so the pad columns of y never count, and get zero gradient). Built
    once per table tensor (and again after an in-place change)."""
    def build():
        g = pad_hv.shape[1] // 2
        shifts = pad_hv.reshape(-1, nk, 2, g).to(torch.int32) + extra_pad
        ar = torch.arange(p, device=pad_hv.device, dtype=torch.int32)
        diff = ar[None, :] - ar[:, None]   # [k, n] = n - k
        mats = torch.zeros((*shifts.shape[:3], p, p), device=pad_hv.device, dtype=dtype)
        for i in range(g):
            mats += (diff == shifts[..., i, None, None]).to(dtype)
        if width is not None:
            mats[:, :, 0, :col_pad] = 0
            mats[:, :, 0, col_pad + width:] = 0
        return mats

    def build_in_capture():
        # built inside a CUDA graph: the values exist only once the graph replays, so never reused outside it (and
        # kept alive for it)
        _BUILT_IN_CAPTURE.append(build())
        return _BUILT_IN_CAPTURE[-1]

    capturing = pad_hv.is_cuda and torch.cuda.is_current_stream_capturing()
    key = (pad_hv._version, nk, extra_pad, p, dtype, pad_hv.device, col_pad, width)
    return cached(_COUNT_MATRICES, pad_hv, key,
                  build_in_capture if capturing else build, keep=not capturing)


_COUNT_MATRICES: dict = {}
_BUILT_IN_CAPTURE: list = []


# Tuner candidates (kind, a, b, num_warps) for planes of h x w; the first is the default. kind "plane": the
# runtime-shape kernels above with a [a=BLOCK_H, b=BLOCK_W] tile; "tile": the constexpr-shape kernels with that
# tile; "flat": a = NPL planes of b = BLOCK flattened positions per program; "dot" / "dotb" / "tc2" / "tc3" / "tc3d":
# the tensor-core kernels, a = P (the padded plane's tile side), b = NB images per program ("dot": one; "tc3": S = 64 /
# P stacked per tile, one or two such groups; "+sN": N pipeline stages instead of 3). A whole plane
# per program (up to 4096 elements) fetches each plane once, its shifted re-reads hitting L1; row strips / chunks
# trade that for less padding waste and more programs. On CUDA the fastest candidate is chosen once per (kernel,
# shape, dtype) by timing them on the real arguments (every kernel here overwrites its whole output, so re-running
# it is harmless); LARGEKERNEL_TUNE=0 keeps the default. ``FORCE = i`` runs candidate i (tests, benchmark sweeps).
TUNE = os.environ.get("LARGEKERNEL_TUNE", "1") == "1"
FORCE: int | None = None
# Every candidate passed the GPU check of `benchmarks/shiftadd.py --sweep` (candidates 0-9: H100, fp32, 2026-11-23;
# 10-11: H200, bf16 and fp32, 2026-12-03; 12-17 as defined for planes up to 64 wide: H200, bf16 and fp32, padded and
# plain rows, the eighteenth session, 2026-12-04; the four SW-tiny stage shapes; 16-17 of wider planes are the checked
# "tile" kernels at another warp count) besides the interpreter tests, so the CUDA tuner considers them all;
# LARGEKERNEL_SHIFTADD_CANDIDATES=verified restricts it to candidate 0, the first one checked on a GPU.
TUNE_ALL = os.environ.get("LARGEKERNEL_SHIFTADD_CANDIDATES", "all") == "all"
GPU_VERIFIED = 1
_TUNED: dict = {}
N_CANDIDATES = 18


def _warps(n: int, per_thread: int) -> int:
    return max(1, min(32, n // (32 * per_thread)))


def _flat_block(hw: int) -> int:
    """Largest power-of-2 chunk (32..1024) that covers an hw plane with >= 85% of its lanes busy (else the
    least wasteful one)."""
    best, best_util = 32, 0.0
    for blk in (1024, 512, 256, 128, 64, 32):
        if blk > next_pow2(hw):
            continue
        util = hw / (cdiv(hw, blk) * blk)
        if util >= 0.85:
            return blk
        if util > best_util + 1e-9:
            best, best_util = blk, util
    return best


def tc_tile(n: int) -> int:
    """The tensor-core candidates' [P, P] tile side for planes n wide (padded): a power of two, at least 16."""
    return max(16, next_pow2(n))


TC_MAX_TILE = 64  # wider planes get no tensor-core candidates


def candidates(h: int, w: int, pad: int = 0, col_pad: int = 0) -> list[tuple[str, int, int, int]]:
    """The N_CANDIDATES launch configurations for planes of h x w (list index = ``FORCE`` value); ``pad``: the
    forward's extra_pad (its "dot" tile covers the padded input plane); ``col_pad``: the zero columns on each
    side of y's rows (the "tc" tiles cover the whole row)."""
    bw = min(128, next_pow2(w))
    bh = min(next_pow2(h), max(1, 4096 // bw))
    strip = max(1, min(bh, 1024 // bw))
    chunk = _flat_block(h * w)
    whole = min(4096, next_pow2(h * w))
    cands = [
        ("plane", bh, bw, _warps(bh * bw, 4)),  # runtime shapes, whole plane
        ("tile", bh, bw, _warps(bh * bw, 4)),  # whole plane, 4 elements per thread
        ("tile+pf", bh, bw, _warps(bh * bw, 4)),  # ... with the next plane's first load issued early
        ("tile+pf", bh, bw, _warps(bh * bw, 8)),  # whole plane, 8 per thread (more ILP, fewer warps)
        ("tile+pf", strip, bw, _warps(strip * bw, 4)),  # row strips of <= 1024 elements: several CTAs per SM
        ("flat", max(1, 512 // chunk), chunk, _warps(max(512, chunk), 4)),  # low-padding chunks
        ("flat+pf", max(1, 512 // chunk), chunk, _warps(max(512, chunk), 4)),
        ("flat+pf", max(1, 1024 // whole), whole, _warps(max(1024, whole), 4)),  # whole flattened plane(s)
    ]
    p = tc_tile(max(h, w + 2 * col_pad) + 2 * pad)
    if p <= TC_MAX_TILE:  # shifts as tensor-core products with count matrices; [P, P] tiles, so small planes only
        cands += [("dot", p, p, 1 if p == 16 else 4), ("dot", p, p, 2 if p == 16 else 8)]
    else:
        cands += [("tile+pf", strip, bw, _warps(strip * bw, 8)), ("flat+pf", 1, chunk, _warps(chunk, 8))]
    if p <= 32:  # several images per program (at P = 64 the [NB, 64, 64] products spill: 22-37 ms, H200)
        cands += [("dotb", p, 4, 4), ("dotb", p, 8, 8)]
    else:
        cands += [("tile", strip, bw, _warps(strip * bw, 8)), ("flat", 1, chunk, _warps(chunk, 8))]
    if p <= TC_MAX_TILE:  # precomputed count matrices, NB images (128 or 256 product rows) per program
        nb = max(1, 128 // p)
        stack = max(1, TC_MAX_TILE // p)
        cands += [("tc3d", p, stack, 4), ("tc2", p, nb, 4), ("tc2+s4", p, max(1, nb // 2), 4),
                  ("tc2", p, max(1, nb // 2), 4), ("tc3d+s2", p, 2 * stack, 4), ("tc3d+s4", p, 2 * stack, 4)]
    else:
        cands += [("tile", bh, bw, _warps(bh * bw, 2)), ("tile+pf", bh, bw, _warps(bh * bw, 2)),
                  ("flat+pf", max(1, 256 // chunk), chunk, _warps(max(256, chunk), 2)),
                  ("flat", max(1, 256 // chunk), chunk, _warps(max(256, chunk), 2)),
                  ("tile", strip, bw, _warps(strip * bw, 2)), ("tile+pf", strip, bw, _warps(strip * bw, 2))]
    assert len(cands) == N_CANDIDATES
    return cands


def candidate_name(cand: tuple[str, int, int, int]) -> str:
    kind, a, b, warps = cand
    return f"{kind}{a}x{b}w{warps}"


def _dot_consts(dtype: torch.dtype) -> dict:
    # fp32 data is split into bf16 parts; bf16/fp16 go to the tensor cores as they are; fp64 uses fp64 dots
    return dict(SPLIT=dtype == torch.float32, EMULATE=os.environ.get("TRITON_INTERPRET", "0") == "1")


def _matrix_dtype(dtype: torch.dtype) -> torch.dtype:
    # the count matrices' type: the tensor cores' operand type (bf16 also for fp32 data, split into bf16 parts)
    return dtype if dtype in (torch.float16, torch.bfloat16, torch.float64) else torch.bfloat16


def _launch(key: tuple, h: int, w: int, run, device: torch.device, pad: int = 0, col_pad: int = 0) -> None:
    """Run ``run(candidate)`` with the forced, tuned or default candidate for planes of h x w."""
    cands = candidates(h, w, pad, col_pad)
    if FORCE is not None:
        return run(cands[FORCE])
    if not (TUNE and device.type == "cuda"):
        return run(cands[0])
    if key not in _TUNED and torch.cuda.is_current_stream_capturing():  # no timing inside a CUDA graph capture
        return run(cands[0])
    if not TUNE_ALL:
        cands = cands[:GPU_VERIFIED]
    if len(cands) == 1:
        return run(cands[0])
    if key not in _TUNED:
        times = []
        for cfg in cands:
            try:
                run(cfg)  # compile + warm up
            except Exception:  # a candidate that does not compile on this device/Triton version is skipped
                times.append(float("inf"))
                continue
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(4_000_000)   # GPU busy while the calls are queued: time the kernels, not the launches
            start.record()
            for _ in range(3):
                run(cfg)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        _TUNED[key] = cands[times.index(min(times))]
    run(_TUNED[key])


def _run_candidate(cand: tuple, kernels: tuple, lead: tuple, plane_args: tuple, extra: tuple, planes: int,
                   grid_h: int, grid_w: int, h: int, w: int, consts: dict, dtype: torch.dtype, batch: int,
                   col_pad: int | None = None, y_layout: torch.Tensor | None = None) -> None:
    """Launch one candidate of a shift-add pass. kernels = its (plane, tile, dot, flat, dotb, tc2, tc3) kernels;
    each launch takes ``lead`` first, the "plane" kernel then ``plane_args`` and its tile counts, the others
    ``extra`` then their own counts; tiles cover grid_h x grid_w per plane (the output plane of that pass),
    ``planes`` of them, ``planes // batch`` per image. ``col_pad``: y's pad columns per row side, for the
    tensor-core kernels that take it (None: a pass without it); ``y_layout``: the pass's tensor in y's layout (the
    forward's input, the backward's output) for the "tc3d" TMA descriptors (None: none)."""
    kind, a, bb, warps = cand
    k_plane, k_tile, k_dot, k_flat, k_dotb, k_tc, k_tc3 = kernels
    if kind.startswith("tc"):   # a = P, bb = NB images per program; the count matrices replace pad_hv
        width = None if not col_pad else w + 2 * consts["E"]
        mats = count_matrices(lead[1], consts["NK"], consts["E"], a, _matrix_dtype(dtype), col_pad or 0, width)
        base = kind.split("+")[0]
        meta = {} if col_pad is None else {"CO": col_pad}
        if "+s" in kind:   # "+sN": N pipeline stages
            meta["num_stages"] = int(kind.split("+s")[1])
        grid = (cdiv(batch, bb) * lead[2].shape[0],)
        if base in ("tc3", "tc3d"):   # S planes stacked per tile; "tc3d": y / gy through TMA where its rows allow
            stack = max(1, TC_MAX_TILE // a)
            tma = base == "tc3d" and tma_planes(y_layout)
            launch(k_tc3, grid, lead[0], stacked_planes_descriptor(y_layout, stack, a) if tma else None, mats,
                   plane_descriptor(mats.view(-1, a, a), a) if tma else None, *lead[2:], *extra, batch, H=h, W=w,
                   P=a, S=stack, NB=bb, num_warps=warps, **meta, **consts, **_dot_consts(dtype))
            return
        launch(k_tc, grid, lead[0], mats, *lead[2:], *extra, batch, H=h, W=w, P=a, NB=bb, num_warps=warps, **meta,
               **consts, **_dot_consts(dtype))
        return
    if kind == "dotb":   # a = P, bb = NB images per program
        launch(k_dotb, (cdiv(batch, bb) * (planes // batch),), *lead, *extra, batch, H=h, W=w, P=a, NB=bb,
               num_warps=warps, **consts, **_dot_consts(dtype))
        return
    pf = {} if kind in ("plane", "dot") else dict(PF=kind.endswith("+pf"))
    if kind == "plane":
        n_th, n_tw = cdiv(grid_h, a), cdiv(grid_w, bb)
        launch(k_plane, (planes * n_th * n_tw,), *lead, *plane_args, n_th, n_tw, BLOCK_H=a, BLOCK_W=bb,
               num_warps=warps, **consts, **pf)
    elif kind.startswith("tile"):
        n_t = cdiv(grid_h, a) * cdiv(grid_w, bb)
        launch(k_tile, (planes * n_t,), *lead, *extra, n_t, H=h, W=w, BLOCK_H=a, BLOCK_W=bb, num_warps=warps,
               **consts, **pf)
    elif kind == "dot":
        launch(k_dot, (planes,), *lead, *extra, H=h, W=w, P=a, num_warps=warps, **consts, **_dot_consts(dtype))
    else:
        n_t = cdiv(grid_h * grid_w, bb)
        launch(k_flat, (cdiv(planes, a) * n_t,), *lead, *extra, planes, n_t, H=h, W=w, NPL=a, BLOCK=bb,
               num_warps=warps, **consts, **pf)


def shift_add_forward(y: torch.Tensor, pad_hv: torch.Tensor, idx_identity: torch.Tensor,
                      extra_pad: int, col_pad: int = 0) -> torch.Tensor:
    """y (B, R*nk, Hp, Wp + 2*col_pad) contiguous (rows with ``col_pad`` zero columns on each side, which the
    tensor-core kernels load as part of the row and the others skip through a copy), int32 tables on y's device ->
    (3, B, R, H, W)."""
    b, rnk, hp, rs = y.shape
    r, g = idx_identity.shape
    nk = rnk // r
    wp = rs - 2 * col_pad
    h, w = hp - 2 * extra_pad, wp - 2 * extra_pad
    out = torch.empty((3, b, r, h, w), device=y.device, dtype=y.dtype)
    consts = dict(NK=nk, G=g, E=extra_pad, F64=y.dtype == torch.float64)
    planes, ts = b * r, b * r * h * w
    kernels = (_shift_add_fwd, _fwd_tile, _fwd_dot, _fwd_flat, _fwd_dotb, _fwd_tc, _fwd_tc3)

    def run(cand):
        yc, co = y, col_pad
        if col_pad and not cand[0].startswith("tc"):
            yc, co = y[..., col_pad:col_pad + wp].contiguous(), 0
        _run_candidate(cand, kernels, (yc, pad_hv, idx_identity, out, r), (h, w, hp, wp, ts), (ts,), planes, h, w,
                       h, w, consts, y.dtype, b, co, yc)

    _launch(("fwd", b, r, h, w, nk, g, extra_pad, y.dtype, col_pad), h, w, run, y.device, extra_pad, col_pad)
    return out


def shift_add_backward(gout: torch.Tensor, pad_hv: torch.Tensor, idx_identity: torch.Tensor,
                       extra_pad: int, col_pad: int = 0) -> torch.Tensor:
    """gout (3, B, R, H, W) contiguous -> grad of y (B, R*nk, H+2e, W+2e + 2*col_pad), zero in the pad columns."""
    _, b, r, h, w = gout.shape
    g = idx_identity.shape[1]
    nk = pad_hv.shape[0] // r
    hp, wp = h + 2 * extra_pad, w + 2 * extra_pad
    gy = torch.empty((b, r * nk, hp, wp + 2 * col_pad), device=gout.device, dtype=gout.dtype)
    consts = dict(NK=nk, G=g, E=extra_pad, F64=gout.dtype == torch.float64)
    planes, ts = b * r * nk, b * r * h * w
    kernels = (_shift_add_bwd, _bwd_tile, _bwd_dot, _bwd_flat, _bwd_dotb, _bwd_tc, _bwd_tc3)

    def run(cand):
        if col_pad and not cand[0].startswith("tc"):
            inner = torch.empty((b, r * nk, hp, wp), device=gout.device, dtype=gout.dtype)
            _run_candidate(cand, kernels, (gout, pad_hv, idx_identity, inner, r), (h, w, hp, wp, ts), (ts,), planes,
                           hp, wp, h, w, consts, gout.dtype, b, 0)
            gy.copy_(torch.nn.functional.pad(inner, (col_pad, col_pad)))
            return
        _run_candidate(cand, kernels, (gout, pad_hv, idx_identity, gy, r), (h, w, hp, wp, ts), (ts,), planes, hp, wp,
                       h, w, consts, gout.dtype, b, col_pad, gy)

    _launch(("bwd", b, r, h, w, nk, g, extra_pad, gout.dtype, col_pad), hp, wp, run, gout.device, 0, col_pad)
    return gy


def shift_add_eval_forward(y: torch.Tensor, pad_hv: torch.Tensor, idx_identity: torch.Tensor, extra_pad: int,
                           scale: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, rep_idx: torch.Tensor,
                           ghost_idx: torch.Tensor) -> torch.Tensor:
    """Fused inference: y (B, R*nk, Hp, Wp), scale (3, R), bias (R,), x (B, C, H, W) contiguous ->
    (B, C, H, W) = cat([sum_t scale_t * term_t + bias + x[:, rep], x[:, ghost]])."""
    b, rnk, hp, wp = y.shape
    r, g = idx_identity.shape
    nk = rnk // r
    c = x.shape[1]
    h, w = hp - 2 * extra_pad, wp - 2 * extra_pad
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    out = torch.empty((b, c, h, w), device=y.device, dtype=torch.promote_types(y.dtype, x.dtype))
    consts = dict(NK=nk, G=g, E=extra_pad, F64=y.dtype == torch.float64)
    tabs = (y, pad_hv, idx_identity, scale.to(acc).contiguous(), bias.to(acc).contiguous(), x,
            rep_idx.to(torch.int32).contiguous(), out)
    planes = b * r

    def run(cand):
        _run_candidate(cand, (_shift_add_eval, _eval_tile, _eval_dot, _eval_flat, _eval_dotb, _eval_tc, _eval_tc3),
                       (*tabs, r, c), (h, w, hp, wp), (), planes, h, w, h, w, consts, y.dtype, b)

    _launch(("eval", b, r, c, h, w, nk, g, extra_pad, y.dtype, x.dtype), h, w, run, y.device, extra_pad)
    if ghost_idx.numel():
        out[:, r:] = x.index_select(1, ghost_idx)
    return out

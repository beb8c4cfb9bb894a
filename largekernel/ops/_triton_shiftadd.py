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
def _shift_add_fwd(y_ptr, pad_ptr, ident_ptr, out_ptr, R, H, W, Hp, Wp, term_stride, n_th, n_tw,
                   NK: tl.constexpr, G: tl.constexpr, E: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, F64: tl.constexpr):
    bc, hs, ws = _tile_coords(tl.program_id(0), n_th, n_tw, BLOCK_H, BLOCK_W)  # bc = b * R + c
    c = bc % R
    inside = (hs < H) & (ws < W)
    acc0, acc1, acc2 = _gather_terms(y_ptr, pad_ptr, ident_ptr, bc, c, hs, ws, inside, Hp, Wp,
                                     NK, G, E, BLOCK_H, BLOCK_W, F64)
    out = out_ptr + bc.to(tl.int64) * H * W + hs * W + ws
    ty = out_ptr.dtype.element_ty
    tl.store(out, acc0.to(ty), mask=inside)
    tl.store(out + term_stride, acc1.to(ty), mask=inside)
    tl.store(out + 2 * term_stride, acc2.to(ty), mask=inside)


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


# Tile candidates (block_h, block_w, num_warps) for a plane of h x w; the first is the default. A whole plane
# per program (up to 4096 elements) fetches each plane once, its shifted re-reads hitting L1; 4 elements per
# thread keeps ptxas at <= 64 registers without spills (sm_90, checked with ptxas -v). On CUDA the fastest
# candidate is chosen once per (kernel, shape, dtype) by timing them on the real arguments (every kernel here
# overwrites its whole output, so re-running it is harmless); LARGEKERNEL_TUNE=0 keeps the default.
TUNE = os.environ.get("LARGEKERNEL_TUNE", "1") == "1"
_TUNED: dict = {}


def _candidates(h: int, w: int) -> list[tuple[int, int, int]]:
    block_w = min(128, triton.next_power_of_2(w))
    block_h = min(triton.next_power_of_2(h), max(1, 4096 // block_w))
    out = []
    for bh, per_thread in ((block_h, 4), (block_h, 8), (max(1, block_h // 2), 4), (block_h, 2)):
        warps = max(1, min(32, bh * block_w // (32 * per_thread)))
        if (bh, block_w, warps) not in out:
            out.append((bh, block_w, warps))
    return out


def _launch(kernel, key: tuple, h: int, w: int, planes: int, args: tuple, consts: dict,
            device: torch.device) -> None:
    """Launch ``kernel`` over ``planes`` planes of h x w tiles with the (tuned) tile configuration."""

    def run(cfg: tuple[int, int, int]) -> None:
        bh, bw, warps = cfg
        n_th, n_tw = triton.cdiv(h, bh), triton.cdiv(w, bw)
        kernel[(planes * n_th * n_tw,)](*args, n_th, n_tw, BLOCK_H=bh, BLOCK_W=bw, num_warps=warps, **consts)

    cands = _candidates(h, w)
    if not (TUNE and device.type == "cuda") or len(cands) == 1:
        return run(cands[0])
    if key not in _TUNED:
        times = []
        for cfg in cands:
            run(cfg)  # compile + warm up
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(3):
                run(cfg)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        _TUNED[key] = cands[times.index(min(times))]
    run(_TUNED[key])


def shift_add_forward(y: torch.Tensor, pad_hv: torch.Tensor, idx_identity: torch.Tensor,
                      extra_pad: int) -> torch.Tensor:
    """y (B, R*nk, Hp, Wp) contiguous, int32 tables on y's device -> (3, B, R, H, W)."""
    b, rnk, hp, wp = y.shape
    r, g = idx_identity.shape
    nk = rnk // r
    h, w = hp - 2 * extra_pad, wp - 2 * extra_pad
    out = torch.empty((3, b, r, h, w), device=y.device, dtype=y.dtype)
    consts = dict(NK=nk, G=g, E=extra_pad, F64=y.dtype == torch.float64)
    _launch(_shift_add_fwd, ("fwd", b, r, h, w, nk, g, extra_pad, y.dtype), h, w, b * r,
            (y, pad_hv, idx_identity, out, r, h, w, hp, wp, b * r * h * w), consts, y.device)
    return out


def shift_add_backward(gout: torch.Tensor, pad_hv: torch.Tensor, idx_identity: torch.Tensor,
                       extra_pad: int) -> torch.Tensor:
    """gout (3, B, R, H, W) contiguous -> grad of y (B, R*nk, H+2e, W+2e)."""
    _, b, r, h, w = gout.shape
    g = idx_identity.shape[1]
    nk = pad_hv.shape[0] // r
    hp, wp = h + 2 * extra_pad, w + 2 * extra_pad
    gy = torch.empty((b, r * nk, hp, wp), device=gout.device, dtype=gout.dtype)
    consts = dict(NK=nk, G=g, E=extra_pad, F64=gout.dtype == torch.float64)
    _launch(_shift_add_bwd, ("bwd", b, r, h, w, nk, g, extra_pad, gout.dtype), hp, wp, b * r * nk,
            (gout, pad_hv, idx_identity, gy, r, h, w, hp, wp, b * r * h * w), consts, gout.device)
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
    args = (y, pad_hv, idx_identity, scale.to(acc).contiguous(), bias.to(acc).contiguous(), x,
            rep_idx.to(torch.int32).contiguous(), out, r, c, h, w, hp, wp)
    _launch(_shift_add_eval, ("eval", b, r, c, h, w, nk, g, extra_pad, y.dtype, x.dtype), h, w, b * r, args,
            consts, y.device)
    if ghost_idx.numel():
        out[:, r:] = x.index_select(1, ghost_idx)
    return out

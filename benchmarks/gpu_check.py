"""One GPU call: correctness at full shapes, peak memory, tile-config sweep, then the benchmark table.

    PYTHONPATH=. python3 benchmarks/gpu_check.py [--sweep] [--no-bench] [--no-memory] [--variants v2,gram,...]

Correctness: our op (outputs NaN-poisoned before every launch) vs float64 ``F.conv2d`` on fresh random
inputs at the full C/H/K of the benchmark shapes (batch 2, plus one batch-64 case), fp32 (1e-5) and bf16
(1e-2), NCHW and channels_last, with bias; forward and all three gradients. Exits non-zero on a failure.
Logs and JSON go to $OUT when set.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dwconv  # noqa: E402

import largekernel.ops.depthwise as dwmod  # noqa: E402

CHECKS = [  # (N, C, H, W, kh, kw, channels_last)
    (2, 128, 56, 56, 31, 31, False), (2, 256, 28, 28, 29, 29, True), (2, 512, 14, 14, 27, 27, False),
    (64, 1024, 7, 7, 13, 13, False), (2, 128, 56, 56, 51, 51, False), (2, 128, 56, 56, 51, 5, True),
    (2, 128, 56, 56, 5, 51, False), (1, 96, 30, 45, 4, 6, False), (3, 77, 33, 19, 63, 63, False),
    (2, 128, 56, 56, 3, 3, True), (32, 256, 28, 28, 29, 29, False),   # the last two: band copies fit in dx's tail
    (16, 128, 56, 56, 31, 31, False),
]


def rel(a: torch.Tensor, r: torch.Tensor) -> float:
    if not torch.isfinite(a).all():
        return float("nan")
    return float((a.double() - r).norm() / r.norm())


# Kernel configurations checked at full shapes (the tuner may pick any of them, or cuDNN's).
VARIANTS = [
    ("v2", lambda w: dict(BLOCK_M=64, BLOCK_W=min(32, dwmod._bw(w)), BLOCK_U=32, num_warps=4, prefetch=True),
     lambda w: dict(BLOCK_V=min(32, dwmod._bw(w)), programs=2112, num_warps=4)),
    ("v2-big", lambda w: dict(BLOCK_M=128, BLOCK_W=dwmod._bw(w), BLOCK_U=32, num_warps=8, prefetch=True),
     lambda w: dict(BLOCK_V=dwmod._bw(w), programs=1056, num_warps=8)),
    ("v1", lambda w: dict(BLOCK_M=128, BLOCK_W=16, BLOCK_U=16, num_warps=4, num_stages=3),
     lambda w: dict(BLOCK_K=32, programs=1056, num_warps=4, num_stages=3)),
    ("plane", lambda w: dict(plane=True, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, prefetch=True),
     lambda w: dict(NB=max(1, 64 // (1 << (w - 1).bit_length())), programs=2112, num_warps=4)),
    ("transposed", lambda w: dict(BLOCK_M=64, BLOCK_W=32, BLOCK_U=32, num_warps=4, transpose=True),
     lambda w: dict(BLOCK_V=32, programs=2112, num_warps=4, transpose=True)),
    ("bands", lambda w: dict(BLOCK_M=128, BLOCK_W=32, BLOCK_U=32, num_warps=4, prefetch=True, bands=True),
     lambda w: dict(BLOCK_V=min(32, dwmod._bw(w)), programs=2112, num_warps=4)),
    ("plane-bands", lambda w: dict(plane=True, bands=True, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4,
                                   prefetch=True),
     lambda w: (dict(plane=True, BLOCK_N=32, programs=4224) if w <= 16 else
                dict(BLOCK_V=min(32, dwmod._bw(w)), programs=2112, num_warps=4))),
    # fp32 only: Triton's six-product bf16 split instead of tf32x3 (a tuner candidate for fp32 inputs)
    ("bf16x6", lambda w: dict(BLOCK_M=64, BLOCK_W=min(32, dwmod._bw(w)), BLOCK_U=32, num_warps=4, prefetch=True,
                              precision="bf16x6"),
     lambda w: dict(BLOCK_V=min(32, dwmod._bw(w)), programs=2112, num_warps=4, precision="bf16x6")),
    ("plane-bf16x6", lambda w: dict(plane=True, bands=True, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4,
                                    prefetch=True, precision="bf16x6"),
     lambda w: (dict(plane=True, BLOCK_N=64, precision="bf16x6") if w <= 16 else
                dict(NB=max(1, 64 // (1 << (w - 1).bit_length())), programs=2112, precision="bf16x6"))),
]
# the three-product split (hi*hi + hi*lo + lo*hi, ~2^-17 per product; offered to the tuner since v8)
VARIANTS += [(name.replace("bf16x6", "bf16x3"), lambda w, f=f: dict(f(w), precision="bf16x3"),
              lambda w, g=g: dict(g(w), precision="bf16x3")) for name, f, g in VARIANTS[-2:]]
# bf16x3 with the kernel as bf16 high / low band copies (row kernel)
VARIANTS.append(("bf16x3-bands", lambda w: dict(BLOCK_M=128, BLOCK_W=32, BLOCK_U=32, num_warps=4, prefetch=True,
                                                bands=True, split=True),
                 lambda w: dict(BLOCK_V=min(32, dwmod._bw(w)), programs=2112, num_warps=4, precision="bf16x3")))

# 16-wide output tiles in fp32 (Toeplitz MMA work 48/31 of the useful work instead of 64/31): bf16 band copies of the
# kernel's parts, and Triton's bf16x3
VARIANTS += [("w16-split", lambda w: dict(BLOCK_M=128, BLOCK_W=16, BLOCK_U=16, num_warps=4, prefetch=True, bands=True,
                                          split=True), VARIANTS[0][2]),
             ("w16-bf16x3", lambda w: dict(BLOCK_M=128, BLOCK_W=16, BLOCK_U=16, num_warps=4, prefetch=True,
                                           precision="bf16x3"), VARIANTS[0][2])]

# the column-Gram weight grad (planes up to 64 wide; else the v2 one)
VARIANTS += [(name, VARIANTS[0][1], lambda w, p=prec: (dict(cols=True, NI=2, BLOCK_R=32, programs=4224, **p)
                                                      if w <= 64 else VARIANTS[0][2](w)))
             for name, prec in (("cols", {}), ("cols-bf16x3", dict(precision="bf16x3")))]

# the Gram-matrix weight grad (planes of <= 128 padded positions: 7x7), the v2 weight grad elsewhere
VARIANTS += [(name, VARIANTS[0][1], lambda w, p=prec: (dict(gram=True, BLOCK_N=64, **p) if w <= 8 else
                                                      VARIANTS[0][2](w)))
             for name, prec in (("gram", {}), ("gram-bf16x3", dict(precision="bf16x3")))]

# the input grad reading band copies kept in dx's last images, the gathering kernel computing those (<= 28x28)
_TAIL = dict(plane=True, bands=True, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, prefetch=True,
             tail=dict(plane=True, BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, num_warps=4, prefetch=True))
VARIANTS += [(name, lambda w, p=prec: dict(_TAIL, **p) if w <= 28 else VARIANTS[0][1](w), VARIANTS[0][2])
             for name, prec in (("tail", {}), ("tail-bf16x3", dict(precision="bf16x3")))]
# the whole-plane GEMM reading copies of an fp32 kernel's bf16 parts (one output row per tile on large planes)
VARIANTS.append(("plane-split", lambda w: dict(plane=True, bands=True, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4,
                                               prefetch=True, split=True), VARIANTS[0][2]))
# the same on any plane with a row tile computing the last images (the large-plane input grad)
_TAIL_ROW = dict(_TAIL, tail=dict(BLOCK_M=64, BLOCK_W=32, BLOCK_U=32, num_warps=4, num_stages=2, prefetch=True))
VARIANTS += [(name, lambda w, p=prec: dict(_TAIL_ROW, **p), VARIANTS[0][2])
             for name, prec in (("tail-row", {}), ("tail-row-bf16x3", dict(precision="bf16x3")),
                                ("tail-row-split", dict(split=True)))]
# v11: the large-plane whole-plane GEMM pipelined by Triton (3 stages, no register prefetch), the input grad with its
# copies in dx's tail and a bf16x3 row tile for those; the column-Gram weight grad on grad_out's and x's bf16 parts
# split once into dx's storage (fp32; other dtypes ignore presplit)
_PLANE_NS3 = dict(_TAIL_ROW, num_stages=3, prefetch=False, split=True, precision="bf16x3")
VARIANTS += [("plane-ns3-split", lambda w: _PLANE_NS3 if w > 32 else VARIANTS[0][1](w), VARIANTS[0][2]),
             ("cols-presplit", VARIANTS[0][1], lambda w: dict(cols=True, NI=2, BLOCK_R=32, programs=0, num_warps=4,
                                                              presplit="gx") if w > 16 else VARIANTS[0][2](w))]


def check_correctness(variants=VARIANTS) -> list[dict]:
    dwmod.POISON = True
    out = []
    for ci, case in enumerate(CHECKS):
        for dt, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
            vs = variants if ci < 4 else [v for v in variants if v[0] not in ("v2-big", "v1")]  # all on stage shapes
            try:
                out.extend(_check_case(case, dt, tol, vs))
            except Exception as e:  # noqa: BLE001 - record and go on
                out.append(dict(shape=case, dtype=str(dt), ok=False, error=repr(e)[:500]))
                print("FAIL", out[-1], flush=True)
    dwmod.FWD_CFG, dwmod.WGRAD_CFG = {}, {}
    dwmod.POISON = False
    torch.cuda.empty_cache()
    return out


def _check_case(case, dt, tol, variants) -> list[dict]:
    """Fresh inputs and one float64 reference, then each kernel variant against it."""
    n, c, h, w_, kh, kw, cl = case
    x = torch.randn(n, c, h, w_, device="cuda", dtype=dt)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(c, 1, kh, kw, device="cuda", dtype=dt) / (kh * kw) ** 0.5
    b = torch.randn(c, device="cuda", dtype=dt)
    g = torch.randn_like(x)
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w, b))
    yr = F.conv2d(xd, wd, bd, padding="same", groups=c)
    rx, rw, rb = torch.autograd.grad(yr, (xd, wd, bd), g.double())
    yr = yr.detach()
    for t in (x, w, b):
        t.requires_grad_()
    rows = []
    for vname, fcfg, wcfg in variants:
        if "bf16x" in vname and dt != torch.float32:
            continue
        dwmod.FWD_CFG, dwmod.WGRAD_CFG = fcfg(w_), wcfg(w_)
        y = torch.ops.largekernel.depthwise_conv2d(x, w, b)
        gx, gw, gb = torch.autograd.grad(y, (x, w, b), g)
        errs = dict(y=rel(y.detach(), yr), dx=rel(gx, rx), dw=rel(gw, rw), db=rel(gb, rb))
        ok = all(e <= tol for e in errs.values()) and y.stride() == x.stride()
        row = dict(shape=(n, c, h, w_, kh, kw), channels_last=cl, dtype=str(dt), variant=vname, ok=ok, **errs)
        print(("OK  " if ok else "FAIL"), row, flush=True)
        rows.append(row)
    return rows


MEMORY_CASES = [(c, h, k, cl) for c, h, k in ((128, 56, 31), (256, 28, 29), (512, 14, 27), (1024, 7, 13))
                for cl in (False, True)]


def peak_memory(cases=MEMORY_CASES, dtypes=(torch.bfloat16, torch.float32)) -> list[dict]:
    rows = []
    for dt in dtypes:
        for c, h, k, cl in cases:
            res = {}
            for name, fn in (("native", dwconv._native), ("ours", dwconv._ours)):
                x, w, b = dwconv.make_inputs(64, c, h, k, k, dt, cl)
                g = torch.randn_like(x)
                torch.autograd.grad(fn(x, w, b), (x, w, b), g)   # warm-up (compile, tuning) not measured
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                y = fn(x, w, b)
                grads = torch.autograd.grad(y, (x, w, b), g)
                torch.cuda.synchronize()
                res[name] = (torch.cuda.max_memory_allocated() - base) / 2**20
                del x, w, b, g, y, grads
                torch.cuda.empty_cache()
            row = dict(dtype=str(dt), C=c, H=h, K=k, channels_last=cl, native_mib=res["native"],
                       ours_mib=res["ours"])
            rows.append(row)
            print("peak fwd+bwd above inputs (MiB):", row, flush=True)
    return rows


def _sweep_fwd(h: int, kw: int) -> list[dict]:
    bw, bu = dwmod._bw(h), min(64, dwmod._bw(16 + kw + 7))
    plane = [dict(plane=True, BLOCK_M=64, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, prefetch=pf)
             for bn, bk, nw, pf in ((64, 64, 4, True), (64, 64, 8, False), (128, 32, 8, False), (64, 16, 4, True))]
    plane += [dict(plane=True, bands=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, prefetch=pf)
              for bm, bn, bk, nw, pf in ((64, 64, 64, 4, True), (64, 64, 64, 4, False), (64, 64, 32, 4, True),
                                         (64, 128, 32, 8, False), (64, 128, 32, 8, True), (64, 128, 64, 8, True),
                                         (64, 64, 16, 4, True), (64, 32, 32, 4, True), (64, 128, 16, 4, True),
                                         (64, 256, 32, 8, True), (32, 64, 32, 4, True), (64, 64, 128, 8, False))]
    rows = [dict(BLOCK_M=64, BLOCK_W=min(32, bw), BLOCK_U=32, num_warps=4, prefetch=True),
            dict(BLOCK_M=64, BLOCK_W=min(32, bw), BLOCK_U=32, num_warps=4, prefetch=True, bands=True),
            dict(BLOCK_M=128, BLOCK_W=bw, BLOCK_U=32, num_warps=8, prefetch=True),
            dict(BLOCK_M=128, BLOCK_W=bw, BLOCK_U=32, num_warps=8, prefetch=True, bands=True),
            dict(BLOCK_M=128, BLOCK_W=bw, BLOCK_U=64, num_warps=8, prefetch=True, bands=True),
            dict(BLOCK_M=256, BLOCK_W=bw, BLOCK_U=32, num_warps=8, prefetch=True, bands=True),
            dict(BLOCK_M=128, BLOCK_W=min(32, bw), BLOCK_U=32, num_warps=4, prefetch=True, bands=True)]
    if h <= 16:
        rows += [dict(BLOCK_M=128, BLOCK_W=16, BLOCK_U=bu, num_warps=8, prefetch=True),
                 dict(BLOCK_M=128, BLOCK_W=16, BLOCK_U=bu, num_warps=8, prefetch=True, bands=True)]
    return (plane if h * h <= 1024 else [c for c in plane if c.get("bands")]) + rows


def _sweep_fwd_fp32(h: int) -> list[dict]:
    """fp32 forward / input-grad tiles on large planes: the row kernel in its fastest tile (the reference), and the
    whole-plane GEMM over whole output rows in many tiles: the kernel as copies of its bf16 high / low parts
    (``split``) or Triton's bf16x3 / bf16x6 splits of both operands; tile sizes, warps, pipeline stages, prefetch."""
    rows = [dict(BLOCK_M=64, BLOCK_W=32, BLOCK_U=32, num_warps=4, num_stages=2, prefetch=True, bands=True, split=True)]
    plane = dict(plane=True, bands=True, BLOCK_N=1 << (h - 1).bit_length())
    rows += [dict(plane, BLOCK_M=bm, BLOCK_K=bk, num_warps=nw, num_stages=ns, prefetch=pf, split=True)
             for bm, bk, nw, ns, pf in ((64, 32, 4, 2, True), (64, 32, 4, 2, False), (64, 32, 4, 1, True),
                                        (64, 32, 4, 3, True), (64, 32, 4, 3, False), (64, 32, 4, 4, False),
                                        (64, 16, 4, 2, True), (64, 16, 4, 3, False), (64, 64, 4, 2, True),
                                        (64, 64, 4, 2, False), (64, 32, 8, 2, True), (64, 64, 8, 2, True),
                                        (64, 16, 8, 3, False), (128, 32, 8, 2, True), (128, 32, 8, 3, False),
                                        (128, 16, 8, 2, True), (128, 64, 8, 2, True), (32, 32, 4, 2, True),
                                        (32, 64, 4, 2, True), (32, 16, 2, 2, True))]
    rows += [dict(plane, BLOCK_M=bm, BLOCK_K=bk, num_warps=nw, num_stages=ns, prefetch=pf, precision=p)
             for p in ("bf16x3", "bf16x6")
             for bm, bk, nw, ns, pf in ((64, 32, 4, 2, True), (64, 32, 4, 3, False), (64, 64, 4, 2, True),
                                        (128, 32, 8, 2, True))]
    return rows


def _sweep_wgrad(h: int) -> list[dict]:
    bv = dwmod._bw(h)
    narrow = 1 << (h - 1).bit_length()
    cands = [dict(BLOCK_V=min(32, bv), programs=2112, num_warps=4), dict(BLOCK_V=bv, programs=1056, num_warps=8),
             dict(BLOCK_K=32, programs=1056, num_warps=4, num_stages=3),
             dict(BLOCK_K=128, programs=1056, num_warps=4, num_stages=3)]
    if h <= 16:
        cands += [dict(plane=True, BLOCK_N=bn, programs=progs, num_warps=nw)
                  for bn, progs, nw in ((64, 0, 4), (64, 0, 8), (32, 4224, 4), (32, 4224, 8), (16, 8448, 4))]
    if h <= 64:   # the column-Gram weight grad
        cands += [dict(cols=True, NI=ni, BLOCK_R=br, programs=progs, num_warps=nw, num_stages=ns)
                  for ni, br, nw, progs, ns in ((1, 32, 4, 4224, 2), (2, 32, 4, 4224, 2), (2, 64, 8, 4224, 2),
                                                (4, 32, 8, 4224, 2), (8, 32, 8, 4224, 2), (2, 32, 4, 2112, 2),
                                                (2, 32, 4, 8448, 2), (2, 16, 4, 4224, 2), (2, 32, 4, 4224, 3),
                                                (2, 64, 4, 4224, 2), (4, 16, 8, 4224, 2), (4, 32, 8, 8448, 3),
                                                (1, 64, 4, 4224, 2), (1, 32, 2, 4224, 3))]
    if h <= 32:
        for red, progs, nw, pf in ((64, 2112, 4, True), (64, 2112, 4, False), (128, 1056, 8, True),
                                   (128, 2112, 4, False), (256, 1056, 8, False), (64, 4224, 4, False)):
            cands.append(dict(NB=max(1, red // narrow), programs=progs, num_warps=nw, prefetch=pf))
    return cands


def _gpu_ms(fn) -> float:
    """GPU time per call (CUDA graph replay: no CPU launch cost, which exceeds the kernel time at 7x7)."""
    from _timing import cuda_graph_time

    return cuda_graph_time(fn)


def _sweep_one(rows: list, kind: str, dt, shape, cfg: dict, fn) -> None:
    c, h, kh, kw = shape
    try:
        t = _gpu_ms(fn)
    except Exception as e:  # noqa: BLE001 - a config that does not compile is a result, not a stop
        print(f"{kind} {dt} C{c} H{h} K{kh} {cfg}: ERROR {repr(e)[:300]}", flush=True)
        return
    rows.append(dict(kind=kind, dtype=str(dt), C=c, H=h, K=kh, cfg=cfg, ms=t))
    print(f"{kind:5s} {str(dt)[6:]:8s} C{c} H{h} K{kh} {t:.4f} ms "
          f"{dwconv.flops(64, c, h, kh, kw) / t / 1e9:6.1f} TFLOP/s {cfg}", flush=True)


def _sweep_shape(rows: list, dt, shape, kinds=("fwd", "dgrad", "wgrad")) -> None:
    c, h, kh, kw = shape
    x, w, b = (t.detach() for t in dwconv.make_inputs(64, c, h, kh, kw, dt))
    g = torch.randn_like(x)
    out = torch.empty_like(x)
    ph, pw = dwmod._pads(kh, kw)
    native = dict(fwd=lambda: F.conv2d(x, w, b, padding="same", groups=c),
                  dgrad=lambda: torch.nn.grad.conv2d_input(x.shape, w, g, padding=(ph, pw), groups=c),
                  wgrad=lambda: torch.nn.grad.conv2d_weight(x, w.shape, g, padding=(ph, pw), groups=c))
    for kind in kinds:
        _sweep_one(rows, kind, dt, shape, dict(native=True), native[kind])
    for cfg in _sweep_fwd_fp32(h) if dt == torch.float32 and h * h > 1024 else _sweep_fwd(h, kw):
        if "fwd" in kinds:
            _sweep_one(rows, "fwd", dt, shape, cfg, lambda cfg=cfg: dwmod._conv_pass(cfg, x, w, b, out, ph, pw))
        if "dgrad" in kinds:
            _sweep_one(rows, "dgrad", dt, shape, cfg,
                       lambda cfg=cfg: dwmod._conv_pass(cfg, g, w, None, out, kh - 1 - ph, kw - 1 - pw, flip=True))
    if "wgrad" in kinds:
        presplit = [dict(cols=True, NI=ni, BLOCK_R=br, programs=progs, num_warps=4, num_stages=ns, presplit=ps,
                         group=grp)
                    for ps in ("g", "x", "gx") for ni, br, progs, ns, grp in
                    ((2, 32, 2112, 2, 32), (2, 64, 4224, 2, 32), (2, 32, 2112, 3, 32), (1, 64, 4224, 3, 32),
                     (2, 32, 2112, 2, 128))] if h > 32 else []
        for cfg in _sweep_wgrad(h) + ([dict(c, precision="bf16x3") for c in _sweep_wgrad(h)
                                       if "BLOCK_V" in c or c.get("cols")] + presplit if dt == torch.float32 else []):
            _sweep_one(rows, "wgrad", dt, shape, cfg, lambda cfg=cfg: dwmod._wgrad_pass(cfg, x, g, w))


def launch_overhead() -> dict:
    """Per-call wall time of the whole op (forward; forward+backward) at a tiny shape, where GPU work is
    negligible: the CPU cost of our dispatch + custom op + Triton launch, vs native F.conv2d."""
    res = {}
    x, w, b = dwconv.make_inputs(1, 8, 7, 13, 13, torch.bfloat16)
    for name, fn in (("native", dwconv._native), ("ours", dwconv._ours)):
        with torch.no_grad():
            res[f"{name}_fwd_us"] = 1000 * dwconv.cuda_time(lambda fn=fn: fn(x, w, b))
    gy = torch.randn(1, 8, 7, 7, device="cuda", dtype=torch.bfloat16)
    for name, fn in (("native", dwconv._native), ("ours", dwconv._ours)):
        res[f"{name}_fwdbwd_us"] = 1000 * dwconv.cuda_time(
            lambda fn=fn: torch.autograd.grad(fn(x, w, b), (x, w, b), gy))
    print("per-call wall time at N1 C8 7x7 K13 (us):", res, flush=True)
    # repeated calls run through the direct-launch cache (largekernel.ops._launch): check them against float64
    from largekernel.ops import _launch

    errs = []
    for n, c, h, k, dt in ((2, 64, 14, 27, torch.bfloat16), (2, 32, 56, 31, torch.bfloat16),
                           (4, 96, 7, 13, torch.float32), (2, 48, 28, 29, torch.float32)):
        xc, wc, bc = dwconv.make_inputs(n, c, h, k, k, dt)
        g = torch.randn(n, c, h, h, device="cuda", dtype=dt)
        for _ in range(3):
            got = (dwconv._ours(xc, wc, bc), *torch.autograd.grad(dwconv._ours(xc, wc, bc), (xc, wc, bc), g))
        xd, wd, bd = (t.detach().double().requires_grad_() for t in (xc, wc, bc))
        yd = F.conv2d(xd, wd, bd, padding="same", groups=c)
        ref = (yd, *torch.autograd.grad(yd, (xd, wd, bd), g.double()))
        errs.append(max(rel(a, r) for a, r in zip(got, ref)))
    res.update(fast_launch=_launch.FAST_LAUNCH, fast_launch_error=_launch.FAST_LAUNCH_ERROR,
               direct_entries=len(_launch._COMPILED), repeated_call_rel_err=errs)
    print("direct launches:", {k: res[k] for k in ("fast_launch", "fast_launch_error", "direct_entries",
                                                   "repeated_call_rel_err")}, flush=True)
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(100):
        torch.autograd.grad(dwconv._ours(x, w, b), (x, w, b), gy)
    torch.cuda.synchronize()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(22)
    return res


def sweep(shapes=((512, 14, 27, 27), (1024, 7, 13, 13), (256, 28, 29, 29)), dtypes=("bfloat16", "float32"),
          kinds=("fwd", "dgrad", "wgrad")) -> list[dict]:
    rows: list[dict] = []
    for dt in dtypes:
        for shape in shapes:
            _sweep_shape(rows, getattr(torch, dt), shape, kinds)
            torch.cuda.empty_cache()
    best = {}
    for r in rows:
        key = (r["kind"], r["dtype"], r["C"])
        if key not in best or r["ms"] < best[key]["ms"]:
            best[key] = r
    print("best per pass:")
    for r in best.values():
        print(f"  {r['kind']:5s} {r['dtype'][6:]:8s} C{r['C']} H{r['H']} K{r['K']} {r['ms']:.4f} ms {r['cfg']}")
    return rows


def check_compile() -> dict:
    from largekernel.layers.conv import DepthwiseConv2d
    from largekernel.ops import use_backend

    layer = DepthwiseConv2d(64, 31, bias=True).cuda()
    x = torch.randn(4, 64, 32, 32, device="cuda")
    with use_backend("triton"):
        path = layer.conv_path(x)
        ref = layer(x)
        torch._dynamo.reset()
        y = torch.compile(layer, fullgraph=True)(x)
    err = rel(y, ref.double())
    print(f"torch.compile(fullgraph=True) inductor: path={path} rel diff vs eager {err:.2e}", flush=True)
    return dict(path=path, rel=err)


def check_cross_fused(report: bool = True) -> list[dict]:
    """The fused cross kernel (``cross_depthwise_conv2d`` without autograd), each configuration forced, against the
    float64 pair of convs at SW-tiny's stage shapes (and a 61 x 61 plane with k = 5), fp32 and bf16, channels_last."""
    from largekernel.ops import cross_depthwise_conv2d
    from largekernel.ops import depthwise as dwmod

    rows = []
    for (c, hw, k, d), dt, tol in [(s, dt, tol) for s in ((80, 56, 3, 51), (160, 28, 3, 53), (320, 14, 3, 49),
                                                         (640, 7, 3, 17), (24, 61, 5, 45))
                                   for dt, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2))]:
        h = torch.randn(c, 1, k, d, device="cuda").to(dt)
        v = torch.randn(c, 1, d, k, device="cuda").to(dt)
        b = torch.randn(c, device="cuda").to(dt)
        x = torch.randn(5, c, hw, hw, device="cuda").to(dt).contiguous(memory_format=torch.channels_last)
        ref = (F.conv2d(x.double(), h.double(), b.double(), padding="same", groups=c)
               + F.conv2d(x.double(), v.double(), padding="same", groups=c))
        for cfg in (dict(NB=2), dict(NB=16, num_warps=8), dict(stack=True, NB=2, ITERS=2),
                    dict(stack=True, NB=1 if hw > 32 else 8, ITERS=1, num_warps=8), dict(tma=True, ITERS=3),
                    dict(tma=True, ITERS=1, num_warps=8)):
            dwmod.CROSS_CFG = cfg
            try:
                with torch.no_grad():
                    y = cross_depthwise_conv2d(x, h, v, b)
            except Exception as e:  # noqa: BLE001 - report the configuration that failed, go on
                rows.append(dict(check="cross_fused", shape=(5, c, hw, hw, k, d), cfg=cfg, dtype=str(dt),
                                 error=repr(e)[:300], ok=False))
                continue
            finally:
                dwmod.CROSS_CFG = {}
            err = rel(y, ref)
            rows.append(dict(check="cross_fused", shape=(5, c, hw, hw, k, d), cfg=cfg, dtype=str(dt), y=err,
                             ok=bool(err <= tol and y.is_contiguous(memory_format=torch.channels_last))))
    if report:
        _report(rows)
    return rows


def check_partial() -> list[dict]:
    """The copies around the kernels at SW-tiny's stage shapes (fp32 channels_last in, bf16 planes): ``padded_rows``
    and the split into convolved and passed-through planes bit for bit against PyTorch's cast and indexing, both back
    again bit for bit; then the partial ops (``channels=``, ``rest=``) under autocast against float64 convs of the
    listed channels and the scale and shift of the others."""
    from largekernel.ops import cross_depthwise_conv2d, depthwise_conv2d
    from largekernel.ops.depthwise import _channel_table
    from largekernel.ops.layout import from_padded_rows, merge_rows, padded_rows, split_rows, to_memory_format

    rows = []
    for c, hw, k, d in ((80, 56, 3, 51), (160, 28, 3, 53), (320, 14, 27, 27), (640, 7, 13, 13)):
        r = int(c * 0.77) // 2 * 2
        channels = torch.randperm(c, device="cuda")[:r].sort().values
        others = torch.tensor(sorted(set(range(c)) - set(channels.tolist())), device="cuda")
        plane, _ = _channel_table(channels, c)
        x = torch.randn(8, c, hw, hw, device="cuda").contiguous(memory_format=torch.channels_last)
        xb = x.bfloat16()
        scale, shift = torch.randn(c - r, device="cuda"), torch.randn(c - r, device="cuda")
        for align in (2, 16):
            planes = padded_rows(x, align, torch.bfloat16)
            back = (from_padded_rows(planes, torch.channels_last) if planes.stride(2) != hw else
                    to_memory_format(planes, torch.channels_last))
            mine, rest = split_rows(x, plane, r, align, torch.bfloat16)
            merged = merge_rows(mine, rest, plane)
            _, scaled = split_rows(x, plane, r, align, torch.bfloat16, (scale, shift))
            # (the GPU fuses the scale and shift into one FMA: one rounding fewer than PyTorch's multiply and add, so
            # a few values land one bf16 step away from those; against float64, both are within half a step)
            want = xb[:, others].double() * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1)
            scaled_ok = bool(((scaled.double() - want).abs() <= want.abs() * 2.0 ** -8 + 1e-5).all())
            ok = (torch.equal(planes, xb) and torch.equal(back, xb) and torch.equal(mine, xb[:, channels])
                  and torch.equal(rest, xb[:, others]) and torch.equal(merged, xb) and scaled_ok
                  and merged.is_contiguous(memory_format=torch.channels_last))
            rows.append(dict(check="copies", shape=(8, c, hw, hw), align=align, ok=bool(ok)))
        xd = xb.double()
        ref = xd.clone()
        ref[:, others] = xd[:, others] * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1)
        if k == 3:
            h, v = torch.randn(r, 1, k, d, device="cuda") / d ** 0.5, torch.randn(r, 1, d, k, device="cuda") / d ** 0.5
            b = torch.randn(r, device="cuda")
            ref[:, channels] = (F.conv2d(xd[:, channels], h.bfloat16().double(), b.bfloat16().double(), padding="same",
                                         groups=r)
                                + F.conv2d(xd[:, channels], v.bfloat16().double(), padding="same", groups=r))
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                y = cross_depthwise_conv2d(x, h, v, b, channels=channels, rest=(scale, shift))
        else:
            w, b = torch.randn(r, 1, k, k, device="cuda") / k, torch.randn(r, device="cuda")
            ref[:, channels] = F.conv2d(xd[:, channels], w.bfloat16().double(), b.bfloat16().double(),
                                        padding="same", groups=r)
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                y = depthwise_conv2d(x, w, b, channels=channels, rest=(scale, shift))
        err = rel(y, ref)
        rows.append(dict(check="partial", shape=(8, c, hw, hw, k, d), y=err,
                         ok=bool(err <= 1e-2 and y.dtype == torch.bfloat16
                                 and y.is_contiguous(memory_format=torch.channels_last))))
        _report(rows[-3:])
    return rows


def check_layers() -> list[dict]:
    """The layout copies and the cross-shaped depthwise layer on the GPU: ``to_memory_format`` bit for bit against
    PyTorch's copy; ``CrossDepthwiseConv2d`` on channels_last inputs (its CUDA-only path: one row-major copy for both
    convs, the sum converted back) against float64 ``F.conv2d`` with the dense cross kernel, forward (with and without
    autograd) and gradients."""
    from largekernel.layers.conv import CrossDepthwiseConv2d
    from largekernel.ops.layout import to_memory_format

    rows = []
    for shape, dt in (((64, 128, 56, 56), torch.bfloat16), ((3, 130, 9, 11), torch.float32),
                      ((2, 70, 5, 9), torch.float16), ((128, 640, 7, 7), torch.bfloat16)):
        x = torch.randn(shape, device="cuda").to(dt)
        cl = to_memory_format(x, torch.channels_last)
        back = to_memory_format(cl, torch.contiguous_format)
        ok = (cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(cl, x) and back.is_contiguous()
              and torch.equal(back, x))
        rows.append(dict(check="layout_copy", shape=shape, dtype=str(dt), ok=bool(ok)))
    for dt, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        c, k, d = 80, 3, 51
        h = torch.randn(c, 1, k, d, device="cuda") / d ** 0.5
        v = torch.randn(c, 1, d, k, device="cuda") / d ** 0.5
        b = torch.randn(c, device="cuda")
        layer = CrossDepthwiseConv2d(h, v, b).cuda().to(dt)
        dense = torch.zeros(c, 1, d, d, device="cuda", dtype=torch.float64)
        dense[:, :, (d - k) // 2:(d + k) // 2, :] += h.double()
        dense[:, :, :, (d - k) // 2:(d + k) // 2] += v.double()
        x = torch.randn(2, c, 56, 56, device="cuda").to(dt).contiguous(memory_format=torch.channels_last)
        xd = x.detach().double().requires_grad_()
        ref = F.conv2d(xd, dense, b.double(), padding="same", groups=c)
        g = torch.randn_like(ref)
        ref.backward(g)
        with torch.no_grad():
            y0 = layer(x)
        x.requires_grad_()
        y = layer(x)
        y.backward(g.to(dt))
        errs = dict(y_nograd=rel(y0, ref.detach()), y=rel(y.detach(), ref.detach()), dx=rel(x.grad, xd.grad))
        ok = all(e <= tol for e in errs.values()) and y.is_contiguous(memory_format=torch.channels_last)
        rows.append(dict(check="cross_dw", dtype=str(dt), ok=bool(ok), **errs))
    _report(rows)   # (as each group finishes: a run cut short by a time limit still says what passed)
    rows += check_cross_fused()
    return rows + check_partial()


def _report(rows: list[dict]) -> None:
    for r in rows:
        print(("OK  " if r["ok"] else "FAIL"), r, flush=True)


def quick(native_from: str | None) -> dict:
    """Short run: in-place kernel flip + small-plane tiles at full C/H/K, timings of the small-plane stage
    shapes, peak memory (bf16, NCHW)."""
    small_w = lambda w: dict(BLOCK_M=128, BLOCK_W=16, BLOCK_U=min(64, dwmod._bw(16 + 27 + 7)),  # noqa: E731
                             num_warps=8, prefetch=True)
    variants = [VARIANTS[0], ("small", small_w, lambda w: dict(BLOCK_K=128, programs=1056, num_stages=3))]
    dwmod.POISON = True
    out = []
    for case, vs, dts in (((2, 128, 56, 56, 31, 31, False), variants[:1], (torch.bfloat16,)),
                          ((2, 512, 14, 14, 27, 27, False), variants, (torch.bfloat16, torch.float32)),
                          ((8, 1024, 7, 7, 13, 13, True), variants, (torch.bfloat16,))):
        for dt in dts:
            out.extend(_check_case(case, dt, 1e-5 if dt == torch.float32 else 1e-2, vs))
    dwmod.FWD_CFG, dwmod.WGRAD_CFG = {}, {}
    dwmod.POISON = False
    rep = dict(correctness=out)
    rep["bench"] = dwconv.run(64, ("bfloat16",), [(512, 14, 27, 27), (1024, 7, 13, 13)],
                              native_from=native_from)
    rep["tuned"] = dwconv.tuned()
    x, w, b = dwconv.make_inputs(64, 128, 56, 31, 31, torch.bfloat16)
    g = torch.randn_like(x)
    mem = {}
    for name, fn in (("native", dwconv._native), ("ours", dwconv._ours)):
        torch.autograd.grad(fn(x, w, b), (x, w, b), g)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        grads = torch.autograd.grad(fn(x, w, b), (x, w, b), g)
        torch.cuda.synchronize()
        mem[name] = (torch.cuda.max_memory_allocated() - base) / 2**20
        del grads
    print("peak fwd+bwd above inputs (MiB), bf16 NCHW 128/56/31:", mem, flush=True)
    rep["memory"] = mem
    for r in rep["bench"]:
        print(dwconv.format_row(r))
    return rep


def _dump(report: dict) -> None:
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gpu_check.json"), "w") as f:
            json.dump(report, f, indent=1, default=str)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="short run, see quick()")
    ap.add_argument("--sweep", action="store_true", help="also time fixed tile configurations one by one")
    ap.add_argument("--compile", action="store_true", help="also check torch.compile (inductor)")
    ap.add_argument("--native-from", default=None, help="JSON of an earlier run to take native timings from")
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--no-check", action="store_true", help="skip the correctness and memory checks")
    ap.add_argument("--overhead", action="store_true", help="only the per-call CPU overhead and its profile")
    ap.add_argument("--memory", action="store_true", help="only the peak-memory comparison")
    ap.add_argument("--memory-h", type=lambda v: [int(h) for h in v.split(",")], default=None,
                    help="--memory: only these plane sizes (e.g. 56,28)")
    ap.add_argument("--memory-dtypes", default="bfloat16,float32", help="--memory: these dtypes")
    ap.add_argument("--layers", action="store_true",
                    help="only the layout-copy, cross-layer and partial-conv (ghost channels) checks")
    ap.add_argument("--cross", action="store_true", help="only the fused cross kernel's checks")
    ap.add_argument("--shapes", default="all", help="'quick' = the 4 stage shapes")
    ap.add_argument("--sweep-shapes", default="512/14/27,1024/7/13,256/28/29", help="C/H/K list for --sweep")
    ap.add_argument("--sweep-dtypes", default="bfloat16,float32")
    ap.add_argument("--sweep-kinds", default="fwd,dgrad,wgrad")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory comparison")
    ap.add_argument("--variants", default=None, help="comma-separated VARIANTS names to check (default: all)")
    args = ap.parse_args()
    t0 = time.time()
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    if args.quick:
        report = quick(args.native_from)
        _dump(report)
        bad = [r for r in report["correctness"] if not r["ok"]]
        print(f"[{time.time() - t0:.0f}s] correctness: {len(report['correctness']) - len(bad)} ok, {len(bad)} failed")
        sys.exit(1 if bad else 0)
    if args.overhead:
        launch_overhead()
        return
    if args.memory:   # (with the tuner's timings of every candidate tried during the warm-up calls)
        cases = [m for m in MEMORY_CASES if args.memory_h is None or m[1] in args.memory_h]
        dtypes = [getattr(torch, d) for d in args.memory_dtypes.split(",")]
        _dump(dict(memory=peak_memory(cases, dtypes), tuning_log=dwconv.tuning_log()))
        return
    if args.layers or args.cross:
        rows = check_cross_fused() if args.cross else check_layers()
        _dump(dict(layers=rows))
        sys.exit(0 if all(r["ok"] for r in rows) else 1)
    report: dict = dict(device=torch.cuda.get_device_name(), torch=torch.__version__)
    variants = VARIANTS if args.variants is None else [v for v in VARIANTS if v[0] in args.variants.split(",")]
    report["correctness"] = [] if args.no_check else check_correctness(variants)
    try:
        report["memory"] = {} if args.no_check or args.no_memory else peak_memory()
    except Exception as e:  # noqa: BLE001
        print("memory check failed:", repr(e)[:500], flush=True)
    _dump(report)
    if args.compile:
        try:
            report["compile"] = check_compile()
        except Exception as e:  # noqa: BLE001 - report, do not stop the run
            print("compile check failed:", repr(e)[:500], flush=True)
            report["compile"] = dict(error=repr(e)[:500])
    print(f"[{time.time() - t0:.0f}s] checks done", flush=True)
    if args.sweep:
        report["overhead"] = launch_overhead()
        shapes = [tuple(int(v) for v in sh.split("/")) for sh in args.sweep_shapes.split(",")]
        report["sweep"] = sweep([(c, h, k, k) for c, h, k in shapes], args.sweep_dtypes.split(","),
                                args.sweep_kinds.split(","))
        print(f"[{time.time() - t0:.0f}s] sweep done", flush=True)
    if not args.no_bench:
        shapes = dwconv.SHAPES[:4] if args.shapes == "quick" else dwconv.SHAPES
        report["bench"] = dwconv.run(64, ("bfloat16", "float32"), shapes, ours_cl=True, native_from=args.native_from)
        report["tuned"] = dwconv.tuned()
        print(f"\n[{time.time() - t0:.0f}s] {torch.cuda.get_device_name()}, batch 64")
        print(dwconv.HEADER)
        for r in report["bench"]:
            print(dwconv.format_row(r))
    _dump(report)
    bad = [r for r in report["correctness"] if not r["ok"]]
    print(f"correctness: {len(report['correctness']) - len(bad)} ok, {len(bad)} failed")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()

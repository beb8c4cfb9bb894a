"""Triton depthwise kernels vs float64 F.conv2d, on the CPU through Triton's interpreter.

Triton reads TRITON_INTERPRET when a kernel is decorated, and setting it in this pytest process would
leak into every other test, so the checks run in one subprocess (this file run as a script) with the
variable set before anything imports triton; the pytest side only reads its JSON verdicts.
Inputs are drawn fresh each run (the seed is printed on failure); kernel outputs are NaN-poisoned. Errors are
relative to the float64 root-sum-square of the summed terms (see ``_run_case``).
"""
import json
import os

import pytest

# (name, N, C, H, W, kh, kw, dtype, layout, bias, grads)   layout: nchw | cl | strided
CASES = [
    ("odd_bias_fp32", 2, 5, 9, 13, 7, 7, "float32", "nchw", True, "xwb"),
    ("even_batch1_fp32", 1, 3, 10, 7, 4, 4, "float32", "nchw", False, "xw"),
    ("rect_odd_fp32", 2, 7, 12, 9, 7, 3, "float32", "nchw", True, "xwb"),
    ("rect_even_fp32", 1, 3, 8, 11, 2, 5, "float32", "nchw", False, "xw"),
    ("wide_rect_fp32", 1, 3, 6, 20, 3, 17, "float32", "nchw", True, "xwb"),
    ("channels_last_fp32", 2, 6, 9, 10, 5, 5, "float32", "cl", True, "xwb"),
    ("strided_fp32", 2, 3, 11, 9, 6, 5, "float32", "strided", False, "xw"),
    ("kernel_over_image_fp32", 1, 3, 5, 6, 9, 11, "float32", "nchw", True, "xwb"),
    ("kernel_beyond_reach_fp32", 2, 3, 5, 4, 13, 12, "float32", "nchw", True, "xwb"),   # cut to 9 x 7
    ("kernel_beyond_reach_bf16_cl", 2, 4, 6, 7, 17, 5, "bfloat16", "cl", False, "xw"),   # cut to 11 x 5
    ("weight_grad_only_fp32", 2, 3, 7, 9, 5, 5, "float32", "nchw", True, "wb"),
    ("input_grad_only_fp32", 1, 3, 7, 9, 5, 4, "float32", "nchw", False, "x"),
    ("bf16_bias", 2, 5, 9, 13, 7, 7, "bfloat16", "nchw", True, "xwb"),
    ("bf16_even_cl", 1, 3, 10, 7, 6, 4, "bfloat16", "cl", False, "xw"),
    ("fp16_rect", 1, 3, 8, 9, 3, 5, "float16", "nchw", True, "xwb"),
    ("vec8_bf16", 2, 3, 9, 16, 5, 7, "bfloat16", "nchw", True, "xwb"),   # W, strides multiples of 8
    ("vec4_even_fp32", 1, 5, 6, 24, 6, 4, "float32", "nchw", False, "xw"),
    ("batch_over_tile_fp32", 19, 3, 6, 5, 7, 7, "float32", "nchw", True, "xwb"),   # > BLOCK_M / NB images
]
VARIANTS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9)   # see largekernel.ops.depthwise.INTERP_VARIANT


def _variant_applies(variant: int, case: tuple) -> bool:
    """Variant 9 only where its Gram weight grad runs (a plane it fits, with a weight grad): elsewhere its weight
    grad is variant 8's and its forward falls back to variant 2's (no room for copies in a 1-2 image output)."""
    if variant != 9:
        return True
    from largekernel.ops._dw_kernels import gram_fits

    return gram_fits(case[3], case[4]) and "w" in case[10]


# cases that exercise one variant only: (variant, case)
VARIANT_CASES = [
    # the band copies (of the kernel's two bf16 parts) fit in the output's last 60 images; the first 20 read them, the
    # gathering kernel does the rest
    (9, ("copies_in_tail_fp32", 80, 1, 6, 5, 7, 7, "float32", "nchw", True, "xwb")),
    # the large-plane form: fp32 copies in the last 9 images, a row tile computes those (forward and input grad)
    (9, ("copies_in_tail_row_rest_fp32", 24, 1, 9, 12, 5, 5, "float32", "nchw", True, "xwb")),
    # the column-Gram weight grad reading grad_out's and x's bf16 parts, split once per group of C // 2 = 2 channels
    # into dx's storage before the input grad
    (9, ("parts_in_channel_groups_wgrad_fp32", 3, 5, 7, 9, 5, 5, "float32", "nchw", True, "xwb")),
]
# forward / input-grad configuration forced for a case (else the variant's)
FORCED_FWD = {"copies_in_tail_row_rest_fp32": dict(plane=True, bands=True, BLOCK_M=16, BLOCK_N=16, BLOCK_K=16,
                                                   tail=dict(BLOCK_M=16, BLOCK_W=16, BLOCK_U=16, prefetch=True))}
# weight-grad configuration forced for a case
FORCED_WGRAD = {"parts_in_channel_groups_wgrad_fp32": dict(cols=True, NI=2, BLOCK_R=16, programs=8, presplit="gx")}
TAIL_CASES = [c for _, c in VARIANT_CASES if "tail" in c[0]]
_ALL_CASES = [(v, c) for c in CASES for v in VARIANTS if _variant_applies(v, c)] + VARIANT_CASES
TOL = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 5e-3}


def _run_case(case, torch, F, depthwise_conv2d, depthwise_path):
    name, N, C, H, W, kh, kw, dtype, layout, with_bias, grads = case
    dt = getattr(torch, dtype)
    if layout == "strided":   # a non-contiguous view: every other column of a wider tensor
        x = torch.randn(N, C, H, 2 * W, dtype=dt)[..., ::2]
    else:
        x = torch.randn(N, C, H, W, dtype=dt)
        if layout == "cl":
            x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(C, 1, kh, kw, dtype=dt) / (kh * kw) ** 0.5
    b = torch.randn(C, dtype=dt) if with_bias else None
    x.requires_grad_("x" in grads)
    w.requires_grad_("w" in grads)
    if b is not None:
        b.requires_grad_("b" in grads)
    path = depthwise_path(x, w, b)
    y = depthwise_conv2d(x, w, b)
    g = torch.randn_like(y)
    y.backward(g)

    def reference(xr, wr, br, gr):   # float64 F.conv2d: the output and the gradients of xr, wr, br
        xr, wr = xr.detach().double().requires_grad_(), wr.detach().double().requires_grad_()
        br = br.detach().double().requires_grad_() if br is not None else None
        yr = F.conv2d(xr, wr, br, padding="same", groups=C)
        yr.backward(gr.double())
        return yr.detach(), xr.grad, wr.grad, br.grad if br is not None else None

    refs = reference(x, w, b, g)
    # Every result is a sum of random-signed products. Its error is judged against the root of the sum of the squared
    # terms (the same float64 computation on squares, square-rooted): the result's expected magnitude, which unlike
    # the result cannot cancel to near zero. (A one-channel bias gradient is a single sum over N*H*W values; judged
    # against itself, one seed in ~100 measured 1.8e-5.)
    squares = reference(x.square(), w.square(), b.square() if b is not None else None, g.square())
    scales = [t.sqrt() if t is not None else None for t in squares]

    def rel(a, i):
        return float((a.double() - refs[i]).norm() / scales[i].norm()) if torch.isfinite(a).all() else float("nan")

    out = {"path": path, "y": rel(y, 0), "y_layout_kept": bool(y.stride() == x.stride() or layout == "strided")}
    if "x" in grads:
        out["dx"] = rel(x.grad, 1)
    if "w" in grads:
        out["dw"] = rel(w.grad, 2)
    if "b" in grads:
        out["db"] = rel(b.grad, 3)
    return out


def _band_copies_match(torch) -> dict:
    """The band-copy builder (one Triton launch reading the kernel flipped / transposed in place) against the
    layout built independently with torch ops: Q[c, i, s, k] = P_i[k + s], P_i[e0 - j] = w'[i, j], w' = w flipped
    and/or transposed."""
    from largekernel.ops import _dw_kernels as K

    out = {}
    w = torch.randn(3, 5, 7)
    for flip in (False, True):
        for transpose in (False, True):
            eff = w.flip(-2, -1) if flip else w
            eff = eff.transpose(1, 2) if transpose else eff
            e0, length, bvec = 20, 30, 8
            lq = -(-length // bvec) * bvec
            p = torch.zeros(eff.shape[0], eff.shape[1], lq + bvec)
            p[:, :, e0 - eff.shape[2] + 1:e0 + 1] = eff.flip(-1)
            ref = torch.stack([p[:, :, s:s + lq] for s in range(bvec)], dim=2)
            q, lq_got = K.band_copies(w, K._taps(w, flip, transpose), e0, length, bvec)
            out[f"flip={flip},transpose={transpose}"] = bool(lq_got == lq and torch.equal(q, ref))
    return out


def _plane_band_reads_in_copies(torch, F) -> dict:
    """The whole-plane GEMM reads only the band copies' rows (``plane_band_geometry``): the copies are placed in the
    middle of a NaN-filled buffer, so a read before or after them turns the output NaN. Tall planes (the rows
    bound by the kernel, not the plane), several output rows per tile, chunks wider than a row, the flipped kernel."""
    from largekernel.ops import _dw_kernels as K

    build = K._band_copies

    def guarded(w, taps, rows, rp, e0, lq, bvec, out=None, part=0):
        n = w.shape[0] * rows * bvec * lq
        return build(w, taps, rows, rp, e0, lq, bvec, torch.full((3 * n,), float("nan"), dtype=w.dtype)[n:2 * n], part)

    K._band_copies = guarded
    out = {}
    try:
        for (n, c, h, w_, kh, kw), bn, bk, flip in (((2, 2, 20, 9, 5, 5), 16, 16, False),
                                                   ((1, 1, 40, 10, 31, 31), 32, 16, True),
                                                   ((1, 2, 12, 6, 6, 4), 16, 32, False)):
            x, w = torch.randn(n, c, h, w_), torch.randn(c, kh, kw)
            ph, pw = (kh - 1) // 2, (kw - 1) // 2
            if flip:
                ph, pw = kh - 1 - ph, kw - 1 - pw
            y = torch.full_like(x, float("nan"))
            K.launch_fwd(x, w, None, y, ph, pw, dict(plane=True, bands=True, BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk,
                                                     prefetch=True), "ieee", True, flip)
            wf = w.flip(-2, -1) if flip else w
            ref = F.conv2d(F.pad(x.double(), (pw, kw - 1 - pw, ph, kh - 1 - ph)), wf.double()[:, None], groups=c)
            out[f"{h}x{w_}/K{kh}x{kw}/N{bn}/K{bk}/flip={flip}"] = float((y.double() - ref).norm() / ref.norm())
    finally:
        K._band_copies = build
    return out


def _layout_copies_match(torch) -> dict:
    """The Triton NCHW <-> channels_last transpose against PyTorch's own copy, bit for bit (odd sizes, partial
    tiles, one-pixel planes, three dtypes), and the copies to and from row-major planes with padded rows."""
    from largekernel.ops.layout import from_padded_rows, padded_rows, to_memory_format

    out = {}
    for shape in ((2, 70, 5, 9), (1, 3, 1, 1), (3, 130, 9, 11)):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x = torch.randn(shape).to(dtype)
            cl = to_memory_format(x, torch.channels_last, use_triton=True)
            back = to_memory_format(cl, torch.contiguous_format, use_triton=True)
            out[f"{shape}/{dtype}"] = bool(
                cl.is_contiguous(memory_format=torch.channels_last) and back.is_contiguous()
                and torch.equal(cl, x.contiguous(memory_format=torch.channels_last)) and torch.equal(back, x))
        # rows padded to 16-byte strides (the TMA cross kernel's planes): same values, zeros in the padding, and back
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(shape).to(dtype).contiguous(memory_format=torch.channels_last)
            rows = padded_rows(x)
            wp = rows.stride(2)
            full = rows.as_strided(rows.shape[:3] + (wp,), rows.stride())
            back = from_padded_rows(rows, torch.channels_last)
            out[f"{shape}/{dtype}/padded"] = bool(
                (wp * x.element_size()) % 16 == 0 and wp - x.shape[-1] < 16 // x.element_size()
                and rows.stride(1) == x.shape[2] * wp and torch.equal(rows, x) and not full[..., x.shape[-1]:].any()
                and back.is_contiguous(memory_format=torch.channels_last) and torch.equal(back, x))
        # ... casting on the way (the cross op under autocast): PyTorch's own cast, bit for bit
        for src in (torch.float32, torch.float16):
            x = torch.randn(shape).to(src).contiguous(memory_format=torch.channels_last)
            rows = padded_rows(x, dtype=torch.bfloat16)
            full = rows.as_strided(rows.shape[:3] + (rows.stride(2),), rows.stride())
            out[f"{shape}/cast/{src}"] = bool(rows.dtype == torch.bfloat16 and (rows.stride(2) * 2) % 16 == 0
                                              and torch.equal(rows, x.bfloat16()) and not full[..., x.shape[-1]:].any())
    # autograd: the gradient comes back through the inverse copy, in the input's layout
    x = torch.randn(2, 5, 3, 4).contiguous(memory_format=torch.channels_last).requires_grad_()
    g = torch.randn(2, 5, 3, 4)
    (to_memory_format(x, torch.contiguous_format, use_triton=True) * g).sum().backward()
    out["grad"] = bool(torch.equal(x.grad, g) and x.grad.is_contiguous(memory_format=torch.channels_last))
    return out


# fused cross conv (inference): (N, C, H, W, k, D, dtype, channels_last, bias)
CROSS_CASES = [(3, 2, 9, 12, 3, 11, "float32", False, True), (2, 3, 7, 7, 3, 17, "float32", True, False),   # cut
               (2, 2, 20, 17, 5, 9, "bfloat16", True, True), (5, 2, 6, 5, 3, 13, "float16", False, True),
               (3, 2, 10, 16, 3, 9, "bfloat16", True, True)]   # (32-byte rows: the TMA kernel without padding)
# one plane per product (the CPU default), 2 images stacked per product, 2 groups per program (N = 3, 5: a partial
# group), and the TMA kernel, 2 images per program (rows whose bytes are no multiple of 16 copied into padded planes)
CROSS_CFGS = {"plain": {}, "stacked": dict(stack=True, NB=2, ITERS=2), "tma": dict(tma=True, ITERS=2),
              "tma-streamed": dict(tma=True, ITERS=2, hoist=False)}


def _cross_matches(torch, F) -> dict:
    """The fused cross kernel (a k x D plus a D x k depthwise conv, the sum and the bias in one pass) against the two
    float64 convs; counts its launches, so that a fall-back to the pair of convs fails."""
    import largekernel.ops.depthwise as dw
    from largekernel.ops import _dw_cross, cross_depthwise_conv2d

    launch_cross, launches = _dw_cross.launch_cross, []

    def counted(*args, **kwargs):
        launches.append(1)
        return launch_cross(*args, **kwargs)

    _dw_cross.launch_cross = counted
    out = {}

    def each_configuration(name, x, wh, wv, b, ref, tol, fmt, autocast=False):
        for kind, cfg in CROSS_CFGS.items():
            launches.clear()
            dw.CROSS_CFG = cfg
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                y = cross_depthwise_conv2d(x, wh, wv, b)
            dw.CROSS_CFG = {}
            out[f"{name}/{kind}"] = dict(
                rel=float((y.double() - ref).norm() / ref.norm()) if torch.isfinite(y).all() else float("nan"),
                tol=tol, fused=len(launches) == 1 and (not autocast or y.dtype == torch.bfloat16),
                layout_kept=y.is_contiguous(memory_format=fmt))

    for n, c, h, w, k, d, dtype, cl, with_bias in CROSS_CASES:
        dt = getattr(torch, dtype)
        x = torch.randn(n, c, h, w, dtype=dt)
        x = x.contiguous(memory_format=torch.channels_last) if cl else x
        wh, wv = torch.randn(c, 1, k, d, dtype=dt), torch.randn(c, 1, d, k, dtype=dt)
        b = torch.randn(c, dtype=dt) if with_bias else None
        ref = (F.conv2d(x.double(), wh.double(), None if b is None else b.double(), padding="same", groups=c)
               + F.conv2d(x.double(), wv.double(), padding="same", groups=c))
        fmt = torch.channels_last if cl else torch.contiguous_format
        each_configuration(f"{n}x{c}x{h}x{w}/{k}x{d}/{dtype}", x, wh, wv, b, ref, TOL[dtype], fmt)
    # a crop of a wider tensor (unit stride along W, not contiguous): each configuration reads the crop, not its parent
    x = torch.randn(2, 3, 9, 14)[..., 1:-1]
    wh, wv = torch.randn(3, 1, 3, 7), torch.randn(3, 1, 7, 3)
    ref = (F.conv2d(x.double(), wh.double(), padding="same", groups=3)
           + F.conv2d(x.double(), wv.double(), padding="same", groups=3))
    each_configuration("crop", x, wh, wv, None, ref, TOL["float32"], torch.contiguous_format)
    # under autocast (fp32 channels_last input, bf16 run): every configuration casts x in its copy to row-major planes
    x = torch.randn(3, 2, 10, 12).contiguous(memory_format=torch.channels_last)
    wh, wv, b = torch.randn(2, 1, 3, 9), torch.randn(2, 1, 9, 3), torch.randn(2)
    ref = (F.conv2d(x.bfloat16().double(), wh.bfloat16().double(), b.bfloat16().double(), padding="same", groups=2)
           + F.conv2d(x.bfloat16().double(), wv.bfloat16().double(), padding="same", groups=2))
    each_configuration("autocast", x, wh, wv, b, ref, TOL["bfloat16"], torch.channels_last, autocast=True)
    _dw_cross.launch_cross = launch_cross
    return out


def _autocast_cast_in_copy(torch, F) -> dict:
    """Under autocast, without autograd, a channels_last fp32 input is cast by the row-major copy (not before it): the
    result equals, bit for bit, the call that casts first (an input that requires grad takes that path), and the
    float64 conv of the cast operands; bf16, channels_last."""
    import largekernel.ops.depthwise as dw
    from largekernel.ops import depthwise_conv2d

    copies, padded_rows = [], dw.padded_rows

    def counted(t, *args):   # the copies that cast: fp32 in, bf16 out
        rows = padded_rows(t, *args)
        copies.append((t.dtype, rows.dtype))
        return rows

    x = torch.randn(2, 3, 9, 11).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(3, 1, 13, 13), torch.randn(3)
    ref = F.conv2d(x.bfloat16().double(), w.bfloat16().double(), b.bfloat16().double(), padding="same", groups=3)
    dw.padded_rows = counted
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            y = depthwise_conv2d(x, w, b)
        cast_first = depthwise_conv2d(x.clone().requires_grad_(), w, b).detach()
    dw.padded_rows = padded_rows
    return dict(rel=float((y.double() - ref).norm() / ref.norm()), bf16=y.dtype == torch.bfloat16,
                layout_kept=y.is_contiguous(memory_format=torch.channels_last), equal=torch.equal(y, cast_first),
                cast_in_copy=copies == [(torch.float32, torch.bfloat16)])


def _partial_channels_match(torch, F) -> dict:
    """A depthwise conv on some channels, a scale and shift on the others (``channels``, ``rest``): the two copies
    that split channels_last input into the convolved planes and the rest, and merge them back, against PyTorch's
    indexing (bit for bit; the scale in float64); both ops through them (their kernels see the R planes only) and
    through the gather / scatter path (NCHW, autograd) against the float64 conv of the listed channels."""
    import largekernel.ops.depthwise as dw
    from largekernel.ops import cross_depthwise_conv2d, depthwise_conv2d
    from largekernel.ops.layout import merge_rows, split_rows

    out = {}
    c, channels = 7, torch.tensor([5, 0, 2, 3])   # (any order: kernel j applies to channel channels[j])
    others = [1, 4, 6]
    plane = torch.tensor([1, -1, 2, 3, -2, 0, -3], dtype=torch.int32)
    for shape in ((2, c, 5, 9), (1, c, 1, 1), (3, c, 9, 11)):
        x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
        for dtype, align in ((torch.float32, 4), (torch.bfloat16, 16), (torch.float16, 2)):
            mine, rest = split_rows(x, plane, 4, align, dtype)
            back = merge_rows(mine, rest, plane)
            scale, shift = torch.randn(3), torch.randn(3)
            _, scaled = split_rows(x, plane, 4, align, dtype, (scale, shift))
            want = x[:, others].to(dtype).double() * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1)
            out[f"copies/{shape}/{dtype}"] = bool(
                torch.equal(mine, x[:, channels].to(dtype)) and torch.equal(rest, x[:, others].to(dtype))
                and (mine.stride(2) * mine.element_size()) % align == 0 and torch.equal(back, x.to(dtype))
                and back.is_contiguous(memory_format=torch.channels_last) and scaled.dtype == dtype
                and ((scaled.double() - want).abs() <= want.abs() * 2 ** -7 + 1e-6).all())

    split, splits = dw.split_rows, []

    def counted(t, plane, count, *args):   # the one copy in: how many planes the kernels then see
        splits.append(count)
        return split(t, plane, count, *args)

    dw.split_rows = counted
    w, b = torch.randn(4, 1, 9, 9), torch.randn(4)
    wh, wv = torch.randn(4, 1, 3, 11), torch.randn(4, 1, 11, 3)
    scale, shift = torch.randn(3), torch.randn(3)
    for name, layout, autocast, grad in (("cl", torch.channels_last, False, False),
                                         ("cl-autocast", torch.channels_last, True, False),
                                         ("nchw", torch.contiguous_format, False, False),
                                         ("cl-grad", torch.channels_last, False, True)):
        x = torch.randn(2, c, 10, 13).contiguous(memory_format=layout)
        cast = (lambda t: t.bfloat16().double()) if autocast else (lambda t: t.double())
        xd = cast(x)
        sq = xd.clone()
        sq[:, channels] = F.conv2d(xd[:, channels], cast(w), cast(b), padding="same", groups=4)
        sq[:, others] = xd[:, others] * cast(scale).view(1, -1, 1, 1) + cast(shift).view(1, -1, 1, 1)
        cr = xd.clone()
        cr[:, channels] = (F.conv2d(xd[:, channels], cast(wh), cast(b), padding="same", groups=4)
                           + F.conv2d(xd[:, channels], cast(wv), padding="same", groups=4))
        tol = TOL["bfloat16" if autocast else "float32"]
        for op, ref in (("square", sq), ("cross", cr)):
            splits.clear()
            xin = x.clone().requires_grad_(grad)
            with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                yg = (depthwise_conv2d(xin, w, b, channels=channels, rest=(scale, shift)) if op == "square" else
                      cross_depthwise_conv2d(xin, wh, wv, b, channels=channels))
            y = yg.detach()
            r = dict(rel=float((y.double() - ref).norm() / ref.norm()) if torch.isfinite(y).all() else float("nan"),
                     tol=tol, layout_kept=y.is_contiguous(memory_format=layout),
                     dtype=y.dtype == (torch.bfloat16 if autocast else torch.float32),
                     copies=splits == ([] if grad or layout != torch.channels_last else [4]))
            if grad:   # the gather / scatter path: d/dx of <y, g> against float64 autograd of the same reference
                g = torch.randn_like(ref)
                (yg.double() * g).sum().backward()
                xr = x.double().requires_grad_()
                yr = xr.clone()
                yr = yr.index_copy(1, channels, F.conv2d(xr[:, channels], w.double(), b.double(), padding="same",
                                                          groups=4) if op == "square" else
                                   F.conv2d(xr[:, channels], wh.double(), b.double(), padding="same", groups=4)
                                   + F.conv2d(xr[:, channels], wv.double(), padding="same", groups=4))
                if op == "square":
                    yr = yr.index_copy(1, torch.tensor(others), xr[:, others] * scale.double().view(1, -1, 1, 1)
                                       + shift.double().view(1, -1, 1, 1))
                (yr * g).sum().backward()
                r["grad_rel"] = float((xin.grad.double() - xr.grad).norm() / xr.grad.norm())
            out[f"{op}/{name}"] = r
    dw.split_rows = split
    for name, bad, match in (("repeated", torch.tensor([0, 0, 2, 3]), "distinct"),
                             ("out of range", torch.tensor([0, 1, 2, 7]), "distinct"),
                             ("too few", torch.tensor([0, 1, 2]), "lists 3 channels")):
        try:
            depthwise_conv2d(torch.randn(1, c, 5, 5), w, b, channels=bad)
            out[f"error/{name}"] = False
        except ValueError as e:
            out[f"error/{name}"] = match in str(e)
    return out


def _plane_operator_matches(torch, F) -> dict:
    """Inference on small planes through the dense plane-operator GEMM (forced): 2-byte types, odd / even /
    beyond-reach kernels, a channels_last fp32 input under autocast, a conv on some channels only; against float64
    F.conv2d of the same (rounded) operands. Then the operator cache: the same operator on a second call, a new one
    once the weight is changed in place (and the output follows it), none for a call with autograd."""
    import largekernel.ops.depthwise as dw
    from largekernel.ops import depthwise_conv2d

    def rel(y, ref):
        return float((y.double() - ref).norm() / ref.norm()) if torch.isfinite(y).all() else float("nan")

    def operator_of(w):
        return next((hit[2] for hit in dw._PLANE_OPERATORS.values() if hit[0]() is w), None)

    out = {}
    dw.FWD_CFG = dict(dense=True, BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)
    try:
        for name, n, c, h, w, kh, kw, dtype in (("odd_bf16", 16, 3, 6, 6, 5, 5, torch.bfloat16),
                                                ("even_rect_fp16", 20, 2, 5, 7, 4, 6, torch.float16),
                                                ("beyond_reach_bf16", 16, 2, 4, 5, 13, 11, torch.bfloat16)):
            x = torch.randn(n, c, h, w).to(dtype)
            wt, b = (torch.randn(c, 1, kh, kw) / kh).to(dtype), torch.randn(c).to(dtype)
            with torch.no_grad():
                y = depthwise_conv2d(x, wt, b)
            ref = F.conv2d(x.double(), wt.double(), b.double(), padding="same", groups=c)
            out[name] = dict(rel=rel(y, ref), operator=operator_of(wt) is not None)
        # fp32 channels_last under autocast, all channels and some (the split copies feed the GEMM R planes)
        x = torch.randn(16, 5, 6, 7).contiguous(memory_format=torch.channels_last)
        wt, b = torch.randn(5, 1, 7, 5) / 7, torch.randn(5)
        wr, br, channels = wt[:3].clone(), b[:3].clone(), torch.tensor([4, 0, 2])
        scale, shift = torch.randn(2), torch.randn(2)
        xd = x.bfloat16().double()
        ref = F.conv2d(xd, wt.bfloat16().double(), b.bfloat16().double(), padding="same", groups=5)
        part = xd.clone()
        part[:, channels] = F.conv2d(xd[:, channels], wr.bfloat16().double(), br.bfloat16().double(), padding="same",
                                     groups=3)
        part[:, [1, 3]] = xd[:, [1, 3]] * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            y = depthwise_conv2d(x, wt, b)
            yp = depthwise_conv2d(x, wr, br, channels=channels, rest=(scale, shift))
        out["autocast_cl"] = dict(rel=rel(y, ref), operator=operator_of(wt) is not None
                                  and y.is_contiguous(memory_format=torch.channels_last))
        out["partial_cl"] = dict(rel=rel(yp, part), operator=operator_of(wr) is not None
                                 and yp.is_contiguous(memory_format=torch.channels_last))
        # the cache: kept while the weight is unchanged, rebuilt after an in-place change, untouched with autograd
        x = torch.randn(16, 3, 6, 6).bfloat16()
        wt, b = torch.randn(3, 1, 5, 5).bfloat16(), torch.randn(3).bfloat16()
        with torch.no_grad():
            depthwise_conv2d(x, wt, b)
            first = operator_of(wt)
            depthwise_conv2d(x, wt, b)
            kept = operator_of(wt) is first
            wt.mul_(-0.5)
            y = depthwise_conv2d(x, wt, b)
        ref = F.conv2d(x.double(), wt.double(), b.double(), padding="same", groups=3)
        dw.FWD_CFG = {}
        trained = torch.randn(3, 1, 5, 5).bfloat16().requires_grad_()
        depthwise_conv2d(x, trained, b).sum().backward()
        out["cache"] = dict(rel=rel(y, ref), operator=kept and operator_of(wt) is not first
                            and operator_of(trained) is None and trained.grad is not None)
    finally:
        dw.FWD_CFG = {}
    return out


def _main() -> None:
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import torch.nn.functional as F
    from conftest import shard_of

    import largekernel.ops.depthwise as dw
    from largekernel.ops import depthwise_conv2d, depthwise_path
    from largekernel.ops.dispatch import set_backend

    seed = torch.seed()
    set_backend("triton")
    dw.POISON = True
    results = {"seed": seed}
    mine = shard_of(_ALL_CASES + [(None, "band_copies"), (None, "plane_band_reads"), (None, "layout_copies"),
                                  (None, "cross"), (None, "autocast"), (None, "partial"),
                                  (None, "plane_operator")])
    for variant, case in mine:
        if variant is None or (variant, case) in VARIANT_CASES:
            continue
        dw.INTERP_VARIANT = variant
        results[f"{case[0]}/v{variant}"] = _run_case(case, torch, F, depthwise_conv2d, depthwise_path)
    from largekernel.ops import _dw_kernels as K

    tail_scratch, split_at = K._tail_scratch, []

    def recorded(*args):   # how many images read the copies kept in the output's tail, per launch
        n, buf = tail_scratch(*args)
        split_at.append(n)
        return n, buf

    K._tail_scratch = recorded
    split_channels, x_splits = K._split_channels, []

    def recorded_split(x, c0, g, buffers=None):   # which channel groups had x split into bf16 parts
        x_splits.append((c0, g))
        return split_channels(x, c0, g, buffers)

    K._split_channels = recorded_split
    for variant, case in VARIANT_CASES:
        if (variant, case) not in mine:
            continue
        dw.INTERP_VARIANT = variant
        dw.FWD_CFG = FORCED_FWD.get(case[0], {})
        dw.WGRAD_CFG = FORCED_WGRAD.get(case[0], {})
        split_at.clear()
        x_splits.clear()
        results[f"{case[0]}/v{variant}"] = dict(_run_case(case, torch, F, depthwise_conv2d, depthwise_path),
                                                tail_images=list(split_at), x_splits=list(x_splits))
        dw.FWD_CFG, dw.WGRAD_CFG = {}, {}
    K._tail_scratch, K._split_channels = tail_scratch, split_channels
    if (None, "band_copies") in mine:
        results["band_copies"] = _band_copies_match(torch)
    if (None, "plane_band_reads") in mine:
        results["plane_band_reads"] = _plane_band_reads_in_copies(torch, F)
    if (None, "layout_copies") in mine:
        results["layout_copies"] = _layout_copies_match(torch)
    if (None, "cross") in mine:
        results["cross"] = _cross_matches(torch, F)
    if (None, "autocast") in mine:
        results["autocast"] = _autocast_cast_in_copy(torch, F)
    if (None, "partial") in mine:
        results["partial"] = _partial_channels_match(torch, F)
    if (None, "plane_operator") in mine:
        results["plane_operator"] = _plane_operator_matches(torch, F)
    print(json.dumps(results))


@pytest.fixture(scope="module")
def results():
    from conftest import run_interpreted

    return run_interpreted(__file__, shards=2)   # two processes at once: CI has two cores


@pytest.mark.parametrize(("variant", "case"), _ALL_CASES, ids=[f"{c[0]}-{v}" for v, c in _ALL_CASES])
def test_triton_matches_float64_reference(results, case, variant):
    r = results[f"{case[0]}/v{variant}"]
    tol = TOL[case[7]]
    assert r["path"] == "triton", r
    for key in ("y", "dx", "dw", "db"):
        if key in r:
            assert r[key] <= tol, f"{key}: rel err {r[key]} > {tol} (seed {results['seed']})"
    assert r["y_layout_kept"]
    assert ("dx" in r) == ("x" in case[10]) and ("dw" in r) == ("w" in case[10])


@pytest.mark.parametrize("case", TAIL_CASES, ids=[c[0] for c in TAIL_CASES])
def test_tail_copies_case_reads_them(results, case):
    """The tail cases really run both kernels, forward and input grad: some images read the copies, the rest not."""
    n = results[f"{case[0]}/v9"]["tail_images"]
    assert len(n) == 2 and all(0 < k < case[1] for k in n), n


def test_parts_case_splits_every_channel_group(results):
    """The weight grad splits x and grad_out in the channel groups (0, 2), (2, 2), (4, 1)."""
    assert results["parts_in_channel_groups_wgrad_fp32/v9"]["x_splits"] == [[0, 2], [0, 2], [2, 2], [2, 2], [4, 1],
                                                                            [4, 1]]


def test_band_copies_match_independent_layout(results):
    assert results["band_copies"] and all(results["band_copies"].values()), results["band_copies"]


def test_whole_plane_gemm_reads_only_its_band_copies(results):
    r = results["plane_band_reads"]
    assert len(r) == 3 and all(v <= 1e-5 for v in r.values()), r   # NaN (a read outside the copies) fails too


def test_layout_copies_match_torch(results):
    assert results["layout_copies"] and all(results["layout_copies"].values()), results["layout_copies"]


def test_fused_cross_conv_matches_float64_pair(results):
    r = results["cross"]
    assert len(r) == (len(CROSS_CASES) + 2) * len(CROSS_CFGS), r
    for name, v in r.items():
        assert v["fused"] and v["layout_kept"] and v["rel"] <= v["tol"], (name, v, results["seed"])


def test_autocast_casts_in_the_row_major_copy(results):
    r = results["autocast"]
    assert r["cast_in_copy"] and r["bf16"] and r["layout_kept"] and r["equal"] and r["rel"] <= TOL["bfloat16"], r


def test_partial_channels_match_float64(results):
    r = results["partial"]
    assert len(r) == 9 + 8 + 3, r
    for name, v in r.items():
        if name.startswith(("copies", "error")):
            assert v is True, (name, results["seed"])
        else:
            assert v["layout_kept"] and v["dtype"] and v["copies"] and v["rel"] <= v["tol"], (name, v, results["seed"])
            assert v.get("grad_rel", 0.0) <= v["tol"], (name, v, results["seed"])


def test_dense_plane_operator_matches_float64(results):
    r = results["plane_operator"]
    assert len(r) == 6, r
    for name, v in r.items():
        assert v["operator"] and v["rel"] <= TOL["bfloat16"], (name, v, results["seed"])


if __name__ == "__main__":
    _main()

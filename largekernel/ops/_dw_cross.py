"""Triton kernels for the sum of a short-wide and a tall-narrow depthwise conv on one input (the cross kernels of the
shift-wise deploy form, :func:`largekernel.ops.depthwise.cross_depthwise_conv2d`), inference only.

Per channel and image, on a plane of at most P x P pixels (P <= 64, zero-padded to a power of two), with
``horizontal`` (kh_h x kw_h) and ``vertical`` (kh_v x kw_v) kernels and 'same' padding:

    out = sum_a X[rows + a - ph_h, :] @ Th_a  +  sum_b Tv_b @ X[:, cols + b - pw_v]  +  bias

``Th_a[u, v] = horizontal[a, u - v + pw_h]`` (P x P, banded) and ``Tv_b[v, u] = vertical[u - v + ph_v, b]``: one
tensor-core product per row of the short-wide kernel and per column of the tall-narrow one, both with the same
(P x P) output tile, so the two convs, their sum and the bias are one pass over x and one write of the output (the
pair of convs with an add is five passes). The band matrices are built once per call (``_cross_bands_kernel``, a
weights-sized (C, kh_h + kw_v, P, P) tensor) and read from L1 / L2 by every image of the channel.
"""
import triton
import triton.language as tl

from largekernel.ops._launch import cdiv, launch, next_pow2, plane_descriptor


@triton.jit
def _cross_bands_kernel(wh_ptr, wv_ptr, q_ptr, KH_H, KW_H, KH_V, KW_V, PH_V, PW_H, P: tl.constexpr):
    """Program (c, m): q[c, m] = Th_m (m < KH_H) or Tv_{m - KH_H}, as described in the module docstring."""
    c = tl.program_id(0)
    m = tl.program_id(1)
    rows = tl.arange(0, P)[:, None]
    cols = tl.arange(0, P)[None, :]
    if m < KH_H:   # Th_a[u, v] = wh[a, u - v + pw_h]
        j = rows - cols + PW_H
        ok = (j >= 0) & (j < KW_H)
        v = tl.load(wh_ptr + (c * KH_H + m) * KW_H + j, mask=ok, other=0.0)
    else:          # Tv_b[v, u] = wv[u - v + ph_v, b]
        i = cols - rows + PH_V
        ok = (i >= 0) & (i < KH_V)
        v = tl.load(wv_ptr + (c * KH_V + i) * KW_V + (m - KH_H), mask=ok, other=0.0)
    q = q_ptr + (c.to(tl.int64) * tl.num_programs(1) + m) * P * P
    tl.store(q + rows * P + cols, v.to(q_ptr.dtype.element_ty))


@triton.jit
def _cross_kernel(x_ptr, q_ptr, b_ptr, y_ptr, N, C, H, W, NB, PH_H, PW_V,
                  KH_H: tl.constexpr, KW_V: tl.constexpr, P: tl.constexpr, HAS_BIAS: tl.constexpr,
                  PRECISION: tl.constexpr, CAST_F32: tl.constexpr):
    """Program (c, block): NB images of channel c; x, y row-major (N, C, H, W)."""
    c = tl.program_id(0)
    n0 = tl.program_id(1) * NB
    rows = tl.arange(0, P)[:, None]
    cols = tl.arange(0, P)[None, :]
    out_ok = (rows < H) & (cols < W)
    qc = q_ptr + c.to(tl.int64) * (KH_H + KW_V) * P * P + rows * P + cols
    bias = tl.load(b_ptr + c).to(tl.float32) if HAS_BIAS else 0.0
    for n in range(n0, tl.minimum(n0 + NB, N)):
        plane = (n * C + c.to(tl.int64)) * H * W
        acc = tl.zeros((P, P), dtype=tl.float32)
        for a in tl.static_range(KH_H):   # rows of the short-wide kernel: shifted rows of x, times Th_a
            r = rows + a - PH_H
            xa = tl.load(x_ptr + plane + r * W + cols, mask=(r >= 0) & (r < H) & (cols < W), other=0.0)
            ta = tl.load(qc + a * P * P)
            if CAST_F32:
                xa, ta = xa.to(tl.float32), ta.to(tl.float32)
            acc = tl.dot(xa, ta, acc, input_precision=PRECISION)
        for b in tl.static_range(KW_V):   # columns of the tall-narrow kernel: Tv_b times shifted columns of x
            s = cols + b - PW_V
            xb = tl.load(x_ptr + plane + rows * W + s, mask=(rows < H) & (s >= 0) & (s < W), other=0.0)
            tb = tl.load(qc + (KH_H + b) * P * P)
            if CAST_F32:
                xb, tb = xb.to(tl.float32), tb.to(tl.float32)
            acc = tl.dot(tb, xb, acc, input_precision=PRECISION)
        tl.store(y_ptr + plane + rows * W + cols, (acc + bias).to(y_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def _cross_stacked_kernel(x_ptr, q_ptr, b_ptr, y_ptr, N, C, H, W, ITERS, PH_H, PW_V,
                          KH_H: tl.constexpr, KW_V: tl.constexpr, P: tl.constexpr, NB: tl.constexpr,
                          HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, CAST_F32: tl.constexpr):
    """Program (c, block): ITERS groups of NB images of channel c, each group's planes stacked into one product per
    tap: the horizontal part as (NB*P x P) @ Th_a with the (image, row) pairs as rows, the vertical part as
    Tv_b @ (P x NB*P) with the (image, column) pairs as columns (small planes: P = 16 at 14 x 14 and 7 x 7)."""
    c = tl.program_id(0)
    m = tl.arange(0, NB * P)
    n_of, y_of = m // P, m % P                     # (image, row) along the rows of the horizontal products
    k = tl.arange(0, P)
    out_n = tl.arange(0, NB)[:, None, None]
    out_y = tl.arange(0, P)[None, :, None]
    out_x = tl.arange(0, P)[None, None, :]
    qc = q_ptr + c.to(tl.int64) * (KH_H + KW_V) * P * P + k[:, None] * P + k[None, :]
    bias = tl.load(b_ptr + c).to(tl.float32) if HAS_BIAS else 0.0
    for it in range(ITERS):
        n0 = (tl.program_id(1) * ITERS + it) * NB
        img = n0 + n_of
        base = (img.to(tl.int64) * C + c) * H * W      # per stacked row / column
        acc_h = tl.zeros((NB * P, P), dtype=tl.float32)
        for a in tl.static_range(KH_H):
            r = y_of + a - PH_H
            ok = ((img < N) & (r >= 0) & (r < H))[:, None] & (k < W)[None, :]
            xa = tl.load(x_ptr + (base + r * W)[:, None] + k[None, :], mask=ok, other=0.0)
            ta = tl.load(qc + a * P * P)
            if CAST_F32:
                xa, ta = xa.to(tl.float32), ta.to(tl.float32)
            acc_h = tl.dot(xa, ta, acc_h, input_precision=PRECISION)
        acc_v = tl.zeros((P, NB * P), dtype=tl.float32)
        for b in tl.static_range(KW_V):
            s = y_of + b - PW_V                        # here: (image, column) pairs along the columns
            ok = (k < H)[:, None] & ((img < N) & (s >= 0) & (s < W))[None, :]
            xb = tl.load(x_ptr + base[None, :] + k[:, None] * W + s[None, :], mask=ok, other=0.0)
            tb = tl.load(qc + (KH_H + b) * P * P)
            if CAST_F32:
                xb, tb = xb.to(tl.float32), tb.to(tl.float32)
            acc_v = tl.dot(tb, xb, acc_v, input_precision=PRECISION)
        out = tl.reshape(acc_h, (NB, P, P)) + tl.permute(tl.reshape(acc_v, (P, NB, P)), (1, 0, 2)) + bias
        n = n0 + out_n
        ok = (n < N) & (out_y < H) & (out_x < W)
        tl.store(y_ptr + (n.to(tl.int64) * C + c) * H * W + out_y * W + out_x, out.to(y_ptr.dtype.element_ty),
                 mask=ok)


@triton.jit
def _cross_tma_kernel(x_desc, q_desc, b_ptr, y_desc, N, C, ITERS, PH_H, PW_V: tl.constexpr,
                      KH_H: tl.constexpr, KW_V: tl.constexpr, P: tl.constexpr, HAS_BIAS: tl.constexpr,
                      PRECISION: tl.constexpr, CAST_F32: tl.constexpr, HOIST: tl.constexpr):
    """Program (c, block): ITERS images of channel c, one plane per product as in ``_cross_kernel``, every tile moved
    by the tensor memory accelerator (TMA, Hopper): the band matrices loaded once per program and kept in shared
    memory (HOIST; else loaded again for each product, from L2: at P = 64 half the shared memory, so twice the programs
    per SM, which hides more of the loads' latency: Triton waits for each load right after issuing it), the
    row-shifted windows of x loaded straight into the products' shared-memory operands (rows and columns outside the
    plane arrive as zeros: no masks, no register staging), the output tile stored the same way.

    The TMA addresses rows only at 16-byte aligned column offsets (a column-shifted box is an illegal instruction on
    the H200), so the columns of x are shifted by a product instead: ``X[:, cols + s] = X @ S_s`` with the 0/1 shift
    matrix ``S_s[j, v] = (j == v + s)``, exact (one non-zero term per element). 16-bit inputs (the products then
    return x's own values); the centre column's shift (``S_0 = I``) is skipped. Descriptors over (N*C, H, W) planes
    with (1, P, P) boxes."""
    c = tl.program_id(0)
    q0 = c * (KH_H + KW_V)
    th = ()
    tv = ()
    if HOIST:
        for a in tl.static_range(KH_H):
            th = th + (q_desc.load([q0 + a, 0, 0]).reshape(P, P),)
        for b in tl.static_range(KW_V):
            tv = tv + (q_desc.load([q0 + KH_H + b, 0, 0]).reshape(P, P),)
    rows = tl.arange(0, P)[:, None]
    cols = tl.arange(0, P)[None, :]
    shifts = ()
    for b in tl.static_range(KW_V):
        shifts = shifts + ((rows == cols + (b - PW_V)).to(tl.float32).to(x_desc.dtype),)
    bias = tl.load(b_ptr + c).to(tl.float32) if HAS_BIAS else 0.0
    n0 = tl.program_id(1) * ITERS
    for n in range(n0, tl.minimum(n0 + ITERS, N)):
        plane = n * C + c
        acc = tl.zeros((P, P), dtype=tl.float32)
        for a in tl.static_range(KH_H):   # shifted rows of x, times Th_a
            xa = x_desc.load([plane, a - PH_H, 0]).reshape(P, P)
            if HOIST:
                ta = th[a]
            else:
                ta = q_desc.load([q0 + a, 0, 0]).reshape(P, P)
            if CAST_F32:
                xa, ta = xa.to(tl.float32), ta.to(tl.float32)
            acc = tl.dot(xa, ta, acc, input_precision=PRECISION)
        x0 = x_desc.load([plane, 0, 0]).reshape(P, P)
        for b in tl.static_range(KW_V):   # Tv_b times shifted columns of x
            xb = x0
            if b != PW_V:
                sb = shifts[b]
                if CAST_F32:
                    xb, sb = xb.to(tl.float32), sb.to(tl.float32)
                xb = tl.dot(xb, sb, input_precision=PRECISION).to(x_desc.dtype)
            if HOIST:
                tb = tv[b]
            else:
                tb = q_desc.load([q0 + KH_H + b, 0, 0]).reshape(P, P)
            if CAST_F32:
                xb, tb = xb.to(tl.float32), tb.to(tl.float32)
            acc = tl.dot(tb, xb, acc, input_precision=PRECISION)
        y_desc.store([plane, 0, 0], (acc + bias).to(y_desc.dtype).reshape(1, P, P))


def launch_cross(x, wh, wv, bias, y, pads_h: tuple[int, int], pads_v: tuple[int, int], cfg: dict, precision: str,
                 interpret: bool) -> None:
    """y = cross conv of row-major x (N, C, H, W) with wh (C, kh_h, kw_h), wv (C, kh_v, kw_v) (contiguous), 'same'
    top / left pads ``pads_h`` / ``pads_v``; cfg: NB (images per program, one product each), num_warps; or stack=True,
    NB (images stacked in one product), ITERS (such groups per program), num_warps; or tma=True, ITERS (images per
    program), num_warps, num_stages, hoist (x, y: planes with 16-byte aligned rows, ``layout.padded_rows``)."""
    N, C, H, W = x.shape
    kh_h, kw_h = wh.shape[1:]
    kh_v, kw_v = wv.shape[1:]
    p = max(16, next_pow2(max(H, W)))   # as the candidates in depthwise._cross_candidates
    q = x.new_empty((C, kh_h + kw_v, p, p))
    launch(_cross_bands_kernel, (C, kh_h + kw_v), wh, wv, q, kh_h, kw_h, kh_v, kw_v, pads_v[0], pads_h[1], P=p,
           num_warps=4)
    b = bias if bias is not None else x
    if cfg.get("tma"):
        meta = dict(KH_H=kh_h, KW_V=kw_v, P=p, HAS_BIAS=bias is not None, PRECISION=precision, CAST_F32=interpret,
                    HOIST=cfg.get("hoist", True), num_warps=cfg.get("num_warps", 4),
                    num_stages=cfg.get("num_stages", 1))
        iters = cfg.get("ITERS", 1)
        launch(_cross_tma_kernel, (C, cdiv(N, iters)), plane_descriptor(x, p), plane_descriptor(q.view(-1, p, p), p),
               b, plane_descriptor(y, p), N, C, iters, pads_h[0], pads_v[1], **meta)
        return
    nb = cfg["NB"]
    meta = dict(KH_H=kh_h, KW_V=kw_v, P=p, HAS_BIAS=bias is not None, PRECISION=precision, CAST_F32=interpret,
                num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 2))
    if cfg.get("stack"):   # NB images per product, ITERS groups per program
        iters = cfg.get("ITERS", 1)
        launch(_cross_stacked_kernel, (C, cdiv(N, nb * iters)), x, q, b, y, N, C, H, W, iters, pads_h[0], pads_v[1],
               NB=nb, **meta)
    else:
        launch(_cross_kernel, (C, cdiv(N, nb)), x, q, b, y, N, C, H, W, nb, pads_h[0], pads_v[1], **meta)

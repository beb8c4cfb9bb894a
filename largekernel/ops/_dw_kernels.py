"""Triton kernels for the stride-1 'same' depthwise convolution (forward, input grad, weight grad).

Imported lazily by :mod:`largekernel.ops.depthwise` (Triton reads ``TRITON_INTERPRET`` when a kernel is
decorated, so the interpreter tests set it before this module is first imported).

Both kernels run on the tensor cores (``tl.dot``) with operands built on the fly, never materialised:

* forward / input grad, per channel: ``out[r, :] = sum_i x[r + i - ph, :] @ T_i`` where the rows ``r`` are
  the flattened (n, y) pairs (the GEMM's M) and ``T_i[u, v] = w[i, u - v + pw]`` is the banded Toeplitz
  matrix of kernel row ``i``, gathered from the (L1-resident) weights one (BLOCK_U x BLOCK_W) tile at a
  time. The input grad is the same kernel on ``grad_out`` with the flipped kernel and mirrored padding.
* weight grad, per channel: ``dw[i, j] = sum_{n, y', v} x[n, y', v + j - pw] * g[n, y' - i + ph, v]``:
  a (KW x KH) GEMM whose reduction runs over all N*H*W positions; the A operand is a stack of shifted
  windows of one x row, the B operand a stack of shifted rows of grad_out. The reduction is split over
  programs; each writes an fp32 partial that a tiny sum finishes (deterministic, no atomics).
* small planes: the forward / input grad as one (batch x HW) @ (HW x HW) GEMM per channel (``_dw_plane_kernel``,
  ``_dw_plane_bands_kernel``), the weight grad from the batch's Gram matrix per channel (``_dw_wgrad_gram_kernel``,
  7x7 and 8x8) or per output row (``_dw_wgrad_plane_kernel``, up to 16x16). Inference on planes of up to 256
  pixels may also keep each channel's conv as a dense (HW x HW) matrix and run the plain batched GEMM on it
  (``_dw_dense_plane_kernel``; the operator is built once per weight, ``plane_operator``).

fp32 inputs use error-compensated splits on the tensor cores, picked per pass by the tuner: ``input_precision=``
``'tf32x3'`` / ``'bf16x6'`` (~1e-7 relative) or ``'bf16x3'`` (~5e-6), or our own bf16x3 where an operand can be split
once instead of at every step (``_dot3``: high / low band copies of the kernel, x in the small-plane weight grad);
the 0/1 GEMMs of the small-plane weight grad split only their data operand, into three exact bf16 parts (``_mma01``).
"""
import triton
import triton.language as tl

from largekernel.ops._launch import cdiv, launch, next_pow2


@triton.jit
def _mma(a, b, acc, PRECISION: tl.constexpr, CAST_F32: tl.constexpr):
    """acc + a @ b on the tensor cores; CAST_F32: operands to fp32 first (the CPU interpreter has no 2-byte dot)."""
    if CAST_F32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _to_bf16_rn(x):
    """fp32 x rounded to the nearest bf16 (ties to even) with integer arithmetic, so that the interpreter (whose float
    casts truncate) computes the same parts as the GPU (whose cast rounds to nearest); NaN / overflow not handled."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)   # exact: the low 16 bits are zero


@triton.jit
def _split_bf16(x):
    """fp32 x as two bf16 parts, hi + lo = x to within ~2^-17 relative (rounded to nearest)."""
    hi = _to_bf16_rn(x)
    return hi, _to_bf16_rn(x - hi.to(tl.float32))


@triton.jit
def _dot_exact(a, b, acc, CAST_F32: tl.constexpr):
    if CAST_F32:   # the interpreter has no 2-byte dot; both operands are exactly representable in fp32
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _dot01(part, sb, acc, S_LEFT: tl.constexpr, CAST_F32: tl.constexpr):
    if S_LEFT:
        acc = _dot_exact(sb, part, acc, CAST_F32)
    else:
        acc = _dot_exact(part, sb, acc, CAST_F32)
    return acc


@triton.jit
def _mma01(a, s, acc, S_LEFT: tl.constexpr, PRECISION: tl.constexpr, CAST_F32: tl.constexpr):
    """acc + a @ s (acc + s @ a if S_LEFT) where s holds only 0 and 1. For fp32 (PRECISION is not 'tf32') a is
    split into three bf16 parts (hi + mid + lo = a to within 2^-24 relative) whose products with s are exact:
    three bf16 MMAs with fp32 accumulation instead of an error-compensated split of both operands (also under
    'bf16x3': two parts would add their 2^-17 to that split's own error, 6e-6 in the interpreter tests).
    (No early returns: Triton's code generator keeps visiting the statements after a return in a static branch.)"""
    if PRECISION == "tf32":
        if S_LEFT:
            acc = tl.dot(s, a, acc, input_precision="tf32")
        else:
            acc = tl.dot(a, s, acc, input_precision="tf32")
    else:
        sb = s.to(tl.bfloat16)
        hi, mid = _split_bf16(a)
        lo = _to_bf16_rn(a - hi.to(tl.float32) - mid.to(tl.float32))   # both subtractions exact
        acc = _dot01(lo, sb, acc, S_LEFT, CAST_F32)
        acc = _dot01(mid, sb, acc, S_LEFT, CAST_F32)
        acc = _dot01(hi, sb, acc, S_LEFT, CAST_F32)
    return acc


@triton.jit
def _dw_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr,
                   N, C, H, W, KH, KW, PH, PW,
                   sxn, sxc, sxh, sxw, syn, syc, syh, syw,
                   HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr,
                   BLOCK_U: tl.constexpr, PRECISION: tl.constexpr, CAST_F32: tl.constexpr):
    pid = tl.program_id(0)
    num_m = tl.cdiv(N * H, BLOCK_M)
    num_w = tl.cdiv(W, BLOCK_W)
    wb = pid % num_w
    mb = (pid // num_w) % num_m
    c = pid // (num_w * num_m)

    rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)          # flattened (n, y)
    n = rows // H
    y = rows % H
    row_in = rows < N * H
    w0 = wb * BLOCK_W
    v = w0 + tl.arange(0, BLOCK_W)                        # output columns
    du = tl.arange(0, BLOCK_U)
    x_base = x_ptr + c.to(tl.int64) * sxc + n.to(tl.int64) * sxn
    w_base = w_ptr + c * KH * KW
    # band offset of tile element (u, v) relative to the chunk start: t = u - v + PW
    t0 = du[:, None] - tl.arange(0, BLOCK_W)[None, :]
    num_u = tl.cdiv(BLOCK_W + KW - 1, BLOCK_U)

    acc = tl.zeros((BLOCK_M, BLOCK_W), dtype=tl.float32)
    for i in range(0, KH):
        yy = y + i - PH
        row_ok = row_in & (yy >= 0) & (yy < H)
        row_ptr = x_base + yy * sxh
        for uc in range(0, num_u):
            u = w0 - PW + uc * BLOCK_U + du                    # input columns
            a = tl.load(row_ptr[:, None] + u[None, :] * sxw,
                        mask=row_ok[:, None] & ((u >= 0) & (u < W))[None, :], other=0.0)
            t = t0 + uc * BLOCK_U                              # = u - v + PW
            b = tl.load(w_base + i * KW + t, mask=(t >= 0) & (t < KW), other=0.0)
            acc = _mma(a, b, acc, PRECISION, CAST_F32)

    if HAS_BIAS:
        acc += tl.load(b_ptr + c).to(tl.float32)
    y_ptrs = (y_ptr + c.to(tl.int64) * syc + n.to(tl.int64)[:, None] * syn + y[:, None] * syh
              + v[None, :] * syw)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_in[:, None] & (v < W)[None, :])


@triton.jit
def _dw_wgrad_kernel(x_ptr, g_ptr, dw_ptr,
                     N, C, H, W, KH, KW, PH, PW, K_PER_SPLIT, SPLITS,
                     sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw,
                     BLOCK_J: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr,
                     PRECISION: tl.constexpr, CAST_F32: tl.constexpr):
    pid = tl.program_id(0)
    s = pid % SPLITS
    c = pid // SPLITS
    HW = H * W
    total = N * HW
    start = s * K_PER_SPLIT
    end = tl.minimum(start + K_PER_SPLIT, total)

    j = tl.arange(0, BLOCK_J)     # kernel column (A rows)
    i = tl.arange(0, BLOCK_I)     # kernel row (B columns)
    dk = tl.arange(0, BLOCK_K)
    x_c = x_ptr + c.to(tl.int64) * sxc
    g_c = g_ptr + c.to(tl.int64) * sgc
    acc = tl.zeros((BLOCK_J, BLOCK_I), dtype=tl.float32)
    for k0 in range(start, end, BLOCK_K):
        k = k0 + dk
        k_ok = k < end
        n = k // HW
        rem = k % HW
        yy = rem // W                                   # x row
        v = rem % W                                     # output column
        n64 = n.to(tl.int64)
        xcol = v[None, :] + j[:, None] - PW
        a = tl.load(x_c + n64[None, :] * sxn + yy[None, :] * sxh + xcol * sxw,
                    mask=k_ok[None, :] & (j < KW)[:, None] & (xcol >= 0) & (xcol < W), other=0.0)
        grow = yy[:, None] - i[None, :] + PH            # grad_out row
        b = tl.load(g_c + n64[:, None] * sgn + grow * sgh + v[:, None] * sgw,
                    mask=k_ok[:, None] & (i < KH)[None, :] & (grow >= 0) & (grow < H), other=0.0)
        acc = _mma(a, b, acc, PRECISION, CAST_F32)

    # partial[s, c, i, j] = acc[j, i]
    out = dw_ptr + (s.to(tl.int64) * C + c) * KH * KW + i[None, :] * KW + j[:, None]
    tl.store(out, acc, mask=(j < KW)[:, None] & (i < KH)[None, :])


@triton.jit
def _fwd_tiles(t, T, num_u, x_rows, y, row_in, w_tap, t0, w0, du, H, W, KW, PH, PWA, sxh, sxw, swh, sww,
               q_c, q2_c, KH, LQ_V, E0, PWD, BLOCK_U: tl.constexpr, BLOCK_W: tl.constexpr, BANDS: tl.constexpr,
               BVEC: tl.constexpr, SPLIT: tl.constexpr):
    """A (rows x input columns) and B (Toeplitz band) tiles of step t = i * num_u + uc; zeros past T. Returns
    (A, B, B2): B2 is the low bf16 part of B's band copies with SPLIT, else B again.

    BANDS: B is read from the shifted band copies (``band_copies``) as aligned BVEC-wide vectors, unmasked:
    B[u, v] = P_i[E0 - D - u + v] with D = uc * BLOCK_U - PWD (PWD = PWA - PW), P_i the reversed zero-padded row,
    stored as BVEC copies shifted by 0..BVEC-1 so that every tile row starts on a vector boundary."""
    i = t // num_u
    uc = t - i * num_u
    live = t < T
    yy = y + i - PH
    row_ok = row_in & (yy >= 0) & (yy < H) & live
    u = w0 - PWA + uc * BLOCK_U + du
    a = tl.load(x_rows[:, None] + yy[:, None] * sxh + u[None, :] * sxw,
                mask=row_ok[:, None] & ((u >= 0) & (u < W))[None, :], other=0.0)
    if BANDS:
        e = E0 + PWD - uc * BLOCK_U - du                  # >= 0; past T (prefetch) row i is clamped
        s = e % BVEC
        row = ((tl.minimum(i, KH - 1) * BVEC + s) * LQ_V + e // BVEC) * BVEC
        offs = row[:, None] + tl.arange(0, BLOCK_W)[None, :]
        b = tl.load(q_c + offs)
        if SPLIT:
            b2 = tl.load(q2_c + offs)
        else:
            b2 = b
    else:
        tt = t0 + uc * BLOCK_U
        b = tl.load(w_tap + i * swh + tt * sww, mask=(tt >= 0) & (tt < KW) & live, other=0.0)
        b2 = b
    return a, b, b2


@triton.jit
def _dot3(a_hi, a_lo, b_hi, b_lo, acc, CAST_F32: tl.constexpr):
    """acc + (a_hi + a_lo) @ (b_hi + b_lo) from bf16 parts as hi*hi + hi*lo + lo*hi (Triton's bf16x3), the small
    products first. Callers split an operand once where it is reused, instead of at every dot."""
    acc = _dot_exact(a_lo, b_hi, acc, CAST_F32)
    acc = _dot_exact(a_hi, b_lo, acc, CAST_F32)
    return _dot_exact(a_hi, b_hi, acc, CAST_F32)


@triton.jit(do_not_specialize=[13, 14, 15])   # w_off, swh, sww: forward and input grad share a binary
def _dw_fwd2_kernel(x_ptr, w_ptr, b_ptr, y_ptr,
                    N, C, H, W_V, KH, KW, PH, PW, PWA_V, w_off, swh, sww,
                    sxn_v, sxc_v, sxh_v, sxw, syn, syc, syh, syw, q_ptr, q2_ptr, LQ_V, E0,
                    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr,
                    BLOCK_U: tl.constexpr, PRECISION: tl.constexpr, CAST_F32: tl.constexpr,
                    VEC: tl.constexpr, BANDS: tl.constexpr, BVEC: tl.constexpr, SPLIT: tl.constexpr):
    """_dw_fwd_kernel with the (kernel row, column chunk) loop flattened and the next step's tiles
    loaded before the current dot (register double buffering: the loads are 2-byte gathers that
    Triton's cp.async pipeliner does not take).

    VEC: W, the x strides and the column-chunk starts are passed as multiples of VEC (``*_v`` = value /
    VEC, chunks start at ``w0 - PWA`` with PWA = PW rounded up to VEC) so that Triton can prove VEC-wide
    aligned, uniformly masked runs and emit vector loads for the x tile. Tap (i, j) of channel c is read
    at ``w_ptr + w_off + c*KH*KW + i*swh + j*sww`` (the input grad reads the kernel flipped in place), or with
    BANDS from the shifted band copies at ``q_ptr`` (see ``band_copies``) as unmasked BVEC-wide vectors.
    SPLIT (fp32 x, with BANDS): ``q_ptr`` / ``q2_ptr`` hold the band copies of the kernel's high / low bf16 parts,
    and each step is three bf16 MMAs (``_dot3``)."""
    W = W_V * VEC
    PWA = PWA_V * VEC
    sxn = sxn_v * VEC
    sxc = sxc_v * VEC
    sxh = sxh_v * VEC
    pid = tl.program_id(0)
    num_m = tl.cdiv(N * H, BLOCK_M)
    num_w = tl.cdiv(W, BLOCK_W)
    wb = pid % num_w
    mb = (pid // num_w) % num_m
    c = pid // (num_w * num_m)

    rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    n = rows // H
    y = rows % H
    row_in = rows < N * H
    w0 = wb * BLOCK_W
    v = w0 + tl.arange(0, BLOCK_W)
    du = tl.arange(0, BLOCK_U)
    x_rows = x_ptr + c.to(tl.int64) * sxc + n.to(tl.int64) * sxn
    w_tap = w_ptr + w_off + c * KH * KW
    t0 = du[:, None] - tl.arange(0, BLOCK_W)[None, :] - (PWA - PW)    # = u - v + PW - uc * BLOCK_U
    num_u = tl.cdiv(BLOCK_W + KW - 1 + PWA - PW, BLOCK_U)
    T = KH * num_u

    q_off = (c.to(tl.int64) * KH * LQ_V) * BVEC * BVEC
    q_c = q_ptr + q_off
    q2_c = q2_ptr + q_off
    PWD = PWA - PW

    acc = tl.zeros((BLOCK_M, BLOCK_W), dtype=tl.float32)
    a, b, b2 = _fwd_tiles(0, T, num_u, x_rows, y, row_in, w_tap, t0, w0, du, H, W, KW, PH, PWA, sxh, sxw, swh, sww,
                          q_c, q2_c, KH, LQ_V, E0, PWD, BLOCK_U, BLOCK_W, BANDS, BVEC, SPLIT)
    for t in range(0, T):
        a_cur = a
        b_cur = b
        b2_cur = b2
        a, b, b2 = _fwd_tiles(t + 1, T, num_u, x_rows, y, row_in, w_tap, t0, w0, du, H, W, KW, PH, PWA, sxh, sxw,
                              swh, sww, q_c, q2_c, KH, LQ_V, E0, PWD, BLOCK_U, BLOCK_W, BANDS, BVEC, SPLIT)
        if SPLIT:   # B comes as its bf16 parts (band copies built that way): split only A, per step
            a_hi, a_lo = _split_bf16(a_cur)
            acc = _dot3(a_hi, a_lo, b_cur, b2_cur, acc, CAST_F32)
        else:
            acc = _mma(a_cur, b_cur, acc, PRECISION, CAST_F32)

    if HAS_BIAS:
        acc += tl.load(b_ptr + c).to(tl.float32)
    y_ptrs = (y_ptr + c.to(tl.int64) * syc + n.to(tl.int64)[:, None] * syn + y[:, None] * syh
              + v[None, :] * syw)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_in[:, None] & (v < W)[None, :])


@triton.jit
def _wg_tiles(t, T, num_v, r_start, x_c, g_c, j, i, dv, H, W, KH, KW, PH, PW,
              sxn, sxh, sxw, sgn, sgh, sgw, BLOCK_V: tl.constexpr):
    """Step t = (row, column chunk): A = shifted windows of one x row, B = shifted grad_out rows."""
    tv = t // num_v
    r = r_start + tv
    v0 = (t - tv * num_v) * BLOCK_V
    live = t < T
    n = (r // H).to(tl.int64)
    yy = r % H
    v = v0 + dv
    v_ok = (v < W) & live
    xcol = v[None, :] + j[:, None] - PW
    a = tl.load(x_c + n * sxn + yy * sxh + xcol * sxw,
                mask=v_ok[None, :] & (j < KW)[:, None] & (xcol >= 0) & (xcol < W), other=0.0)
    grow = yy - i + PH
    b = tl.load(g_c + n * sgn + grow[None, :] * sgh + v[:, None] * sgw,
                mask=v_ok[:, None] & ((i < KH) & (grow >= 0) & (grow < H))[None, :], other=0.0)
    return a, b


@triton.jit
def _dw_wgrad2_kernel(x_ptr, g_ptr, dw_ptr,
                      N, C, H, W_V, KH, KW, PH, PW, ROWS_PER_SPLIT, SPLITS,
                      sxn, sxc, sxh, sxw, sgn_v, sgc_v, sgh_v, sgw,
                      BLOCK_J: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_V: tl.constexpr,
                      PRECISION: tl.constexpr, CAST_F32: tl.constexpr, VEC: tl.constexpr):
    """Weight grad with the reduction walked row by row (scalar row indices, no per-element div/mod)
    and the next step's tiles loaded before the current dot. W and the grad_out strides come as multiples
    of VEC (see _dw_fwd2_kernel) so the grad_out rows load as vectors."""
    W = W_V * VEC
    sgn = sgn_v * VEC
    sgc = sgc_v * VEC
    sgh = sgh_v * VEC
    pid = tl.program_id(0)
    s = pid % SPLITS
    c = pid // SPLITS
    r_start = s * ROWS_PER_SPLIT
    r_end = tl.minimum(r_start + ROWS_PER_SPLIT, N * H)
    num_v = tl.cdiv(W, BLOCK_V)
    T = (r_end - r_start) * num_v

    j = tl.arange(0, BLOCK_J)
    i = tl.arange(0, BLOCK_I)
    dv = tl.arange(0, BLOCK_V)
    x_c = x_ptr + c.to(tl.int64) * sxc
    g_c = g_ptr + c.to(tl.int64) * sgc
    acc = tl.zeros((BLOCK_J, BLOCK_I), dtype=tl.float32)
    a, b = _wg_tiles(0, T, num_v, r_start, x_c, g_c, j, i, dv, H, W, KH, KW, PH, PW,
                     sxn, sxh, sxw, sgn, sgh, sgw, BLOCK_V)
    for t in range(0, T):
        a_cur = a
        b_cur = b
        a, b = _wg_tiles(t + 1, T, num_v, r_start, x_c, g_c, j, i, dv, H, W, KH, KW, PH, PW,
                         sxn, sxh, sxw, sgn, sgh, sgw, BLOCK_V)
        acc = _mma(a_cur, b_cur, acc, PRECISION, CAST_F32)

    out = dw_ptr + (s.to(tl.int64) * C + c) * KH * KW + i[None, :] * KW + j[:, None]
    tl.store(out, acc, mask=(j < KW)[:, None] & (i < KH)[None, :])


@triton.jit
def _dw_wgrad_cols_kernel(x_ptr, x2_ptr, g_ptr, g2_ptr, dw_ptr,
                          N, C, H, W_V, KH, KW, PH, PW, ROWS_PER_SPLIT, SPLITS,
                          sxn_v, sxc_v, sxh_v, sxw, sgn_v, sgc_v, sgh_v, sgw,
                          NI: tl.constexpr, WP: tl.constexpr, BLOCK_R: tl.constexpr,
                          PRECISION: tl.constexpr, CAST_F32: tl.constexpr, VEC: tl.constexpr,
                          SPLIT_G: tl.constexpr, SPLIT_X: tl.constexpr):
    """Weight grad of NI kernel rows i0.. of channel c from column Gram matrices: with the flattened (n, oy) rows
    as the reduction, P[ox, (ii, px)] = sum_(n, oy) g[n, oy, ox] * x[n, oy + i0 + ii - PH, px] is one GEMM of
    contiguous rows (no gathers: A = grad_out rows, transposed; B = the NI row-shifted x rows side by side, NI*WP
    wide), and dw[i0 + ii, j] = sum_ox P[ox, (ii, ox + j - PW)], a diagonal sum taken once at the end. The MMA
    work is WP*WP / (W*KW) times the useful work (56x56 K31: 2.4x), the operands load as vectors. The rows are
    split over SPLITS programs per (channel, row block) writing fp32 partials. W and the strides but sxw / sgw
    come as multiples of VEC (see _dw_fwd2_kernel). SPLIT_G / SPLIT_X: grad_out / x come as their bf16 high / low
    parts (``g_ptr`` / ``g2_ptr``, ``x_ptr`` / ``x2_ptr``, split once beforehand), the other operand is split here;
    three bf16 MMAs per step (``_dot3``)."""
    W = W_V * VEC
    sxn = sxn_v * VEC
    sxc = sxc_v * VEC
    sxh = sxh_v * VEC
    sgn = sgn_v * VEC
    sgc = sgc_v * VEC
    sgh = sgh_v * VEC
    pid = tl.program_id(0)
    s = pid % SPLITS
    ib = (pid // SPLITS) % tl.cdiv(KH, NI)
    c = pid // (SPLITS * tl.cdiv(KH, NI))
    i0 = ib * NI
    k_start = s * ROWS_PER_SPLIT
    k_end = tl.minimum(k_start + ROWS_PER_SPLIT, N * H)
    x_c = x_ptr + c.to(tl.int64) * sxc
    g_c = g_ptr + c.to(tl.int64) * sgc
    x2_c = x2_ptr + c.to(tl.int64) * sxc
    g2_c = g2_ptr + c.to(tl.int64) * sgc
    dk = tl.arange(0, BLOCK_R)
    ox = tl.arange(0, WP)
    col = tl.arange(0, NI * WP)
    ii = col // WP
    px = col % WP
    dy = i0 + ii - PH   # x row offset of each B column
    acc = tl.zeros((WP, NI * WP), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_R):
        k = k0 + dk
        k_ok = k < k_end
        n = (k // H).to(tl.int64)
        oy = k % H
        a_offs = (n * sgn + oy * sgh)[:, None] + (ox * sgw)[None, :]
        a_mask = k_ok[:, None] & (ox < W)[None, :]
        a = tl.load(g_c + a_offs, mask=a_mask, other=0.0)
        py = oy[:, None] + dy[None, :]
        b_offs = (n * sxn)[:, None] + py * sxh + (px * sxw)[None, :]
        b_mask = k_ok[:, None] & (py >= 0) & (py < H) & ((px < W) & (i0 + ii < KH))[None, :]
        b = tl.load(x_c + b_offs, mask=b_mask, other=0.0)
        if SPLIT_G or SPLIT_X:
            if SPLIT_G:
                a_hi = a
                a_lo = tl.load(g2_c + a_offs, mask=a_mask, other=0.0)
            else:
                a_hi, a_lo = _split_bf16(a)
            if SPLIT_X:
                b_hi = b
                b_lo = tl.load(x2_c + b_offs, mask=b_mask, other=0.0)
            else:
                b_hi, b_lo = _split_bf16(b)
            acc = _dot3(tl.trans(a_hi), tl.trans(a_lo), b_hi, b_lo, acc, CAST_F32)
        else:
            acc = _mma(tl.trans(a), b, acc, PRECISION, CAST_F32)
    out = dw_ptr + ((s.to(tl.int64) * C + c) * KH + i0) * KW
    rows = tl.arange(0, NI)
    diag = px[None, :] - ox[:, None]
    for j in range(0, KW):
        v = tl.sum(tl.where(diag == j - PW, acc, 0.0), axis=0)   # [NI * WP]: sum over ox of each column
        v = tl.sum(tl.reshape(v, (NI, WP)), axis=1)
        tl.store(out + rows * KW + j, v, mask=i0 + rows < KH)


@triton.jit
def _plane_tiles(p0, live, x_rows, oy, ox, dk, H, W, KH, KW, PH, PW, p_hi, sxh, sxw, w_tap, swh, sww):
    """A = x[batch rows, positions p0 + dk] and B[p, o] = w[py - oy + PH, px - ox + PW] (0 off the kernel)."""
    p = p0 + dk
    py = p // W
    px = p - py * W
    p_ok = (p < p_hi) & live
    a = tl.load(x_rows[:, None] + (py * sxh + px * sxw)[None, :], mask=p_ok[None, :], other=0.0)
    di = py[:, None] - oy[None, :] + PH
    dj = px[:, None] - ox[None, :] + PW
    b = tl.load(w_tap + di * swh + dj * sww, mask=p_ok[:, None] & (di >= 0) & (di < KH) & (dj >= 0) & (dj < KW),
                other=0.0)
    return a, b


@triton.jit(do_not_specialize=[12, 13, 14])   # w_off, swh, sww: forward and input grad share a binary
def _dw_plane_kernel(x_ptr, w_ptr, b_ptr, y_ptr,
                     N, C, H, W, KH, KW, PH, PW, w_off, swh, sww,
                     sxn, sxc, sxh, sxw, syn, syc, syh, syw,
                     HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, CAST_F32: tl.constexpr,
                     PREFETCH: tl.constexpr):
    """Whole-plane form for small images: per channel, ``y[n, o] = sum_p x[n, p] * B[p, o]`` over the
    flattened input (p) and output (o) positions, ``B[p, o] = w[py - oy + PH, px - ox + PW]`` (zero off the
    kernel): a (batch x HW) @ (HW x HW) GEMM. Only the input rows within the kernel's reach of the output
    tile are visited, so its cost is ~2*N*HW*min(HW, reach*W) and stops growing once the kernel covers the
    plane (14x14 with K=27: 196 inputs per output instead of 729 taps). The GEMM rows are batch elements."""
    pid = tl.program_id(0)
    HW = H * W
    num_o = tl.cdiv(HW, BLOCK_N)
    num_m = tl.cdiv(N, BLOCK_M)
    ob = pid % num_o
    mb = (pid // num_o) % num_m
    c = pid // (num_o * num_m)

    o = ob * BLOCK_N + tl.arange(0, BLOCK_N)
    oy = o // W
    ox = o - oy * W
    m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < N
    # masked-off batch rows read row 0 (valid memory); their outputs are not stored
    x_rows = x_ptr + c.to(tl.int64) * sxc + tl.where(m_ok, m, 0).to(tl.int64) * sxn
    w_tap = w_ptr + w_off + c * KH * KW
    o_first = ob * BLOCK_N
    o_last = tl.minimum(o_first + BLOCK_N, HW) - 1
    p_lo = tl.maximum(o_first // W - PH, 0) * W
    p_hi = tl.minimum(o_last // W + KH - PH, H) * W
    p_lo = (p_lo // BLOCK_K) * BLOCK_K
    T = tl.cdiv(p_hi - p_lo, BLOCK_K)
    dk = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if PREFETCH:   # next step's tiles loaded before the current dot (more registers)
        a, b = _plane_tiles(p_lo, 0 < T, x_rows, oy, ox, dk, H, W, KH, KW, PH, PW, p_hi, sxh, sxw, w_tap, swh, sww)
        for t in range(0, T):
            a_cur = a
            b_cur = b
            a, b = _plane_tiles(p_lo + (t + 1) * BLOCK_K, t + 1 < T, x_rows, oy, ox, dk, H, W, KH, KW, PH, PW, p_hi,
                                sxh, sxw, w_tap, swh, sww)
            acc = _mma(a_cur, b_cur, acc, PRECISION, CAST_F32)
    else:
        for t in range(0, T):
            a, b = _plane_tiles(p_lo + t * BLOCK_K, True, x_rows, oy, ox, dk, H, W, KH, KW, PH, PW, p_hi,
                                sxh, sxw, w_tap, swh, sww)
            acc = _mma(a, b, acc, PRECISION, CAST_F32)

    if HAS_BIAS:
        acc += tl.load(b_ptr + c).to(tl.float32)
    y_ptrs = (y_ptr + c.to(tl.int64) * syc + m.to(tl.int64)[:, None] * syn + (oy * syh + ox * syw)[None, :])
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & (o < HW)[None, :])


@triton.jit
def _plane_band_tiles(p0, x_rows, dk, W, py_hi, sxh, sxw, q_c, q2_c, ocol, E0, PW, PHR, LQ_V,
                      WP: tl.constexpr, BVEC: tl.constexpr, SPLIT: tl.constexpr):
    """A = x[batch rows, p'] over padded positions p' = py * WP + px (zero for px >= W or py >= py_hi) and
    B[p', o'] = w[py - oy + PH, px - ox + PW] read as aligned BVEC-wide runs along ox from the band copies.
    Returns (A, B, B2): with SPLIT, B / B2 from the copies of the kernel's high / low bf16 parts, else B2 = B."""
    p = p0 + dk
    py = p // WP
    px = p % WP
    a = tl.load(x_rows[:, None] + (py * sxh + px * sxw)[None, :], mask=((px < W) & (py < py_hi))[None, :],
                other=0.0)
    e = E0 - PW - px
    offs = ((((py + PHR) * BVEC + e % BVEC) * LQ_V + e // BVEC) * BVEC)[:, None] + ocol[None, :]
    b = tl.load(q_c + offs)
    if SPLIT:
        b2 = tl.load(q2_c + offs)
    else:
        b2 = b
    return a, b, b2


@triton.jit
def _plane_band_mma(a, b, b2, acc, PRECISION: tl.constexpr, CAST_F32: tl.constexpr, SPLIT: tl.constexpr):
    if SPLIT:   # B comes as its bf16 parts: split only A (fp32), three bf16 MMAs
        a_hi, a_lo = _split_bf16(a)
        acc = _dot3(a_hi, a_lo, b, b2, acc, CAST_F32)
    else:
        acc = _mma(a, b, acc, PRECISION, CAST_F32)
    return acc


@triton.jit
def _dw_plane_bands_kernel(x_ptr, q_ptr, q2_ptr, b_ptr, y_ptr,
                           N, C, H, W, KH, PH, PW, PHR, E0, QR, LQ_V,
                           sxn, sxc, sxh, sxw, syn, syc, syh, syw,
                           HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, WP: tl.constexpr, BVEC: tl.constexpr, PRECISION: tl.constexpr,
                           CAST_F32: tl.constexpr, PREFETCH: tl.constexpr, SPLIT: tl.constexpr):
    """Whole-plane GEMM (see _dw_plane_kernel) on positions padded to WP = pow2(W) columns, so that along the
    output columns the B operand is a run of one reversed kernel row: it is read as aligned vectors from the
    band copies ``q`` (``plane_band_geometry``: per kernel row, BVEC copies shifted by 0..BVEC-1, zero rows above
    and below) instead of element by element. An output tile is BLOCK_N // WP whole output rows.
    SPLIT (fp32 x): ``q`` / ``q2`` are the copies of the kernel's high / low bf16 parts (``_dot3``)."""
    pid = tl.program_id(0)
    NR: tl.constexpr = BLOCK_N // WP
    num_o = tl.cdiv(H, NR)
    num_m = tl.cdiv(N, BLOCK_M)
    ob = pid % num_o
    mb = (pid // num_o) % num_m
    c = pid // (num_o * num_m)

    o = tl.arange(0, BLOCK_N)
    oy = ob * NR + o // WP
    ox = o % WP
    ocol = ox - (oy * BVEC * LQ_V) * BVEC
    m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < N
    x_rows = x_ptr + c.to(tl.int64) * sxc + tl.where(m_ok, m, 0).to(tl.int64) * sxn
    q_off = (c.to(tl.int64) * QR * LQ_V) * BVEC * BVEC
    q_c = q_ptr + q_off
    q2_c = q2_ptr + q_off
    py_lo = tl.maximum(ob * NR - PH, 0)
    py_hi = tl.minimum(ob * NR + NR + KH - 1 - PH, H)
    p_lo = (py_lo * WP // BLOCK_K) * BLOCK_K
    T = tl.cdiv(py_hi * WP - p_lo, BLOCK_K)
    dk = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if PREFETCH:
        a, b, b2 = _plane_band_tiles(p_lo, x_rows, dk, W, py_hi, sxh, sxw, q_c, q2_c, ocol, E0, PW, PHR, LQ_V, WP,
                                     BVEC, SPLIT)
        for t in range(0, T):
            a_cur = a
            b_cur = b
            b2_cur = b2
            a, b, b2 = _plane_band_tiles(p_lo + (t + 1) * BLOCK_K, x_rows, dk, W, py_hi, sxh, sxw, q_c, q2_c, ocol,
                                         E0, PW, PHR, LQ_V, WP, BVEC, SPLIT)
            acc = _plane_band_mma(a_cur, b_cur, b2_cur, acc, PRECISION, CAST_F32, SPLIT)
    else:
        for t in range(0, T):
            a, b, b2 = _plane_band_tiles(p_lo + t * BLOCK_K, x_rows, dk, W, py_hi, sxh, sxw, q_c, q2_c, ocol, E0,
                                         PW, PHR, LQ_V, WP, BVEC, SPLIT)
            acc = _plane_band_mma(a, b, b2, acc, PRECISION, CAST_F32, SPLIT)

    if HAS_BIAS:
        acc += tl.load(b_ptr + c).to(tl.float32)
    y_ptrs = y_ptr + c.to(tl.int64) * syc + m.to(tl.int64)[:, None] * syn + (oy * syh + ox * syw)[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & ((oy < H) & (ox < W))[None, :])


@triton.jit
def _dw_dense_plane_kernel(x_ptr, op_ptr, b_ptr, y_ptr, N, C, PQ, KP, NP, Q: tl.constexpr, HAS_BIAS: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           PRECISION: tl.constexpr, CAST_F32: tl.constexpr):
    """Program (output positions, images, c): y[n, c] = x[n, c] @ op[c] + bias[c] over packed row-major planes of
    P = PQ * Q positions (Q a power of two dividing P, so that Triton knows how far rows are aligned), op (C, KP, NP)
    the channel's conv as a dense (P x P) matrix zero-padded to multiples of 16 (``plane_operator``)."""
    P = PQ * Q
    c = tl.program_id(2)
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    o = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.arange(0, BLOCK_K)
    m_ok = m < N
    x_rows = x_ptr + (m.to(tl.int64) * C + c) * P
    op_c = op_ptr + c.to(tl.int64) * KP * NP
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, P, BLOCK_K):
        p = k0 + k
        a = tl.load(x_rows[:, None] + p[None, :], mask=m_ok[:, None] & (p < P)[None, :], other=0.0)
        b = tl.load(op_c + p[:, None] * NP + o[None, :], mask=(p < KP)[:, None] & (o < NP)[None, :], other=0.0)
        acc = _mma(a, b, acc, PRECISION, CAST_F32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + c).to(tl.float32)
    y_rows = y_ptr + (m.to(tl.int64) * C + c) * P
    tl.store(y_rows[:, None] + o[None, :], acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & (o < P)[None, :])


def plane_operator(w, H: int, W: int, ph: int, pw: int):
    """The 'same'-style conv of an (H, W) plane with each channel's kernel of w (C, kh, kw) (top / left padding
    (ph, pw)) as a matrix: op[c, i, o] = w[c, yi - yo + ph, xi - xo + pw] for input / output positions i = yi * W +
    xi, o = yo * W + xo (0 where the tap is off the kernel), zero-padded to (C, P16, P16), P16 = H * W rounded up to
    16. Exact copies of the taps; C * P16^2 elements (SW-tiny's 14 x 14 stage, C = 246: 21 MB in bf16)."""
    import torch

    C, kh, kw = w.shape
    P = H * W
    p16 = cdiv(P, 16) * 16
    i = torch.arange(P, device=w.device)
    dy = (i // W)[:, None] - (i // W)[None, :] + ph
    dx = (i % W)[:, None] - (i % W)[None, :] + pw
    on = (dy >= 0) & (dy < kh) & (dx >= 0) & (dx < kw)
    op = w.new_zeros((C, p16, p16))
    op[:, :P, :P] = torch.where(on, w[:, dy.clamp(0, kh - 1), dx.clamp(0, kw - 1)], 0)
    return op


def launch_dense_plane(x, op, bias, y, cfg: dict, precision: str, cast_f32: bool) -> None:
    """y = x (N, C, H, W), packed row-major planes, through each channel's dense operator op (``plane_operator``),
    plus bias."""
    N, C, H, W = x.shape
    P = H * W
    q = min(16, P & -P)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    launch(_dw_dense_plane_kernel, (cdiv(P, bn), cdiv(N, bm), C), x, op, bias if bias is not None else op, y,
           N, C, P // q, op.shape[1], op.shape[2], Q=q, HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn,
           BLOCK_K=cfg["BLOCK_K"], PRECISION=precision, CAST_F32=cast_f32, num_warps=cfg.get("num_warps", 4),
           num_stages=cfg.get("num_stages", 2))


def _taps(w, flip: bool, transpose: bool) -> tuple[int, int, int, int, int]:
    """(KH, KW, w_off, swh, sww) of w (C, kh, kw) as a kernel reads it: tap (i, j) of channel c sits at
    ``w + w_off + c*KH*KW + i*swh + j*sww``; flip reads the kernel backwards in place (the input grad), transpose
    with its strides swapped (the transposed problem of tall kernels). No copies."""
    kh, kw = w.shape[-2:]
    w_off, swh, sww = (kh * kw - 1, -kw, -1) if flip else (0, kw, 1)
    return (kw, kh, w_off, sww, swh) if transpose else (kh, kw, w_off, swh, sww)


def plane_band_geometry(kh: int, kw: int, H: int, W: int, ph: int, pw: int, block_n: int, block_k: int, bvec: int):
    """(rows, RP, E0, LQ) of the band copies for _dw_plane_bands_kernel (built by ``_band_copies``): Q[c, r, s, k] =
    P_r[k + s] with P_r[e] = w[r - RP, E0 - e] (zero off the kernel; w flipped if flip). A tile of NR output rows
    reads kernel-row offsets py - oy + ph from -(RP) (its first chunk may start below its first input row, and its
    last output row sees its first input rows at negative offsets) up to rows - RP - 1 (its last input row in reach,
    plus one chunk and the prefetched one past it): ~kh + 2 rows of ~2*pow2(W) columns, times bvec, per channel
    (C128 56x56 K31 fp32: 7.5 MB), whatever the plane's height."""
    wp = next_pow2(W)
    nr = block_n // wp
    oy_max = cdiv(H, nr) * nr - 1
    reach = cdiv(2 * block_k, wp)    # input rows a chunk and its prefetched successor run past the last one in reach
    under = cdiv(block_k, wp) - 1    # input rows a tile's first chunk can start below its first
    rp = max(0, min(under + nr - 1, oy_max - ph))
    top = min(nr + kh - 2 + reach, H - 1 + reach + ph)   # the highest kernel-row index read
    e0 = max(kw - 1, pw + wp - 1)
    return rp + top + 1, rp, e0, cdiv(e0 - pw + wp, bvec) * bvec


@triton.jit
def _wgb_tiles(t, live, H, x_c, g_c, nn, v, j, i, N, W, KH, KW, PH, PW, sxn, sxh, sxw, sgn, sgh, sgw,
               NB: tl.constexpr):
    """Step t = (image group, row y'): A[j, (n, v)] = x[n, y', v + j - PW], B[(n, v), i] = g[n, y' - i + PH, v]."""
    grp = t // H
    yy = t - grp * H
    n = grp * NB + nn
    ok = (n < N) & (v < W) & live
    n64 = tl.where(ok, n, 0).to(tl.int64)
    xcol = v[None, :] + j[:, None] - PW
    a = tl.load(x_c + n64[None, :] * sxn + yy * sxh + xcol * sxw,
                mask=ok[None, :] & (j < KW)[:, None] & (xcol >= 0) & (xcol < W), other=0.0)
    grow = yy - i + PH
    b = tl.load(g_c + n64[:, None] * sgn + grow[None, :] * sgh + v[:, None] * sgw,
                mask=ok[:, None] & ((i < KH) & (grow >= 0) & (grow < H))[None, :], other=0.0)
    return a, b


@triton.jit
def _dw_wgrad_batched_kernel(x_ptr, g_ptr, dw_ptr,
                             N, C, H, W, KH, KW, PH, PW, STEPS_PER_SPLIT, SPLITS,
                             sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw,
                             BLOCK_J: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_V: tl.constexpr,
                             NB: tl.constexpr, PRECISION: tl.constexpr, CAST_F32: tl.constexpr,
                             PREFETCH: tl.constexpr):
    """Weight grad for narrow planes (W <= BLOCK_V): each reduction step takes the same row y' of NB images
    side by side (NB * BLOCK_V reduction elements instead of one short row), so a 7-wide plane fills a
    64-deep MMA instead of a 16-deep one. Steps t = (image group, row) are split over programs; fp32 partials
    as in _dw_wgrad2_kernel."""
    pid = tl.program_id(0)
    s = pid % SPLITS
    c = pid // SPLITS
    t_start = s * STEPS_PER_SPLIT
    t_end = tl.minimum(t_start + STEPS_PER_SPLIT, tl.cdiv(N, NB) * H)
    T = t_end - t_start

    kk = tl.arange(0, NB * BLOCK_V)
    nn = kk // BLOCK_V
    v = kk % BLOCK_V
    j = tl.arange(0, BLOCK_J)
    i = tl.arange(0, BLOCK_I)
    x_c = x_ptr + c.to(tl.int64) * sxc
    g_c = g_ptr + c.to(tl.int64) * sgc
    acc = tl.zeros((BLOCK_J, BLOCK_I), dtype=tl.float32)
    if PREFETCH:
        a, b = _wgb_tiles(t_start, 0 < T, H, x_c, g_c, nn, v, j, i, N, W, KH, KW, PH, PW, sxn, sxh, sxw,
                          sgn, sgh, sgw, NB)
        for t in range(0, T):
            a_cur = a
            b_cur = b
            a, b = _wgb_tiles(t_start + t + 1, t + 1 < T, H, x_c, g_c, nn, v, j, i, N, W, KH, KW, PH, PW,
                              sxn, sxh, sxw, sgn, sgh, sgw, NB)
            acc = _mma(a_cur, b_cur, acc, PRECISION, CAST_F32)
    else:
        for t in range(0, T):
            a, b = _wgb_tiles(t_start + t, True, H, x_c, g_c, nn, v, j, i, N, W, KH, KW, PH, PW,
                              sxn, sxh, sxw, sgn, sgh, sgw, NB)
            acc = _mma(a, b, acc, PRECISION, CAST_F32)

    out = dw_ptr + (s.to(tl.int64) * C + c) * KH * KW + i[None, :] * KW + j[:, None]
    tl.store(out, acc, mask=(j < KW)[:, None] & (i < KH)[None, :])


@triton.jit
def _band_copies_kernel(w_ptr, q_ptr, KH, KW, R, RP, E0, LQ, w_off, swh, sww,
                        BLOCK_R: tl.constexpr, BVEC: tl.constexpr, BLOCK_Q: tl.constexpr, PART: tl.constexpr):
    """BLOCK_R rows r of one channel's band copies: q[c, r, s, k] = w[c, r - RP, E0 - k - s] (0 off the kernel),
    tap (i, j) read at w_ptr + w_off + c*KH*KW + i*swh + j*sww (flipped / transposed in place). PART 1 / 2: the
    bf16 high / low part of each (fp32) tap instead (``_split_bf16``)."""
    pid = tl.program_id(0)
    num_r = tl.cdiv(R, BLOCK_R)
    c = pid // num_r
    r = (pid - c * num_r) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None, None]
    i = r - RP
    sv = tl.arange(0, BVEC)[None, :, None]
    k = tl.arange(0, BLOCK_Q)[None, None, :]
    j = E0 - k - sv
    keep = (r < R) & (k < LQ)
    ok = keep & (i >= 0) & (i < KH) & (j >= 0) & (j < KW)
    v = tl.load(w_ptr + w_off + c * KH * KW + i * swh + j * sww, mask=ok, other=0.0)
    if PART != 0:
        hi, lo = _split_bf16(v.to(tl.float32))
        v = hi if PART == 1 else lo
    tl.store(q_ptr + ((c.to(tl.int64) * R + r) * BVEC + sv) * LQ + k, v.to(q_ptr.dtype.element_ty), mask=keep)


def _part_dtype(w, part: int):
    """The dtype of the band copies of ``part`` of w (``_band_copies``): w's own, or bf16 for its parts 1 / 2."""
    import torch

    return torch.bfloat16 if part else w.dtype


def _band_copies(w, taps: tuple, rows: int, rp: int, e0: int, lq: int, bvec: int, out=None, part: int = 0):
    """(C, rows, bvec, lq) band copies of w (C, kh, kw) read through ``taps`` (``_taps``), one launch; see
    _band_copies_kernel. ``out``: a contiguous buffer of exactly that many elements of the copies' dtype
    (``_part_dtype``) to use."""
    kh, kw, w_off, swh, sww = taps
    shape = (w.shape[0], rows, bvec, lq)
    q = w.new_empty(shape, dtype=_part_dtype(w, part)) if out is None else out.view(shape)
    # several rows per program: one (row, copy) per 1-warp program was ~19k programs at 7x7 C1024
    block_q = next_pow2(lq)
    block_r = max(1, min(next_pow2(rows), 4096 // (bvec * block_q)))
    launch(_band_copies_kernel, (w.shape[0] * cdiv(rows, block_r),), w, q, kh, kw, rows, rp, e0, lq, w_off, swh, sww,
           BLOCK_R=block_r, BVEC=bvec, BLOCK_Q=block_q, PART=part, num_warps=4)
    return q


def band_copies(w, taps: tuple, e0: int, length: int, bvec: int, part: int = 0):
    """Per kernel row i of w (C, kh, kw) read through ``taps`` (``_taps``: flipped / transposed in place): the
    reversed row zero-padded to ``length``,
    ``P_i[e0 - j] = w[i, j]`` (e0 >= kw - 1), stored as ``bvec`` copies shifted by 0..bvec-1: Q[c, i, s, k] =
    P_i[k + s] for k < LQ = length rounded up to bvec, so that any run P_i[e:e + n] is one aligned run of copy
    e % bvec. Returns (Q, LQ). C * kh * bvec * LQ elements: weights-sized (~6 MB at C128 K31 bf16), no
    activation-sized copy."""
    lq = cdiv(length, bvec) * bvec
    return _band_copies(w, taps, taps[0], 0, e0, lq, bvec, part=part), lq


@triton.jit
def _batch_split(N, N_PER_SPLIT, SPLITS):
    """(split, channel, first image, end image) of this program of a whole-plane weight grad."""
    pid = tl.program_id(0)
    s = pid % SPLITS
    n_start = s * N_PER_SPLIT
    return s, pid // SPLITS, n_start, tl.minimum(n_start + N_PER_SPLIT, N)


@triton.jit
def _padded_positions(H, W, HP: tl.constexpr, WP: tl.constexpr):
    """(py, px, inside) of the HP*WP positions p = py * WP + px of a plane padded to HP x WP."""
    p = tl.arange(0, HP * WP)
    py = p // WP
    px = p % WP
    return py, px, (py < H) & (px < W)


@triton.jit
def _x_block(x_c, n, n_end, py, px, p_ok, sxn, sxh, sxw, CAST_F32: tl.constexpr):
    """x[images n, padded positions] as a (HP*WP, BLOCK_N) tile (zero off the plane and from n_end on), with the
    clamped image offsets and their mask for loading grad_out rows of the same images."""
    n_ok = n < n_end
    n64 = tl.where(n_ok, n, 0).to(tl.int64)
    xt = tl.load(x_c + n64[None, :] * sxn + (py * sxh + px * sxw)[:, None], mask=p_ok[:, None] & n_ok[None, :],
                 other=0.0)
    if CAST_F32:
        xt = xt.to(tl.float32)
    return xt, n64, n_ok


@triton.jit
def _dw_wgrad_plane_kernel(x_ptr, g_ptr, dw_ptr,
                           N, C, H, W, KH, KW, PH, PW, N_PER_SPLIT, SPLITS,
                           sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw,
                           HP: tl.constexpr, WP: tl.constexpr, KHP: tl.constexpr, BLOCK_N: tl.constexpr,
                           PRECISION: tl.constexpr, CAST_F32: tl.constexpr):
    """Weight grad for small planes (H, W <= 16), without gathers: per channel and output row oy,
    ``M[(py, px), ox] = sum_n x[n, py, px] * g[n, oy, ox]`` is a plain GEMM over the batch (both operands are
    contiguous rows), and the tap (py - oy + PH, px - ox + PW) of each entry is reached by two more small GEMMs
    with constant 0/1 matrices: ``D = reshape(M, (HP, WP*WP)) @ S`` sums the diagonals px - ox (S[(px, ox), j'] =
    [px - ox + WP - 1 == j']), ``dw += R_oy @ D`` moves input row py to kernel row py - oy + PH. Positions are
    padded to HP x WP (pow2, >= 16); the batch is split over SPLITS programs per channel (fp32 partials)."""
    s, c, n_start, n_end = _batch_split(N, N_PER_SPLIT, SPLITS)
    py, px, p_ok = _padded_positions(H, W, HP, WP)
    ox = tl.arange(0, WP)
    nn = tl.arange(0, BLOCK_N)
    k = tl.arange(0, WP * WP)
    jj = tl.arange(0, 2 * WP)
    skew = ((k // WP - k % WP + WP - 1)[:, None] == jj[None, :]).to(tl.float32)
    ii = tl.arange(0, KHP)
    hh = tl.arange(0, HP)
    x_c = x_ptr + c.to(tl.int64) * sxc
    g_c = g_ptr + c.to(tl.int64) * sgc
    acc = tl.zeros((KHP, 2 * WP), dtype=tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        xt, n64, n_ok = _x_block(x_c, n0 + nn, n_end, py, px, p_ok, sxn, sxh, sxw, CAST_F32)   # (HP*WP, BLOCK_N)
        if PRECISION == "bf16x3":   # x split once per batch block, not again for every output row
            xt_hi, xt_lo = _split_bf16(xt)
        else:
            xt_hi = xt
            xt_lo = xt
        for oy in range(0, H):
            gt = tl.load(g_c + n64[:, None] * sgn + oy * sgh + ox[None, :] * sgw,
                         mask=n_ok[:, None] & (ox < W)[None, :], other=0.0)       # (BLOCK_N, WP)
            if CAST_F32:
                gt = gt.to(tl.float32)
            if PRECISION == "bf16x3":   # Triton's bf16x3 with x pre-split
                g_hi, g_lo = _split_bf16(gt)
                m = _dot3(xt_hi, xt_lo, g_hi, g_lo, tl.zeros((HP * WP, WP), dtype=tl.float32), CAST_F32)   # (HP*WP, WP)
            else:
                m = tl.dot(xt, gt, input_precision=PRECISION)                     # (HP*WP, WP)
            d = _mma01(tl.reshape(m, (HP, WP * WP)), skew, tl.zeros((HP, 2 * WP), dtype=tl.float32), False,
                       PRECISION, CAST_F32)                                       # (HP, 2*WP)
            shift = ((hh[None, :] - oy + PH) == ii[:, None]).to(tl.float32)      # (KHP, HP)
            acc = _mma01(d, shift, acc, True, PRECISION, CAST_F32)

    j = jj - (WP - 1) + PW
    out = dw_ptr + (s.to(tl.int64) * C + c) * KH * KW + ii[:, None] * KW + j[None, :]
    tl.store(out, acc, mask=(ii < KH)[:, None] & ((j >= 0) & (j < KW))[None, :])


@triton.jit
def _dw_wgrad_gram_kernel(x_ptr, g_ptr, dw_ptr,
                          N, C, H, W, KH, KW, PH, PW, N_PER_SPLIT, SPLITS,
                          sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw,
                          HP: tl.constexpr, WP: tl.constexpr, KHP: tl.constexpr, JP: tl.constexpr,
                          BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, CAST_F32: tl.constexpr):
    """Weight grad for planes of at most GRAM_MAX padded positions (7x7: 8 x 8), where every output sees most of
    the input: per channel the Gram matrix ``P[p, q] = sum_n x[n, p] * g[n, q]`` over the batch is one GEMM per
    batch block (reduction length = batch), and only once the batch is summed is each entry moved to its tap
    (py - qy + PH, px - qx + PW): P reordered to ((py, qy), (px, qx)), ``D = P @ S`` sums the diagonals
    px - qx (S[(px, qx), j'] = [px - qx + WP - 1 == j']), ``dw = R @ D`` sums py - qy (R[i, (py, qy)] =
    [py - qy + PH == i]). ~8x fewer MMA steps than ``_dw_wgrad_plane_kernel`` at 7x7, in one dependency chain
    per batch block instead of one per output row."""
    s, c, n_start, n_end = _batch_split(N, N_PER_SPLIT, SPLITS)
    py, px, p_ok = _padded_positions(H, W, HP, WP)
    nn = tl.arange(0, BLOCK_N)
    x_c = x_ptr + c.to(tl.int64) * sxc
    g_c = g_ptr + c.to(tl.int64) * sgc
    gram = tl.zeros((HP * WP, HP * WP), dtype=tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        xt, n64, n_ok = _x_block(x_c, n0 + nn, n_end, py, px, p_ok, sxn, sxh, sxw, CAST_F32)   # (HP*WP, BLOCK_N)
        gt = tl.load(g_c + n64[:, None] * sgn + (py * sgh + px * sgw)[None, :], mask=n_ok[:, None] & p_ok[None, :],
                     other=0.0)                                                   # (BLOCK_N, HP*WP)
        if CAST_F32:
            gt = gt.to(tl.float32)
        if PRECISION == "bf16x3":
            x_hi, x_lo = _split_bf16(xt)
            g_hi, g_lo = _split_bf16(gt)
            gram = _dot3(x_hi, x_lo, g_hi, g_lo, gram, CAST_F32)
        else:
            gram = tl.dot(xt, gt, gram, input_precision=PRECISION)

    pairs = tl.reshape(tl.permute(tl.reshape(gram, (HP, WP, HP, WP)), (0, 2, 1, 3)), (HP * HP, WP * WP))
    k = tl.arange(0, WP * WP)
    jj = tl.arange(0, JP)
    skew = ((k // WP - k % WP + WP - 1)[:, None] == jj[None, :]).to(tl.float32)   # (WP*WP, JP)
    d = _mma01(pairs, skew, tl.zeros((HP * HP, JP), dtype=tl.float32), False, PRECISION, CAST_F32)
    r = tl.arange(0, HP * HP)
    ii = tl.arange(0, KHP)
    rows = ((r // HP - r % HP + PH)[None, :] == ii[:, None]).to(tl.float32)      # (KHP, HP*HP)
    acc = _mma01(d, rows, tl.zeros((KHP, JP), dtype=tl.float32), True, PRECISION, CAST_F32)

    j = jj - (WP - 1) + PW
    out = dw_ptr + (s.to(tl.int64) * C + c) * KH * KW + ii[:, None] * KW + j[None, :]
    tl.store(out, acc, mask=(ii < KH)[:, None] & ((j >= 0) & (j < KW))[None, :])


def _vec(t, cfg: dict) -> int:
    """Widest run (<= 16 bytes) that W, the strides and the data pointer are all multiples of."""
    n, c, h, w = t.shape
    vec = min(cfg.get("vec", 16), 16 // t.element_size())
    while vec > 1 and not (t.stride(3) == 1 and w % vec == 0 and t.stride(0) % vec == 0 and t.stride(1) % vec == 0
                           and t.stride(2) % vec == 0 and t.data_ptr() % (vec * t.element_size()) == 0):
        vec //= 2
    return vec


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, next_pow2(n))


GRAM_MAX = 128   # padded plane positions up to which the Gram weight grad applies (its P tile is GRAM_MAX^2 fp32)


def gram_dims(H: int, W: int) -> tuple[int, int]:
    """Padded (HP, WP) of the Gram weight grad: powers of two, >= 4 so that its reordered GEMMs are >= 16 wide."""
    return _pow2(H, 4), _pow2(W, 4)


def gram_fits(H: int, W: int) -> bool:
    """Whether the Gram weight grad takes an H x W plane."""
    hp, wp = gram_dims(H, W)
    return hp * wp <= GRAM_MAX


def _batch_splits(N: int, C: int, cfg: dict) -> tuple[int, int]:
    """(splits, images per split) of a whole-plane weight grad: the batch over about cfg['programs'] programs
    (default: one per channel), in multiples of BLOCK_N images."""
    bn = cfg.get("BLOCK_N", 64)
    splits = max(1, min(cdiv(N, bn), cdiv(cfg.get("programs", C), C)))
    per_split = cdiv(cdiv(N, splits), bn) * bn
    return cdiv(N, per_split), per_split


def _plane_partials(x, splits: int, kh: int, kw: int, pw: int, wp: int, jp: int, poison: bool):
    """fp32 (splits, C, kh, kw) partials of a whole-plane weight grad, whose kernel writes every kernel row and the
    columns pw - wp + 1 .. pw - wp + jp: zeros where taps lie beyond the plane's reach, else empty (NaN if poison)."""
    import torch

    covered = pw - wp + 1 <= 0 and kw - 1 <= pw - wp + jp
    partial = (torch.empty if covered else torch.zeros)((splits, x.shape[1], kh, kw), device=x.device,
                                                        dtype=torch.float32)
    return partial.fill_(float("nan")) if poison and covered else partial


def _tail_scratch(y, nbytes: int, dtype):
    """(n, buf): a buffer of ``nbytes`` bytes, viewed as ``dtype``, in the storage of y's images n.. (16-byte
    aligned), n the images before it; (0, None) where y is not contiguous or the buffer would reach into image 0."""
    import torch

    if y.numel() == 0:
        return 0, None
    per_image = y[0].numel() * y.element_size()
    start = (y.numel() * y.element_size() - nbytes) // 16 * 16
    if not y.is_contiguous() or y.data_ptr() % 16 or start < per_image:
        return 0, None
    return start // per_image, y.view(-1).view(torch.uint8)[start:start + nbytes].view(dtype)


@triton.jit
def _split_channels_kernel(x_ptr, hi_ptr, lo_ptr, G, H, W, sxn, sxc, sxh, sxw, TOTAL, BLOCK: tl.constexpr):
    """hi / lo (N, G, H, W), contiguous = the bf16 parts (``_split_bf16``) of x's channels c0.. (x_ptr at c0)."""
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = e < TOTAL
    hw = e % (H * W)
    nc = e // (H * W)
    v = tl.load(x_ptr + (nc // G) * sxn + (nc % G) * sxc + (hw // W) * sxh + (hw % W) * sxw, mask=ok, other=0.0)
    hi, lo = _split_bf16(v.to(tl.float32))
    tl.store(hi_ptr + e, hi, mask=ok)
    tl.store(lo_ptr + e, lo, mask=ok)


def _split_channels(x, c0: int, g: int, buffers=None):
    """(hi, lo): the bf16 parts of x[:, c0:c0 + g] as two contiguous (N, g, H, W) tensors, the next two of
    ``buffers`` (an iterator of such tensors) where given."""
    import torch

    N, _, H, W = x.shape
    if buffers is not None:
        hi, lo = next(buffers), next(buffers)
    else:
        hi = torch.empty((N, g, H, W), device=x.device, dtype=torch.bfloat16)
        lo = torch.empty_like(hi)
    total = hi.numel()
    launch(_split_channels_kernel, (cdiv(total, 1024),), x[:, c0:], hi, lo, g, H, W, *x.stride(), total,
           BLOCK=1024, num_warps=4)
    return hi, lo


def _kernel_parts(split: bool) -> list:
    """The parts of the kernel whose band copies a launch reads (``_band_copies``' ``part``): [0] = w itself, or
    with split (fp32 w) [1, 2] = its bf16 high / low parts (``_dot3``), split while the copies are written (no
    weights-sized temporaries: they were above native's backward peak, beside dx)."""
    return [1, 2] if split else [0]


def launch_fwd(x, w, bias, y, ph: int, pw: int, cfg: dict, precision: str, cast_f32: bool,
               flip: bool = False) -> None:
    """y = depthwise 'same'-style conv of x with w (C, kh, kw) (flipped in both axes if flip) and top/left
    padding (ph, pw)."""
    N, C, H, W = x.shape
    taps = _taps(w, flip, False)
    KH, KW, w_off, swh, sww = taps
    b_arg = bias if bias is not None else w   # any pointer when HAS_BIAS is off
    if cfg.get("plane"):
        bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
        grid = (C * cdiv(N, bm) * cdiv(H * W, bn),)
        if cfg.get("bands"):
            parts = _kernel_parts(bool(cfg.get("split")) and w.element_size() == 4)
            part_dtype = _part_dtype(w, parts[0])
            wp, bvec = next_pow2(W), 16 // part_dtype.itemsize
            bn = max(bn, wp)   # whole output rows per tile
            rows, rp, e0, lq = plane_band_geometry(KH, KW, H, W, ph, pw, bn, bk, bvec)
            size = C * rows * bvec * lq
            rest, scratch = cfg.get("tail"), None
            if rest is not None:   # no room for the copies beside y: they live in y's last images, which `rest`
                # (a configuration without copies) computes once this launch has read them
                N, scratch = _tail_scratch(y, len(parts) * size * part_dtype.itemsize, part_dtype)
                if N == 0:
                    launch_fwd(x, w, bias, y, ph, pw, rest, precision, cast_f32, flip)
                    return
            qs = [_band_copies(w, taps, rows, rp, e0, lq, bvec,
                               None if scratch is None else scratch[i * size:(i + 1) * size], part)
                  for i, part in enumerate(parts)]
            grid = (C * cdiv(N, bm) * cdiv(H, bn // wp),)
            launch(_dw_plane_bands_kernel, grid, x, qs[0], qs[-1], b_arg, y,
                                         N, C, H, W, KH, ph, pw, ph + rp, e0, rows, lq // bvec,
                                         *x.stride(), *y.stride(),
                                         HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, WP=wp,
                                         BVEC=bvec, PRECISION=precision, CAST_F32=cast_f32,
                                         PREFETCH=cfg.get("prefetch", False), SPLIT=len(parts) == 2,
                                         num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 2))
            if rest is not None:   # the last images; whole-plane tiles no taller than their count (16..BLOCK_M)
                if rest.get("plane"):
                    rest = dict(rest, BLOCK_M=min(rest["BLOCK_M"], max(16, next_pow2(x.shape[0] - N))))
                launch_fwd(x[N:], w, bias, y[N:], ph, pw, rest, precision, cast_f32, flip)
            return
        launch(_dw_plane_kernel, grid, x, w, b_arg, y,
                               N, C, H, W, KH, KW, ph, pw, w_off, swh, sww,
                               *x.stride(), *y.stride(),
                               HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                               PRECISION=precision, CAST_F32=cast_f32, PREFETCH=cfg.get("prefetch", False),
                               num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 2))
        return
    if cfg.get("transpose"):   # tall kernels: run on the (W, H) views, the kernel read transposed in place
        x, y = x.transpose(2, 3), y.transpose(2, 3)
        N, C, H, W = x.shape
        ph, pw = pw, ph
        taps = _taps(w, flip, True)
        KH, KW, w_off, swh, sww = taps
    bm, bw, bu = cfg["BLOCK_M"], cfg["BLOCK_W"], cfg["BLOCK_U"]
    grid = (C * cdiv(N * H, bm) * cdiv(W, bw),)
    if cfg.get("prefetch") or cfg.get("transpose"):
        vec = _vec(x, cfg)
        sn, sc, sh, sw = x.stride()
        pwa = cdiv(pw, vec) * vec
        num_u = cdiv(bw + KW - 1 + pwa - pw, bu)
        bands = bool(cfg.get("bands"))
        split = bands and bool(cfg.get("split")) and x.element_size() == 4   # fp32: bf16 hi / lo band copies
        bvec = 8 if split else 16 // w.element_size() if bands else 1
        q, q2, lq, e0 = w, w, 1, num_u * bu - 1
        if bands:
            copies = [band_copies(w, taps, e0, e0 + pwa - pw + bw, bvec, p) for p in _kernel_parts(split)]
            (q, lq), (q2, _) = copies[0], copies[-1]
        launch(_dw_fwd2_kernel, grid, x, w, b_arg, y,
                              N, C, H, W // vec, KH, KW, ph, pw, pwa // vec, w_off, swh, sww,
                              sn // vec, sc // vec, sh // vec, sw, *y.stride(), q, q2, lq // bvec, e0,
                              HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_W=bw, BLOCK_U=bu,
                              PRECISION=precision, CAST_F32=cast_f32, VEC=vec, BANDS=bands,
                              BVEC=bvec, SPLIT=split,
                              num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 2))
        return
    if flip:
        w = w.flip(-2, -1).contiguous()
    launch(_dw_fwd_kernel, grid, x, w, b_arg, y,
                         N, C, H, W, KH, KW, ph, pw,
                         *x.stride(), *y.stride(),
                         HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_W=bw, BLOCK_U=bu,
                         PRECISION=precision, CAST_F32=cast_f32,
                         num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 2))


def launch_wgrad(x, g, kh: int, kw: int, ph: int, pw: int, cfg: dict, precision: str, cast_f32: bool,
                 poison: bool = False, scratch=None):
    """Returns the fp32 weight grad (C, kh, kw). ``scratch``: a buffer (dx, not yet written) that the
    column-Gram kernel may keep the operands' bf16 parts in."""
    import torch

    if cfg.get("transpose"):   # tall kernels: the transposed problem, its (kw x kh) grad transposed back
        dw = launch_wgrad(x.transpose(2, 3), g.transpose(2, 3), kw, kh, pw, ph,
                          {k: v for k, v in cfg.items() if k != "transpose"}, precision, cast_f32, poison)
        return dw.transpose(1, 2)
    N, C, H, W = x.shape
    if cfg.get("gram"):   # Gram matrix over the batch, then to taps
        if not gram_fits(H, W):
            raise ValueError(f"the Gram weight grad takes planes up to {GRAM_MAX} padded positions, got {H}x{W}")
        hp, wp = gram_dims(H, W)
        jp = max(16, 2 * wp)
        splits, per_split = _batch_splits(N, C, cfg)
        partial = _plane_partials(x, splits, kh, kw, pw, wp, jp, poison)
        launch(_dw_wgrad_gram_kernel, (C * splits,), x, g, partial,
                                             N, C, H, W, kh, kw, ph, pw, per_split, splits,
                                             *x.stride(), *g.stride(),
                                             HP=hp, WP=wp, KHP=_pow2(kh), JP=jp, BLOCK_N=cfg.get("BLOCK_N", 64),
                                             PRECISION=precision, CAST_F32=cast_f32,
                                             num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 2))
        return partial.sum(0) if splits > 1 else partial[0]
    if cfg.get("plane"):   # gather-free small-plane form
        if H > 16 or W > 16:
            raise ValueError(f"the whole-plane weight grad takes planes up to 16x16, got {H}x{W}")
        hp, wp = max(16, next_pow2(H)), max(16, next_pow2(W))
        splits, per_split = _batch_splits(N, C, cfg)
        partial = _plane_partials(x, splits, kh, kw, pw, wp, 2 * wp, poison)
        launch(_dw_wgrad_plane_kernel, (C * splits,), x, g, partial,
                                              N, C, H, W, kh, kw, ph, pw, per_split, splits,
                                              *x.stride(), *g.stride(),
                                              HP=hp, WP=wp, KHP=_pow2(kh), BLOCK_N=cfg.get("BLOCK_N", 64),
                                              PRECISION=precision, CAST_F32=cast_f32,
                                              num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 2))
        return partial.sum(0) if splits > 1 else partial[0]
    if "NB" in cfg:   # several images' rows per reduction step (narrow planes)
        nb, bv = cfg["NB"], _pow2(W, 1)
        steps = cdiv(N, nb) * H
        splits = max(1, min(steps, cdiv(cfg.get("programs", 1024), C)))
        per_split = cdiv(steps, splits)
        splits = cdiv(steps, per_split)
        partial = torch.empty((splits, C, kh, kw), device=x.device, dtype=torch.float32)
        if poison:
            partial.fill_(float("nan"))
        launch(_dw_wgrad_batched_kernel, (C * splits,), x, g, partial,
                                                N, C, H, W, kh, kw, ph, pw, per_split, splits,
                                                *x.stride(), *g.stride(),
                                                BLOCK_J=_pow2(kw), BLOCK_I=_pow2(kh), BLOCK_V=bv, NB=nb,
                                                PRECISION=precision, CAST_F32=cast_f32,
                                                PREFETCH=cfg.get("prefetch", True),
                                                num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 2))
        return partial.sum(0) if splits > 1 else partial[0]
    if cfg.get("cols"):   # column Gram matrices per kernel row, over all rows of the batch
        # presplit ("g", "x" or "gx", fp32): those operands as bf16 parts, split once per group of channels into
        # ``scratch`` (dx's storage, before the input grad overwrites it: groups of C // 2 channels) or, without
        # it, into temporaries of the group's size
        presplit = cfg.get("presplit", "") if x.element_size() == 4 else ""
        in_scratch = bool(presplit) and C >= 2 and scratch is not None and scratch.is_contiguous() and \
            scratch.numel() * scratch.element_size() >= 2 * x.numel() * x.element_size() * len(presplit) // 4
        group = max(1, C // 2) if in_scratch else cfg.get("group", C) if presplit else C
        wp, ni, br = _pow2(W), cfg.get("NI", 2), cfg["BLOCK_R"]
        rows = N * H
        # programs counts those of all channels; 0: one program per (channel, row block), writing dw directly
        splits = max(1, min(cdiv(rows, br), cdiv(cfg.get("programs", 1024), C * cdiv(kh, ni))))
        rows_per_split = cdiv(cdiv(rows, splits), br) * br
        splits = cdiv(rows, rows_per_split)
        dw = torch.empty((C, kh, kw), device=x.device, dtype=torch.float32)
        n_parts = 2 * len(presplit)
        for c0 in range(0, C, group):
            gc = min(group, C - c0)
            parts = iter(scratch.view(-1).view(torch.bfloat16)[:n_parts * N * gc * H * W].view(n_parts, N, gc, H, W)) \
                if in_scratch else None
            xa, xb = _split_channels(x, c0, gc, parts) if "x" in presplit else (x[:, c0:c0 + gc],) * 2
            ga, gb = _split_channels(g, c0, gc, parts) if "g" in presplit else (g[:, c0:c0 + gc],) * 2
            out = dw[c0:c0 + gc] if splits == 1 else torch.empty((splits, gc, kh, kw), device=x.device,
                                                                 dtype=torch.float32)
            if poison:
                out.fill_(float("nan"))
            vec = min(_vec(xa, cfg), _vec(ga, cfg))
            xn, xc, xh, xw = xa.stride()
            gn, gcs, gh, gw = ga.stride()
            launch(_dw_wgrad_cols_kernel, (gc * cdiv(kh, ni) * splits,), xa, xb, ga, gb, out,
                                                  N, gc, H, W // vec, kh, kw, ph, pw, rows_per_split, splits,
                                                  xn // vec, xc // vec, xh // vec, xw, gn // vec, gcs // vec, gh // vec,
                                                  gw, NI=ni, WP=wp, BLOCK_R=br, PRECISION=precision,
                                                  CAST_F32=cast_f32, VEC=vec, SPLIT_G="g" in presplit,
                                                  SPLIT_X="x" in presplit, num_warps=cfg.get("num_warps", 4),
                                                  num_stages=cfg.get("num_stages", 2))
            if splits > 1:
                torch.sum(out, 0, out=dw[c0:c0 + gc])
        return dw
    if "BLOCK_V" in cfg:   # row-walking kernel
        rows = N * H
        splits = max(1, min(rows, cdiv(cfg.get("programs", 1024), C)))
        rows_per_split = cdiv(rows, splits)
        splits = cdiv(rows, rows_per_split)
        partial = torch.empty((splits, C, kh, kw), device=x.device, dtype=torch.float32)
        if poison:
            partial.fill_(float("nan"))
        vec = _vec(g, cfg)
        gn, gc, gh, gw = g.stride()
        launch(_dw_wgrad2_kernel, (C * splits,), x, g, partial,
                                         N, C, H, W // vec, kh, kw, ph, pw, rows_per_split, splits,
                                         *x.stride(), gn // vec, gc // vec, gh // vec, gw,
                                         BLOCK_J=_pow2(kw), BLOCK_I=_pow2(kh), BLOCK_V=cfg["BLOCK_V"],
                                         PRECISION=precision, CAST_F32=cast_f32, VEC=vec,
                                         num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 2))
        return partial.sum(0) if splits > 1 else partial[0]
    bk = cfg["BLOCK_K"]
    total = N * H * W
    blocks = cdiv(total, bk)
    splits = max(1, min(blocks, cdiv(cfg.get("programs", 1024), C)))
    k_per_split = cdiv(blocks, splits) * bk
    splits = cdiv(total, k_per_split)
    partial = torch.empty((splits, C, kh, kw), device=x.device, dtype=torch.float32)
    if poison:
        partial.fill_(float("nan"))
    launch(_dw_wgrad_kernel, (C * splits,), x, g, partial,
                                    N, C, H, W, kh, kw, ph, pw, k_per_split, splits,
                                    *x.stride(), *g.stride(),
                                    BLOCK_J=_pow2(kw), BLOCK_I=_pow2(kh), BLOCK_K=bk,
                                    PRECISION=precision, CAST_F32=cast_f32,
                                    num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 2))
    return partial.sum(0) if splits > 1 else partial[0]

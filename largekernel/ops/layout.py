"""NCHW <-> channels_last copies for the depthwise kernels, which want unit stride along W.

A channels_last activation is copied to row-major before our kernels and the result copied back (the kernels'
own strided channels_last stores were 2x slower, docs/performance.md). PyTorch's generic strided copy does this
transpose far below copy bandwidth on the H100 (RepLKNet-31B's training step: 120 such copies, ~6.6 of 75 ms of GPU
time); :func:`to_memory_format` does it as a tiled Triton transpose on CUDA and falls back to PyTorch elsewhere.
"""
from __future__ import annotations

import os

import torch

from largekernel.ops.dispatch import triton_interpreting

# LARGEKERNEL_FAST_TRANSPOSE=0: always PyTorch's copy
FAST_TRANSPOSE = os.environ.get("LARGEKERNEL_FAST_TRANSPOSE", "1") == "1"
_kernel = None
_padded = None
PADDED_TILE: tuple = ()   # force the row-major-planes copies' (positions, channels, warps) per program (benchmarks)


def _transpose_kernel():
    """The Triton kernel, built on first use (Triton reads TRITON_INTERPRET when a kernel is decorated)."""
    global _kernel
    if _kernel is None:
        import triton
        import triton.language as tl

        @triton.jit
        def _nchw_nhwc_copy(src, dst, P, C, s_n, s_p, s_c, d_n, d_p, d_c,
                            BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
            # one (BLOCK_P positions x BLOCK_C channels) tile of image n; each side is read / written along its
            # unit-stride axis (Triton stages the tile through shared memory between the two layouts)
            n = tl.program_id(2).to(tl.int64)
            p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
            c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
            mask = (p < P)[:, None] & (c < C)[None, :]
            v = tl.load(src + n * s_n + p[:, None] * s_p + c[None, :] * s_c, mask=mask)
            tl.store(dst + n * d_n + p[:, None] * d_p + c[None, :] * d_c, v, mask=mask)

        _kernel = _nchw_nhwc_copy
    return _kernel


def _copy_kernel_fits(t: torch.Tensor, image_numel: int) -> bool:
    """Whether the Triton copies can run on t: where Triton runs (CUDA, or the CPU under ``TRITON_INTERPRET=1``, the CI
    tests), images their int32 offsets address, and a batch within the grid's third dimension."""
    return ((t.is_cuda or (t.device.type == "cpu" and triton_interpreting())) and 0 < image_numel < 2**31
            and t.shape[0] < 65536)


def _padded_kernel():
    """Triton kernel between channels_last and row-major planes whose rows are padded to a stride of WP >= W."""
    global _padded, _to_bf16_rn
    if _padded is None:
        import triton
        import triton.language as tl

        # (a module global: Triton resolves the helpers a kernel calls among its module's globals)
        from largekernel.ops._dw_kernels import _to_bf16_rn

        @triton.jit
        def _padded_rows_copy(src, dst, H, W, WP, C, HWQ, plane, rest, R, N, scale, shift, Q: tl.constexpr,
                              PADDED: tl.constexpr, TO_ROWS: tl.constexpr, SPLIT: tl.constexpr, AFFINE: tl.constexpr,
                              BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BF16_RN: tl.constexpr):
            # positions walk the padded (H, WP) grid: unit stride on the row-major side (whose pad columns receive
            # zeros), channels at unit stride on the channels_last side (whose pad columns do not exist).
            # The plane size H * WP is HWQ * Q, Q a power of two that divides it (up to 16): so Triton knows how far
            # a program's row-major accesses are aligned, and moves them in vectors of up to Q elements.
            # SPLIT, to rows: channel c of image n goes to plane n * R + plane[c] of dst where plane[c] >= 0, else,
            # scaled on the way (AFFINE), to plane N * R + n * (C - R) + g, g = -1 - plane[c] (one buffer for both:
            # one store per element). Back: from src's plane n * R + plane[c] or rest's n * (C - R) + g.
            HWP = HWQ * Q
            n = tl.program_id(2).to(tl.int64)
            p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
            c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
            h, w = p // WP, p % WP
            in_grid = (p < HWP)[:, None] & (c < C)[None, :]
            real = in_grid & (w < W)[:, None]
            at_cl = n * H * W * C + (h * W + w)[:, None] * C + c[None, :]
            if SPLIT:
                t = tl.load(plane + c, mask=c < C, other=0)
                mine = t >= 0
                g = tl.where(mine, 0, -1 - t)
            if TO_ROWS:   # (in dst's dtype: the copy may also cast, as autocast would have before it)
                if SPLIT:
                    at_rows = (tl.where(mine, n * R + t, N * R + n * (C - R) + g) * HWP)[None, :] + p[:, None]
                else:
                    at_rows = ((n * C + c) * HWP)[None, :] + p[:, None]
                v = tl.load(src + at_cl, mask=real, other=0.0)
                v = _to_bf16_rn(v.to(tl.float32)) if BF16_RN else v.to(dst.dtype.element_ty)
                if AFFINE:   # the passed-through channels' scale and shift, on the cast value (1 and 0 elsewhere)
                    a = tl.load(scale + g, mask=(c < C) & ~mine, other=1.0).to(tl.float32)
                    b = tl.load(shift + g, mask=(c < C) & ~mine, other=0.0).to(tl.float32)
                    u = v.to(tl.float32) * a[None, :] + b[None, :]
                    v = _to_bf16_rn(u) if BF16_RN else u.to(dst.dtype.element_ty)
                tl.store(dst + at_rows, v, mask=in_grid)
            # (back, from unpadded rows: masked by whole planes, the same mask as by real positions there, in a form
            # Triton sees constant along p, so that the loads are vectors as well)
            elif SPLIT:   # two masked loads, each with its plane's alignment, rather than one through either
                mine_at = ((n * R + tl.maximum(t, 0)) * HWP)[None, :] + p[:, None]
                rest_at = ((n * (C - R) + g) * HWP)[None, :] + p[:, None]
                v = tl.load(src + mine_at, mask=(real if PADDED else in_grid) & mine[None, :])
                u = tl.load(rest + rest_at, mask=(real if PADDED else in_grid) & ~mine[None, :])
                tl.store(dst + at_cl, tl.where(mine[None, :], v, u), mask=real)
            else:
                at_rows = ((n * C + c) * HWP)[None, :] + p[:, None]
                tl.store(dst + at_cl, tl.load(src + at_rows, mask=real if PADDED else in_grid), mask=real)

        _padded = _padded_rows_copy
    return _padded


def _row_planes(t: torch.Tensor, wp: int) -> bool:
    """Whether 4-d ``t`` views row-major planes with rows ``wp`` elements apart, planes and images packed."""
    _, c, h, _ = t.shape
    return t.stride(-1) == 1 and t.stride(-2) == wp and t.stride(1) == h * wp and t.stride(0) == c * h * wp


def padded_rows(t: torch.Tensor, align: int = 16, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A row-major copy of 4-d ``t`` whose rows start every ``align`` bytes: a (N, C, H, W) view of a zero-padded
    (N, C, H, WP) buffer (the tensor memory accelerator addresses rows at 16-byte strides only), in ``dtype``
    (default ``t``'s: the copy casts on the way). ``t`` itself when it already is such a row-major tensor of that
    dtype. Channels_last input runs the Triton copy where Triton runs."""
    n, c, h, w = t.shape
    dtype = dtype or t.dtype
    wp = -(-w * dtype.itemsize // align) * align // dtype.itemsize
    if dtype == t.dtype and _row_planes(t, wp) and t.data_ptr() % align == 0:
        return t
    out = t.new_empty((n, c, h, wp), dtype=dtype)
    if not (FAST_TRANSPOSE and memory_format_of(t) == torch.channels_last and _copy_kernel_fits(t, out[0].numel())):
        out[..., w:] = 0
        out[..., :w] = t
        return out[..., :w]
    _launch_padded(t, out, h, w, wp, to_rows=True)
    return out[..., :w]


def from_padded_rows(t: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    """``t`` (a (N, C, H, W) view of padded row-major planes, as :func:`padded_rows` gives) in ``memory_format``."""
    n, c, h, w = t.shape
    wp = t.stride(-2)
    if (memory_format != torch.channels_last or not FAST_TRANSPOSE or t.stride(1) != h * wp
            or not _copy_kernel_fits(t, c * h * wp)):
        return t.contiguous(memory_format=memory_format)
    out = torch.empty((n, c, h, w), dtype=t.dtype, device=t.device, memory_format=torch.channels_last)
    _launch_padded(t, out, h, w, wp, to_rows=False)
    return out


def split_rows(t: torch.Tensor, plane: torch.Tensor, count: int, align: int, dtype: torch.dtype,
               affine: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Channels_last ``t`` (N, C, H, W) as two row-major copies in ``dtype`` (one pass: the copy casts), rows every
    ``align`` bytes (views of one zero-padded buffer, as :func:`padded_rows`): (N, count, H, W), channel c at plane
    ``plane[c]`` where that is >= 0, and (N, C - count, H, W), channel c at plane ``g = -1 - plane[c]`` otherwise,
    as ``t[:, c] * scale[g] + shift[g]`` with ``affine = (scale, shift)`` (on the cast value, in fp32). ``plane``:
    (C,) int32 on t's device. Where Triton runs (as the other copies); :func:`merge_rows` puts them back."""
    n, c, h, w = t.shape
    wp = -(-w * dtype.itemsize // align) * align // dtype.itemsize
    buf = t.new_empty((n * c, h, wp), dtype=dtype)
    scale, shift = affine if affine is not None else (None, None)
    _launch_padded(t, buf, h, w, wp, to_rows=True, split=(plane, buf, count, scale, shift))
    mine, rest = buf.split([n * count, n * (c - count)])
    return mine.view(n, count, h, wp)[..., :w], rest.view(n, c - count, h, wp)[..., :w]


def merge_rows(mine: torch.Tensor, rest: torch.Tensor, plane: torch.Tensor) -> torch.Tensor:
    """The channels_last (N, C, H, W) tensor whose channel c is plane ``plane[c]`` of the row-major ``mine`` (N, R,
    H, W) where that is >= 0, else plane ``-1 - plane[c]`` of the row-major ``rest`` (N, C - R, H, W) (same dtype)."""
    n, r, h, w = mine.shape
    c = r + rest.shape[1]

    if not (_row_planes(mine, mine.stride(2)) and _row_planes(rest, mine.stride(2))):   # (rows padded alike, or not)
        mine, rest = mine.contiguous(), rest.contiguous()
    out = torch.empty((n, c, h, w), dtype=mine.dtype, device=mine.device, memory_format=torch.channels_last)
    _launch_padded(mine, out, h, w, mine.stride(2), to_rows=False, split=(plane, rest, r, None, None))
    return out


def _tile(positions: int) -> tuple[int, int, int]:
    """(positions, channels, warps) of a padded copy's program: 128 x 32 (fastest at 56 px on the H200), fewer
    positions and more channels for small planes (a 7 x 7 plane in a 64-position tile)."""
    block_p = min(128, max(16, 1 << (positions - 1).bit_length()))
    return block_p, min(128, 4096 // block_p), 4


def _launch_padded(src: torch.Tensor, dst: torch.Tensor, h: int, w: int, wp: int, to_rows: bool,
                   split: tuple | None = None) -> None:
    """split: (plane, rest, R, scale, shift) of :func:`split_rows` / :func:`merge_rows`, or None."""
    from largekernel.ops._launch import cdiv, launch, on_device

    n, c = (src if to_rows else dst).shape[:2]
    block_p, block_c, warps = PADDED_TILE or _tile(h * wp)
    # -> bf16 under the interpreter, whose cast truncates: rounded to nearest as on the GPU
    bf16_rn = (triton_interpreting() and dst.dtype == torch.bfloat16
               and src.dtype in (torch.float32, torch.float16))
    plane, rest, r, scale, shift = split if split is not None else (src, src, c, None, None)
    affine = scale is not None
    if not affine:
        scale = shift = src
    q = min(16, (h * wp) & -(h * wp))   # the largest power of two (up to 16) dividing the plane size
    with on_device(src):
        launch(_padded_kernel(), (cdiv(h * wp, block_p), cdiv(c, block_c), n), src, dst, h, w, wp, c, h * wp // q,
               plane, rest, r, n, scale, shift, Q=q, PADDED=wp != w, TO_ROWS=to_rows, SPLIT=split is not None,
               AFFINE=affine, BLOCK_P=block_p, BLOCK_C=block_c, BF16_RN=bf16_rn, num_warps=warps)


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    """``torch.channels_last`` for a channels_last tensor that is not also row-major, else
    ``torch.contiguous_format``."""
    cl = t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


class _Transpose(torch.autograd.Function):
    """The Triton copy with autograd: the gradient goes back through the inverse copy."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
        ctx.source_format = (torch.channels_last if memory_format == torch.contiguous_format
                             else torch.contiguous_format)
        return _copy(t, memory_format)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return to_memory_format(grad, ctx.source_format), None


def to_memory_format(t: torch.Tensor, memory_format: torch.memory_format,
                     use_triton: bool | None = None) -> torch.Tensor:
    """``t.contiguous(memory_format=memory_format)``; a 4-d copy between NCHW and channels_last runs as the Triton
    transpose (``use_triton=None``: where Triton runs, i.e. on CUDA tensors, and on the CPU under
    ``TRITON_INTERPRET=1``, the CI tests). Returns ``t`` itself when it is already in that format."""
    if t.is_contiguous(memory_format=memory_format):
        return t
    if use_triton is None:
        use_triton = FAST_TRANSPOSE
    to_cl = memory_format == torch.channels_last
    # the two layouts this kernel converts between, and image sizes its int32 offsets address
    ok = (use_triton and t.dim() == 4 and (t.is_contiguous() if to_cl else memory_format_of(t) == torch.channels_last)
          and _copy_kernel_fits(t, t[0].numel()))
    if not ok:
        return t.contiguous(memory_format=memory_format)
    if t.requires_grad and torch.is_grad_enabled():
        return _Transpose.apply(t, memory_format)
    return _copy(t, memory_format)


def _copy(t: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    from largekernel.ops._launch import cdiv, launch, on_device

    to_cl = memory_format == torch.channels_last
    n, c, h, w = t.shape
    out = torch.empty_like(t, memory_format=memory_format)
    p = h * w
    # strides of (n, p, c) on both sides: NCHW has (C*P, 1, P), channels_last (P*C, C, 1)
    s_src, s_dst = (c * p, 1, p), (p * c, c, 1)
    if not to_cl:
        s_src, s_dst = s_dst, s_src
    block_p, block_c = 64, 64
    grid = (cdiv(p, block_p), cdiv(c, block_c), n)
    with on_device(t):
        launch(_transpose_kernel(), grid, t, out, p, c, *s_src, *s_dst, BLOCK_P=block_p, BLOCK_C=block_c,
               num_warps=4)
    return out


def rowmajor(t: torch.Tensor) -> torch.Tensor:
    """``t`` with unit stride along W (the depthwise kernels take any other strides): itself, or a row-major copy."""
    return t if t.stride(-1) == 1 else to_memory_format(t, torch.contiguous_format)


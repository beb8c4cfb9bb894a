"""Depthwise 'same' convolution: the single dispatch point between the fast kernels and PyTorch.

Paths (see :func:`depthwise_path`):

* ``triton``: our Triton kernels (``_dw_kernels``) behind the custom op ``largekernel::depthwise_conv2d``
  (registered with ``torch.library``: autograd, fake tensors, so ``torch.compile`` traces it without a
  graph break). CUDA tensors in a supported configuration; CPU tensors too when the backend is forced to
  'triton' under ``TRITON_INTERPRET=1`` (the CI correctness tests).
* ``native``: ``F.conv2d(padding='same', groups=C)``. On the CPU the 'auto' backend runs it in the faster
  memory layout for the kernel size (``native-nchw`` / ``native-channels_last``), see
  :data:`CPU_NCHW_K_RANGE`. ONNX export and TorchScript tracing always take the native path, so an
  exported model holds a standard ``Conv`` node.
"""
from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn.functional as F

from largekernel.ops._launch import TMA_ALIGN, cached, next_pow2, on_device
from largekernel.ops.dispatch import get_backend, triton_interpreting
from largekernel.ops.layout import (
    from_padded_rows,
    memory_format_of,
    merge_rows,
    padded_rows,
    rowmajor,
    split_rows,
    to_memory_format,
)

try:
    _TRITON_MISSING = importlib.util.find_spec("triton") is None
except (ImportError, ValueError):  # pragma: no cover
    _TRITON_MISSING = True

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_KERNEL = 64

# CPU layout cliff (PyTorch's CPU depthwise conv, oneDNN): NCHW is fast for 11..13 and collapses from 15 up
# (10-40x), channels_last is as fast or faster for <= 9 and >= 15. Measured on this project's CPU machine (torch 2.14.1,
# one thread, batch 1, C128/56x56 and C512/14x14, K = 3..31), table in docs/performance.md.
CPU_NCHW_K_RANGE = (10, 14)   # max(kh, kw) in this closed range -> NCHW, otherwise channels_last


def _pads(kh: int, kw: int) -> tuple[int, int]:
    """Top/left padding of PyTorch's padding='same' (the extra tap of an even kernel goes bottom/right)."""
    return (kh - 1) // 2, (kw - 1) // 2


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if x.dim() != 4:
        raise ValueError(f"x must be (N, C, H, W), got shape {tuple(x.shape)}")
    if weight.dim() != 4 or weight.shape[1] != 1:
        raise ValueError(f"depthwise weight must be (C, 1, kh, kw), got {tuple(weight.shape)}")
    if x.shape[1] != weight.shape[0]:
        raise ValueError(f"input has {x.shape[1]} channels but the depthwise weight has {weight.shape[0]}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")


def _triton_supported(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    kh, kw = weight.shape[-2:]
    return (x.dtype in _DTYPES and weight.dtype == x.dtype and (bias is None or bias.dtype == x.dtype)
            and weight.device == x.device and kh <= MAX_KERNEL and kw <= MAX_KERNEL
            and x.numel() > 0 and x.shape[2] * x.shape[3] < 2**30)


def _exporting() -> bool:
    return torch.onnx.is_in_onnx_export() or torch.jit.is_tracing() or torch.jit.is_scripting()


def _triton_runs_on(x: torch.Tensor) -> bool:
    if _TRITON_MISSING:
        return False
    return x.is_cuda or (x.device.type == "cpu" and triton_interpreting())


def _auto_prefers_triton(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """'auto': where our op beats PyTorch's conv in the same layout, forward+backward, measured on the H100
    (docs/performance.md): every kernel from 13 up; 7..12 for NCHW inputs (cuDNN's channels_last kernel
    is faster there); never below 7."""
    k = max(weight.shape[-2:])
    if not x.is_cuda or k < AUTO_MIN_K:
        return False
    return k >= AUTO_ANY_LAYOUT_K or x.stride(-1) == 1


AUTO_MIN_K = 7
AUTO_ANY_LAYOUT_K = 13


def depthwise_path(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> str:
    """Which implementation :func:`depthwise_conv2d` takes for these arguments:
    'triton', 'native', 'native-nchw' or 'native-channels_last' (CPU layout choice)."""
    backend = get_backend()
    if backend != "native" and not _exporting():
        ok = _triton_supported(x, weight, bias) and _triton_runs_on(x)
        if ok and (backend == "triton" or _auto_prefers_triton(x, weight)):
            return "triton"
    if backend == "auto" and x.device.type == "cpu" and not _exporting():
        kh, kw = weight.shape[-2:]
        lo, hi = CPU_NCHW_K_RANGE
        return "native-nchw" if lo <= max(kh, kw) <= hi else "native-channels_last"
    return "native"


def _native(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, path: str = "native"):
    if path == "native":
        return F.conv2d(x, weight, bias, padding="same", groups=weight.shape[0])
    fmt = torch.channels_last if path == "native-channels_last" else torch.contiguous_format
    out = F.conv2d(x.contiguous(memory_format=fmt), weight, bias, padding="same", groups=weight.shape[0])
    return out.contiguous(memory_format=memory_format_of(x))


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """Autocast's dtype when autocast is on for (floating) x's device, else None."""
    dev = x.device.type
    # NOTE(lead): models are built and counted on the 'meta' device (FLOP counts, tests); autocast has no 'meta'.
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev) and x.is_floating_point():
        return torch.get_autocast_dtype(dev)
    return None


def _autocast(*tensors: torch.Tensor | None) -> tuple:
    """The op's arguments (x first; None passes through) in the autocast dtype when autocast is on for x's device."""
    dt = _autocast_dtype(tensors[0])
    if dt is None:
        return tensors
    return tuple(t.to(dt) if t is not None else None for t in tensors)


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records a call on these tensors (None passes)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _defer_cast(x: torch.Tensor, grad: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(source, x). Under autocast, for a call without autograd on a channels_last input where Triton runs, the cast
    of x is left to the row-major copy that our kernels make anyway (one pass instead of two): x becomes an unfilled
    stand-in of the cast (x's strides in the autocast dtype; allocated, never read) on which the path and tuning
    decisions are taken, and ``source`` is the input itself. Otherwise (None, x)."""
    if (grad or not _triton_runs_on(x) or memory_format_of(x) != torch.channels_last
            or torch.compiler.is_compiling()):
        return None, x
    dtype = _autocast_dtype(x)
    if dtype is None or dtype == x.dtype or dtype not in _DTYPES:
        return None, x
    return x, torch.empty_strided(x.shape, x.stride(), dtype=dtype, device=x.device)


_CHANNEL_TABLES: dict[int, tuple] = {}
_PLANE_OPERATORS: dict[int, tuple] = {}


def has_values(t: torch.Tensor) -> bool:
    """Whether t holds data (not a 'meta' or fake tensor: models built for counting)."""
    from torch._subclasses.fake_tensor import is_fake

    return t.device.type != "meta" and not is_fake(t)


def _channel_table(channels: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(plane (C,) int32: channel c's index in ``channels`` or ``-1 - its rank among the others``; the others (C - R,)
    ascending), checked and built once per ``channels`` tensor (and again if it is changed in place)."""
    return cached(_CHANNEL_TABLES, channels, (channels._version, c, channels.device),
                  lambda: _build_channel_table(channels, c))


def _build_channel_table(channels: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    r = channels.numel()
    if channels.dim() != 1 or channels.dtype not in (torch.int32, torch.int64) or not 0 < r <= c:
        raise ValueError(f"channels must be a 1-d tensor of 1..{c} channel indices, got {channels.dtype} "
                         f"{tuple(channels.shape)}")
    long = channels.long()
    if not has_values(channels):   # (models built without storage, for counting: shapes only)
        return long.new_empty(c, dtype=torch.int32), long.new_empty(c - r)
    if int(long.min()) < 0 or int(long.max()) >= c or long.unique().numel() != r:
        raise ValueError(f"channels must be distinct indices in [0, {c})")
    mine = torch.zeros(c, dtype=torch.bool, device=channels.device).index_fill_(0, long, True)
    index = torch.zeros(c, dtype=torch.long, device=channels.device).index_copy_(
        0, long, torch.arange(r, device=channels.device))
    plane = torch.where(mine, index, -torch.cumsum(~mine, 0)).to(torch.int32)
    return plane, (~mine).nonzero()[:, 0]


def _on_channels(x: torch.Tensor, channels: torch.Tensor, rest: tuple[torch.Tensor, torch.Tensor] | None, conv,
                params: tuple, count: int, align: int | None = None) -> torch.Tensor:
    """``conv`` (a depthwise op on (N, R, H, W)) on x's channels ``channels``, the other channels passed through
    (``x * scale + shift`` with ``rest = (scale, shift)``, or unchanged); ``params``: conv's tensors (for autograd and
    autocast), ``count``: their channel count R. Returns (N, C, H, W) in x's layout.

    Without autograd, on a channels_last x where Triton runs, x goes through one copy to row-major planes (which
    casts under autocast, sets the passed-through channels aside and gives rows every ``align`` bytes, default
    the element size) and one copy back that puts the other channels in place: conv's kernels see R planes only.
    Otherwise a gather, conv, and scatter."""
    if x.dim() != 4:
        raise ValueError(f"x must be (N, C, H, W), got shape {tuple(x.shape)}")
    if channels.numel() != count:
        raise ValueError(f"channels lists {channels.numel()} channels but the kernel has {count}")
    c = x.shape[1]
    if rest is not None and any(tuple(t.shape) != (c - count,) for t in rest):
        raise ValueError(f"rest must be (scale, shift) of shape ({c - count},) each, got "
                         f"{[tuple(t.shape) for t in rest]}")
    plane, others = _channel_table(channels, c)
    dtype = _autocast_dtype(x) or x.dtype
    grad = _needs_grad(x, *params, *(rest or ()))
    if (not grad and dtype in _DTYPES and _triton_runs_on(x) and memory_format_of(x) == torch.channels_last
            and not torch.compiler.is_compiling()):
        mine, passed = split_rows(x, plane, count, align or dtype.itemsize, dtype, rest)
        return merge_rows(conv(mine), passed, plane)
    x, index = x.to(dtype), channels.long()
    out = x.clone()   # (in x's layout; index_copy's own result is NCHW)
    out.index_copy_(1, index, conv(x.index_select(1, index)))
    if rest is not None:
        scale, shift = (t.to(torch.float32 if dtype != torch.float64 else dtype).view(1, -1, 1, 1) for t in rest)
        out.index_copy_(1, others, (x.index_select(1, others).to(scale.dtype) * scale + shift).to(dtype))
    return out


def crop_to_reach(weight: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The taps of a 'same' depthwise kernel (C, 1, kh, kw) that can reach an h x w input: a kernel longer than
    2h - 1 (2w - 1) along an axis is cut to the centred 2h - 1 (2w - 1), whose 'same' padding is h - 1 (w - 1).
    Exact (the cut taps only ever meet padding; their gradient is zero). SW-tiny's 49 x 49 kernels at 14 x 14
    run as 27 x 27, SLaK's 51 x 5 at 7 x 7 as 13 x 5."""
    kh, kw = weight.shape[-2:]
    if kh <= 2 * h - 1 and kw <= 2 * w - 1:
        return weight
    top, left = _pads(kh, kw)
    rows = slice(top - h + 1, top + h) if kh > 2 * h - 1 else slice(None)
    cols = slice(left - w + 1, left + w) if kw > 2 * w - 1 else slice(None)
    return weight[:, :, rows, cols]


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     channels: torch.Tensor | None = None,
                     rest: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Stride-1 depthwise convolution with 'same' padding (exactly ``F.conv2d(padding='same')``).

    x: (N, C, H, W) (any strides; channels_last too); weight: (C, 1, kh, kw); bias: (C,) or None.
    Returns (N, C, H, W). Odd kernels are centred; for even kernels the extra tap sits on the bottom/right
    (pad (k-1)//2 before, k//2 after, as PyTorch's 'same'). On the Triton path taps that cannot reach the input are
    dropped first (:func:`crop_to_reach`).

    ``channels`` (R,) int: the kernel applies to these channels of x only (weight (R, 1, kh, kw), bias (R,), output
    channel ``channels[j]``); every other channel passes through, as ``x[:, c] * scale + shift`` with ``rest =
    (scale, shift)`` ((C - R,) each, the other channels in ascending order) or unchanged (``rest=None``): a conv
    with 1 x 1 kernels there (the shift-wise layers' ghost channels; see ``_on_channels`` for how it runs).

    Inference calls (no autograd) on small planes may keep a dense form of the kernel per ``weight`` tensor
    (:data:`PLANE_OPERATOR`), rebuilt when ``weight`` changes in place.
    """
    if channels is not None:
        return _on_channels(x, channels, rest, lambda planes: depthwise_conv2d(planes, weight, bias),
                           (weight, bias), weight.shape[0])
    return _depthwise(x, weight, bias, weight)


def _depthwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, key: torch.Tensor) -> torch.Tensor:
    """:func:`depthwise_conv2d` on all channels; ``key``: the caller's weight tensor, which a cached plane operator
    belongs to (``weight`` may be a cast of it)."""
    _check(x, weight, bias)
    grad = _needs_grad(x, weight, bias)
    source, x = _defer_cast(x, grad)
    x, weight, bias = _autocast(x, weight, bias)
    path = depthwise_path(x, weight, bias)
    if source is not None:   # the row-major copy casts; the result goes back to channels_last
        if path != "triton":
            return _native(source.to(x.dtype), weight, bias, path)
        out = _depthwise(padded_rows(source, x.element_size(), x.dtype), weight, bias, key)
        return to_memory_format(out, torch.channels_last)
    if path == "triton":
        # (our kernels only: the native path keeps the kernel as given, which is also what FLOP counters see)
        weight = crop_to_reach(weight, x.shape[-2], x.shape[-1])
        if torch.compiler.is_compiling():   # the registered op: traced as one node, no graph break
            return torch.ops.largekernel.depthwise_conv2d(x, weight, bias)
        if not grad:   # inference: the forward alone, which may use the weight's cached plane operator
            with on_device(x):
                return _triton_forward(x, weight, bias, key)
        # eager: the same kernels through a plain autograd.Function; the custom op's Python wrapper costs
        # ~0.4 ms per forward+backward on the H100 host (torch 2.11, profiled), more than the 7x7 kernels
        return _DepthwiseConv2dFunction.apply(x, weight, bias)
    return _native(x, weight, bias, path)


CROSS_MAX_PLANE = 64   # the fused cross kernel holds a plane (zero-padded to a power of two) in one tile
CROSS_MAX_SHORT = 7    # ... and unrolls one product per row (column) of the short-wide (tall-narrow) kernel


def cross_depthwise_conv2d(x: torch.Tensor, horizontal: torch.Tensor, vertical: torch.Tensor,
                           bias: torch.Tensor | None = None, channels: torch.Tensor | None = None,
                           rest: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``depthwise_conv2d(x, horizontal, bias) + depthwise_conv2d(x, vertical)``: a short-wide (C, 1, k, D) and a
    tall-narrow (C, 1, D', k') kernel on the same input (the cross deploy form of the shift-wise layers).

    Without autograd, on the Triton path and planes up to 64 x 64 (32 x 32 in fp32), one fused kernel
    (``_dw_cross``: both convs, the sum and the bias in one pass) is tried against the pair of convs and the faster
    kept (tuned once per shape, as every pass); otherwise the pair. x: (N, C, H, W), any layout; returns x's layout.
    ``channels``, ``rest``: the kernels apply to some channels only, as in :func:`depthwise_conv2d`.
    """
    if channels is not None:
        # (rows at TMA's 16-byte strides where its kernels may run: then the copy is the one they read)
        align = TMA_ALIGN if _cross_tma(x, _autocast_dtype(x) or x.dtype) else None
        return _on_channels(x, channels, rest,
                           lambda planes: cross_depthwise_conv2d(planes, horizontal, vertical, bias),
                           (horizontal, vertical, bias), horizontal.shape[0], align)
    _check(x, horizontal, bias)
    _check(x, vertical, None)
    grad = _needs_grad(x, horizontal, vertical, bias)
    # (under autocast: the row-major copies cast x on the way; every use of x's values goes through inputs())
    source, x = _defer_cast(x, grad)
    x, horizontal, vertical, bias = _autocast(x, horizontal, vertical, bias)
    h, w = x.shape[-2:]

    def inputs() -> torch.Tensor:
        return x if source is None else source.to(x.dtype)

    def rows(align: int) -> torch.Tensor:   # x as row-major planes whose rows start at `align`-byte strides
        if source is None and align == x.element_size():
            return rowmajor(x).contiguous()   # (a view with unit stride along W, a crop say, is copied)
        return padded_rows(x if source is None else source, align, x.dtype)

    def pair() -> torch.Tensor:
        if x.is_cuda and memory_format_of(x) == torch.channels_last:
            # our CUDA kernels run on row-major copies: one for both convs, the sum converted back (each conv would
            # otherwise copy its input in and its output back)
            planes = rows(x.element_size())
            out = depthwise_conv2d(planes, horizontal, bias)
            out = (out.add_(depthwise_conv2d(planes, vertical)) if not grad
                   else out + depthwise_conv2d(planes, vertical))
            return to_memory_format(out, torch.channels_last)
        src = inputs()
        return depthwise_conv2d(src, horizontal, bias) + depthwise_conv2d(src, vertical)

    # (fp32 on 64-wide tiles: over the H200's shared memory in most configurations, gpu_check --cross; under
    # torch.compile the pair, whose convs are registered ops)
    fused = (not grad and max(h, w) <= (CROSS_MAX_PLANE if x.element_size() == 2 else CROSS_MAX_PLANE // 2)
             and horizontal.shape[-2] <= CROSS_MAX_SHORT and vertical.shape[-1] <= CROSS_MAX_SHORT
             and not torch.compiler.is_compiling() and depthwise_path(x, horizontal, bias) == "triton"
             and depthwise_path(x, vertical) == "triton")
    if not fused:
        return pair()
    horizontal, vertical = crop_to_reach(horizontal, h, w), crop_to_reach(vertical, h, w)
    wh = horizontal.reshape(horizontal.shape[0], *horizontal.shape[-2:]).contiguous()
    wv = vertical.reshape(vertical.shape[0], *vertical.shape[-2:]).contiguous()
    b = bias.contiguous() if bias is not None else None

    def run(cand: dict) -> torch.Tensor:   # (timed as called: with the layout copies, like the pair)
        from largekernel.ops._dw_cross import launch_cross

        if cand.get("pair"):
            return pair()
        tma = cand.get("tma")
        src = rows(TMA_ALIGN if tma else x.element_size())   # (TMA: rows at 16-byte strides, zero-padded)
        out = _alloc_like(src.as_strided(src.shape[:3] + (src.stride(2),), src.stride()))[..., :w]   # (a view)
        launch_cross(src, wh, wv, b, out, _pads(*wh.shape[-2:]), _pads(*wv.shape[-2:]), cand, _precision(x.dtype),
                     x.device.type == "cpu")
        if src is x:
            return out
        return from_padded_rows(out, memory_format_of(x)) if tma else to_memory_format(out, memory_format_of(x))

    with on_device(x):
        return run(_pick("cross", x, tuple(wh.shape[-2:]), tuple(wv.shape[-2:]), lambda: _cross_candidates(x), run))


def _cross_tma(x: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the fused cross kernel's TMA configurations are among the candidates for x in ``dtype``: Hopper,
    16-bit, planes of 32 px and more."""
    if x.device.type not in ("cuda", "meta") or dtype.itemsize != 2:
        return False
    hopper = x.device.type == "meta" or torch.cuda.get_device_capability(x.device)[0] >= 9   # (meta: compile tests)
    return hopper and max(x.shape[-2:]) > 16


def _cross_candidates(x: torch.Tensor) -> list[dict]:
    """Fused cross kernel configurations (images per program, warps) and the pair of convs."""
    if x.device.type == "cpu":
        return [dict(NB=2, num_warps=4)]
    p = max(16, next_pow2(max(x.shape[-2:])))
    stacked = [dict(stack=True, NB=nb, ITERS=it, num_warps=nw) for nb in ({64: (1, 2), 32: (2, 4)}.get(p, (4, 8, 16)))
               for it, nw in ((1, 4), (4, 4), (2, 8))]
    tma = []
    if _cross_tma(x, x.dtype):   # Hopper's tensor memory accelerator (TMA): on the H200 it won at 56 and 28 px, lost
        stages = (1,) if p == 64 else (1, 2)   # at 14 and 7 (performance.md)
        tma = [dict(tma=True, ITERS=it, num_warps=4, num_stages=ns) for it in (4, 16) for ns in stages]
        if p == 64:   # the band matrices streamed per product: half the shared memory, twice the programs per SM
            tma.append(dict(tma=True, ITERS=4, num_warps=4, num_stages=1, hoist=False))   # (0.220 vs 0.242 ms, H200)
    return tma + [dict(NB=nb, num_warps=nw) for nb in (4, 16) for nw in (4, 8)] + stacked + [dict(pair=True)]


# ----------------------------------------------------------------------------------------------------
# Triton implementation and the custom op

# Per pass (forward, input grad, weight grad) a few candidates: tile configurations of our two kernel
# generations and, for odd kernels, cuDNN's own kernel for that pass. On the GPU the fastest candidate is
# picked once per (pass, shape, dtype, layout) by timing each on the real arguments (a one-time, cached
# micro-benchmark; LARGEKERNEL_TUNE=0 turns it off and takes the first candidate). FWD_CFG / WGRAD_CFG
# force one configuration (benchmarks, tests).
FWD_CFG: dict = {}
CROSS_CFG: dict = {}
WGRAD_CFG: dict = {}
TUNE = os.environ.get("LARGEKERNEL_TUNE", "1") == "1"
FP32_PRECISION = os.environ.get("LARGEKERNEL_FP32_PRECISION", "tf32x3")   # or 'ieee' (CUDA-core FMA)
# fp32 candidates are also tried with these other splits of Triton's: bf16x6 (six bf16 products, ~2e-7 relative
# error like tf32x3) and bf16x3 (three products, hi*hi + hi*lo + lo*hi: ~4.4e-6 measured on the H200, within the
# 1e-5 fp32 criterion; 1.1-1.5x faster). LARGEKERNEL_FP32_SPLITS=bf16x6 keeps every fp32 pass at ~1e-7; naming a
# precision in LARGEKERNEL_FP32_PRECISION (e.g. 'ieee') means that one only, unless the splits are named too.
_DEFAULT_SPLITS = "" if "LARGEKERNEL_FP32_PRECISION" in os.environ else "bf16x6,bf16x3"
FP32_SPLITS = [p for p in os.environ.get("LARGEKERNEL_FP32_SPLITS", _DEFAULT_SPLITS).split(",") if p]
POISON = False   # tests: fill kernel outputs with NaN before the launch so unwritten elements show
# interpreter tests: 0 = first-generation kernels, 1 = prefetching / row-walking ones, 2 = whole-plane forward and
# batched-rows weight grad, 3 = the row kernels on the transposed problem, 4 / 5 = the row kernel /
# its transposed problem reading the shifted band copies (and the column-Gram weight grad / on the transposed
# problem), 6 / 7 = the whole-plane GEMM reading them, 8 = the row kernel
# reading bf16 high / low band copies of an fp32 kernel (and the bf16x3 whole-plane weight grad), 9 = the Gram-matrix
# weight grad on planes of <= GRAM_MAX padded positions (bf16x3; the plane weight grad on larger ones) and the
# whole-plane GEMM with its band copies in the output's last images (fp32: copies of the kernel's bf16 parts)
INTERP_VARIANT = 0
PLANE_MAX = 1024   # planes up to this many pixels also try the whole-plane GEMM (28x28 and below)
# Inference on planes up to DENSE_PLANE_MAX pixels (16 x 16) in 2-byte types also tries a plain batched GEMM on each
# channel's kernel as a dense (HW x HW) matrix, kept per weight tensor (memory: SW-tiny at 224 px holds ~0.4 GB of
# them, UniRepLKNet-T ~0.27 GB). LARGEKERNEL_PLANE_OPERATOR=0 turns it off.
DENSE_PLANE_MAX = 256
PLANE_OPERATOR = os.environ.get("LARGEKERNEL_PLANE_OPERATOR", "1") == "1"
_TUNED: dict = {}
_TUNING_LOG: dict = {}


def _bw(W: int) -> int:
    return min(64, max(16, 1 << (W - 1).bit_length()))


def _dense_fits(x: torch.Tensor) -> bool:
    """Whether the dense plane-operator GEMM is a candidate for row-major x: 2-byte types, packed planes of at most
    DENSE_PLANE_MAX pixels, and a batch whose activations are at least a quarter of the operator's size (which every
    image's GEMM reads: C * P16^2 elements against N * C * P)."""
    n, _, h, w = x.shape
    p16 = -(-h * w // 16) * 16
    return (PLANE_OPERATOR and x.element_size() == 2 and h * w <= DENSE_PLANE_MAX and x.is_contiguous()
            and 4 * n * h * w >= p16 * p16)


def _dense_candidates(x: torch.Tensor) -> list[dict]:
    """Tiles of the dense plane-operator GEMM (the H200 sweep at 14 x 14 and 7 x 7, docs/performance.md v13)."""
    if x.device.type == "cpu":
        return [dict(dense=True, BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)]
    widest = next_pow2(x.shape[2] * x.shape[3])
    return [dict(dense=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=ns)
            for bm, bn, bk, nw, ns in ((128, 256, 64, 8, 3), (64, 256, 32, 4, 3), (64, 128, 32, 8, 3),
                                       (128, 128, 32, 8, 3), (64, 64, 32, 4, 2), (64, 64, 64, 4, 2))
            if bn <= widest]


def _plane_operator(key: torch.Tensor, weight: torch.Tensor, ph: int, pw: int, h: int, w: int) -> torch.Tensor:
    """``weight``'s plane operator on (h, w) planes (``_dw_kernels.plane_operator``), kept for ``key`` while it
    lives and is not changed in place (one per weight: a new plane size or dtype replaces it)."""
    from largekernel.ops import _dw_kernels as K

    c, _, kh, kw = weight.shape
    signature = (key._version, weight.dtype, weight.device, kh, kw, ph, pw, h, w)
    return cached(_PLANE_OPERATORS, key, signature,
                  lambda: K.plane_operator(weight.reshape(c, kh, kw), h, w, ph, pw))


def clear_plane_operators() -> None:
    """Free the dense plane operators kept for inference calls (rebuilt on demand). For loops that evaluate between
    training steps: the weights change afterwards, so the kept operators would only hold memory (RepLKNet-31B's
    stage 3 at 224 px in bf16: ~0.8 GB) until the next evaluation replaces them."""
    _PLANE_OPERATORS.clear()


def _fwd_candidates(x: torch.Tensor, kh: int, kw: int, bands: bool = True) -> list[dict]:
    """Forward / input-grad configurations. bands=False leaves out the kernels that read band copies (a
    weights-sized temporary, ~10x the kernel: the input grad runs without them so that forward+backward peaks
    no higher than PyTorch's own convolution)."""
    if FWD_CFG:
        return [FWD_CFG]
    if x.device.type == "cpu":
        return [[dict(BLOCK_M=16, BLOCK_W=16, BLOCK_U=16),
                 dict(BLOCK_M=16, BLOCK_W=16, BLOCK_U=16, prefetch=True),
                 dict(plane=True, BLOCK_M=16, BLOCK_N=16, BLOCK_K=16),
                 dict(BLOCK_M=16, BLOCK_W=16, BLOCK_U=16, transpose=True),
                 dict(BLOCK_M=16, BLOCK_W=16, BLOCK_U=16, prefetch=True, bands=True),
                 dict(BLOCK_M=16, BLOCK_W=16, BLOCK_U=16, transpose=True, bands=True),
                 dict(plane=True, bands=True, BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, prefetch=True),
                 dict(plane=True, bands=True, BLOCK_M=16, BLOCK_N=16, BLOCK_K=32),
                 dict(BLOCK_M=16, BLOCK_W=16, BLOCK_U=16, prefetch=True, bands=True, split=True),
                 dict(plane=True, bands=True, BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, split=True,
                      tail=dict(plane=True, BLOCK_M=16, BLOCK_N=16, BLOCK_K=16))][INTERP_VARIANT]]
    N, _, H, W = x.shape
    few = []   # 7x7: the same plane tiles with fewer images each
    plane_rows = []   # large planes: the whole-plane GEMM over one output row per tile
    if H * W <= PLANE_MAX:   # small planes: the whole-plane GEMM reading the band copies, one row-Toeplitz config
        # (from the H100 tile sweeps, docs/performance.md: bf16 likes 64x128x16 tiles at 14x14, 64x64x16 at 7x7,
        # fp32 narrower output tiles)
        bm = min(64, max(16, 1 << (N - 1).bit_length()))
        tiles = ([(64, 32, 4), (64, 16, 4), (128, 16, 4), (32, 32, 4)] if x.dtype == torch.float32 else
                 [(128, 16, 4), (64, 16, 4), (128, 32, 8), (64, 32, 4), (64, 16, 8)])
        banded = [dict(plane=True, bands=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, prefetch=True)
                  for bn, bk, nw in tiles]
        if bands:
            cands = banded
            if N >= 128:   # inference batches: one B tile serves 128 images
                cands.append(dict(plane=True, bands=True, BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=8,
                                  prefetch=True))
        else:   # the element-wise gathering whole-plane GEMM
            cands = [dict(plane=True, BLOCK_M=bm, BLOCK_N=128, BLOCK_K=32, num_warps=8),
                     dict(plane=True, BLOCK_M=bm, BLOCK_N=64, BLOCK_K=64, num_warps=4, prefetch=True),
                     dict(plane=True, BLOCK_M=bm, BLOCK_N=64, BLOCK_K=16, num_warps=4, prefetch=True)]
            # and the band-reading GEMM with its copies in the output's last images, which the gathering one then
            # computes: no temporary (fp32 28x28 input grad: ~0.9 ms gathering, ~0.3 ms reading copies)
            cands += [dict(c, tail=cands[-1]) for c in banded[:2]]
        if H * W <= 64 and bm > 16:   # 7x7: one tile per channel leaves too few programs in flight (1024 for
            # C1024); fewer images per tile give 2-4x the programs, each gathering the same (L1/L2-resident) kernel
            few += [dict(c, BLOCK_M=m) for m in (bm // 2, bm // 4) if m >= 16 for c in (cands[:2] if bands else
                                                                                        cands[-2:])]
            cands += few
        row = dict(BLOCK_M=128, BLOCK_W=_bw(W), BLOCK_U=32, num_warps=8, num_stages=2, prefetch=True)
        cands.append(row)
    else:
        bw = _bw(W)
        cands = [dict(BLOCK_M=64, BLOCK_W=min(32, bw), BLOCK_U=32, num_warps=4, num_stages=2, prefetch=True),
                 dict(BLOCK_M=128, BLOCK_W=bw, BLOCK_U=32, num_warps=8, num_stages=2, prefetch=True),
                 dict(BLOCK_M=128, BLOCK_W=16, BLOCK_U=16, num_warps=4, num_stages=3)]
        if kh > kw:   # tall kernels: the band along the rows is the short one; work on the transposed views
            cands += [dict(BLOCK_M=64, BLOCK_W=min(32, _bw(H)), BLOCK_U=32, num_warps=4, transpose=True),
                      dict(BLOCK_M=128, BLOCK_W=_bw(H), BLOCK_U=32, num_warps=8, transpose=True)]
        elif x.dtype != torch.float32 and bands:   # 2-byte types: B as aligned vectors from the band copies
            # (56x56 K31 bf16: 0.926 -> 0.713 ms; slower in fp32, where B is 4-wide)
            cands += [dict(BLOCK_M=128, BLOCK_W=32, BLOCK_U=32, num_warps=4, num_stages=2, prefetch=True, bands=True),
                      dict(BLOCK_M=64, BLOCK_W=32, BLOCK_U=32, num_warps=4, num_stages=2, prefetch=True, bands=True)]
        elif bands and "bf16x3" in FP32_SPLITS:   # fp32: bf16x3 with B as aligned bf16 vectors from the band copies
            # of the kernel's high / low parts, not split again at every step
            cands += [dict(BLOCK_M=bm, BLOCK_W=32, BLOCK_U=32, num_warps=nw, num_stages=2, prefetch=True, bands=True,
                           split=True) for bm, nw in ((64, 4), (128, 4), (128, 8))]
        if kh <= kw and next_pow2(W) <= 64:   # the whole-plane GEMM over one output row per tile (the batch as its
            # rows, one B tile for 64 images: fp32 56x56 K31 1.39 ms against the row kernel's 2.20, H200); in the input
            # grad (no room for copies beside an NCHW dx) with the copies in dx's last images, which a row tile computes
            # (Triton's own cp.async pipelining, 3 stages, beat our register prefetch there: 1.12 vs 1.37 ms)
            plane_rows = [dict(plane=True, bands=True, BLOCK_M=64, BLOCK_N=64, BLOCK_K=bk, num_warps=4, num_stages=ns,
                               prefetch=pf) for bk, ns, pf in ((32, 3, False), (32, 2, True), (64, 2, True),
                                                               (16, 3, False))]
            if not bands:
                plane_rows = [dict(c, tail=cands[0]) for c in plane_rows[:2]]
            if x.dtype != torch.float32:   # (fp32: with its splits only, below)
                cands += plane_rows
    if x.dtype == torch.float32:   # also the other splits (bf16x6: 2-byte MMA operands, six products) of: the two
        # fastest tf32x3 tiles; for the small-plane input grad every whole-plane tile and the row kernel in fp32's
        # fastest 56x56 tile; on large planes the whole-plane GEMM over one output row per tile. (16-wide row tiles,
        # whose Toeplitz MMA work is 48/31 of the useful work instead of 64/31, were slower: 2.41 against 2.21 ms.)
        if H * W <= PLANE_MAX and not bands:
            base = [c for c in cands if c.get("plane")] + [dict(row, BLOCK_M=64, BLOCK_W=min(32, _bw(W)), num_warps=4)]
        else:
            base = cands[:2]
        if bands:   # (without band copies, ``few`` are whole-plane tiles and already in base)
            base += few
        base += plane_rows
        cands += [dict(c, precision=p) for p in FP32_SPLITS for c in base]
        if "bf16x3" in FP32_SPLITS:   # and the whole-plane GEMM reading copies of the kernel's bf16 parts (bf16x3)
            # (precision: that of the tail's row tile, if any; the split whole-plane kernel does its own)
            cands += [dict(c, split=True, precision="bf16x3") for c in plane_rows]
    if kh % 2 and kw % 2:
        cands.append(dict(native=True))
    return cands


def _wgrad_candidates(x: torch.Tensor, kh: int, kw: int, in_dx: bool = False) -> list[dict]:
    """Weight-grad configurations. in_dx: dx is computed too, so that its storage can hold the operands' bf16
    parts beforehand (the fp32 column-Gram kernel's presplit: no temporary beyond native's peak)."""
    if WGRAD_CFG:
        return [WGRAD_CFG]
    from largekernel.ops import _dw_kernels as K

    small = x.shape[2] <= 16 and x.shape[3] <= 16   # the gather-free whole-plane weight grad applies
    gram = K.gram_fits(x.shape[2], x.shape[3])       # and the Gram-matrix one (7x7, 8x8)
    if x.device.type == "cpu":
        plane = [dict(plane=True, BLOCK_N=16, programs=8), dict(plane=True, BLOCK_N=16)]
        split = dict(plane=True, BLOCK_N=16, precision="bf16x3") if small else dict(BLOCK_V=16, programs=8)
        return [[dict(BLOCK_K=32, programs=8), dict(BLOCK_V=16, programs=8), dict(NB=2, programs=8),
                 dict(BLOCK_V=16, programs=8, transpose=True),
                 dict(cols=True, NI=2, BLOCK_R=16, programs=8), dict(cols=True, NI=4, BLOCK_R=16, programs=8,
                                                                     transpose=True),
                 *(plane if small else [dict(NB=2, programs=8), dict(BLOCK_K=32, programs=8)]), split,
                 dict(gram=True, BLOCK_N=16, programs=8, precision="bf16x3") if gram else split
                 ][INTERP_VARIANT]]
    W = x.shape[3]
    bv = _bw(W)
    cands = [dict(BLOCK_V=min(32, bv), programs=2112, num_warps=4, num_stages=2),
             dict(BLOCK_V=min(32, bv), programs=4224, num_warps=4, num_stages=2)]
    if small:   # (bf16 14x14 K27: 0.091 ms on the H100; fp32 since its 0/1 GEMMs use exact bf16 parts, v8)
        cands = [dict(plane=True, BLOCK_N=64, num_warps=4), dict(plane=True, BLOCK_N=32, programs=4224, num_warps=4),
                 dict(plane=True, BLOCK_N=128, num_warps=8), *cands]
    if gram:
        cands = [dict(gram=True, BLOCK_N=64, num_warps=4), dict(gram=True, BLOCK_N=32, programs=1056, num_warps=4),
                 dict(gram=True, BLOCK_N=64, num_warps=8), *cands]
    if next_pow2(W) <= 64:   # column Gram matrices per kernel row (vector loads, no gathers; MMA work
        # (pow2(W) / W) * (pow2(W) / kw) times the useful work)
        wide = next_pow2(W) == 64
        cands += [dict(cols=True, NI=ni, BLOCK_R=br, programs=4224, num_warps=nw)
                  for ni, br, nw in (((2, 32, 4), (2, 64, 8), (4, 32, 8)) if wide else ((4, 32, 4), (8, 32, 8)))]
        if x.dtype == torch.float32 and in_dx and not small and x.shape[1] >= 2:   # fp32: both operands split
            # into bf16 parts once (in dx's storage: groups of C // 2 channels), not at every step: 1.56 against 3.18
            # ms at 56x56 K31 (H200 sweep, temporaries)
            cands += [dict(cols=True, NI=ni, BLOCK_R=br, programs=0, num_warps=4, num_stages=ns, presplit="gx")
                      for ni, br, ns in ((2, 32, 2), (2, 32, 3), (1, 32, 2), (2, 64, 2))]
    if W <= 32:   # narrow planes: the same row of several images per reduction step
        narrow = 1 << (W - 1).bit_length()
        cands += [dict(NB=max(1, 64 // narrow), programs=4224, num_warps=4, prefetch=False),
                  dict(NB=max(1, 64 // narrow), programs=2112, num_warps=4, prefetch=True),
                  dict(NB=max(1, 128 // narrow), programs=2112, num_warps=4, prefetch=False)]
    else:
        cands += [dict(BLOCK_V=bv, programs=1056, num_warps=8, num_stages=2),
                  dict(BLOCK_K=32, programs=1056, num_warps=4, num_stages=3)]
    if x.dtype == torch.float32:   # the other fp32 splits too: which is fastest differs per tile (v8 table)
        base = ([c for c in cands if c.get("plane") or c.get("gram")] if small else
                [c for c in cands if "BLOCK_K" not in c])
        cands += [dict(c, precision=p) for p in FP32_SPLITS for c in base]
    if kh != kw and x.shape[2] > 32:   # rectangular kernels: also the transposed problem
        cands.append(dict(BLOCK_V=min(32, _bw(x.shape[2])), programs=2112, num_warps=4, transpose=True))
    if kh % 2 and kw % 2:
        cands.append(dict(native=True))
    return cands


def _cuda_ms(fn, reps: int = 3, calls: int = 4) -> float:
    """Median over ``reps`` of the time of ``calls`` back-to-back calls (the GPU queue stays busy, so small
    planes are timed by their kernels rather than by the CPU launch cost)."""
    fn()   # compile / warm up
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        # keep the GPU busy while the calls are queued, so that the events time the kernels and not the CPU cost
        # of launching them (larger than the kernels at 7x7; it would favour candidates with fewer launches)
        torch.cuda._sleep(4_000_000)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _pick(kind: str, x: torch.Tensor, kh: int, kw: int, candidates, run) -> dict:
    """The fastest candidate for this pass and argument signature, timed once and cached. ``candidates()`` builds
    the list; it is only called when the pick is not cached (this runs on every call: host time counts)."""
    forced = WGRAD_CFG if kind.startswith("wgrad") else CROSS_CFG if kind == "cross" else FWD_CFG
    if forced:
        return forced
    if not TUNE or not x.is_cuda:
        return candidates()[0]
    key = (kind, x.dtype, tuple(x.shape), kh, kw, x.stride(-1) == 1, x.device.index, _precision(x.dtype))
    best = _TUNED.get(key)
    if best is not None:
        return best
    cands = candidates()
    if len(cands) == 1 or torch.cuda.is_current_stream_capturing():   # no timing inside a CUDA graph capture
        return cands[0]
    best, best_ms, log = cands[0], float("inf"), []
    for cand in cands:
        try:
            ms = _cuda_ms(lambda c=cand: run(c))
        except Exception as e:  # noqa: BLE001 - a candidate that fails to compile/launch is skipped
            log.append((cand, repr(e)[:200]))
            continue
        log.append((cand, ms))
        if ms < best_ms:
            best, best_ms = cand, ms
    _TUNED[key] = best
    _TUNING_LOG[key] = log
    return best


def tuned_choices(with_times: bool = False) -> dict:
    """What the one-time tuning picked so far: {(pass, dtype, shape, kh, kw, ...): candidate}; with_times:
    every candidate with its measured ms (or the error that ruled it out) instead."""
    return dict(_TUNING_LOG if with_times else _TUNED)


def _precision(dtype: torch.dtype, cand: dict | None = None) -> str:
    """The dot precision of a pass: the candidate's own fp32 split if it names one, else the dtype's default."""
    if cand and "precision" in cand:
        return cand["precision"]
    return FP32_PRECISION if dtype == torch.float32 else "tf32"


def _alloc_like(t: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(t)
    return out.fill_(float("nan")) if POISON else out


def _conv_pass(cand: dict, src: torch.Tensor, w: torch.Tensor, bias, out: torch.Tensor, ph: int, pw: int,
               flip: bool = False, operator=None):
    """out = 'same'-style conv of src with w (C, 1, kh, kw) (flipped if flip: the input grad), top/left
    padding (ph, pw); ``operator()``: w's plane operator, for the candidates that read it."""
    from largekernel.ops import _dw_kernels as K

    C, _, kh, kw = w.shape
    if cand.get("native"):   # odd kernels only: then (ph, pw) is the centred 'same' padding
        out.copy_(F.conv2d(src, w.flip(-2, -1) if flip else w, bias, padding="same", groups=C))
        return
    if cand.get("dense"):
        if operator is None:
            raise ValueError("the dense plane-operator configuration needs an inference call on a small plane")
        K.launch_dense_plane(src, operator(), bias.contiguous() if bias is not None else None, out, cand,
                             _precision(src.dtype, cand), src.device.type == "cpu")
        return
    K.launch_fwd(rowmajor(src), w.reshape(C, kh, kw).contiguous(),
                 bias.contiguous() if bias is not None else None, out, ph, pw, cand,
                 _precision(src.dtype, cand), src.device.type == "cpu", flip)


def _wgrad_pass(cand: dict, x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor,
                scratch: torch.Tensor | None = None) -> torch.Tensor:
    from largekernel.ops import _dw_kernels as K

    C, _, kh, kw = weight.shape
    ph, pw = _pads(kh, kw)
    if cand.get("native"):
        return torch.nn.grad.conv2d_weight(x, weight.shape, g, padding=(ph, pw), groups=C)
    dw = K.launch_wgrad(rowmajor(x), rowmajor(g), kh, kw, ph, pw, cand, _precision(x.dtype, cand),
                        x.device.type == "cpu", POISON, scratch)
    return dw.reshape(C, 1, kh, kw).to(weight.dtype)


def _triton_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    key: torch.Tensor | None = None) -> torch.Tensor:
    """The forward on our kernels; ``key`` (inference calls): the tensor a plane operator of ``weight`` is cached
    for, which makes the dense plane-operator configurations candidates where they fit (``_dense_fits``)."""
    kh, kw = weight.shape[-2:]
    ph, pw = _pads(kh, kw)
    # The kernels want unit stride along W. A channels_last input is computed on a row-major copy into a row-major
    # output, converted back at the end: two copies, much cheaper than the kernels' strided output stores were
    # (RepLKNet-31B stage 1, batch 128, H100: 3.1 ms per call with channels_last stores vs ~1.4 ms row-major).
    src = rowmajor(x)
    y = _alloc_like(src)
    operator = None
    if key is not None and not key.is_inference() and _dense_fits(src):   # (inference tensors have no version)
        operator = lambda: _plane_operator(key, weight, ph, pw, *x.shape[-2:])  # noqa: E731
    cand = _pick("fwd" if operator is None else "fwd-infer", x, kh, kw,
                 lambda: _fwd_candidates(x, kh, kw) + (_dense_candidates(x) if operator else []),
                 lambda c: _conv_pass(c, src, weight, bias, y, ph, pw, operator=operator))
    if cand.get("native"):
        return F.conv2d(x, weight, bias, padding="same", groups=weight.shape[0])
    _conv_pass(cand, src, weight, bias, y, ph, pw, operator=operator)
    return y if src is x else to_memory_format(y, memory_format_of(x))


def _triton_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, need_x: bool, need_w: bool,
                     need_b: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    kh, kw = weight.shape[-2:]
    ph, pw = _pads(kh, kw)
    dx, dw, db = x.new_empty(0), x.new_empty(0), x.new_empty(0)
    # one row-major copy of grad_out (and of x, for the weight grad) where they are channels_last: see _triton_forward
    gr = rowmajor(grad) if need_w or need_x else grad
    dx_like = x if x.stride(-1) == 1 else gr   # dx is row-major, converted to x's layout at the end
    dx_buf = None
    if need_w:   # first, so that its fp32 partial sums are freed before dx is allocated (peak memory)
        xr = rowmajor(x)
        # (picked apart from a weight grad without dx, whose candidates have nowhere to keep the parts)
        cand = _pick("wgrad" if need_x else "wgrad-only", x, kh, kw, lambda: _wgrad_candidates(x, kh, kw, in_dx=need_x),
                     lambda c: _wgrad_pass(c, xr, gr, weight, torch.empty_like(xr) if c.get("presplit") else None))
        if cand.get("presplit") and need_x:   # (it keeps the operands' bf16 parts in dx until the input grad)
            dx_buf = torch.empty_like(dx_like)
        dw = _wgrad_pass(cand, xr, gr, weight, dx_buf)
        if dx_buf is not None and POISON:   # poisoned once the parts are read, not before they are written
            dx_buf.fill_(float("nan"))
        del xr   # a channels_last x's row-major copy: freed before dx is allocated (peak memory)
    if need_x:
        dx = dx_buf if dx_buf is not None else _alloc_like(dx_like)
        # band copies (a weights-sized temporary) only where PyTorch's own backward peaks far higher: channels_last
        # inputs in 2-byte types (NCHW, and fp32 at 7x7, peak at or below native's only without them: the memory
        # table in docs/performance.md)
        bands = x.stride(-1) != 1 and x.element_size() == 2
        cand = _pick("dgrad", x, kh, kw, lambda: _fwd_candidates(x, kh, kw, bands=bands),
                     lambda c: _conv_pass(c, gr, weight, None, dx, kh - 1 - ph, kw - 1 - pw, flip=True))
        if cand.get("native"):
            dx = F.conv2d(grad, weight.flip(-2, -1), None, padding="same", groups=weight.shape[0])
        else:   # our kernels read the kernel flipped in place: no flipped copy (peak memory = native's)
            _conv_pass(cand, gr, weight, None, dx, kh - 1 - ph, kw - 1 - pw, flip=True)
        del gr   # likewise grad_out's copy, before dx's channels_last copy
        dx = to_memory_format(dx, memory_format_of(x))
    if need_b:
        # accumulated in fp32 by torch's reduction itself; an fp32 result cast afterwards was 4*C bytes above
        # native's peak in 2-byte types (the +1 / +2 / +4 KiB of the v8 / v9 memory tables at C256 / 512 / 1024)
        db = grad.sum(dim=(0, 2, 3)).to(weight.dtype)
    return dx, dw, db


def _native_backward(grad, x, weight, need_x, need_w, need_b):
    C, _, kh, kw = weight.shape
    ph, pw = _pads(kh, kw)
    # 'same' for even kernels = asymmetric zero padding, then a valid conv
    xp = F.pad(x, [pw, kw - 1 - pw, ph, kh - 1 - ph])
    dx, dw, db = x.new_empty(0), x.new_empty(0), x.new_empty(0)
    if need_x:
        dxp = torch.nn.grad.conv2d_input(xp.shape, weight, grad, groups=C)
        dx = dxp[:, :, ph:ph + x.shape[2], pw:pw + x.shape[3]].contiguous()
    if need_w:
        dw = torch.nn.grad.conv2d_weight(xp, weight.shape, grad, groups=C)
    if need_b:
        db = grad.sum(dim=(0, 2, 3))
    return dx, dw, db


def _forward_impl(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if _triton_runs_on(x) and _triton_supported(x, weight, bias):
        with on_device(x):
            return _triton_forward(x, weight, bias)
    return F.conv2d(x, weight, bias, padding="same", groups=weight.shape[0])


def _backward_impl(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, need_x: bool, need_w: bool,
                   need_b: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if _triton_runs_on(x) and _triton_supported(x, weight, None):
        with on_device(x):
            return _triton_backward(grad, x, weight, need_x, need_w, need_b)
    return _native_backward(grad, x, weight, need_x, need_w, need_b)


# The registered ops (what torch.compile traces and ONNX export sees) run the same two implementations.
_op_forward = torch.library.custom_op("largekernel::depthwise_conv2d", mutates_args=(),
                                      schema="(Tensor x, Tensor weight, Tensor? bias) -> Tensor")(_forward_impl)
_op_backward = torch.library.custom_op(
    "largekernel::depthwise_conv2d_backward", mutates_args=(),
    schema="(Tensor grad, Tensor x, Tensor weight, bool need_x, bool need_w, bool need_b) -> (Tensor, Tensor, Tensor)",
)(_backward_impl)


@_op_forward.register_fake
def _(x, weight, bias):
    return torch.empty_like(x)


@_op_backward.register_fake
def _(grad, x, weight, need_x, need_w, need_b):
    return (torch.empty_like(x) if need_x else x.new_empty(0),
            torch.empty_like(weight) if need_w else x.new_empty(0),
            weight.new_empty(weight.shape[0]) if need_b else x.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _grads(ctx, grad: torch.Tensor, backward) -> tuple:
    """The autograd backward of both wrappers: which grads are needed, then ``backward`` (the registered op or,
    in eager mode, its implementation)."""
    x, weight = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_b = ctx.has_bias and ctx.needs_input_grad[2]
    dx, dw, db = backward(grad, x, weight, need_x, need_w, need_b)
    return (dx if need_x else None), (dw if need_w else None), (db if need_b else None)


def _backward(ctx, grad):
    return _grads(ctx, grad, torch.ops.largekernel.depthwise_conv2d_backward)


_op_forward.register_autograd(_backward, setup_context=_setup_context)


class _DepthwiseConv2dFunction(torch.autograd.Function):
    """Eager-mode autograd for the Triton path (same implementations as the registered ops, without their
    dispatch cost)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        _setup_context(ctx, (x, weight, bias), None)
        return _forward_impl(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _grads(ctx, grad, _backward_impl)

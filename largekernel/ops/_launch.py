"""Host-side launch helpers: integer arithmetic (``triton.cdiv`` / ``triton.next_power_of_2`` are Triton
constexpr functions whose Python wrapper costs microseconds per call) and :func:`launch`, which calls a compiled
kernel directly once Triton has built it for the same specialization."""
from __future__ import annotations

import contextlib
import os
import weakref

import torch

# LARGEKERNEL_FAST_LAUNCH=0: always go through ``kernel[grid](...)`` (Triton's JITFunction.run).
FAST_LAUNCH = os.environ.get("LARGEKERNEL_FAST_LAUNCH", "1") == "1"
FAST_LAUNCH_ERROR = ""   # why the shortcut was turned off, if it was
FAST_LAUNCH_DESCRIPTORS = True   # launches with host-side TMA descriptors take it too (off once one fails)
_COMPILED: dict = {}
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: a context that makes it t's (a no-op when it already is)."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


TMA_ALIGN = 16   # bytes: the tensor memory accelerator's alignment of a tensor's base and of its strides


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _is_descriptor(v: object) -> bool:
    return type(v).__name__ == "TensorDescriptor"


def _specialization(v: object) -> object:
    """At least as fine as what Triton specializes a runtime argument on: a tensor's dtype and 16-byte alignment;
    a host-side TMA descriptor's element type, block shape and fill options (its base, shape and strides are
    launch-time values: the launcher encodes them at every call); an int's value 1, divisibility by 16 and int32
    range; the value of anything else (constexprs, None)."""
    if isinstance(v, torch.Tensor):
        return v.dtype, v.data_ptr() % 16 == 0
    if _is_descriptor(v):
        return ("tensordesc", v.base.dtype, tuple(v.block_shape), getattr(v, "padding", None),
                getattr(v, "round_f32_to_tf32", None))
    if isinstance(v, bool) or not isinstance(v, int):
        return v
    return v == 1, v % 16 == 0, -2**31 <= v < 2**31


def launch(kernel, grid: tuple, *args: object, **meta: object) -> None:
    """``kernel[grid](*args, **meta)``. Triton's launch path (argument binding, specialization, cache-key hashing)
    costs ~100 us of CPU per launch on the lent H100's host, more than the kernels of a 7x7 plane and enough to
    leave a training step CPU-bound; so the compiled kernel Triton returns is kept under a key at least as fine
    as Triton's own specialization, and later launches with the same key call it directly. Any failure of the
    direct call turns the shortcut off for the process (then every launch takes Triton's path); a failure of a
    launch with TMA descriptors turns it off for those only."""
    global FAST_LAUNCH, FAST_LAUNCH_ERROR, FAST_LAUNCH_DESCRIPTORS
    descriptors = any(_is_descriptor(a) for a in args)
    direct = FAST_LAUNCH and (FAST_LAUNCH_DESCRIPTORS or not descriptors)
    if direct:
        # the device too: Triton compiles (and loads) a kernel per device, and the runner launches what it holds
        device = args[0].device if args and isinstance(args[0], torch.Tensor) else None
        key = (kernel, device, tuple(_specialization(a) for a in args), tuple(meta.items()))
        entry = _COMPILED.get(key)
        if entry is not None:
            compiled, constexprs = entry
            try:   # the compiled kernel's runner takes a 3-d grid (JITFunction.run pads it)
                compiled[grid + (1,) * (3 - len(grid))](*args, *constexprs)
                return
            except Exception as err:  # noqa: BLE001 - an API this Triton does not have: use its own path from now on
                FAST_LAUNCH_ERROR = f"{type(err).__name__}: {err}"
                if descriptors:
                    FAST_LAUNCH_DESCRIPTORS = False
                else:
                    FAST_LAUNCH = False
    compiled = kernel[grid](*args, **meta)
    if direct and hasattr(compiled, "packed_metadata"):
        names = getattr(kernel, "arg_names", None)
        if names is not None and all(n in meta for n in names[len(args):]):
            _COMPILED[key] = (compiled, tuple(meta[n] for n in names[len(args):]))


def cached(store: dict, t: torch.Tensor, signature: tuple, build, keep: bool = True):
    """``build()``, kept in ``store`` for tensor ``t`` while t lives and ``signature`` (which includes t's version
    counter: an in-place change rebuilds) stays the same; one entry per tensor. ``keep=False``: a miss is built but
    not stored (an existing entry is still returned)."""
    key = id(t)
    hit = store.get(key)
    if hit is not None and hit[0]() is t and hit[1] == signature:
        return hit[2]
    value = build()
    if keep:
        store[key] = (weakref.ref(t, lambda _: store.pop(key, None)), signature, value)
    return value


def plane_descriptor(t: torch.Tensor, p: int):
    """TMA descriptor over the (H, W) planes of t (N, C, H, W) or (M, H, W), rows at any 16-byte aligned stride
    (the padded row-major copies of ``layout.padded_rows``, the shift-add's count matrices), with (1, p, p) boxes."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    n = t.shape[0] * t.shape[1] if t.dim() == 4 else t.shape[0]
    h, w = t.shape[-2:]
    return TensorDescriptor(t, [n, h, w], [t.stride(-3), t.stride(-2), 1], [1, p, p])


def stacked_planes_descriptor(t: torch.Tensor, s: int, p: int):
    """TMA descriptor over the (H, W) planes of t (B, M, H, W) with (s, 1, p, p) boxes: plane m of s consecutive
    images, stacked (rows 16-byte aligned, as for :func:`plane_descriptor`)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(t, list(t.shape), list(t.stride()), [s, 1, p, p])


def tma_planes(t: torch.Tensor | None) -> bool:
    """Whether t's planes can take a TMA descriptor (:func:`plane_descriptor`, :func:`stacked_planes_descriptor`):
    contiguous, its start and rows 16-byte aligned."""
    return (t is not None and t.is_contiguous() and t.data_ptr() % 16 == 0
            and t.shape[-1] * t.element_size() % 16 == 0)

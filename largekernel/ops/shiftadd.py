"""Shift-add: the gather step of the shift-wise convolution (ShiftwiseConv, CVPR 2025, Sec. 3).

Input ``y`` (B, R*nk, H+2e, W+2e) holds, for each of R channels, the nk "full" small-kernel correlations
(padding k-1, so e = k//2). With ``pad_hv`` (R*nk, 2*G) and ``idx_identity`` (R, G) (the official tables,
G = N_rep index groups) the three outputs, each (B, R, H, W), are, for channel c:

- horizontal: ``out0[h, w] = sum_{j, g} y[c*nk+j, h+e, w - pad_hv[c*nk+j, g]]``
- vertical:   ``out1[h, w] = sum_{j, g} y[c*nk+j, h - pad_hv[c*nk+j, G+g], w+e]``
- identity:   ``out2[h, w] = sum_g y[idx_identity[c, g], h+e, w+e]``

with zeros wherever the read falls outside ``y``. Returned stacked as (3, B, R, H, W). This is the
output-centric (gather) form of the official CUDA op's scatter; both directions are gathers, no atomics.

``col_pad`` > 0: y's rows carry that many extra columns on each side, (B, R*nk, H+2e, W+2e + 2*col_pad), which the
op ignores (the result is that of ``y[..., col_pad:-col_pad]``; their gradient is zero). The values there must be
finite: the tensor-core kernels load whole rows and multiply those columns by zero. A producer that writes y with
zero pad columns and a 16-byte-aligned row (the shift-wise layer's small conv, padded wider) gives those kernels
16-byte copies.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from largekernel.ops.dispatch import get_backend, triton_usable

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check(y: torch.Tensor, pad_hv: torch.Tensor, idx_identity: torch.Tensor, extra_pad: int,
           col_pad: int = 0) -> tuple[int, int]:
    if y.dim() != 4:
        raise ValueError(f"y must be (B, R*nk, H+2e, W+2e), got shape {tuple(y.shape)}")
    if idx_identity.dim() != 2 or pad_hv.dim() != 2:
        raise ValueError(f"pad_hv must be (R*nk, 2G) and idx_identity (R, G), got {tuple(pad_hv.shape)} "
                         f"and {tuple(idx_identity.shape)}")
    r, g = idx_identity.shape
    if r == 0 or y.shape[1] % r != 0:
        raise ValueError(f"y has {y.shape[1]} channels, not a multiple of R={r} (idx_identity rows)")
    nk = y.shape[1] // r
    if tuple(pad_hv.shape) != (r * nk, 2 * g):
        raise ValueError(f"pad_hv must have shape {(r * nk, 2 * g)}, got {tuple(pad_hv.shape)}")
    if col_pad < 0 or y.shape[3] <= 2 * col_pad:
        raise ValueError(f"col_pad={col_pad} does not fit y of spatial size {tuple(y.shape[2:])}")
    if extra_pad < 0 or y.shape[2] <= 2 * extra_pad or y.shape[3] - 2 * col_pad <= 2 * extra_pad:
        raise ValueError(f"extra_pad={extra_pad} does not fit y of spatial size {tuple(y.shape[2:])}"
                         + (f" with col_pad={col_pad}" if col_pad else ""))
    return nk, g


def _window(z: torch.Tensor, row: int, col: int, h: int, w: int) -> torch.Tensor:
    """z[..., row:row+h, col:col+w] with zeros outside z."""
    hp, wp = z.shape[-2:]
    r0, r1, c0, c1 = max(row, 0), min(row + h, hp), max(col, 0), min(col + w, wp)
    if r0 >= r1 or c0 >= c1:
        return z.new_zeros(*z.shape[:-2], h, w)
    return F.pad(z[..., r0:r1, c0:c1], [c0 - col, col + w - c1, r0 - row, row + h - r1])


def shift_add_reference(y: torch.Tensor, pad_hv: torch.Tensor, idx_identity: torch.Tensor,
                        extra_pad: int, col_pad: int = 0) -> torch.Tensor:
    """Pure-PyTorch shift-add (differentiable by autograd); any shift tables. Returns (3, B, R, H, W)."""
    nk, g = _check(y, pad_hv, idx_identity, extra_pad, col_pad)
    if col_pad:
        y = y[..., col_pad:y.shape[3] - col_pad]
    b, _, hp, wp = y.shape
    r = idx_identity.shape[0]
    e = extra_pad
    h, w = hp - 2 * e, wp - 2 * e
    yv = y.reshape(b, r, nk, hp, wp)
    pad_hv = pad_hv.long().cpu()
    outs = []
    for term, shifts in enumerate((pad_hv[:, :g], pad_hv[:, g:])):
        values = torch.unique(shifts).tolist()
        # counts[c, j, u]: how many groups shift kernel j of channel c by values[u]
        counts = torch.stack([(shifts == v).sum(1) for v in values], dim=1).reshape(r, nk, len(values))
        z = torch.einsum("brjhw,rju->bruhw", yv, counts.to(device=y.device, dtype=y.dtype))
        acc = None
        for u, s in enumerate(values):
            row, col = (e, -s) if term == 0 else (-s, e)
            part = _window(z[:, :, u], row, col, h, w)
            acc = part if acc is None else acc + part
        outs.append(acc)
    ident = y.index_select(1, idx_identity.long().t().reshape(-1).to(y.device)).reshape(b, g, r, hp, wp)
    outs.append(ident.sum(1)[:, :, e:e + h, e:e + w])
    return torch.stack(outs)


@torch.library.custom_op("largekernel::shift_add", mutates_args=(),
                         schema="(Tensor y, Tensor pad_hv, Tensor idx_identity, int extra_pad, int col_pad=0) "
                                "-> Tensor")
def _op_forward(y: torch.Tensor, pad_hv: torch.Tensor, idx_identity: torch.Tensor, extra_pad: int,
                col_pad: int = 0) -> torch.Tensor:
    from largekernel.ops._triton_shiftadd import shift_add_forward

    return shift_add_forward(y.contiguous(), pad_hv, idx_identity, extra_pad, col_pad)


@_op_forward.register_fake
def _(y, pad_hv, idx_identity, extra_pad, col_pad=0):
    b, _, hp, wp = y.shape
    return y.new_empty((3, b, idx_identity.shape[0], hp - 2 * extra_pad, wp - 2 * extra_pad - 2 * col_pad))


@torch.library.custom_op("largekernel::shift_add_backward", mutates_args=(),
                         schema="(Tensor gout, Tensor pad_hv, Tensor idx_identity, int extra_pad, int col_pad=0) "
                                "-> Tensor")
def _op_backward(gout: torch.Tensor, pad_hv: torch.Tensor, idx_identity: torch.Tensor,
                 extra_pad: int, col_pad: int = 0) -> torch.Tensor:
    from largekernel.ops._triton_shiftadd import shift_add_backward

    return shift_add_backward(gout.contiguous(), pad_hv, idx_identity, extra_pad, col_pad)


@_op_backward.register_fake
def _(gout, pad_hv, idx_identity, extra_pad, col_pad=0):
    _, b, r, h, w = gout.shape
    return gout.new_empty((b, pad_hv.shape[0], h + 2 * extra_pad, w + 2 * extra_pad + 2 * col_pad))


def _setup_context(ctx, inputs, output):
    _, pad_hv, idx_identity, extra_pad, col_pad = inputs
    ctx.save_for_backward(pad_hv, idx_identity)
    ctx.extra_pad = extra_pad
    ctx.col_pad = col_pad


def _backward(ctx, gout):
    pad_hv, idx_identity = ctx.saved_tensors
    gy = torch.ops.largekernel.shift_add_backward(gout, pad_hv, idx_identity, ctx.extra_pad, ctx.col_pad)
    return gy, None, None, None, None


_op_forward.register_autograd(_backward, setup_context=_setup_context)


def shift_add_col_pad(width: int) -> int:
    """The pad columns per row side that make y's rows (``width`` = W + 2e) exactly as wide as the tensor-core
    kernels' tile (a power of two, 16..64), so those kernels load whole rows with 16-byte copies; 0 where that
    takes an odd number of columns, more than an eighth of the row, or the rows are wider than the tile."""
    from largekernel.ops._triton_shiftadd import TC_MAX_TILE, tc_tile

    extra = tc_tile(width) - width
    return extra // 2 if width + extra <= TC_MAX_TILE and extra % 2 == 0 and extra <= width // 8 else 0


def shift_add_path(y: torch.Tensor) -> str:
    """'triton' or 'native': the fused kernel on CUDA (backend 'auto' or 'triton'); on the CPU only when the
    backend is forced to 'triton' under ``TRITON_INTERPRET=1`` (tests); never while exporting/tracing."""
    backend = get_backend()
    if backend == "native" or y.dtype not in _TRITON_DTYPES or not triton_usable(y):
        return "native"
    if torch.onnx.is_in_onnx_export() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return "native"
    if y.is_cuda or backend == "triton":
        return "triton"
    return "native"


def shift_add(y: torch.Tensor, pad_hv: torch.Tensor, idx_identity: torch.Tensor, extra_pad: int,
              col_pad: int = 0) -> torch.Tensor:
    """Shift-add of the module docstring: y (B, R*nk, H+2e, W+2e + 2*col_pad) -> (3, B, R, H, W).

    Runs the fused Triton kernel (forward and backward, custom op ``largekernel::shift_add``) where
    :func:`shift_add_path` says so, else the PyTorch reference. The tables get no gradient.
    """
    _check(y, pad_hv, idx_identity, extra_pad, col_pad)
    if y.is_meta or pad_hv.is_meta:  # shapes only (model summaries, FLOP counting on the meta device)
        b, _, hp, wp = y.shape
        h, w = hp - 2 * extra_pad, wp - 2 * extra_pad - 2 * col_pad
        return y.new_empty((3, b, idx_identity.shape[0], h, w), device="meta")
    if shift_add_path(y) == "triton":
        pad_hv = pad_hv.to(device=y.device, dtype=torch.int32).contiguous()
        idx_identity = idx_identity.to(device=y.device, dtype=torch.int32).contiguous()
        if torch.compiler.is_compiling():
            return torch.ops.largekernel.shift_add(y, pad_hv, idx_identity, extra_pad, col_pad)
        return _ShiftAddFunction.apply(y, pad_hv, idx_identity, extra_pad, col_pad)   # eager: no custom-op cost
    return shift_add_reference(y, pad_hv, idx_identity, extra_pad, col_pad)


class _ShiftAddFunction(torch.autograd.Function):
    """Eager-mode autograd for the Triton shift-add (the kernels of the custom op, without its Python wrapper,
    which costs ~0.2 ms per call on the H100 host)."""

    @staticmethod
    def forward(ctx, y, pad_hv, idx_identity, extra_pad, col_pad):
        from largekernel.ops._triton_shiftadd import shift_add_forward

        ctx.save_for_backward(pad_hv, idx_identity)
        ctx.extra_pad, ctx.col_pad = extra_pad, col_pad
        return shift_add_forward(y.contiguous(), pad_hv, idx_identity, extra_pad, col_pad)

    @staticmethod
    def backward(ctx, gout):
        from largekernel.ops._triton_shiftadd import shift_add_backward

        pad_hv, idx_identity = ctx.saved_tensors
        gy = shift_add_backward(gout.contiguous(), pad_hv, idx_identity, ctx.extra_pad, ctx.col_pad)
        return gy, None, None, None, None


@torch.library.custom_op("largekernel::shift_add_eval", mutates_args=(),
                         schema="(Tensor y, Tensor pad_hv, Tensor idx_identity, int extra_pad, Tensor scale, "
                                "Tensor bias, Tensor x, Tensor rep_idx, Tensor ghost_idx) -> Tensor")
def _op_eval(y: torch.Tensor, pad_hv: torch.Tensor, idx_identity: torch.Tensor, extra_pad: int,
             scale: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, rep_idx: torch.Tensor,
             ghost_idx: torch.Tensor) -> torch.Tensor:
    return _eval_triton(y, pad_hv, idx_identity, extra_pad, scale, bias, x, rep_idx, ghost_idx)


def _eval_triton(y, pad_hv, idx_identity, extra_pad, scale, bias, x, rep_idx, ghost_idx):
    from largekernel.ops._triton_shiftadd import shift_add_eval_forward

    return shift_add_eval_forward(y.contiguous(), pad_hv, idx_identity, extra_pad, scale, bias, x.contiguous(),
                                  rep_idx, ghost_idx)


@_op_eval.register_fake
def _(y, pad_hv, idx_identity, extra_pad, scale, bias, x, rep_idx, ghost_idx):
    return x.new_empty(x.shape, dtype=torch.promote_types(y.dtype, x.dtype))


def shift_add_eval(y: torch.Tensor, pad_hv: torch.Tensor, idx_identity: torch.Tensor, extra_pad: int,
                   scale: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, rep_idx: torch.Tensor,
                   ghost_idx: torch.Tensor) -> torch.Tensor:
    """Inference-only shift-wise epilogue, one pass: with t = shift_add(y, ...) (3, B, R, H, W), returns
    ``cat([sum_i scale[i] * t[i] + bias + x[:, rep_idx], x[:, ghost_idx]], 1)`` of shape (B, C, H, W).

    ``scale`` (3, R) / ``bias`` (R,) are the eval-mode BNs of the three terms. No autograd on the Triton path.
    """
    _check(y, pad_hv, idx_identity, extra_pad)
    r = idx_identity.shape[0]
    if tuple(scale.shape) != (3, r) or tuple(bias.shape) != (r,):
        raise ValueError(f"scale must be (3, {r}) and bias ({r},), got {tuple(scale.shape)}, {tuple(bias.shape)}")
    if rep_idx.numel() + ghost_idx.numel() != x.shape[1] or rep_idx.numel() != r:
        raise ValueError(f"rep_idx ({rep_idx.numel()}) + ghost_idx ({ghost_idx.numel()}) must cover the "
                         f"{x.shape[1]} channels of x with {r} rep channels")
    if shift_add_path(y) == "triton" and not y.is_meta:
        dev = y.device
        args = (y, pad_hv.to(device=dev, dtype=torch.int32).contiguous(),
                idx_identity.to(device=dev, dtype=torch.int32).contiguous(), extra_pad, scale, bias, x,
                rep_idx.to(dev), ghost_idx.to(dev))
        return torch.ops.largekernel.shift_add_eval(*args) if torch.compiler.is_compiling() else _eval_triton(*args)
    t = shift_add(y, pad_hv, idx_identity, extra_pad)
    dtype = torch.promote_types(y.dtype, x.dtype)
    scale = scale.to(dtype).view(3, 1, r, 1, 1)
    out = t[0] * scale[0] + t[1] * scale[1] + t[2] * scale[2] + bias.to(dtype).view(1, -1, 1, 1)
    out = out + x.index_select(1, rep_idx)
    return torch.cat([out, x.index_select(1, ghost_idx).to(dtype)], dim=1) if ghost_idx.numel() else out

"""Shift-add: the gather step of the shift-wise convolution (ShiftwiseConv, CVPR 2025, Sec. 3).

Input ``y`` (B, R*nk, H+2e, W+2e) holds, for each of R channels, the nk "full" small-kernel correlations
(padding k-1, so e = k//2). With ``pad_hv`` (R*nk, 2*G) and ``idx_identity`` (R, G) (the official tables,
G = N_rep index groups) the three outputs, each (B, R, H, W), are, for channel c:

- horizontal: ``out0[h, w] = sum_{j, g} y[c*nk+j, h+e, w - pad_hv[c*nk+j, g]]``
- vertical:   ``out1[h, w] = sum_{j, g} y[c*nk+j, h - pad_hv[c*nk+j, G+g], w+e]``
- identity:   ``out2[h, w] = sum_g y[idx_identity[c, g], h+e, w+e]``

with zeros wherever the read falls outside ``y``. Returned stacked as (3, B, R, H, W). This is the
output-centric (gather) form of the official CUDA op's scatter; both directions are gathers, no atomics.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from largekernel.ops.dispatch import get_backend, triton_usable

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check(y: torch.Tensor, pad_hv: torch.Tensor, idx_identity: torch.Tensor, extra_pad: int) -> tuple[int, int]:
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
    if extra_pad < 0 or y.shape[2] <= 2 * extra_pad or y.shape[3] <= 2 * extra_pad:
        raise ValueError(f"extra_pad={extra_pad} does not fit y of spatial size {tuple(y.shape[2:])}")
    return nk, g


def _window(z: torch.Tensor, row: int, col: int, h: int, w: int) -> torch.Tensor:
    """z[..., row:row+h, col:col+w] with zeros outside z (F.pad crops with negative amounts)."""
    hp, wp = z.shape[-2:]
    return F.pad(z, [-col, col + w - wp, -row, row + h - hp])


def shift_add_reference(y: torch.Tensor, pad_hv: torch.Tensor, idx_identity: torch.Tensor,
                        extra_pad: int) -> torch.Tensor:
    """Pure-PyTorch shift-add (differentiable by autograd); any shift tables. Returns (3, B, R, H, W)."""
    nk, g = _check(y, pad_hv, idx_identity, extra_pad)
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


class _ShiftAddTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: torch.Tensor, pad_hv: torch.Tensor, idx_identity: torch.Tensor,
                extra_pad: int) -> torch.Tensor:
        from largekernel.ops._triton_shiftadd import shift_add_backward, shift_add_forward

        pad_hv = pad_hv.to(device=y.device, dtype=torch.int32).contiguous()
        idx_identity = idx_identity.to(device=y.device, dtype=torch.int32).contiguous()
        ctx.save_for_backward(pad_hv, idx_identity)
        ctx.extra_pad = extra_pad
        ctx.backward_fn = shift_add_backward
        return shift_add_forward(y.contiguous(), pad_hv, idx_identity, extra_pad)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gout: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        pad_hv, idx_identity = ctx.saved_tensors
        return ctx.backward_fn(gout.contiguous(), pad_hv, idx_identity, ctx.extra_pad), None, None, None


def _use_triton(y: torch.Tensor) -> bool:
    if get_backend() == "native" or y.dtype not in _TRITON_DTYPES:
        return False
    return triton_usable(y)


def shift_add(y: torch.Tensor, pad_hv: torch.Tensor, idx_identity: torch.Tensor, extra_pad: int) -> torch.Tensor:
    """Shift-add of the module docstring: y (B, R*nk, H+2e, W+2e) -> (3, B, R, H, W).

    Runs the fused Triton kernel (forward and backward) where the backend selection allows it (CUDA, or CPU
    under ``TRITON_INTERPRET=1``), else the PyTorch reference. The tables get no gradient.
    """
    _check(y, pad_hv, idx_identity, extra_pad)
    if y.is_meta or pad_hv.is_meta:  # shapes only (model summaries, FLOP counting on the meta device)
        b, _, hp, wp = y.shape
        h, w = hp - 2 * extra_pad, wp - 2 * extra_pad
        return y.new_empty((3, b, idx_identity.shape[0], h, w), device="meta")
    if _use_triton(y):
        return _ShiftAddTriton.apply(y, pad_hv, idx_identity, extra_pad)
    return shift_add_reference(y, pad_hv, idx_identity, extra_pad)

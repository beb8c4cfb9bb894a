"""UniRepLKNet's Dilated Reparam Block (Ding et al., 2024, Sec. 3.2): a large depthwise kernel in parallel with
dilated small depthwise kernels, each followed by BN; merged into one large kernel for deployment.

State-dict names follow the official release: ``lk_origin.weight``, ``origin_bn.*``, ``dil_conv_k{k}_{r}.weight``,
``dil_bn_k{k}_{r}.*``; deploy form ``lk_origin.{weight,bias}``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from largekernel.layers.blocks import get_bn
from largekernel.layers.conv import DepthwiseConv2d, fuse_bn, pad_kernel_to

__all__ = ["DilatedReparamBlock", "dilated_branch_config", "dilate_kernel", "merge_dilated_into_large_kernel"]

# kernel size of the large kernel -> (small kernel sizes, dilation rates) of the parallel branches (official).
_BRANCHES: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {
    17: ((5, 9, 3, 3, 3), (1, 2, 4, 5, 7)),
    15: ((5, 7, 3, 3, 3), (1, 2, 3, 5, 7)),
    13: ((5, 7, 3, 3, 3), (1, 2, 3, 4, 5)),
    11: ((5, 5, 3, 3, 3), (1, 2, 3, 4, 5)),
    9: ((5, 5, 3, 3), (1, 2, 3, 4)),
    7: ((5, 3, 3), (1, 2, 3)),
    5: ((3, 3), (1, 2)),
}


def dilated_branch_config(kernel_size: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The official (kernel sizes, dilation rates) of the parallel branches for a large kernel size."""
    if kernel_size not in _BRANCHES:
        raise ValueError(f"kernel_size must be one of {sorted(_BRANCHES)} for the Dilated Reparam Block, "
                         f"got {kernel_size}")
    return _BRANCHES[kernel_size]


def dilate_kernel(kernel: torch.Tensor, dilation: int) -> torch.Tensor:
    """The non-dilated kernel equivalent to ``kernel`` (.., k, k) applied with ``dilation`` r: size r*(k-1)+1,
    taps at every r-th position, zeros between."""
    if dilation < 1:
        raise ValueError(f"dilation must be >= 1, got {dilation}")
    kh, kw = kernel.shape[-2:]
    out = kernel.new_zeros(*kernel.shape[:-2], dilation * (kh - 1) + 1, dilation * (kw - 1) + 1)
    out[..., ::dilation, ::dilation] = kernel
    return out


def merge_dilated_into_large_kernel(large: torch.Tensor, small: torch.Tensor, dilation: int) -> torch.Tensor:
    """``large`` (C, 1, K, K) plus the dense equivalent of the dilated ``small`` kernel, centres aligned."""
    dense = dilate_kernel(small, dilation)
    if dense.shape[-1] > large.shape[-1] or dense.shape[-2] > large.shape[-2]:
        raise ValueError(f"dilated kernel of size {tuple(dense.shape[-2:])} does not fit in the large kernel "
                         f"{tuple(large.shape[-2:])}")
    return large + pad_kernel_to(dense, tuple(large.shape[-2:]))


class DilatedReparamBlock(nn.Module):
    """Depthwise K x K conv + BN, plus, per (k, r) branch, a depthwise k x k conv with dilation r + BN; all summed.

    (N, C, H, W) -> (N, C, H, W). ``reparameterize()`` folds every BN and merges the branches into one
    K x K :class:`DepthwiseConv2d` with bias (``lk_origin``), exactly (eval-mode BN).
    ``kernel_sizes``/``dilations`` override the official table; each dilated kernel must fit in K.
    ``attempt_use_lk_impl`` is accepted for compatibility with the official signature and ignored (the large
    conv always goes through our depthwise dispatch point).
    """

    def __init__(self, channels: int, kernel_size: int, deploy: bool = False, use_sync_bn: bool = False,
                 kernel_sizes: Sequence[int] | None = None, dilations: Sequence[int] | None = None,
                 attempt_use_lk_impl: bool = True) -> None:
        super().__init__()
        if (kernel_sizes is None) != (dilations is None):
            raise ValueError("kernel_sizes and dilations must be given together")
        if kernel_sizes is None:
            kernel_sizes, dilations = dilated_branch_config(kernel_size)
        if len(kernel_sizes) != len(dilations):
            raise ValueError(f"kernel_sizes {tuple(kernel_sizes)} and dilations {tuple(dilations)} differ in length")
        for k, r in zip(kernel_sizes, dilations):
            if k % 2 == 0 or r < 1 or r * (k - 1) + 1 > kernel_size:
                raise ValueError(f"branch (kernel {k}, dilation {r}) must be odd, r >= 1 and fit in {kernel_size}")
        self.channels = channels
        self.kernel_size = kernel_size
        self.kernel_sizes = tuple(int(k) for k in kernel_sizes)
        self.dilates = tuple(int(r) for r in dilations)
        self.lk_origin = DepthwiseConv2d(channels, kernel_size, bias=deploy)
        if not deploy:
            self.origin_bn = get_bn(channels, use_sync_bn)
            for k, r in zip(self.kernel_sizes, self.dilates):
                self.add_module(f"dil_conv_k{k}_{r}", nn.Conv2d(channels, channels, k, padding=r * (k - 1) // 2,
                                                                 dilation=r, groups=channels, bias=False))
                self.add_module(f"dil_bn_k{k}_{r}", get_bn(channels, use_sync_bn))

    @property
    def deployed(self) -> bool:
        return not hasattr(self, "origin_bn")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deployed:
            return self.lk_origin(x)
        out = self.origin_bn(self.lk_origin(x))
        for k, r in zip(self.kernel_sizes, self.dilates):
            out = out + getattr(self, f"dil_bn_k{k}_{r}")(getattr(self, f"dil_conv_k{k}_{r}")(x))
        return out

    @torch.no_grad()
    def merged_kernel(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (C, 1, K, K) kernel and (C,) bias of the equivalent single conv (eval-mode BN)."""
        if self.deployed:
            bias = self.lk_origin.bias if self.lk_origin.bias is not None else self.lk_origin.weight.new_zeros(
                self.channels)
            return self.lk_origin.weight.detach().clone(), bias.detach().clone()
        weight, bias = fuse_bn(self.lk_origin.weight, self.origin_bn, self.lk_origin.bias)
        for k, r in zip(self.kernel_sizes, self.dilates):
            w, b = fuse_bn(getattr(self, f"dil_conv_k{k}_{r}").weight, getattr(self, f"dil_bn_k{k}_{r}"))
            weight = merge_dilated_into_large_kernel(weight, w, r)
            bias = bias + b
        return weight, bias

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Merge into ``lk_origin`` (K x K depthwise conv with bias); no-op when already merged."""
        if self.deployed:
            return
        weight, bias = self.merged_kernel()
        self.lk_origin = DepthwiseConv2d.from_weights(weight, bias)
        del self.origin_bn
        for k, r in zip(self.kernel_sizes, self.dilates):
            delattr(self, f"dil_conv_k{k}_{r}")
            delattr(self, f"dil_bn_k{k}_{r}")

    def extra_repr(self) -> str:
        return f"{self.channels}, kernel_size={self.kernel_size}, branches={list(zip(self.kernel_sizes, self.dilates))}"

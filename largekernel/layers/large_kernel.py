"""RepLKNet's re-parameterized large-kernel depthwise conv (Ding et al., CVPR 2022, Sec. 3, guideline 3)."""
from __future__ import annotations

import torch
import torch.nn as nn

from largekernel.layers.conv import DepthwiseConv2d, conv_bn, fuse_bn, pad_kernel_to


def check_kernel_pair(kernel_size: int, small_kernel: int | None, name: str = "small_kernel") -> None:
    """Raise ValueError unless ``small_kernel`` can be merged into the centre of ``kernel_size``."""
    if not isinstance(kernel_size, int) or kernel_size < 1:
        raise ValueError(f"kernel_size must be a positive int, got {kernel_size!r}")
    if small_kernel is None:
        return
    if not isinstance(small_kernel, int) or small_kernel < 1:
        raise ValueError(f"{name} must be a positive int or None, got {small_kernel!r}")
    if small_kernel > kernel_size:
        raise ValueError(f"{name}={small_kernel} is larger than the large kernel {kernel_size}")
    if (kernel_size - small_kernel) % 2:
        raise ValueError(f"{name}={small_kernel} and kernel_size={kernel_size} differ in parity; "
                         "the small kernel cannot be centred in the large one")


class ReparamLargeKernelConv(nn.Module):
    """Depthwise KxK conv-BN in parallel with a depthwise kxk conv-BN (k = ``small_kernel``), summed.

    ``reparameterize()`` merges both into one KxK depthwise conv with bias (``lkb_reparam``), exactly:
    the small kernel is zero-padded into the centre of the large one after folding each BN.
    Input (N, C, H, W) -> (N, C, H/stride, W/stride). Keys follow the official release:
    ``lkb_origin.{conv,bn}``, ``small_conv.{conv,bn}``, merged ``lkb_reparam``.
    """

    def __init__(self, channels: int, kernel_size: int, small_kernel: int | None = 5, stride: int = 1,
                 deploy: bool = False) -> None:
        super().__init__()
        small_kernel = small_kernel or None  # 0 means "no small kernel" (timm.create_model drops None kwargs)
        check_kernel_pair(kernel_size, small_kernel)
        self.channels = channels
        self.kernel_size = kernel_size
        self.small_kernel = small_kernel
        self.stride = stride
        if deploy:
            self.lkb_reparam = DepthwiseConv2d(channels, kernel_size, stride=stride, bias=True)
        else:
            self.lkb_origin = conv_bn(channels, channels, kernel_size, stride, groups=channels)
            if small_kernel is not None:
                self.small_conv = conv_bn(channels, channels, small_kernel, stride, groups=channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "lkb_reparam"):
            return self.lkb_reparam(x)
        out = self.lkb_origin(x)
        if hasattr(self, "small_conv"):
            out = out + self.small_conv(x)
        return out

    @torch.no_grad()
    def get_equivalent_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (C, 1, K, K) kernel and (C,) bias of the merged conv (eval-mode BN statistics)."""
        kernel, bias = fuse_bn(self.lkb_origin.conv.weight, self.lkb_origin.bn)
        if hasattr(self, "small_conv"):
            small_k, small_b = fuse_bn(self.small_conv.conv.weight, self.small_conv.bn)
            kernel = kernel + pad_kernel_to(small_k, (self.kernel_size, self.kernel_size))
            bias = bias + small_b
        return kernel, bias

    @torch.no_grad()
    def reparameterize(self) -> None:
        if hasattr(self, "lkb_reparam"):
            return
        kernel, bias = self.get_equivalent_kernel_bias()
        self.lkb_reparam = DepthwiseConv2d.from_weights(kernel, bias, stride=self.stride)
        del self.lkb_origin
        if hasattr(self, "small_conv"):
            del self.small_conv

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel_size={self.kernel_size}, small_kernel={self.small_kernel}"

"""Convolution building blocks: the depthwise conv that routes through our kernels, the 1x1 conv that runs
channels_last inputs as one GEMM, and conv-BN units."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from largekernel.ops import cross_depthwise_conv2d, depthwise_conv2d, depthwise_path, get_backend
from largekernel.ops.depthwise import has_values


def _pair(k: int | tuple[int, int]) -> tuple[int, int]:
    return (k, k) if isinstance(k, int) else (int(k[0]), int(k[1]))


class DepthwiseConv2d(nn.Conv2d):
    """Drop-in for ``nn.Conv2d(C, C, k, padding=k//2, groups=C)`` whose stride-1 forward goes through
    :func:`largekernel.ops.depthwise_conv2d` (the fast-kernel dispatch point).

    Parameters keep ``nn.Conv2d``'s names (``weight`` (C, 1, kh, kw), ``bias``) so official checkpoints load.
    Input (N, C, H, W) -> output (N, C, H/stride, W/stride).
    """

    def __init__(self, channels: int, kernel_size: int | tuple[int, int], stride: int = 1,
                 bias: bool = False, padding: int | tuple[int, int] | None = None) -> None:
        kh, kw = _pair(kernel_size)
        if padding is None:
            padding = (kh // 2, kw // 2)
        super().__init__(channels, channels, (kh, kw), stride=stride, padding=padding, groups=channels, bias=bias)

    @classmethod
    def from_weights(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, stride: int = 1) -> DepthwiseConv2d:
        """A depthwise conv holding ``weight`` (C, 1, kh, kw) and ``bias`` (C,) on their device and dtype
        (the merged conv of a re-parameterization)."""
        conv = cls(weight.shape[0], tuple(weight.shape[-2:]), stride=stride, bias=bias is not None)
        conv = conv.to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(weight)
            if bias is not None:
                conv.bias.copy_(bias)
        return conv

    def _is_same(self) -> bool:
        kh, kw = self.kernel_size
        return (self.stride == (1, 1) and self.dilation == (1, 1) and kh % 2 == 1 and kw % 2 == 1
                and self.padding == (kh // 2, kw // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._is_same():
            return depthwise_conv2d(x, self.weight, self.bias)
        return super().forward(x)

    def conv_path(self, x: torch.Tensor) -> str:
        """Which implementation ``forward(x)`` takes ('triton', 'native', 'native-nchw', ...)."""
        if not self._is_same():
            return "native (not stride-1 same)"
        return depthwise_path(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", backend={get_backend()}"


class CrossDepthwiseConv2d(nn.Module):
    """A D x D depthwise kernel whose support is a centred cross of width k, as two depthwise convs on the same
    input, summed: ``dense_h`` (k x D, with bias) + ``dense_v`` (D x k); 2kD taps instead of D^2 (the dense
    deploy form of the shift-wise layers). (N, C, H, W) -> (N, C, H, W).
    """

    def __init__(self, horizontal: torch.Tensor, vertical: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if horizontal.shape[0] != vertical.shape[0] or horizontal.shape[-2:] != vertical.shape[-2:][::-1]:
            raise ValueError(f"a cross needs (C, 1, k, D) and (C, 1, D, k) kernels, got {tuple(horizontal.shape)} "
                             f"and {tuple(vertical.shape)}")
        if any(n % 2 == 0 for n in horizontal.shape[-2:]):
            raise ValueError(f"a centred cross needs odd k and D, got a {tuple(horizontal.shape[-2:])} kernel")
        self.dense_h = DepthwiseConv2d.from_weights(horizontal, bias)
        self.dense_v = DepthwiseConv2d.from_weights(vertical)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cross_depthwise_conv2d(x, self.dense_h.weight, self.dense_v.weight, self.dense_h.bias)


class PartialDepthwiseConv2d(nn.Module):
    """A depthwise conv (``conv``: a :class:`DepthwiseConv2d` or :class:`CrossDepthwiseConv2d` over R channels) on
    the channels ``channels`` of a C-channel input, and on every other channel a 1 x 1 depthwise kernel with bias
    (``x * rest_scale + rest_shift``, the others in ascending order; identity where absent): the deploy form of a
    shift-wise layer, whose ghost channels bypass the operator (ShiftwiseConv Sec. 3), with the BN after it folded
    in. The kernels see the R channels only (:func:`largekernel.ops.depthwise_conv2d`'s ``channels``).
    (N, C, H, W) -> (N, C, H, W).
    """

    def __init__(self, conv: DepthwiseConv2d | CrossDepthwiseConv2d, channels: torch.Tensor, in_channels: int,
                 rest_scale: torch.Tensor | None = None, rest_shift: torch.Tensor | None = None) -> None:
        super().__init__()
        width = conv.dense_h.weight.shape[0] if isinstance(conv, CrossDepthwiseConv2d) else conv.weight.shape[0]
        index = channels.detach().long()
        if index.dim() != 1 or index.numel() != width or (has_values(index) and (
                index.unique().numel() != width or not 0 <= int(index.min()) <= int(index.max()) < in_channels)):
            raise ValueError(f"channels must be {width} distinct indices in [0, {in_channels}), one per kernel of "
                             f"conv, got {tuple(channels.shape)}")
        if (rest_scale is None) != (rest_shift is None):
            raise ValueError("rest_scale and rest_shift come together")
        self.in_channels = in_channels
        self.conv = conv
        self.register_buffer("channels", index)
        if rest_scale is not None:
            for name, t in (("rest_scale", rest_scale), ("rest_shift", rest_shift)):
                if tuple(t.shape) != (in_channels - width,):
                    raise ValueError(f"{name} must be ({in_channels - width},), got {tuple(t.shape)}")
                setattr(self, name, nn.Parameter(t.detach().clone()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        rest = (self.rest_scale, self.rest_shift) if hasattr(self, "rest_scale") else None
        if isinstance(self.conv, CrossDepthwiseConv2d):
            return cross_depthwise_conv2d(x, self.conv.dense_h.weight, self.conv.dense_v.weight, self.conv.dense_h.bias,
                                          channels=self.channels, rest=rest)
        return depthwise_conv2d(x, self.conv.weight, self.conv.bias, channels=self.channels, rest=rest)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, channels={self.channels.numel()}"


class PointwiseConv2d(nn.Conv2d):
    """Drop-in for ``nn.Conv2d(C_in, C_out, 1)`` (same parameters and state-dict names). With a bias, a
    channels_last input runs as ``F.linear`` on its (N, H, W, C) view, so the bias is added in the GEMM's
    epilogue; cuDNN's 1x1 conv adds it in a separate broadcast pass over the output (RepLKNet-31B deploy, batch
    128, H100: ~10 of ~35 ms per forward, docs/performance.md; on the CPU the GEMM is as fast or faster too).
    Output in the input's layout; other inputs (and ONNX export) take ``nn.Conv2d``'s path.
    (N, C_in, H, W) -> (N, C_out, H, W).
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # without a bias there is no extra pass to save: cuDNN's conv (what the training forms were measured with)
        if self.bias is not None and x.dim() == 4 and not torch.onnx.is_in_onnx_export():
            nhwc = x.permute(0, 2, 3, 1)
            if nhwc.is_contiguous():   # a channels_last tensor (or one that is both)
                return F.linear(nhwc, self.weight.flatten(1), self.bias).permute(0, 3, 1, 2)
        return super().forward(x)


def _is_pointwise(in_channels: int, out_channels: int, kh: int, kw: int, stride: int, padding, groups: int,
                  dilation: int) -> bool:
    return (kh, kw) == (1, 1) and stride == 1 and _pair(padding) == (0, 0) and groups == 1 and dilation == 1


def create_conv2d(in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], stride: int = 1,
                  padding: int | tuple[int, int] | None = None, groups: int = 1, bias: bool = False,
                  dilation: int = 1) -> nn.Conv2d:
    """A conv; depthwise ones (in == out == groups) become :class:`DepthwiseConv2d`, dense 1x1 ones
    :class:`PointwiseConv2d`."""
    kh, kw = _pair(kernel_size)
    if padding is None:
        padding = (kh // 2 * dilation, kw // 2 * dilation)
    if in_channels == out_channels == groups and dilation == 1:
        return DepthwiseConv2d(in_channels, (kh, kw), stride=stride, bias=bias, padding=padding)
    if _is_pointwise(in_channels, out_channels, kh, kw, stride, padding, groups, dilation):
        return PointwiseConv2d(in_channels, out_channels, bias=bias)
    return nn.Conv2d(in_channels, out_channels, (kh, kw), stride=stride, padding=padding, groups=groups,
                     bias=bias, dilation=dilation)


def fuse_bn(weight: torch.Tensor, bn: nn.BatchNorm2d,
            bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BN that follows a conv into (weight, bias). Exact."""
    std = (bn.running_var + bn.eps).sqrt()
    scale = bn.weight / std
    shift = bn.bias - bn.running_mean * scale
    if bias is not None:
        shift = shift + bias * scale
    return weight * scale.reshape(-1, *([1] * (weight.dim() - 1))), shift


@torch.no_grad()
def fold_pre_bn(bn: nn.BatchNorm2d, conv: nn.Conv2d) -> nn.Conv2d:
    """A 1x1 conv with bias equal to ``conv(bn(x))`` for an eval-mode BN *before* a 1x1 (dense, unpadded) conv:
    bn(x) = s*x + t per input channel, so conv(bn(x)) = (W*s) x + (W t + b). Exact."""
    if conv.kernel_size != (1, 1) or conv.groups != 1 or conv.padding != (0, 0):
        raise ValueError("a BN before a conv folds exactly only into a dense, unpadded 1x1 conv")
    scale = bn.weight / (bn.running_var + bn.eps).sqrt()
    shift = bn.bias - bn.running_mean * scale
    fused = (PointwiseConv2d(conv.in_channels, conv.out_channels) if conv.stride == (1, 1) else
             nn.Conv2d(conv.in_channels, conv.out_channels, 1, stride=conv.stride)).to(conv.weight)
    fused.weight.copy_(conv.weight * scale.reshape(1, -1, 1, 1))
    bias = conv.weight.flatten(1) @ shift
    fused.bias.copy_(bias if conv.bias is None else bias + conv.bias)
    return fused


class ConvNorm(nn.Sequential):
    """conv -> BN (-> activation). Keys ``conv.*``, ``bn.*``, as in the official releases.

    ``fold_bn()`` folds the BN into the conv (the activation, if any, stays as ``nonlinear``); it is not
    part of ``reparameterize()``, whose deploy form keeps the official merged layout.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] | None = None, groups: int = 1, dilation: int = 1,
                 act_layer: type[nn.Module] | None = None, norm_layer: type[nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        self.add_module("conv", create_conv2d(in_channels, out_channels, kernel_size, stride, padding, groups,
                                              bias=False, dilation=dilation))
        self.add_module("bn", norm_layer(out_channels))
        if act_layer is not None:
            self.add_module("nonlinear", act_layer())

    @torch.no_grad()
    def fold_bn(self) -> None:
        if not hasattr(self, "bn"):
            return
        conv: nn.Conv2d = self.conv
        weight, bias = fuse_bn(conv.weight, self.bn, conv.bias)
        fused = create_conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride[0],
                              conv.padding, conv.groups, bias=True, dilation=conv.dilation[0])
        fused = fused.to(device=weight.device, dtype=weight.dtype)
        fused.weight.copy_(weight)
        fused.bias.copy_(bias)
        self.conv = fused
        del self.bn


def conv_bn(in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], stride: int = 1,
            padding: int | tuple[int, int] | None = None, groups: int = 1, dilation: int = 1) -> ConvNorm:
    return ConvNorm(in_channels, out_channels, kernel_size, stride, padding, groups, dilation)


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] | None = None, groups: int = 1, dilation: int = 1) -> ConvNorm:
    return ConvNorm(in_channels, out_channels, kernel_size, stride, padding, groups, dilation, act_layer=nn.ReLU)


def pad_kernel_to(kernel: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Zero-pad a (.., kh, kw) kernel symmetrically to (.., H, W) (centres aligned; odd sizes)."""
    kh, kw = kernel.shape[-2:]
    ph, pw = (size[0] - kh) // 2, (size[1] - kw) // 2
    return F.pad(kernel, [pw, size[1] - kw - pw, ph, size[0] - kh - ph])

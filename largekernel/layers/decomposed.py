"""SLaK's decomposed sparse large kernel (Liu et al., "More ConvNets in the 2020s", ICLR 2023, Sec. 4.1).

A KxK depthwise kernel is replaced by two rectangular depthwise kernels, K x s and s x K, plus a small
s x s kernel, each followed by BN, summed. The official code (``ReparamLargeKernelConv`` with ``Decom=True``)
has no merge; ours folds the BNs and sums the three kernels, zero-padded, into one KxK depthwise conv.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn

from largekernel.layers.conv import DepthwiseConv2d, fuse_bn, pad_kernel_to
from largekernel.ops import depthwise_conv2d


class SparseDepthwiseConv2d(DepthwiseConv2d):
    """:class:`DepthwiseConv2d` whose weight can be pruned (the sparsity protocol of ``largekernel.train.sparse``).

    Buffer ``weight_mask`` (ones at init, persistent, same shape as ``weight``); forward uses
    ``weight * weight_mask``. A state dict without the mask (an official checkpoint) loads as unmasked.
    """

    sparse_params: tuple[str, ...] = ("weight",)

    def __init__(self, channels: int, kernel_size: int | tuple[int, int], stride: int = 1, bias: bool = False,
                 padding: int | tuple[int, int] | None = None) -> None:
        super().__init__(channels, kernel_size, stride=stride, bias=bias, padding=padding)
        self.register_buffer("weight_mask", torch.ones(self.weight.shape, device=self.weight.device,
                                                       dtype=self.weight.dtype))

    def masked_weight(self) -> torch.Tensor:
        return self.weight * self.weight_mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.masked_weight()
        if self._is_same():
            return depthwise_conv2d(x, weight, self.bias)
        return self._conv_forward(x, weight, self.bias)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        key = prefix + "weight_mask"
        if key not in state_dict and prefix + "weight" in state_dict:
            state_dict[key] = torch.ones_like(self.weight_mask)  # checkpoints without masks are dense
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def _conv_branch(channels: int, kernel_size: int | tuple[int, int], stride: int, bn: bool,
                 sparse: bool) -> nn.Sequential:
    """Depthwise conv (-> BN): keys ``conv.weight`` (+ ``bn.*``), as the official ``conv_bn``."""
    conv_cls = SparseDepthwiseConv2d if sparse else DepthwiseConv2d
    layers: OrderedDict[str, nn.Module] = OrderedDict(conv=conv_cls(channels, kernel_size, stride=stride))
    if bn:
        layers["bn"] = nn.BatchNorm2d(channels)
    return nn.Sequential(layers)


def _check_odd(value: object, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1 or value % 2 == 0:
        raise ValueError(f"{name} must be a positive odd int, got {value!r}")
    return value


class DecomposedLargeKernelConv(nn.Module):
    """SLaK's large-kernel unit on (N, C, H, W) -> (N, C, H/stride, W/stride), all convs depthwise, 'same'.

    ``decompose=True`` (the published SLaK): ``LoRA1`` (K x s) + ``LoRA2`` (s x K) + ``small_conv`` (s x s).
    ``decompose=False``: ``lkb_origin`` (K x K) + ``small_conv`` (RepLKNet-style). Each branch is conv (+ BN
    when ``bn``); the small branch exists only when ``small_kernel < kernel_size``. Keys are the official ones
    (``LoRA1.conv.weight``, ``LoRA1.bn.*``, ...). The large branches carry sparsity masks
    (``LoRA1.conv.weight_mask``; the official ``--only-L`` run prunes exactly these); ``small_conv`` does not.

    ``reparameterize()`` (ours; the official code has none) merges everything into ``lkb_reparam`` (K x K
    depthwise conv with bias), exactly in eval mode; ``deploy=True`` builds that form directly.
    """

    def __init__(self, channels: int, kernel_size: int, small_kernel: int | None = 5, stride: int = 1,
                 decompose: bool = True, bn: bool = True, deploy: bool = False) -> None:
        super().__init__()
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        _check_odd(kernel_size, "kernel_size")
        if small_kernel is not None:
            _check_odd(small_kernel, "small_kernel")
        if decompose and (small_kernel is None or small_kernel >= kernel_size):
            raise ValueError(f"small_kernel must be smaller than kernel_size={kernel_size} to decompose, "
                             f"got {small_kernel!r}")
        self.channels = channels
        self.kernel_size = kernel_size
        self.small_kernel = small_kernel
        self.stride = stride
        self.decompose = decompose
        if deploy:
            self.lkb_reparam = DepthwiseConv2d(channels, kernel_size, stride=stride, bias=True)
            return
        if decompose:
            self.LoRA1 = _conv_branch(channels, (kernel_size, small_kernel), stride, bn, sparse=True)
            self.LoRA2 = _conv_branch(channels, (small_kernel, kernel_size), stride, bn, sparse=True)
        else:
            self.lkb_origin = _conv_branch(channels, kernel_size, stride, bn, sparse=True)
        if small_kernel is not None and small_kernel < kernel_size:
            self.small_conv = _conv_branch(channels, small_kernel, stride, bn, sparse=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "lkb_reparam"):
            return self.lkb_reparam(x)
        if self.decompose:
            out = self.LoRA1(x) + self.LoRA2(x)
        else:
            out = self.lkb_origin(x)
        if hasattr(self, "small_conv"):
            out = out + self.small_conv(x)
        return out

    def _branch_kernel_bias(self, branch: nn.Sequential) -> tuple[torch.Tensor, torch.Tensor]:
        conv = branch.conv
        weight = conv.masked_weight() if isinstance(conv, SparseDepthwiseConv2d) else conv.weight
        if hasattr(branch, "bn"):
            weight, bias = fuse_bn(weight, branch.bn)
        else:
            bias = torch.zeros(self.channels, device=weight.device, dtype=weight.dtype)
        return pad_kernel_to(weight, (self.kernel_size, self.kernel_size)), bias

    @torch.no_grad()
    def get_equivalent_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (C, 1, K, K) kernel and (C,) bias of the merged conv (masks applied, eval-mode BN statistics)."""
        names = ("LoRA1", "LoRA2") if self.decompose else ("lkb_origin",)
        if hasattr(self, "small_conv"):
            names = (*names, "small_conv")
        kernel, bias = self._branch_kernel_bias(getattr(self, names[0]))
        for name in names[1:]:
            k, b = self._branch_kernel_bias(getattr(self, name))
            kernel, bias = kernel + k, bias + b
        return kernel, bias

    @torch.no_grad()
    def reparameterize(self) -> None:
        if hasattr(self, "lkb_reparam"):
            return
        kernel, bias = self.get_equivalent_kernel_bias()
        conv = DepthwiseConv2d.from_weights(kernel, bias, stride=self.stride)
        for name in ("LoRA1", "LoRA2", "lkb_origin", "small_conv"):
            if hasattr(self, name):
                delattr(self, name)
        self.lkb_reparam = conv

    def extra_repr(self) -> str:
        return (f"{self.channels}, kernel_size={self.kernel_size}, small_kernel={self.small_kernel}, "
                f"stride={self.stride}, decompose={self.decompose}")

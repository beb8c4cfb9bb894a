"""Small shared blocks: GRN, squeeze-and-excitation, ConvNeXt-style LayerNorm, BN factory.

State-dict layouts follow the official UniRepLKNet / ConvNeXt releases so their checkpoints load strictly.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class GRN(nn.Module):
    """Global Response Normalization (ConvNeXt V2, Sec. 3) on channels-last input (N, H, W, C).

    ``y = (gamma * Nx + 1) * x + beta`` with ``Nx = ||x||_{HW} / (mean_C ||x||_{HW} + eps)``.
    Keys ``gamma``, ``beta``, each (1, 1, 1, C) (zeros at init: identity). ``use_bias=False`` drops ``beta``
    (UniRepLKNet's deploy form, where ``beta`` is folded into the following Linear).
    """

    def __init__(self, dim: int, use_bias: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        self.use_bias = use_bias
        self.eps = eps
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        if use_bias:
            self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = torch.linalg.vector_norm(x, ord=2, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + self.eps)
        # the (N, 1, 1, C) scale in x's dtype: under bf16 autocast, fp32 gamma would promote the full-size product to
        # fp32 (twice the bytes written, and a cast back before the next Linear)
        y = (self.gamma * nx + 1).to(x.dtype) * x
        return y + self.beta.to(x.dtype) if self.use_bias else y


class SEBlock(nn.Module):
    """Squeeze-and-excitation (Hu et al., 2018) on (N, C, H, W): global mean -> ``down`` 1x1 conv -> act ->
    ``up`` 1x1 conv -> gate -> channel-wise rescale. Keys ``down.{weight,bias}``, ``up.{weight,bias}``.

    Defaults (ReLU, sigmoid) are UniRepLKNet's.
    """

    def __init__(self, channels: int, internal_channels: int, act_layer: type[nn.Module] = nn.ReLU,
                 gate: Callable[[torch.Tensor], torch.Tensor] = torch.sigmoid) -> None:
        super().__init__()
        if channels <= 0 or internal_channels <= 0:
            raise ValueError(f"channels and internal_channels must be positive, got {channels}, "
                             f"{internal_channels}")
        self.down = nn.Conv2d(channels, internal_channels, 1, bias=True)
        self.up = nn.Conv2d(internal_channels, channels, 1, bias=True)
        self.nonlinear = act_layer()
        self.gate = gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3), keepdim=True)
        s = self.gate(self.up(self.nonlinear(self.down(s))))
        return x * s


class LayerNorm(nn.Module):
    """ConvNeXt's LayerNorm over the channel dim, for ``channels_first`` (N, C, H, W) (default) or
    ``channels_last`` (N, ..., C) input. Keys ``weight``, ``bias`` of shape (C,).
    """

    def __init__(self, normalized_shape: int, eps: float = 1e-6, data_format: str = "channels_first") -> None:
        super().__init__()
        if data_format not in ("channels_first", "channels_last"):
            raise ValueError(f"data_format must be 'channels_first' or 'channels_last', got {data_format!r}")
        self.weight = nn.Parameter(torch.ones(normalized_shape))
        self.bias = nn.Parameter(torch.zeros(normalized_shape))
        self.eps = eps
        self.data_format = data_format
        self.normalized_shape = (normalized_shape,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.data_format == "channels_last":
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape[0]}, eps={self.eps}, data_format={self.data_format}"


def get_bn(channels: int, use_sync_bn: bool = False) -> nn.BatchNorm2d | nn.SyncBatchNorm:
    """BatchNorm2d, or SyncBatchNorm when asked for and a process group exists (same state-dict keys)."""
    if use_sync_bn and dist.is_available() and dist.is_initialized():
        return nn.SyncBatchNorm(channels)
    return nn.BatchNorm2d(channels)

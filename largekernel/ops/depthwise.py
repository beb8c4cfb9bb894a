"""Depthwise 'same' convolution: the single dispatch point between the fast kernels and PyTorch."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Stride-1 depthwise convolution with 'same' padding.

    x: (N, C, H, W); weight: (C, 1, kh, kw); bias: (C,) or None. Returns (N, C, H, W).
    Odd kernels are centred; for even kernels the extra tap sits on the top/left (PyTorch's 'same').
    """
    if weight.dim() != 4 or weight.shape[1] != 1:
        raise ValueError(f"depthwise weight must be (C, 1, kh, kw), got {tuple(weight.shape)}")
    if x.shape[1] != weight.shape[0]:
        raise ValueError(f"input has {x.shape[1]} channels but the depthwise weight has {weight.shape[0]}")
    return F.conv2d(x, weight, bias, padding="same", groups=weight.shape[0])

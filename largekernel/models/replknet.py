"""RepLKNet: "Scaling Up Your Kernels to 31x31: Revisiting Large Kernel Design in CNNs" (Ding et al., CVPR 2022).

Layout and state-dict names follow the official release (DingXiaoH/RepLKNet-pytorch), so its checkpoints load
strictly in training form and in merged (``lkb_reparam``) form. Every depthwise conv goes through
:class:`largekernel.layers.DepthwiseConv2d`, i.e. through the fast-kernel dispatch point.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.utils.checkpoint
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.layers import DropPath
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from largekernel.layers import ReparamLargeKernelConv, check_kernel_pair, conv_bn, conv_bn_relu
from largekernel.layers.conv import fold_pre_bn

__all__ = ["RepLKNet", "RepLKNetCfg", "RepLKBlock", "ConvFFN"]


def _batch_norm(channels: int, sync_bn: bool) -> nn.Module:
    # SyncBN only makes sense (and only works) inside an initialised process group.
    if sync_bn and torch.distributed.is_available() and torch.distributed.is_initialized():
        return nn.SyncBatchNorm(channels)
    return nn.BatchNorm2d(channels)


def _fold_pre_bn_into_pw1(block: nn.Module, bn_name: str) -> None:
    """Fold ``block.pw1``'s own BN, then the BN before it (``bn_name``) into its 1x1 conv; the pre-BN becomes an
    Identity."""
    block.pw1.fold_bn()
    if not isinstance(getattr(block, bn_name), nn.Identity):
        block.pw1.conv = fold_pre_bn(getattr(block, bn_name), block.pw1.conv)
        setattr(block, bn_name, nn.Identity())


class RepLKBlock(nn.Module):
    """Sec. 4.1: pre-BN -> 1x1 conv-BN-ReLU -> large depthwise conv (+ small kernel) -> ReLU -> 1x1 conv-BN,
    identity shortcut with drop path. (N, C, H, W) -> (N, C, H, W); the depthwise part has C*dw_ratio channels.
    """

    def __init__(self, channels: int, dw_channels: int, kernel_size: int, small_kernel: int | None,
                 drop_path: float = 0.0, sync_bn: bool = False, deploy: bool = False) -> None:
        super().__init__()
        self.pw1 = conv_bn_relu(channels, dw_channels, 1)
        self.pw2 = conv_bn(dw_channels, channels, 1)
        self.large_kernel = ReparamLargeKernelConv(dw_channels, kernel_size, small_kernel, deploy=deploy)
        self.lk_nonlinear = nn.ReLU()
        self.prelkb_bn = _batch_norm(channels, sync_bn)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def fold_bn(self) -> None:
        """Deploy with ``fold_bn=True``: the 1x1 convs absorb their BNs and the pre-BN (exact in eval mode)."""
        _fold_pre_bn_into_pw1(self, "prelkb_bn")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pw1(self.prelkb_bn(x))
        out = self.pw2(self.lk_nonlinear(self.large_kernel(out)))
        return x + self.drop_path(out)


class ConvFFN(nn.Module):
    """Sec. 4.1: pre-BN -> 1x1 conv-BN -> GELU -> 1x1 conv-BN, identity shortcut. (N, C, H, W) -> same."""

    def __init__(self, channels: int, hidden_channels: int, drop_path: float = 0.0, sync_bn: bool = False) -> None:
        super().__init__()
        self.preffn_bn = _batch_norm(channels, sync_bn)
        self.pw1 = conv_bn(channels, hidden_channels, 1)
        self.pw2 = conv_bn(hidden_channels, channels, 1)
        self.nonlinear = nn.GELU()
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def fold_bn(self) -> None:
        """As RepLKBlock.fold_bn: pw1 absorbs its BN and the pre-BN."""
        _fold_pre_bn_into_pw1(self, "preffn_bn")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pw2(self.nonlinear(self.pw1(self.preffn_bn(x))))
        return x + self.drop_path(out)


class RepLKNetStage(nn.Module):
    """``depth`` pairs of (RepLKBlock, ConvFFN) at one resolution; ``norm`` is a BN only for dense-prediction
    features of RepLKNet-XL (``norm_intermediate_features``), else identity."""

    def __init__(self, channels: int, depth: int, kernel_size: int, small_kernel: int | None,
                 drop_path: Sequence[float], dw_ratio: float = 1.0, ffn_ratio: float = 4.0,
                 norm_intermediate_features: bool = False, sync_bn: bool = False, deploy: bool = False) -> None:
        super().__init__()
        self.grad_checkpointing = False
        blocks: list[nn.Module] = []
        for i in range(depth):
            blocks.append(RepLKBlock(channels, int(channels * dw_ratio), kernel_size, small_kernel, drop_path[i],
                                     sync_bn=sync_bn, deploy=deploy))
            blocks.append(ConvFFN(channels, int(channels * ffn_ratio), drop_path[i], sync_bn=sync_bn))
        self.blocks = nn.ModuleList(blocks)
        self.norm = _batch_norm(channels, sync_bn) if norm_intermediate_features else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting() and x.requires_grad:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


@dataclass(frozen=True)
class RepLKNetCfg:
    """One RepLKNet size: per-stage kernels, depths (block pairs) and widths; the rest of the design."""

    large_kernel_sizes: tuple[int, ...] = (31, 29, 27, 13)
    layers: tuple[int, ...] = (2, 2, 18, 2)
    channels: tuple[int, ...] = (128, 256, 512, 1024)
    small_kernel: int | None = 5
    dw_ratio: float = 1.0
    ffn_ratio: float = 4.0
    extra: dict = field(default_factory=dict)


class RepLKNet(nn.Module):
    """RepLKNet (Sec. 4.1, Fig. 4): stem (stride 4) -> 4 stages of RepLK blocks + ConvFFNs, joined by
    transitions (1x1 conv-BN-ReLU, depthwise 3x3 stride-2 conv-BN-ReLU) -> BN -> global pool -> Linear.

    Input (N, in_chans, H, W); features (N, channels[-1], H/32, W/32); logits (N, num_classes).
    ``small_kernel=0`` (or None) builds no small-kernel branch; pass 0 through ``timm.create_model``, which drops
    keyword arguments whose value is None.
    """

    def __init__(
        self,
        large_kernel_sizes: Sequence[int] = (31, 29, 27, 13),
        layers: Sequence[int] = (2, 2, 18, 2),
        channels: Sequence[int] = (128, 256, 512, 1024),
        small_kernel: int | None = 5,
        dw_ratio: float = 1.0,
        ffn_ratio: float = 4.0,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.3,
        norm_intermediate_features: bool = False,
        sync_bn: bool = False,
        deploy: bool = False,
    ) -> None:
        super().__init__()
        large_kernel_sizes, layers, channels = tuple(large_kernel_sizes), tuple(layers), tuple(channels)
        small_kernel = small_kernel or None
        if not (len(large_kernel_sizes) == len(layers) == len(channels)) or not layers:
            raise ValueError(f"large_kernel_sizes {large_kernel_sizes}, layers {layers} and channels {channels} "
                             "must have the same, non-zero length")
        for k in large_kernel_sizes:
            check_kernel_pair(k, small_kernel)
        if in_chans < 1:
            raise ValueError(f"in_chans must be >= 1, got {in_chans}")
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.large_kernel_sizes = large_kernel_sizes
        self.num_features = self.head_hidden_size = channels[-1]
        self.grad_checkpointing = False

        base = channels[0]
        self.stem = nn.ModuleList([
            conv_bn_relu(in_chans, base, 3, stride=2, padding=1),
            conv_bn_relu(base, base, 3, stride=1, padding=1, groups=base),
            conv_bn_relu(base, base, 1),
            conv_bn_relu(base, base, 3, stride=2, padding=1, groups=base),
        ])
        n_blocks = sum(layers)
        dpr = [drop_path_rate * i / max(n_blocks - 1, 1) for i in range(n_blocks)]  # linspace, meta-safe
        self.stages = nn.ModuleList()
        self.transitions = nn.ModuleList()
        self.feature_info = []
        for i, depth in enumerate(layers):
            self.stages.append(RepLKNetStage(
                channels[i], depth, large_kernel_sizes[i], small_kernel, dpr[sum(layers[:i]):sum(layers[:i + 1])],
                dw_ratio=dw_ratio, ffn_ratio=ffn_ratio, norm_intermediate_features=norm_intermediate_features,
                sync_bn=sync_bn, deploy=deploy))
            self.feature_info.append(dict(num_chs=channels[i], reduction=4 * 2 ** i, module=f"stages.{i}"))
            if i < len(layers) - 1:
                self.transitions.append(nn.Sequential(
                    conv_bn_relu(channels[i], channels[i + 1], 1),
                    conv_bn_relu(channels[i + 1], channels[i + 1], 3, stride=2, padding=1, groups=channels[i + 1]),
                ))
        self.norm = _batch_norm(channels[-1], sync_bn)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(channels[-1], num_classes) if num_classes > 0 else nn.Identity()

    checkpoint_filter_fn = staticmethod(lambda state, model: checkpoint_filter_fn(state, model))

    # ---- timm surface -------------------------------------------------------------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^stem",
            blocks=r"^(?:stages|transitions)\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^stages\.(\d+)\.norm", (99998,)),
                (r"^transitions\.(\d+)", (99999,)),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set()

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        device = self.stem[0].conv.weight.device
        self.head = nn.Linear(self.num_features, num_classes, device=device) if num_classes > 0 else nn.Identity()

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"RepLKNet expects input (N, {self.in_chans}, H, W), got {tuple(x.shape)}")

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.stem:
            x = layer(x)
        return x

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs (strides 4, 8, 16, 32) selected by ``indices``, each after the stage's ``norm``."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        self._check_input(x)
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        intermediates = []
        x = self._stem(x)
        last = max_index if (stop_early or intermediates_only) else len(self.stages) - 1
        for i in range(last + 1):
            x = self.stages[i](x)
            if i in take_indices:
                intermediates.append(self.stages[i].norm(x))
            if i < len(self.transitions) and i < last:
                x = self.transitions[i](x)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        self.transitions = self.transitions[:max_index]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        x = self._stem(x)
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i < len(self.transitions):
                x = self.transitions[i](x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.norm(x)
        if self.global_pool:
            x = self.avgpool(x).flatten(1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: RepLKNet) -> dict[str, torch.Tensor]:
    """Official checkpoints already use our names; drop heads/norms the model does not have."""
    own = model.state_dict()
    out = {}
    for k, v in state_dict.items():
        if k.startswith(("head.", "norm.")) and k not in own:
            continue  # features-only / headless model
        out[k] = v
    return out


# ---- configurations -----------------------------------------------------------------------------------------
_B = dict(layers=(2, 2, 18, 2), channels=(128, 256, 512, 1024), small_kernel=5)
MODEL_CFGS: dict[str, RepLKNetCfg] = {
    "replknet_31b": RepLKNetCfg(large_kernel_sizes=(31, 29, 27, 13), **_B),
    "replknet_31l": RepLKNetCfg(large_kernel_sizes=(31, 29, 27, 13), layers=(2, 2, 18, 2),
                                channels=(192, 384, 768, 1536), small_kernel=5),
    "replknet_xl": RepLKNetCfg(large_kernel_sizes=(27, 27, 27, 13), layers=(2, 2, 18, 2),
                               channels=(256, 512, 1024, 2048), small_kernel=None, dw_ratio=1.5),
    # Kernel-size ablations of Table 5 (RepLKNet-31B layout). Small kernel 5 cannot sit inside a 3x3.
    "replknet_3": RepLKNetCfg(large_kernel_sizes=(3, 3, 3, 3), layers=(2, 2, 18, 2),
                              channels=(128, 256, 512, 1024), small_kernel=None),
    "replknet_7": RepLKNetCfg(large_kernel_sizes=(7, 7, 7, 7), **_B),
    "replknet_13": RepLKNetCfg(large_kernel_sizes=(13, 13, 13, 13), **_B),
    "replknet_25": RepLKNetCfg(large_kernel_sizes=(25, 25, 25, 13), **_B),
    # Compact variants for CPU training and tests (not in the paper).
    "replknet_micro": RepLKNetCfg(large_kernel_sizes=(13, 13, 13, 7), layers=(1, 1, 2, 1),
                                  channels=(32, 64, 128, 256), small_kernel=3),
    "replknet_test": RepLKNetCfg(large_kernel_sizes=(7, 7, 5, 5), layers=(1, 1, 1, 1),
                                 channels=(8, 16, 16, 32), small_kernel=3),
}


def _create_replknet(variant: str, pretrained: bool = False, **kwargs) -> RepLKNet:
    cfg = asdict(MODEL_CFGS[variant])
    cfg.pop("extra")
    cfg.update(kwargs)
    return build_model_with_cfg(
        RepLKNet, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2, 3)),
        **cfg,
    )


def _cfg(file: str = "", top1: float | None = None, **kwargs) -> dict:
    notes = (f"reported ImageNet-1K top-1 {top1}%",) if top1 is not None else ()
    return {
        "file": file, "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.875, "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.0.conv", "classifier": "head", "paper_ids": "arXiv:2203.06717",
        "origin_url": "https://github.com/DingXiaoH/RepLKNet-pytorch", "notes": notes, **kwargs,
    }


_384 = dict(input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0)
default_cfgs = generate_default_cfgs({
    "replknet_31b.in1k": _cfg("RepLKNet-31B_ImageNet-1K_224.pth", 83.5),
    "replknet_31b.in1k_384": _cfg("RepLKNet-31B_ImageNet-1K_384.pth", 84.8, **_384),
    "replknet_31b.in22k_ft_in1k": _cfg("RepLKNet-31B_ImageNet-22K-to-1K_224.pth", 85.2),
    "replknet_31b.in22k_ft_in1k_384": _cfg("RepLKNet-31B_ImageNet-22K-to-1K_384.pth", 86.0, **_384),
    "replknet_31b.in22k": _cfg("RepLKNet-31B_ImageNet-22K.pth", num_classes=21841),
    "replknet_31l.in22k_ft_in1k_384": _cfg("RepLKNet-31L_ImageNet-22K-to-1K_384.pth", 86.6, **_384),
    "replknet_31l.in22k": _cfg("RepLKNet-31L_ImageNet-22K.pth", num_classes=21841),
    "replknet_xl.megdata73m_ft_in1k_320": _cfg(
        "RepLKNet-XL_MegData73M_ImageNet1K.pth", 87.8, input_size=(3, 320, 320), pool_size=(10, 10),
        crop_pct=1.0, mean=IMAGENET_INCEPTION_MEAN, std=IMAGENET_INCEPTION_STD),
    "replknet_3": _cfg(),
    "replknet_7": _cfg(),
    "replknet_13": _cfg(),
    "replknet_25": _cfg(),
    "replknet_micro": _cfg(),
    "replknet_test": _cfg(),
})


@register_model
def replknet_31b(pretrained: bool = False, **kwargs) -> RepLKNet:
    """RepLKNet-31B: kernels 31/29/27/13, depths 2/2/18/2, widths 128..1024, small kernel 5."""
    return _create_replknet("replknet_31b", pretrained, **kwargs)


@register_model
def replknet_31l(pretrained: bool = False, **kwargs) -> RepLKNet:
    """RepLKNet-31L: RepLKNet-31B with widths 192..1536."""
    return _create_replknet("replknet_31l", pretrained, **kwargs)


@register_model
def replknet_xl(pretrained: bool = False, **kwargs) -> RepLKNet:
    """RepLKNet-XL: kernels 27/27/27/13, widths 256..2048, dw_ratio 1.5, no small kernel; mean/std 0.5."""
    return _create_replknet("replknet_xl", pretrained, **kwargs)


@register_model
def replknet_3(pretrained: bool = False, **kwargs) -> RepLKNet:
    """Table 5 ablation: RepLKNet-31B layout with 3x3 kernels in every stage (no small-kernel branch)."""
    return _create_replknet("replknet_3", pretrained, **kwargs)


@register_model
def replknet_7(pretrained: bool = False, **kwargs) -> RepLKNet:
    """Table 5 ablation: 7x7 kernels in every stage."""
    return _create_replknet("replknet_7", pretrained, **kwargs)


@register_model
def replknet_13(pretrained: bool = False, **kwargs) -> RepLKNet:
    """Table 5 ablation: 13x13 kernels in every stage."""
    return _create_replknet("replknet_13", pretrained, **kwargs)


@register_model
def replknet_25(pretrained: bool = False, **kwargs) -> RepLKNet:
    """Table 5 ablation: kernels 25/25/25/13."""
    return _create_replknet("replknet_25", pretrained, **kwargs)


@register_model
def replknet_micro(pretrained: bool = False, **kwargs) -> RepLKNet:
    """Compact RepLKNet for CPU training: widths 32..256, depths 1/1/2/1, kernels 13/13/13/7, small kernel 3."""
    return _create_replknet("replknet_micro", pretrained, **kwargs)


@register_model
def replknet_test(pretrained: bool = False, **kwargs) -> RepLKNet:
    """Tiny RepLKNet for unit tests."""
    return _create_replknet("replknet_test", pretrained, **kwargs)

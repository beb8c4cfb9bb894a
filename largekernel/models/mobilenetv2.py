"""MobileNetV2 with configurable depthwise kernels, the RepLKNet guideline testbed (Ding et al., CVPR 2022, Sec. 3).

The paper's guidelines 2, 3 and 5 are ablations on MobileNetV2 ("Inverted Residuals and Linear Bottlenecks",
Sandler et al., CVPR 2018): the depthwise kernel is enlarged (per stage), identity shortcuts can be removed,
and a parallel small-kernel depthwise branch can be added during training and merged into the large kernel
by ``reparameterize()`` (:class:`largekernel.layers.ReparamLargeKernelConv`, keys ``lkb_origin``/``small_conv``
-> ``lkb_reparam``). Random initialisation only: no published checkpoint has this layout.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from largekernel.layers import ConvNorm, ReparamLargeKernelConv, check_kernel_pair

__all__ = ["LKMobileNetV2", "LKInvertedResidual", "MBV2_ARCH", "MBV2_TINY_ARCH"]

# (expand ratio t, output channels c, blocks n, first stride s) per stage, Table 2 of Sandler et al.
MBV2_ARCH: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
# A narrow, shallow MobileNetV2 for CPU experiments: same seven-stage stride pattern.
MBV2_TINY_ARCH: tuple[tuple[int, int, int, int], ...] = (
    (1, 8, 1, 1), (4, 12, 2, 2), (4, 16, 2, 2), (4, 24, 2, 2), (4, 32, 1, 1), (4, 48, 2, 2), (4, 64, 1, 1))


def _make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class LKInvertedResidual(nn.Module):
    """1x1 expand conv-BN-ReLU6 -> KxK depthwise conv-BN (+ parallel kxk conv-BN) -> ReLU6 -> 1x1 conv-BN,
    plus an identity shortcut when stride is 1, widths match and ``shortcut`` is on.

    (N, in_chs, H, W) -> (N, out_chs, H/stride, W/stride).
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int, expand_ratio: float, kernel_size: int,
                 small_kernel: int | None = None, shortcut: bool = True) -> None:
        super().__init__()
        mid = int(round(in_chs * expand_ratio))
        self.has_shortcut = shortcut and stride == 1 and in_chs == out_chs
        self.conv_pw = ConvNorm(in_chs, mid, 1, act_layer=nn.ReLU6) if expand_ratio != 1 else nn.Identity()
        self.conv_dw = ReparamLargeKernelConv(mid, kernel_size, small_kernel, stride=stride)
        self.act_dw = nn.ReLU6()
        self.conv_pwl = ConvNorm(mid, out_chs, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_pwl(self.act_dw(self.conv_dw(self.conv_pw(x))))
        return x + out if self.has_shortcut else out


class LKMobileNetV2(nn.Module):
    """MobileNetV2: stem 3x3/2 conv-BN-ReLU6 -> 7 stages of inverted residuals -> 1x1 conv-BN-ReLU6 head ->
    global average pool -> dropout -> Linear.

    ``kernel_size``: one depthwise kernel for all stages or one per stage (7); ``small_kernel``: parallel
    re-param branch (None or 0: off), likewise per stage; ``shortcut``: identity shortcuts on/off.
    Input (N, in_chans, H, W); features (N, num_features, H/32, W/32) for the default stride pattern.
    Intermediates (``forward_intermediates``/``features_only``) are the outputs of stages 1, 2, 4, 6
    (strides 4, 8, 16, 32).
    """

    def __init__(
        self,
        kernel_size: int | Sequence[int] = 3,
        small_kernel: int | None | Sequence[int | None] = None,
        shortcut: bool = True,
        width_mult: float = 1.0,
        arch: Sequence[Sequence[int]] = MBV2_ARCH,
        stem_chs: int = 32,
        num_features: int = 1280,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        drop_rate: float = 0.2,
    ) -> None:
        super().__init__()
        arch = tuple(tuple(int(v) for v in stage) for stage in arch)
        n_st = len(arch)
        if n_st == 0 or any(len(s) != 4 or min(s) < 1 for s in arch):
            raise ValueError(f"arch must be non-empty (t, c, n, s) tuples of positive ints, got {arch}")
        kernels = [kernel_size] * n_st if isinstance(kernel_size, int) else list(kernel_size)
        smalls = [small_kernel] * n_st if small_kernel is None or isinstance(small_kernel, int) else list(small_kernel)
        smalls = [sk or None for sk in smalls]  # 0 means no branch (timm.create_model drops None kwargs)
        if len(kernels) != n_st:
            raise ValueError(f"kernel_size must be an int or {n_st} ints, got {kernel_size!r}")
        if len(smalls) != n_st:
            raise ValueError(f"small_kernel must be None, an int or {n_st} values, got {small_kernel!r}")
        for k, sk in zip(kernels, smalls):
            if not isinstance(k, int) or k < 1 or k % 2 == 0:
                raise ValueError(f"kernel_size must be odd positive ints, got {kernel_size!r}")
            check_kernel_pair(k, sk)
        if width_mult <= 0:
            raise ValueError(f"width_mult must be positive, got {width_mult}")
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.kernel_sizes = tuple(kernels)
        self.grad_checkpointing = False

        stem = _make_divisible(stem_chs * width_mult)
        self.conv_stem = ConvNorm(in_chans, stem, 3, stride=2, act_layer=nn.ReLU6)
        self.stages = nn.ModuleList()
        self.feature_info = []
        chs, reduction = stem, 2
        for i, ((t, c, n, s), k, sk) in enumerate(zip(arch, kernels, smalls)):
            out = _make_divisible(c * width_mult)
            blocks = [LKInvertedResidual(chs if j == 0 else out, out, s if j == 0 else 1, t, k, sk, shortcut)
                      for j in range(n)]
            self.stages.append(nn.Sequential(*blocks))
            chs, reduction = out, reduction * s
            # the last stage at each stride feeds the dense-prediction features
            if i + 1 == n_st or arch[i + 1][3] > 1:
                if reduction > 2:
                    self.feature_info.append(dict(num_chs=out, reduction=reduction, module=f"stages.{i}"))
        self._feature_stages = [int(f["module"].split(".")[1]) for f in self.feature_info]
        self.num_features = self.head_hidden_size = (
            _make_divisible(num_features * width_mult) if width_mult > 1.0 else num_features)
        self.conv_head = ConvNorm(chs, self.num_features, 1, act_layer=nn.ReLU6)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.head_drop = nn.Dropout(drop_rate)
        self.classifier = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    # ---- timm surface -------------------------------------------------------------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^conv_stem", blocks=r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set()

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        device = self.conv_stem.conv.weight.device
        self.classifier = nn.Linear(self.num_features, num_classes, device=device) if num_classes > 0 else nn.Identity()

    def _run_stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting() and x.requires_grad:
            return torch.utils.checkpoint.checkpoint(self.stages[i], x, use_reentrant=False)
        return self.stages[i](x)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"LKMobileNetV2 expects input (N, {self.in_chans}, H, W), got {tuple(x.shape)}")

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Outputs of the stride-4/8/16/32 stages selected by ``indices`` (timm semantics)."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        self._check_input(x)
        take_indices, max_index = feature_take_indices(len(self._feature_stages), indices)
        take_stages = {self._feature_stages[i] for i in take_indices}
        last = self._feature_stages[max_index] if (stop_early or intermediates_only) else len(self.stages) - 1
        intermediates = []
        x = self.conv_stem(x)
        for i in range(last + 1):
            x = self._run_stage(i, x)
            if i in take_stages:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return self.conv_head(x), intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        take_indices, max_index = feature_take_indices(len(self._feature_stages), indices)
        self.stages = self.stages[:self._feature_stages[max_index] + 1]
        if prune_head:
            self.conv_head = nn.Identity()
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        x = self.conv_stem(x)
        for i in range(len(self.stages)):
            x = self._run_stage(i, x)
        return self.conv_head(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool:
            x = self.avgpool(x).flatten(1)
        x = self.head_drop(x)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: LKMobileNetV2) -> dict[str, torch.Tensor]:
    """Our own checkpoints load as saved; a headless model drops the classifier."""
    own = model.state_dict()
    return {k: v for k, v in state_dict.items() if not (k.startswith("classifier.") and k not in own)}


def _cfg(**kwargs) -> dict:
    return {
        "file": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.875,
        "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "conv_stem.conv", "classifier": "classifier", "paper_ids": "arXiv:2203.06717",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "lk_mobilenetv2": _cfg(),
    "lk_mobilenetv2_k13": _cfg(),
    "lk_mobilenetv2_k13_rep3": _cfg(),
    "lk_mobilenetv2_tiny": _cfg(input_size=(3, 64, 64), pool_size=(2, 2)),
})


def _num_feature_levels(arch: Sequence[Sequence[int]]) -> int:
    """Feature levels of an arch (stage ends at stride > 2 where the stride changes next, and the last)."""
    strides, reduction, levels = [int(s[3]) for s in arch], 2, 0
    for i, s in enumerate(strides):
        reduction *= s
        if (i + 1 == len(strides) or strides[i + 1] > 1) and reduction > 2:
            levels += 1
    return levels


def _create_lk_mobilenetv2(variant: str, pretrained: bool = False, **kwargs) -> LKMobileNetV2:
    levels = _num_feature_levels(kwargs.get("arch", MBV2_ARCH))
    return build_model_with_cfg(
        LKMobileNetV2, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=tuple(range(levels))),
        **kwargs,
    )


@register_model
def lk_mobilenetv2(pretrained: bool = False, **kwargs) -> LKMobileNetV2:
    """MobileNetV2 1.0 (3x3 depthwise); ``kernel_size``/``small_kernel``/``shortcut`` configure the ablations."""
    return _create_lk_mobilenetv2("lk_mobilenetv2", pretrained, **kwargs)


@register_model
def lk_mobilenetv2_k13(pretrained: bool = False, **kwargs) -> LKMobileNetV2:
    """MobileNetV2 1.0 with 13x13 depthwise kernels in every stage (guideline 2)."""
    return _create_lk_mobilenetv2("lk_mobilenetv2_k13", pretrained, **dict(dict(kernel_size=13), **kwargs))


@register_model
def lk_mobilenetv2_k13_rep3(pretrained: bool = False, **kwargs) -> LKMobileNetV2:
    """MobileNetV2 1.0 with 13x13 depthwise kernels and a parallel 3x3 branch merged at deploy (guideline 3)."""
    return _create_lk_mobilenetv2("lk_mobilenetv2_k13_rep3", pretrained,
                                  **dict(dict(kernel_size=13, small_kernel=3), **kwargs))


@register_model
def lk_mobilenetv2_tiny(pretrained: bool = False, **kwargs) -> LKMobileNetV2:
    """Narrow, shallow MobileNetV2 (stem 8, widths 8..64, head 128) for CPU experiments; not in the paper."""
    return _create_lk_mobilenetv2("lk_mobilenetv2_tiny", pretrained,
                                  **dict(dict(arch=MBV2_TINY_ARCH, stem_chs=8, num_features=128, drop_rate=0.0),
                                         **kwargs))

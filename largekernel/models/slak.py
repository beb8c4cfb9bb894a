"""SLaK: Sparse Large Kernel Network (Liu et al., "More ConvNets in the 2020s: Scaling up Kernels Beyond 51x51
using Sparsity", ICLR 2023; official code VITA-Group/SLaK ``models/SLaK.py``).

ConvNeXt's macro design (stem 4x4/4 conv + LN, LN + 2x2/2 conv downsampling, [3, 3, 9, 3] / [3, 3, 27, 3]
blocks) with the ConvNeXt block's 7x7 depthwise conv replaced by the decomposed large kernel (Sec. 4.1):
51x5 + 5x51 + 5x5 depthwise conv-BN branches (kernels 51/49/47/13 per stage), widths x1.3 (Sec. 4.3), trained
with dynamic sparsity 0.4 (``largekernel.train.sparse``). State-dict keys are the official ones, so released
checkpoints load strictly; ``reparameterize()`` merges each large kernel into one KxK depthwise conv
(``large_kernel.lkb_reparam.{weight,bias}``, our deploy layout; the official code has no merged form).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from largekernel.layers.blocks import LayerNorm
from largekernel.layers.decomposed import DecomposedLargeKernelConv
from largekernel.models._stages import StagedConvNet

__all__ = ["SLaK", "SLaKBlock"]


class SLaKBlock(nn.Module):
    """ConvNeXt block with SLaK's large kernel (Sec. 4): large_kernel -> LayerNorm -> Linear(C, 4C) -> GELU ->
    Linear(4C, C) -> layer scale ``gamma`` -> drop path, plus identity. (N, C, H, W) -> (N, C, H, W).
    """

    def __init__(self, dim: int, kernel_size: int, small_kernel: int | None = 5, drop_path: float = 0.0,
                 layer_scale_init_value: float = 1e-6, decompose: bool = True, bn: bool = True,
                 deploy: bool = False) -> None:
        super().__init__()
        if small_kernel is not None and small_kernel >= kernel_size and not decompose:
            small_kernel = None  # the official code drops the small branch then (e.g. ConvNeXt's "7 7 7 7 100")
        self.large_kernel = DecomposedLargeKernelConv(dim, kernel_size, small_kernel, decompose=decompose, bn=bn,
                                                      deploy=deploy)
        self.norm = LayerNorm(dim, eps=1e-6, data_format="channels_last")
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(layer_scale_init_value * torch.ones(dim)) if layer_scale_init_value > 0 else None
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.large_kernel(x).permute(0, 2, 3, 1)
        x = self.pwconv2(self.act(self.pwconv1(self.norm(x))))
        if self.gamma is not None:
            x = self.gamma * x
        return shortcut + self.drop_path(x.permute(0, 3, 1, 2))


class SLaK(StagedConvNet):
    """SLaK classifier. Input (N, in_chans, H, W) -> logits (N, num_classes); stage maps at strides 4/8/16/32.

    ``dims`` are the ConvNeXt widths before ``width_factor`` (each becomes ``int(width_factor * d)``, as the
    official code). ``kernel_size`` = (stage 1..4 large kernels, small kernel s). ``decompose``/``bn`` are
    the official ``Decom``/``bn`` flags; the defaults are the published SLaK settings.
    """

    def __init__(self, in_chans: int = 3, num_classes: int = 1000, global_pool: str = "avg",
                 depths: Sequence[int] = (3, 3, 9, 3), dims: Sequence[int] = (96, 192, 384, 768),
                 kernel_size: Sequence[int] = (51, 49, 47, 13, 5), width_factor: float = 1.3,
                 decompose: bool = True, bn: bool = True, drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 layer_scale_init_value: float = 1e-6, head_init_scale: float = 1.0, deploy: bool = False) -> None:
        super().__init__()
        if len(depths) != 4 or len(dims) != 4:
            raise ValueError(f"depths and dims must have 4 entries, got {tuple(depths)}, {tuple(dims)}")
        if len(kernel_size) != 5:
            raise ValueError(f"kernel_size must be (k1, k2, k3, k4, small), got {tuple(kernel_size)}")
        if not width_factor > 0:
            raise ValueError(f"width_factor must be positive, got {width_factor}")
        if global_pool != "avg":
            raise ValueError(f"global_pool must be 'avg', got {global_pool!r}")
        dims = [int(d * width_factor) for d in dims]
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.kernel_size = tuple(kernel_size)
        self.grad_checkpointing = False

        self.downsample_layers = nn.ModuleList()  # [0] is the stem
        self.downsample_layers.append(nn.Sequential(nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4),
                                                    LayerNorm(dims[0], eps=1e-6, data_format="channels_first")))
        for i in range(3):
            self.downsample_layers.append(nn.Sequential(LayerNorm(dims[i], eps=1e-6, data_format="channels_first"),
                                                        nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2)))
        n_blocks = sum(depths)
        dp_rates = [drop_path_rate * i / max(n_blocks - 1, 1) for i in range(n_blocks)]  # linspace(0, rate)
        self.stages = nn.ModuleList()
        self.feature_info = []
        cur = 0
        for i in range(4):
            self.stages.append(nn.Sequential(*[
                SLaKBlock(dims[i], kernel_size[i], kernel_size[-1], dp_rates[cur + j], layer_scale_init_value,
                          decompose=decompose, bn=bn, deploy=deploy)
                for j in range(depths[i])]))
            cur += depths[i]
            self.feature_info.append(dict(num_chs=dims[i], reduction=4 * 2 ** i, module=f"stages.{i}"))
        self.num_features = self.head_hidden_size = dims[-1]
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()

        self.apply(self._init_weights)
        if isinstance(self.head, nn.Linear):
            self.head.weight.data.mul_(head_init_scale)
            self.head.bias.data.mul_(head_init_scale)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^downsample_layers\.0\.",
            blocks=r"^stages\.(\d+)" if coarse else [
                (r"^downsample_layers\.(\d+)", (0,)),
                (r"^stages\.(\d+)\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None and global_pool != "avg":
            raise ValueError(f"global_pool must be 'avg', got {global_pool!r}")
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        self.downsample_layers = self.downsample_layers[:max_index + 1]
        if prune_norm or max_index < 3:
            self.norm = nn.Identity()
        if max_index < 3:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or max_index < 3:
            self.reset_classifier(0)
        return take_indices

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.norm(x.mean((-2, -1))))
        return x if pre_logits else self.head(x)


@torch.no_grad()
def _merge_large_kernels(state: dict[str, torch.Tensor], model: nn.Module) -> None:
    """Training-form large-kernel keys -> ``lkb_reparam`` for the model's layers already in deploy form."""
    for name, module in model.named_modules():
        if not (isinstance(module, DecomposedLargeKernelConv) and hasattr(module, "lkb_reparam")):
            continue
        prefix = f"{name}."
        if prefix + "lkb_reparam.weight" in state:
            continue
        sub = {k[len(prefix):]: state.pop(k) for k in list(state) if k.startswith(prefix)}
        if not sub:
            continue
        train_form = DecomposedLargeKernelConv(
            module.channels, module.kernel_size, module.small_kernel, module.stride,
            decompose="LoRA1.conv.weight" in sub, bn=any(".bn." in k for k in sub))
        train_form.load_state_dict(sub)
        train_form.eval().reparameterize()
        state[prefix + "lkb_reparam.weight"] = train_form.lkb_reparam.weight
        state[prefix + "lkb_reparam.bias"] = train_form.lkb_reparam.bias


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Official SLaK checkpoint (``{'model': ...}`` from its ``main.py``, or a bare state dict) -> ours.

    Names are unchanged; a ``module.`` prefix is stripped; missing ``*.weight_mask`` buffers load as ones; a
    training-form checkpoint loaded into a deploy-form model is merged on the fly.
    """
    for key in ("model", "state_dict"):
        if key in state_dict and isinstance(state_dict[key], Mapping):
            state_dict = state_dict[key]
            break
    out = {(k[7:] if k.startswith("module.") else k): v for k, v in state_dict.items()}
    _merge_large_kernels(out, model)
    return out


def _cfg(url: str = "", **kwargs: object) -> dict:
    return {
        "url": url, "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.875,
        "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "downsample_layers.0.0", "classifier": "head", "license": "mit",
        "paper_name": "More ConvNets in the 2020s: Scaling up Kernels Beyond 51x51 using Sparsity",
        "paper_ids": "arXiv:2207.03620", **kwargs,
    }


# The official weights live on Google Drive / SURFdrive (no direct URL): download the file and load it with
# ``pretrained=True, pretrained_cfg_overlay=dict(file=...)``. ``notes`` carry the reported ImageNet-1K top-1.
default_cfgs = generate_default_cfgs({
    "slak_tiny.in1k": _cfg(
        origin_url="https://drive.google.com/file/d/1Iut2f5FMS_77jGPYoUJDQzDIXOsax1u4/view",
        description="SLaK-T 51x51, ImageNet-1K 300 epochs, sparsity 0.4", notes=("top1=82.5", "epochs=300")),
    "slak_tiny.in1k_120ep": _cfg(
        origin_url="https://surfdrive.surf.nl/files/index.php/s/WiQYWNclJ9bW5XV",
        description="SLaK-T 51x51, ImageNet-1K 120 epochs", notes=("top1=81.6", "epochs=120")),
    "slak_small.in1k": _cfg(
        origin_url="https://drive.google.com/file/d/1etM6KQbnlsgDAZ37adsQJ3UI8Bbv2AVe/view",
        description="SLaK-S 51x51, ImageNet-1K 300 epochs, sparsity 0.4", notes=("top1=83.8", "epochs=300")),
    "slak_base.in1k": _cfg(
        origin_url="https://drive.google.com/file/d/1duUxUD3RSblQ6eDHd0n-u0aulwGypf1j/view",
        description="SLaK-B 51x51, ImageNet-1K 300 epochs, sparsity 0.4", notes=("top1=84.0", "epochs=300")),
    "slak_large": _cfg(description="SLaK-L (defined by the official code; no released weights)"),
    "slak_test": _cfg(input_size=(3, 64, 64), pool_size=(2, 2), description="tiny SLaK for tests"),
})


def _create_slak(variant: str, pretrained: bool = False, **kwargs: object) -> SLaK:
    return build_model_with_cfg(
        SLaK, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"), **kwargs)


@register_model
def slak_tiny(pretrained: bool = False, **kwargs: object) -> SLaK:
    """SLaK-T: depths 3/3/9/3, widths 124/249/499/998, kernels 51/49/47/13 + 5."""
    args = dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768))
    return _create_slak("slak_tiny", pretrained, **dict(args, **kwargs))


@register_model
def slak_small(pretrained: bool = False, **kwargs: object) -> SLaK:
    """SLaK-S: depths 3/3/27/3, widths 124/249/499/998."""
    args = dict(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768))
    return _create_slak("slak_small", pretrained, **dict(args, **kwargs))


@register_model
def slak_base(pretrained: bool = False, **kwargs: object) -> SLaK:
    """SLaK-B: depths 3/3/27/3, widths 166/332/665/1331."""
    args = dict(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024))
    return _create_slak("slak_base", pretrained, **dict(args, **kwargs))


@register_model
def slak_large(pretrained: bool = False, **kwargs: object) -> SLaK:
    """SLaK-L (official code's ``SLaK_large``): depths 3/3/27/3, widths 249/499/998/1996."""
    args = dict(depths=(3, 3, 27, 3), dims=(192, 384, 768, 1536))
    return _create_slak("slak_large", pretrained, **dict(args, **kwargs))


@register_model
def slak_test(pretrained: bool = False, **kwargs: object) -> SLaK:
    """Tiny SLaK for tests: one block per stage, widths 20/41/62/83, kernels 13/11/9/7 + 3."""
    args = dict(depths=(1, 1, 1, 1), dims=(16, 32, 48, 64), kernel_size=(13, 11, 9, 7, 3))
    return _create_slak("slak_test", pretrained, **dict(args, **kwargs))

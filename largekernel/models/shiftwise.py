"""ShiftWise v2 networks (ShiftwiseConv, CVPR 2025; arXiv 2401.12736): UniRepLKNet's macro design with the
shift-wise conv as token mixer. Official code: lidc54/shift-wiseConv ``backbones/SW_v2_unirep.py``.

State-dict names are the official ones (``downsample_layers``, ``stages.i.j.large_kernel.LoRAs.p.weight``,
``norm``, ``se.down|up``, ``pwconv1.1``, ``act.1.gamma|beta``, ``pwconv2.0|2``, ``gamma``, ``head``), so official
checkpoints (training or merged form) load strictly through :func:`checkpoint_filter_fn`, which adds the
tables the official code does not save (rebuilt from the official seeds).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from largekernel.layers.blocks import GRN, SEBlock
from largekernel.layers.conv import CrossDepthwiseConv2d, DepthwiseConv2d, PartialDepthwiseConv2d, fuse_bn
from largekernel.layers.shiftwise import ShiftwiseConv2d, ShiftwisePathConv
from largekernel.models._stages import StagedConvNet
from largekernel.models.unireplknet import _ToNCHW, _ToNHWC, downsample_layers, fold_ffn_tail

__all__ = ["ShiftWiseV2", "ShiftWiseBlock", "checkpoint_filter_fn"]


class ShiftWiseBlock(nn.Module):
    """SW block (official ``Block``), (N, C, H, W) -> same: shift-wise conv -> BN -> SE -> Linear(C, 4C) ->
    GELU -> GRN -> Linear(4C, C, no bias) -> BN -> layer scale -> drop path -> + input.
    """

    def __init__(self, dim: int, kernel_size: int, small_kernel: int = 3, drop_path: float = 0.0,
                 layer_scale_init_value: float = 1e-6, ghost_ratio: float = 0.23, n_path: int = 2, n_rep: int = 4,
                 bn: bool = True, impl: str = "shiftadd") -> None:
        super().__init__()
        self.large_kernel = ShiftwiseConv2d(dim, kernel_size, small_kernel, bn=bn, ghost_ratio=ghost_ratio,
                                            n_path=n_path, n_rep=n_rep, impl=impl)
        self.norm = nn.BatchNorm2d(dim)
        self.se = SEBlock(dim, dim // 4)
        self.pwconv1 = nn.Sequential(_ToNHWC(), nn.Linear(dim, 4 * dim))
        self.act = nn.Sequential(nn.GELU(), GRN(4 * dim))
        self.pwconv2 = nn.Sequential(nn.Linear(4 * dim, dim, bias=False), _ToNCHW(), nn.BatchNorm2d(dim))
        self.gamma = nn.Parameter(layer_scale_init_value * torch.ones(dim)) if layer_scale_init_value > 0 else None
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    @torch.no_grad()
    def to_dense(self, kind: str = "square", split_ghosts: bool = True) -> None:
        """Deploy the whole block, in place (inference only; exact in eval mode), with ``norm`` folded in: the
        shift-wise layer becomes one depthwise conv in input channel order, ``kind="square"`` a D x D
        :class:`DepthwiseConv2d`, ``"cross"`` a :class:`CrossDepthwiseConv2d` (k x D + D x k). ``split_ghosts``:
        the conv covers the rep channels only and the ghost channels get their scale and shift beside it
        (:class:`PartialDepthwiseConv2d`, the default: faster in both forms at 56, 28 and 14 px, slightly slower at
        7 px on the H200, docs/performance.md, whole models v13), or (False) it covers all C channels, the ghost ones
        as a centre tap. The
        layer's output channel order (rep, then ghost channels) moves into the weights of ``se`` and ``pwconv1``, so
        no channel gather or concatenation is left; GRN ``beta``, the last BN and the layer scale fold into
        ``pwconv2`` as in UniRepLKNet's deploy form. Idempotent."""
        sw = self.large_kernel
        if not isinstance(sw, ShiftwiseConv2d):
            return
        if kind not in ("square", "cross"):
            raise ValueError(f"kind must be 'square' or 'cross', got {kind!r}")
        in_index = torch.cat([sw.rep_idx, sw.ghost_idx])   # output channel o reads input channel in_index[o]
        pos = torch.argsort(in_index)                        # ... and input channel c lands on output pos[c]
        scale, shift = fuse_bn(torch.ones_like(self.norm.weight), self.norm)
        r, column = sw.rep_channels, scale.view(-1, 1, 1, 1)
        if kind == "square":
            weight, bias = sw.rep_dense_kernel()   # (R, D, D), (R,)
            weights = (weight.unsqueeze(1),)
        else:
            horizontal, vertical, bias = sw.cross_kernels()
            weights = (horizontal, vertical)
        if split_ghosts:
            # (rep_idx ascending: rep output j sits at input channel rep_idx[j]; ghost output r + g at ghost_idx[g])
            weights = tuple(column[:r] * w for w in weights)
            rep_conv = (DepthwiseConv2d.from_weights(*weights, scale[:r] * bias + shift[:r]) if kind == "square" else
                        CrossDepthwiseConv2d(*weights, scale[:r] * bias + shift[:r]))
            conv: nn.Module = PartialDepthwiseConv2d(rep_conv, sw.rep_idx, sw.in_channels, scale[r:], shift[r:])
        else:   # all C channels, input order: the ghost ones a centre tap (in the k x D kernel of a cross)
            full = []
            for i, w in enumerate(weights):
                ghost = w.new_zeros(sw.ghost_channels, *w.shape[1:])
                if i == 0:
                    ghost[:, 0, w.shape[-2] // 2, w.shape[-1] // 2] = 1
                full.append((column * torch.cat([w, ghost]))[pos])
            bias = (scale * torch.cat([bias, bias.new_zeros(sw.ghost_channels)]) + shift)[pos]
            conv = (DepthwiseConv2d.from_weights(full[0], bias) if kind == "square" else
                    CrossDepthwiseConv2d(*full, bias))
        self.large_kernel = conv
        self.norm = nn.Identity()
        self.se.down.weight.copy_(self.se.down.weight[:, pos])
        self.se.up.weight.copy_(self.se.up.weight[pos])
        self.se.up.bias.copy_(self.se.up.bias[pos])
        linear: nn.Linear = self.pwconv1[1]
        linear.weight.copy_(linear.weight[:, pos])
        fold_ffn_tail(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.se(self.norm(self.large_kernel(x)))
        y = self.pwconv2(self.act(self.pwconv1(y)))
        if self.gamma is not None:
            y = self.gamma.view(1, -1, 1, 1) * y
        return x + self.drop_path(y)


class ShiftWiseV2(StagedConvNet):
    """ShiftWise v2 (official ``ShiftWise_v2``): stem (3x3 s2 conv, LN, GELU, 3x3 s2 conv, LN) -> 4 stages of
    :class:`ShiftWiseBlock` joined by 3x3 s2 conv + LN downsamples -> global mean -> LayerNorm -> Linear.

    Input (N, in_chans, H, W); ``forward_features`` (N, dims[-1], H/32, W/32); logits (N, num_classes).
    ``kernel_sizes`` are the big kernels per stage, ``small_kernel`` the shift-wise small kernel (the official
    ``kernel_size`` list is ``[*kernel_sizes, small_kernel]``). ``impl``: the shift-wise layers' implementation
    (``"shiftadd"``, official, or ``"bands"``; same parameters and function, see :class:`ShiftwiseConv2d`).
    """

    def __init__(
        self,
        depths: Sequence[int] = (3, 3, 18, 3),
        dims: Sequence[int] = (80, 160, 320, 640),
        kernel_sizes: Sequence[int] = (51, 49, 47, 13),
        small_kernel: int = 3,
        ghost_ratio: float = 0.23,
        n_path: int = 2,
        n_rep: int = 4,
        bn: bool = True,
        impl: str = "shiftadd",
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        layer_scale_init_value: float = 1e-6,
        head_init_scale: float = 1.0,
    ) -> None:
        super().__init__()
        depths, dims, kernel_sizes = tuple(depths), tuple(dims), tuple(kernel_sizes)
        if not (len(depths) == len(dims) == len(kernel_sizes) == 4):
            raise ValueError(f"depths {depths}, dims {dims} and kernel_sizes {kernel_sizes} must have length 4")
        if in_chans < 1:
            raise ValueError(f"in_chans must be >= 1, got {in_chans}")
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.num_features = self.head_hidden_size = dims[-1]
        self.grad_checkpointing = False

        self.downsample_layers = downsample_layers(in_chans, dims)
        n_blocks = sum(depths)
        dpr = [drop_path_rate * i / max(n_blocks - 1, 1) for i in range(n_blocks)]  # linspace, meta-safe
        self.stages = nn.ModuleList()
        self.feature_info = []
        for i, depth in enumerate(depths):
            first = sum(depths[:i])
            self.stages.append(nn.Sequential(*[
                ShiftWiseBlock(dims[i], kernel_sizes[i], small_kernel, dpr[first + j], layer_scale_init_value,
                               ghost_ratio, n_path, n_rep, bn, impl)
                for j in range(depth)]))
            self.feature_info.append(dict(num_chs=dims[i], reduction=4 * 2 ** i, module=f"stages.{i}"))
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)
        if isinstance(self.head, nn.Linear):
            with torch.no_grad():
                self.head.weight.mul_(head_init_scale)
                self.head.bias.mul_(head_init_scale)

    checkpoint_filter_fn = staticmethod(lambda state, model: checkpoint_filter_fn(state, model))

    # ---- deploy --------------------------------------------------------------------------------------------
    def reparameterize(self) -> None:
        """Official deploy form: every shift-wise layer merges its paths (``LoRA``). In place."""
        for m in self.modules():
            if isinstance(m, ShiftwiseConv2d):
                m.reparameterize()

    def to_dense(self, kind: str | Sequence[str] = "square", split_ghosts: bool = True) -> None:
        """Deploy every block with its shift-wise layer as one dense depthwise conv (:meth:`ShiftWiseBlock.to_dense`):
        D x D (``"square"``) or a k x D + D x k pair (``"cross"``); a sequence gives one kind per stage (at 224 px
        ``("cross", "cross", "square", "square")`` was the fastest on the H100 and, with the fused cross kernel, on the
        H200: docs/performance.md, whole models v8); ``split_ghosts``: whether the ghost channels skip the conv. In
        place; inference only (exact in eval mode)."""
        kinds = [kind] * len(self.stages) if isinstance(kind, str) else list(kind)
        if len(kinds) != len(self.stages):
            raise ValueError(f"to_dense needs one kind per stage ({len(self.stages)}), got {len(kinds)}")
        for stage, stage_kind in zip(self.stages, kinds):
            for block in stage:
                block.to_dense(stage_kind, split_ghosts)

    # ---- timm surface -------------------------------------------------------------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^downsample_layers\.0",
            blocks=r"^(?:stages|downsample_layers)\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.(\d+)", None),
                (r"^downsample_layers\.(\d+)", (0,)),
                (r"^norm", (99999,)),
            ],
        )

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool:
            x = x.mean((-2, -1))
        x = self.head_drop(self.norm(x) if self.global_pool else x)
        return x if pre_logits else self.head(x)


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: ShiftWiseV2) -> dict[str, torch.Tensor]:
    """Map an official (or our) state dict onto ``model``.

    Unwraps ``{'model': ...}`` and ``module.``; converts between the training (``LoRAs.p.weight``) and merged
    (``LoRA.weight``) layouts in either direction (merged -> training puts the sum on path 0, zeros on the
    others: same function); adds what the official code does not save: the channel split and shift tables
    (recomputed with the official seeds, :meth:`ShiftwiseConv2d.official_buffers`) and all-ones sparsity masks
    (pruned kernels are zeros in official checkpoints); drops the head/final norm for headless models.
    Checkpoints of ours (tables and masks included) pass through unchanged.
    """
    for key in ("model", "state_dict", "model_ema"):
        if key in state_dict and isinstance(state_dict[key], Mapping):
            state_dict = state_dict[key]
            break
    state = {(k[7:] if k.startswith("module.") else k): v for k, v in state_dict.items()}
    own = model.state_dict()
    for name, m in model.named_modules():
        if not isinstance(m, ShiftwiseConv2d):
            continue
        p = f"{name}." if name else ""
        paths = sorted({int(k[len(p) + 6:].split(".")[0]) for k in state if k.startswith(f"{p}LoRAs.")})
        if m.form == "train" and f"{p}LoRA.weight" in state:
            merged = state.pop(f"{p}LoRA.weight")
            mask = state.pop(f"{p}LoRA.weight_mask", None)
            for i in range(m.n_path):
                state[f"{p}LoRAs.{i}.weight"] = merged if i == 0 else torch.zeros_like(merged)
                if mask is not None:
                    state[f"{p}LoRAs.{i}.weight_mask"] = mask
        elif m.form != "train" and paths and f"{p}LoRA.weight" not in state:
            weight = 0
            for i in paths:
                w = state.pop(f"{p}LoRAs.{i}.weight")
                mask = state.pop(f"{p}LoRAs.{i}.weight_mask", None)
                weight = weight + (w if mask is None else w * mask)
            state[f"{p}LoRA.weight"] = weight
        for key, value in m.official_buffers().items():  # recomputed: also right for a model built on 'meta'
            state.setdefault(p + key, value)
        for sub, conv in m.named_modules():
            if isinstance(conv, ShiftwisePathConv):
                state.setdefault(f"{p}{sub}.weight_mask", torch.ones(own[f"{p}{sub}.weight_mask"].shape))
    return {k: v for k, v in state.items() if k in own or not k.startswith(("head.", "norm."))}


# ---- configurations -----------------------------------------------------------------------------------------
# Released SW-tiny run (README): kernel_size 51 49 47 13 3, ghost_ratio 0.23, N_path 2, N_rep 4, bn on.
_SW = dict(kernel_sizes=(51, 49, 47, 13), small_kernel=3, ghost_ratio=0.23, n_path=2, n_rep=4, bn=True)
MODEL_CFGS: dict[str, dict] = {
    "shiftwise_v2_tiny": dict(depths=(3, 3, 18, 3), dims=(80, 160, 320, 640), **_SW),
    "shiftwise_v2_small": dict(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768), **_SW),
    "shiftwise_v2_base": dict(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024), **_SW),
    "shiftwise_v2_large": dict(depths=(3, 3, 27, 3), dims=(192, 384, 768, 1536), **_SW),
    # Not in the paper: a tiny model for unit tests.
    "shiftwise_v2_test": dict(depths=(1, 1, 2, 1), dims=(16, 32, 48, 64), kernel_sizes=(13, 11, 9, 5),
                              small_kernel=3, ghost_ratio=0.23, n_path=2, n_rep=4, bn=True),
}


def _cfg(file: str = "", top1: float | None = None, **kwargs) -> dict:
    notes = (f"reported ImageNet-1K top-1 {top1}%",) if top1 is not None else ()
    return {
        "file": file, "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.875, "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "downsample_layers.0.0", "classifier": "head", "paper_ids": "arXiv:2401.12736",
        "origin_url": "https://github.com/lidc54/shift-wiseConv", "notes": notes, **kwargs,
    }


default_cfgs = generate_default_cfgs({
    # Google Drive release linked from the official README (300 epochs, sparsity 0.3); local file only.
    "shiftwise_v2_tiny.in1k": _cfg("SW_300_unirep_tiny_gap131_M2_N4_g023_s03.pth", 83.39),
    "shiftwise_v2_small": _cfg(),
    "shiftwise_v2_base": _cfg(),
    "shiftwise_v2_large": _cfg(),
    "shiftwise_v2_test": _cfg(),
})


def _create_shiftwise(variant: str, pretrained: bool = False, **kwargs) -> ShiftWiseV2:
    cfg = {**MODEL_CFGS[variant], **kwargs}
    return build_model_with_cfg(
        ShiftWiseV2, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2, 3)),
        **cfg,
    )


@register_model
def shiftwise_v2_tiny(pretrained: bool = False, **kwargs) -> ShiftWiseV2:
    """SW-tiny: depths 3/3/18/3, widths 80..640, kernels 51/49/47/13 from 3x3 (83.39% IN-1K, 300 epochs)."""
    return _create_shiftwise("shiftwise_v2_tiny", pretrained, **kwargs)


@register_model
def shiftwise_v2_small(pretrained: bool = False, **kwargs) -> ShiftWiseV2:
    """SW-small: depths 3/3/27/3, widths 96..768 (SW-tiny's shift-wise settings)."""
    return _create_shiftwise("shiftwise_v2_small", pretrained, **kwargs)


@register_model
def shiftwise_v2_base(pretrained: bool = False, **kwargs) -> ShiftWiseV2:
    """SW-base: depths 3/3/27/3, widths 128..1024."""
    return _create_shiftwise("shiftwise_v2_base", pretrained, **kwargs)


@register_model
def shiftwise_v2_large(pretrained: bool = False, **kwargs) -> ShiftWiseV2:
    """SW-large: depths 3/3/27/3, widths 192..1536."""
    return _create_shiftwise("shiftwise_v2_large", pretrained, **kwargs)


@register_model
def shiftwise_v2_test(pretrained: bool = False, **kwargs) -> ShiftWiseV2:
    """Tiny ShiftWise v2 for unit tests: depths 1/1/2/1, widths 16..64, kernels 13/11/9/5 from 3x3."""
    return _create_shiftwise("shiftwise_v2_test", pretrained, **kwargs)

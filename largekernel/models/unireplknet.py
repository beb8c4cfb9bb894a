"""UniRepLKNet: "UniRepLKNet: A Universal Perception Large-Kernel ConvNet for Audio, Video, Point Cloud,
Time-Series and Image Recognition" (Ding et al., CVPR 2024).

Layout and state-dict names follow the official release (AILab-CVC/UniRepLKNet, ``unireplknet.py``), so its
checkpoints load strictly in training form and in deploy form (``deploy=True``, the structure after
``reparameterize()``). Large depthwise convs go through :class:`largekernel.layers.DepthwiseConv2d`.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from largekernel.layers.blocks import GRN, LayerNorm, SEBlock, get_bn
from largekernel.layers.conv import DepthwiseConv2d, fuse_bn
from largekernel.layers.dilated import DilatedReparamBlock
from largekernel.models._stages import StagedConvNet

__all__ = ["UniRepLKNet", "UniRepLKNetBlock", "DEFAULT_KERNEL_SIZES"]


class _ToNHWC(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1)


class _ToNCHW(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2)


class UniRepLKNetBlock(nn.Module):
    """Sec. 3.3 / Fig. 3: depthwise conv (Dilated Reparam Block for K >= 7, plain K in {3, 5}) -> BN -> SE ->
    Linear (x4) -> GELU -> GRN -> Linear -> BN -> layer scale, identity shortcut with drop path.

    (N, C, H, W) -> (N, C, H, W). ``kernel_size=0`` drops the depthwise conv and its BN. ``reparameterize()``
    gives the official deploy form: dwconv with merged branches and the BN folded in (bias), GRN ``beta``, the
    second BN and the layer scale folded into ``pwconv2.0`` (with bias); the GRN keeps ``gamma``.
    """

    def __init__(self, dim: int, kernel_size: int, drop_path: float = 0.0, layer_scale_init_value: float = 1e-6,
                 deploy: bool = False, use_sync_bn: bool = False, ffn_factor: float = 4,
                 attempt_use_lk_impl: bool = True) -> None:
        super().__init__()
        if kernel_size >= 7:
            self.dwconv: nn.Module = DilatedReparamBlock(dim, kernel_size, deploy=deploy, use_sync_bn=use_sync_bn)
        elif kernel_size in (3, 5):
            self.dwconv = DepthwiseConv2d(dim, kernel_size, bias=deploy)
        elif kernel_size == 0:
            self.dwconv = nn.Identity()
        else:
            raise ValueError(f"kernel_size must be 0, 3, 5 or >= 7 (dilated reparam), got {kernel_size}")
        self.norm = nn.Identity() if deploy or kernel_size == 0 else get_bn(dim, use_sync_bn)
        self.se = SEBlock(dim, dim // 4)
        ffn_dim = int(ffn_factor * dim)
        self.pwconv1 = nn.Sequential(_ToNHWC(), nn.Linear(dim, ffn_dim))
        self.act = nn.Sequential(nn.GELU(), GRN(ffn_dim, use_bias=not deploy))
        if deploy:
            self.pwconv2 = nn.Sequential(nn.Linear(ffn_dim, dim), _ToNCHW())
        else:
            self.pwconv2 = nn.Sequential(nn.Linear(ffn_dim, dim, bias=False), _ToNCHW(), get_bn(dim, use_sync_bn))
        if not deploy and layer_scale_init_value is not None and layer_scale_init_value > 0:
            self.gamma = nn.Parameter(layer_scale_init_value * torch.ones(dim))
        else:
            self.gamma = None
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    @property
    def deployed(self) -> bool:
        dw_merged = not isinstance(self.dwconv, DilatedReparamBlock) or self.dwconv.deployed
        return dw_merged and isinstance(self.norm, nn.Identity) and len(self.pwconv2) == 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.se(self.norm(self.dwconv(x)))
        y = self.pwconv2(self.act(self.pwconv1(y)))
        if self.gamma is not None:
            y = y * self.gamma.view(1, -1, 1, 1)
        return x + self.drop_path(y)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Official deploy form, in place; exact for eval-mode BN. Idempotent."""
        if isinstance(self.dwconv, DilatedReparamBlock):
            self.dwconv.reparameterize()
        if not isinstance(self.norm, nn.Identity):
            conv = self.dwconv.lk_origin if isinstance(self.dwconv, DilatedReparamBlock) else self.dwconv
            weight, bias = fuse_bn(conv.weight, self.norm, conv.bias)
            fused = DepthwiseConv2d.from_weights(weight, bias)
            if isinstance(self.dwconv, DilatedReparamBlock):
                self.dwconv.lk_origin = fused
            else:
                self.dwconv = fused
            self.norm = nn.Identity()
        fold_ffn_tail(self)


@torch.no_grad()
def fold_ffn_tail(block: nn.Module) -> None:
    """UniRepLKNet's deploy form of a block's FFN tail, in place (exact in eval mode): GRN ``beta``
    (``block.act[1]``), the BN after ``block.pwconv2`` (Linear, _ToNCHW, BN) and the layer scale ``block.gamma``
    fold into ``pwconv2``'s Linear (with bias). Shared with the shift-wise blocks (same macro design)."""
    linear: nn.Linear = block.pwconv2[0]
    grn: GRN = block.act[1]
    has_bn = len(block.pwconv2) == 3
    if not (grn.use_bias or has_bn or block.gamma is not None):
        return
    # pwconv2(GRN(x)) = W (GRN0(x) + beta) + b, then BN, then layer scale: all affine per output channel.
    weight = linear.weight
    bias = linear.bias if linear.bias is not None else weight.new_zeros(weight.shape[0])
    if grn.use_bias:
        bias = bias + weight @ grn.beta.reshape(-1)
        del grn.beta
        grn.use_bias = False
    if has_bn:
        weight, bias = fuse_bn(weight, block.pwconv2[2], bias)
    if block.gamma is not None:
        weight, bias = weight * block.gamma[:, None], bias * block.gamma
        block.gamma = None
    fused = nn.Linear(linear.in_features, linear.out_features).to(weight.device, weight.dtype)
    fused.weight.copy_(weight)
    fused.bias.copy_(bias)
    block.pwconv2 = nn.Sequential(fused, _ToNCHW())


# Official default kernel sizes per block, keyed by depths (A/F/P, N, T, S/B/L/XL).
DEFAULT_KERNEL_SIZES: dict[tuple[int, ...], tuple[tuple[int, ...], ...]] = {
    (2, 2, 6, 2): ((3, 3), (13, 13), (13,) * 6, (13, 13)),
    (2, 2, 8, 2): ((3, 3), (13, 13), (13,) * 8, (13, 13)),
    (3, 3, 18, 3): ((3, 3, 3), (13, 13, 13), (13, 3) * 9, (13, 13, 13)),
    (3, 3, 27, 3): ((3, 3, 3), (13, 13, 13), (13, 3, 3) * 9, (13, 13, 13)),
}


def downsample_layers(in_chans: int, dims: Sequence[int]) -> nn.ModuleList:
    """UniRepLKNet's stem (two 3x3 stride-2 convs with LN, GELU between: stride 4) followed by one 3x3 stride-2
    conv + LN before each later stage. Keys ``downsample_layers.{i}.{j}`` as in the official release; the
    shift-wise nets use the same macro design."""
    layers = nn.ModuleList([nn.Sequential(
        nn.Conv2d(in_chans, dims[0] // 2, 3, stride=2, padding=1),
        LayerNorm(dims[0] // 2, eps=1e-6),
        nn.GELU(),
        nn.Conv2d(dims[0] // 2, dims[0], 3, stride=2, padding=1),
        LayerNorm(dims[0], eps=1e-6),
    )])
    for i in range(len(dims) - 1):
        layers.append(nn.Sequential(
            nn.Conv2d(dims[i], dims[i + 1], 3, stride=2, padding=1), LayerNorm(dims[i + 1], eps=1e-6)))
    return layers


class UniRepLKNet(StagedConvNet):
    """UniRepLKNet for image classification. (N, in_chans, H, W) -> (N, num_classes).

    Stem: two stride-2 3x3 convs (LayerNorm, GELU between); stride-2 3x3 conv + LayerNorm before stages 2-4;
    head: global average pool -> LayerNorm -> Linear. Stage outputs have strides 4, 8, 16, 32.

    Args: ``depths``/``dims`` per stage; ``kernel_sizes`` per block (None: the official defaults for the
    depths); ``deploy`` builds the re-parameterized structure; ``use_sync_bn`` uses SyncBatchNorm when a process
    group exists; ``attempt_use_lk_impl`` is accepted and ignored (our dispatch point picks the kernel).
    """

    def __init__(self, in_chans: int = 3, num_classes: int = 1000, depths: Sequence[int] = (3, 3, 27, 3),
                 dims: Sequence[int] = (96, 192, 384, 768), drop_path_rate: float = 0.0, drop_rate: float = 0.0,
                 layer_scale_init_value: float = 1e-6, head_init_scale: float = 1.0,
                 kernel_sizes: Sequence[Sequence[int]] | None = None, deploy: bool = False,
                 with_cp: bool = False, use_sync_bn: bool = False, global_pool: str = "avg",
                 attempt_use_lk_impl: bool = True) -> None:
        super().__init__()
        depths = tuple(int(d) for d in depths)
        if len(depths) != 4 or len(dims) != 4:
            raise ValueError(f"depths and dims must have 4 entries, got {depths} and {tuple(dims)}")
        if kernel_sizes is None:
            if depths not in DEFAULT_KERNEL_SIZES:
                raise ValueError(f"no default kernel_sizes for depths {depths}; pass kernel_sizes per block")
            kernel_sizes = DEFAULT_KERNEL_SIZES[depths]
        kernel_sizes = tuple(tuple(int(k) for k in ks) for ks in kernel_sizes)
        if tuple(len(ks) for ks in kernel_sizes) != depths:
            raise ValueError(f"kernel_sizes {kernel_sizes} do not match depths {depths}")
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.depths, self.dims = depths, tuple(int(d) for d in dims)
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.kernel_sizes = kernel_sizes
        self.num_features = self.head_hidden_size = dims[-1]
        self.grad_checkpointing = with_cp

        self.downsample_layers = downsample_layers(in_chans, dims)

        n_blocks = sum(depths)
        dp_rates = [drop_path_rate * i / max(n_blocks - 1, 1) for i in range(n_blocks)]  # linspace, no tensors
        self.stages = nn.ModuleList()
        self.feature_info = []
        cur = 0
        for i in range(4):
            self.stages.append(nn.Sequential(*[
                UniRepLKNetBlock(dims[i], kernel_sizes[i][j], drop_path=dp_rates[cur + j],
                                 layer_scale_init_value=layer_scale_init_value, deploy=deploy,
                                 use_sync_bn=use_sync_bn)
                for j in range(depths[i])]))
            cur += depths[i]
            self.feature_info.append(dict(num_chs=dims[i], reduction=4 * 2 ** i, module=f"stages.{i}"))

        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)
        if isinstance(self.head, nn.Linear):
            self.head.weight.data.mul_(head_init_scale)
            self.head.bias.data.mul_(head_init_scale)

    # ---- timm surface -------------------------------------------------------------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^downsample_layers\.0\.",
            blocks=r"^(?:stages|downsample_layers)\.(\d+)" if coarse else [
                (r"^downsample_layers\.([1-3])\.", (0,)),
                (r"^stages\.(\d+)\.(\d+)", None),
                (r"^norm\.", (99999,)),
            ],
        )

    def reparameterize_unireplknet(self) -> None:
        """Official name: convert in place to the deploy form (same as ``largekernel.reparameterize``)."""
        for m in list(self.modules()):
            if isinstance(m, UniRepLKNetBlock):
                m.reparameterize()

    @property
    def deploy(self) -> bool:
        """True when every block is in the deploy (re-parameterized) form."""
        return all(block.deployed for stage in self.stages for block in stage)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = self.head_drop(self.norm(x.mean((2, 3))))
            return x if pre_logits else self.head(x)
        x = self.head_drop(self.norm(x.permute(0, 2, 3, 1)))  # no pooling: per-location norm and head
        return (x if pre_logits else self.head(x)).permute(0, 3, 1, 2)


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: UniRepLKNet) -> dict[str, torch.Tensor]:
    """Official checkpoints already use our names. Unwraps ``model``/``state_dict``, strips a ``backbone.``
    prefix (OpenMMLab) and drops the per-stage ``norm{i}`` of the detection/segmentation backbones and any
    head/norm the model lacks (features-only / headless). A training-form checkpoint (as published) given to a
    deploy-form model is re-parameterized on the way in."""
    for key in ("model", "state_dict"):
        if key in state_dict and isinstance(state_dict[key], Mapping):
            state_dict = state_dict[key]
    own = model.state_dict()
    out = {}
    for k, v in state_dict.items():
        k = k.removeprefix("module.").removeprefix("backbone.")
        if k.split(".")[0] in ("norm0", "norm1", "norm2", "norm3"):
            continue
        if k.startswith(("head.", "norm.")) and k not in own:
            continue
        out[k] = v
    if model.deploy and any(mark in k for k in out for mark in (".origin_bn.", ".pwconv2.2.")):
        out = _train_to_deploy_state(out, model)
    return out


@torch.no_grad()
def _train_to_deploy_state(state: dict[str, torch.Tensor], model: UniRepLKNet) -> dict[str, torch.Tensor]:
    """A training-form state dict (as published) converted to the deploy form of ``model``'s configuration."""
    num_classes = state["head.weight"].shape[0] if "head.weight" in state else 0
    train = UniRepLKNet(in_chans=model.in_chans, num_classes=num_classes, depths=model.depths, dims=model.dims,
                        kernel_sizes=model.kernel_sizes)
    if "norm.weight" not in state:
        train.norm = nn.Identity()
    train.load_state_dict(state, strict=True)
    train.eval().reparameterize_unireplknet()
    return train.state_dict()


# ---- configurations -----------------------------------------------------------------------------------------
_DEPTHS_AFP, _DEPTHS_N, _DEPTHS_T, _DEPTHS_SBLXL = (2, 2, 6, 2), (2, 2, 8, 2), (3, 3, 18, 3), (3, 3, 27, 3)
MODEL_CFGS: dict[str, dict] = {
    "unireplknet_a": dict(depths=_DEPTHS_AFP, dims=(40, 80, 160, 320)),
    "unireplknet_f": dict(depths=_DEPTHS_AFP, dims=(48, 96, 192, 384)),
    "unireplknet_p": dict(depths=_DEPTHS_AFP, dims=(64, 128, 256, 512)),
    "unireplknet_n": dict(depths=_DEPTHS_N, dims=(80, 160, 320, 640)),
    "unireplknet_t": dict(depths=_DEPTHS_T, dims=(80, 160, 320, 640)),
    "unireplknet_s": dict(depths=_DEPTHS_SBLXL, dims=(96, 192, 384, 768)),
    "unireplknet_b": dict(depths=_DEPTHS_SBLXL, dims=(128, 256, 512, 1024)),
    "unireplknet_l": dict(depths=_DEPTHS_SBLXL, dims=(192, 384, 768, 1536)),
    "unireplknet_xl": dict(depths=_DEPTHS_SBLXL, dims=(256, 512, 1024, 2048)),
    # Tiny variant for CPU tests (not in the paper): every kind of depthwise conv (3, 5, dilated 7/9/13).
    "unireplknet_test": dict(depths=(1, 1, 2, 1), dims=(16, 24, 32, 48), kernel_sizes=((3,), (7,), (13, 5), (9,))),
}


def _create_unireplknet(variant: str, pretrained: bool = False, **kwargs) -> UniRepLKNet:
    cfg = dict(MODEL_CFGS[variant])
    cfg.update(kwargs)
    return build_model_with_cfg(
        UniRepLKNet, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2, 3)),
        **cfg,
    )


def _cfg(file: str = "", top1: float | None = None, lost: bool = False, **kwargs) -> dict:
    notes = (f"reported ImageNet-1K top-1 {top1}%",) if top1 is not None else ()
    if lost:
        notes += ("listed in the official code; the official README says this checkpoint was lost",)
    return {
        "file": file, "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.875, "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "downsample_layers.0.0", "classifier": "head", "paper_ids": "arXiv:2311.15599",
        "origin_url": "https://github.com/AILab-CVC/UniRepLKNet", "notes": notes, **kwargs,
    }


_384 = dict(input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0, crop_mode="squash")  # official: warp
_22K = dict(num_classes=21841)
default_cfgs = generate_default_cfgs({
    "unireplknet_a.in1k": _cfg("unireplknet_a_in1k_224_acc77.03.pth", 77.03),
    "unireplknet_f.in1k": _cfg("unireplknet_f_in1k_224_acc78.58.pth", 78.58),
    "unireplknet_p.in1k": _cfg("unireplknet_p_in1k_224_acc80.23.pth", 80.23),
    "unireplknet_n.in1k": _cfg("unireplknet_n_in1k_224_acc81.64.pth", 81.64),
    "unireplknet_t.in1k": _cfg("unireplknet_t_in1k_224_acc83.21.pth", 83.21),
    "unireplknet_s.in1k": _cfg("unireplknet_s_in1k_224_acc83.91.pth", 83.91),
    "unireplknet_s.in22k_ft_in1k_384": _cfg("unireplknet_s_in22k_to_in1k_384_acc86.44.pth", 86.44, **_384),
    "unireplknet_s.in22k": _cfg("unireplknet_s_in22k_pretrain.pth", lost=True, **_22K),
    "unireplknet_b.in22k_ft_in1k_384": _cfg("unireplknet_b_in22k_to_in1k_384_acc87.40.pth", 87.40, **_384),
    "unireplknet_b.in22k": _cfg("unireplknet_b_in22k_pretrain.pth", **_22K),
    "unireplknet_l.in22k_ft_in1k_384": _cfg("unireplknet_l_in22k_to_in1k_384_acc87.88.pth", 87.88, **_384),
    "unireplknet_l.in22k": _cfg("unireplknet_l_in22k_pretrain.pth", input_size=(3, 192, 192),
                                pool_size=(6, 6), **_22K),
    "unireplknet_xl.in22k_ft_in1k_384": _cfg("unireplknet_xl_in22k_to_in1k_384_acc87.96.pth", 87.96, lost=True,
                                            **_384),
    "unireplknet_xl.in22k": _cfg("unireplknet_xl_in22k_pretrain.pth", input_size=(3, 192, 192),
                                 pool_size=(6, 6), **_22K),
    "unireplknet_test": _cfg(input_size=(3, 64, 64), pool_size=(2, 2)),
})


@register_model
def unireplknet_a(pretrained: bool = False, **kwargs) -> UniRepLKNet:
    """UniRepLKNet-A: depths 2/2/6/2, widths 40..320, kernels 3 (stage 1) and 13."""
    return _create_unireplknet("unireplknet_a", pretrained, **kwargs)


@register_model
def unireplknet_f(pretrained: bool = False, **kwargs) -> UniRepLKNet:
    """UniRepLKNet-F: depths 2/2/6/2, widths 48..384."""
    return _create_unireplknet("unireplknet_f", pretrained, **kwargs)


@register_model
def unireplknet_p(pretrained: bool = False, **kwargs) -> UniRepLKNet:
    """UniRepLKNet-P: depths 2/2/6/2, widths 64..512."""
    return _create_unireplknet("unireplknet_p", pretrained, **kwargs)


@register_model
def unireplknet_n(pretrained: bool = False, **kwargs) -> UniRepLKNet:
    """UniRepLKNet-N: depths 2/2/8/2, widths 80..640."""
    return _create_unireplknet("unireplknet_n", pretrained, **kwargs)


@register_model
def unireplknet_t(pretrained: bool = False, **kwargs) -> UniRepLKNet:
    """UniRepLKNet-T: depths 3/3/18/3, widths 80..640; stage 3 alternates kernels 13 and 3."""
    return _create_unireplknet("unireplknet_t", pretrained, **kwargs)


@register_model
def unireplknet_s(pretrained: bool = False, **kwargs) -> UniRepLKNet:
    """UniRepLKNet-S: depths 3/3/27/3, widths 96..768; stage 3 kernels 13, 3, 3 repeated."""
    return _create_unireplknet("unireplknet_s", pretrained, **kwargs)


@register_model
def unireplknet_b(pretrained: bool = False, **kwargs) -> UniRepLKNet:
    """UniRepLKNet-B: UniRepLKNet-S layout with widths 128..1024."""
    return _create_unireplknet("unireplknet_b", pretrained, **kwargs)


@register_model
def unireplknet_l(pretrained: bool = False, **kwargs) -> UniRepLKNet:
    """UniRepLKNet-L: UniRepLKNet-S layout with widths 192..1536."""
    return _create_unireplknet("unireplknet_l", pretrained, **kwargs)


@register_model
def unireplknet_xl(pretrained: bool = False, **kwargs) -> UniRepLKNet:
    """UniRepLKNet-XL: UniRepLKNet-S layout with widths 256..2048."""
    return _create_unireplknet("unireplknet_xl", pretrained, **kwargs)


@register_model
def unireplknet_test(pretrained: bool = False, **kwargs) -> UniRepLKNet:
    """Tiny CPU test variant (not in the paper): depths 1/1/2/1, widths 16..48, kernels 3/7/(13, 5)/9."""
    return _create_unireplknet("unireplknet_test", pretrained, **kwargs)

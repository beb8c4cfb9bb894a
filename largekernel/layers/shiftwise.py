"""Shift-wise convolution (ShiftwiseConv, CVPR 2025, Sec. 3): a big depthwise kernel from small ones.

Exact re-implementation of the official ``ShifthWiseConv2dImplicit`` (lidc54/shift-wiseConv, commit 2202e6b,
``backbones/SW_v2_unirep.py`` and ``shiftadd/ops``). Per layer, for input (B, C, H, W):

1. the channels split into R shift-wise ("rep") and C-R ghost channels (fixed draw, NumPy seed 123);
2. ``n_path`` grouped small convs R -> R*nk (k x k, padding k-1, nk = ceil(K/k)) are summed;
3. shift-add (:func:`largekernel.ops.shiftadd.shift_add`) places the nk kernels of each channel at the nk
   slots of a horizontal (k x K) and a vertical (K x k) band, once per each of ``n_rep`` index groups with
   shuffled slot orders, plus one random kernel per group at the centre (tables: torch seed 123);
4. BN on each of the three terms, + the rep input (identity); output = cat([rep part, ghost channels]).

Ours stores the channel split and the tables as persistent buffers, keeps the official state-dict names
(``LoRAs.{p}.weight``, merged ``LoRA.weight``, ``bn_lora1``, ``bn_lora2``, ``bn_small``) and adds a sparsity
mask per whole small kernel (``LoRAs.{p}.weight_mask``, (R*nk, 1, 1, 1)).
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from largekernel.layers.conv import DepthwiseConv2d
from largekernel.ops import depthwise_conv2d
from largekernel.ops.shiftadd import shift_add, shift_add_col_pad, shift_add_eval, shift_add_path

_SEED = 123
_IMPLS = ("shiftadd", "bands")


def shiftwise_channel_split(channels: int, ghost_ratio: float) -> tuple[list[int], list[int]]:
    """(rep, ghost) channel indices, both ascending, as the official v2 layer draws them.

    R = int(C * (1 - ghost_ratio)) // 2 * 2 (float arithmetic, rounded down to even); the C - R ghost channels
    are ``np.random.seed(123); np.random.choice(C, C - R, replace=False)`` (here a local RandomState).
    """
    n_rep = int(channels * (1 - ghost_ratio)) // 2 * 2
    ghost = sorted(np.random.RandomState(_SEED).choice(channels, channels - n_rep, replace=False).tolist())
    ghost_set = set(ghost)
    return [c for c in range(channels) if c not in ghost_set], ghost


def shiftwise_slot_shifts(big_kernel: int, small_kernel: int) -> list[int]:
    """Shift of slot i (official ``real_pad``): K//2 - i*k - (k-1), i < nk."""
    nk = math.ceil(big_kernel / small_kernel)
    return [big_kernel // 2 - i * small_kernel - (small_kernel - 1) for i in range(nk)]


@functools.lru_cache(maxsize=64)
def _tables(big_kernel: int, small_kernel: int, channels: int, n_rep: int) -> tuple[torch.Tensor, torch.Tensor]:
    return shiftwise_tables(big_kernel, small_kernel, channels, n_rep)


def shiftwise_tables(big_kernel: int, small_kernel: int, channels: int,
                     n_rep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The official shift tables ``pad_hv`` (R*nk, 2*n_rep) and ``idx_identit`` (R, n_rep), int32.

    Draw order after seeding 123 (a local generator, so the caller's RNG is untouched): for each group g, for
    each channel c, ``randperm(nk)`` (horizontal); the same again (vertical); for each g ``randint(0, nk, [R])``
    (identity kernel). Slot i of channel c in group g holds kernel perm[i], so kernel j gets the shift of slot
    perm^-1(j). ``idx_identit[c, g] = c*nk + r``.
    """
    nk = math.ceil(big_kernel / small_kernel)
    cpu = torch.device("cpu")  # explicit: also under a `with torch.device("meta")` model construction
    slot_shift = torch.tensor(shiftwise_slot_shifts(big_kernel, small_kernel), dtype=torch.int32, device=cpu)
    gen = torch.Generator(device=cpu).manual_seed(_SEED)
    perms = [[[torch.randperm(nk, generator=gen, device=cpu) for _ in range(channels)] for _ in range(n_rep)]
             for _ in range(2)]  # [horizontal|vertical][g][c]
    ident = torch.stack([torch.randint(0, nk, [channels], generator=gen, device=cpu) for _ in range(n_rep)],
                        dim=1)
    cols = []
    for direction in perms:
        for group in direction:
            perm = torch.stack(group)  # (R, nk): slot -> kernel
            inverse = torch.argsort(perm, dim=1)  # kernel -> slot
            cols.append(slot_shift[inverse].reshape(-1))
    pad_hv = torch.stack(cols, dim=1).contiguous()
    idx_identit = (ident + torch.arange(channels, device=cpu)[:, None] * nk).to(torch.int32).contiguous()
    return pad_hv, idx_identit


class ShiftwisePathConv(nn.Conv2d):
    """One path's grouped small conv R -> R*nk (k x k, padding k-1, no bias), masked per whole kernel.

    Follows the sparsity protocol: ``sparse_params = ("weight",)`` and buffer ``weight_mask`` (R*nk, 1, 1, 1).
    """

    sparse_params: tuple[str, ...] = ("weight",)

    def __init__(self, channels: int, nk: int, small_kernel: int) -> None:
        super().__init__(channels, channels * nk, small_kernel, padding=small_kernel - 1, groups=channels,
                         bias=False)
        self.register_buffer("weight_mask", torch.ones(channels * nk, 1, 1, 1))

    def masked_weight(self) -> torch.Tensor:
        return self.weight * self.weight_mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.masked_weight(), None, 1, self.padding, 1, self.groups)


class ShiftwiseConv2d(nn.Module):
    """Shift-wise conv (official ``ShifthWiseConv2dImplicit``): (B, C, H, W) -> (B, C, H, W).

    Output channel order is the official one: the R rep channels (ascending), then the ghost channels.
    Every form equals, in eval mode, one dense depthwise conv of size ``dense_size`` on the permuted input
    (:meth:`to_dense_kernel`). Forms: training (``LoRAs``), :meth:`reparameterize` (paths merged into ``LoRA``,
    the official deploy layout), :meth:`fold_bn` (the three BNs become ``term_scale`` (3, R) and
    ``term_bias`` (R,)), :meth:`to_dense` (``kind="square"``: one D x D :class:`DepthwiseConv2d` ``dense``
    with bias; ``kind="cross"``: its non-zero support only, a k x D ``dense_h`` (with bias) + a D x k
    ``dense_v``, 2kD instead of D^2 taps).

    ``impl`` picks how the trainable forms compute the three terms (same function, same parameters):
    ``"shiftadd"`` (official: grouped small convs R -> R*nk, then the shift-add op) or ``"bands"`` (the small
    kernels placed differentiably into a k x D, a D x k and a k x k kernel, three depthwise convs through
    :func:`largekernel.ops.depthwise_conv2d`; no nk-times larger intermediate).

    Args: ``n_path`` (official ``N_path``) summed small convs; ``n_rep`` (official ``N_rep``) index groups;
    ``ghost_ratio`` in [0, 1); ``bn`` toggles the three BNs; ``stride`` must be 1 (as in the official blocks).
    """

    def __init__(self, in_channels: int, big_kernel: int, small_kernel: int = 3, stride: int = 1,
                 bn: bool = True, ghost_ratio: float = 0.23, n_path: int = 2, n_rep: int = 4,
                 impl: str = "shiftadd") -> None:
        super().__init__()
        if impl not in _IMPLS:
            raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
        for name, value in (("in_channels", in_channels), ("big_kernel", big_kernel),
                            ("small_kernel", small_kernel), ("n_path", n_path), ("n_rep", n_rep)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if small_kernel % 2 == 0:
            raise ValueError(f"small_kernel must be odd, got {small_kernel}")
        if small_kernel > big_kernel:
            raise ValueError(f"small_kernel={small_kernel} must not exceed big_kernel={big_kernel}")
        if stride != 1:
            raise ValueError(f"stride must be 1 (the official shift-add assumes it), got {stride}")
        if not 0 <= ghost_ratio < 1:
            raise ValueError(f"ghost_ratio must be in [0, 1), got {ghost_ratio}")
        rep, ghost = shiftwise_channel_split(in_channels, ghost_ratio)
        if len(rep) < 2:
            raise ValueError(f"in_channels={in_channels} is too few for ghost_ratio={ghost_ratio}: "
                             f"{len(rep)} shift-wise channels (need >= 2)")
        self.in_channels = in_channels
        self.big_kernel = big_kernel
        self.small_kernel = small_kernel
        self.ghost_ratio = ghost_ratio
        self.n_path = n_path
        self.n_rep = n_rep
        self.nk = math.ceil(big_kernel / small_kernel)
        self.padding = small_kernel - 1
        self.extra_pad = self.padding - small_kernel // 2
        self.rep_channels = len(rep)
        self.ghost_channels = len(ghost)
        self.dense_size = 2 * max(big_kernel // 2, self.nk * small_kernel - 1 - big_kernel // 2) + 1
        self.use_bn = bn
        self.impl = impl
        for name, value in self.official_buffers().items():  # on the default device (meta-safe)
            self.register_buffer(name, value.to(torch.get_default_device()))
        self.LoRAs = nn.ModuleList(ShiftwisePathConv(self.rep_channels, self.nk, small_kernel)
                                   for _ in range(n_path))
        if bn:
            self.bn_lora1 = nn.BatchNorm2d(self.rep_channels)
            self.bn_lora2 = nn.BatchNorm2d(self.rep_channels)
            self.bn_small = nn.BatchNorm2d(self.rep_channels)

    def official_buffers(self) -> dict[str, torch.Tensor]:
        """The channel split and shift tables the official code draws at construction (NumPy / torch seed 123;
        every layer of the same shape gets the same ones), as CPU tensors: ``rep_idx``, ``ghost_idx``,
        ``pad_hv``, ``idx_identity``. Used to fill in official checkpoints, which do not save them."""
        rep, ghost = shiftwise_channel_split(self.in_channels, self.ghost_ratio)
        pad_hv, idx_identity = _tables(self.big_kernel, self.small_kernel, len(rep), self.n_rep)
        cpu = torch.device("cpu")
        return {"rep_idx": torch.tensor(rep, dtype=torch.long, device=cpu),
                "ghost_idx": torch.tensor(ghost, dtype=torch.long, device=cpu),
                "pad_hv": pad_hv.clone(), "idx_identity": idx_identity.clone()}

    # ---- forms -------------------------------------------------------------------------------------------
    @property
    def form(self) -> str:
        """'train', 'merged', 'folded' (merged + BNs folded), 'dense' (square) or 'cross'."""
        if hasattr(self, "dense"):
            return "dense"
        if hasattr(self, "dense_h"):
            return "cross"
        if hasattr(self, "term_scale"):
            return "folded"
        return "merged" if hasattr(self, "LoRA") else "train"

    def small_kernels(self) -> torch.Tensor:
        """The summed, masked small kernels (R*nk, 1, k, k) that feed the shift-add."""
        if hasattr(self, "LoRA"):
            return self.LoRA.masked_weight()
        weight = self.LoRAs[0].masked_weight()
        for conv in self.LoRAs[1:]:
            weight = weight + conv.masked_weight()
        return weight

    def term_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval-mode (scale (3, R), bias (R,)) of the three terms: BN, folded BN, or (1, 0) without BN."""
        if hasattr(self, "term_scale"):
            return self.term_scale, self.term_bias
        ref = self.small_kernels()
        if not self.use_bn:
            return ref.new_ones(3, self.rep_channels), ref.new_zeros(self.rep_channels)
        scales, bias = [], 0
        for bn in (self.bn_lora1, self.bn_lora2, self.bn_small):
            scale = bn.weight / (bn.running_var + bn.eps).sqrt()
            scales.append(scale)
            bias = bias + bn.bias - bn.running_mean * scale
        return torch.stack(scales), bias

    def sparse_ties(self) -> list[list[str]]:
        """Parameters whose sparsity masks are tied (the dynamic-sparsity engine's hook): the paths' kernels,
        as the official ``add_module_sum_rep`` copies path 0's mask to every path."""
        return [[f"LoRAs.{p}.weight" for p in range(len(self.LoRAs))]] if self.form == "train" else []

    def band_kernels(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The three terms as centred depthwise kernels, before BN: horizontal (R, 1, k, D), vertical
        (R, 1, D, k), identity (R, 1, k, k). Slot i of a band sits at offsets i*k - K//2 ... along the long
        axis and holds, summed over the n_rep groups, the small kernel the table assigns to it.
        Differentiable in the small kernels (this is the ``"bands"`` implementation): one gather and one
        index_add through the tables' placement (:meth:`band_placement`)."""
        r, k, d = self.rep_channels, self.small_kernel, self.dense_size
        src, dst = self.band_placement()
        kernels = self.small_kernels().reshape(-1)
        flat = kernels.new_zeros(r * (2 * k * d + k * k)).index_add(0, dst, kernels.index_select(0, src))
        horizontal, vertical, centre = flat.split([r * k * d, r * d * k, r * k * k])
        return horizontal.view(r, 1, k, d), vertical.view(r, 1, d, k), centre.view(r, 1, k, k)

    def band_placement(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(src, dst): tap ``src[t]`` of the flattened small kernels (R*nk, k, k) adds into element ``dst[t]`` of the
        flattened [horizontal (R, k, D), vertical (R, D, k), identity (R, k, k)] kernels. Built from the tables
        (``pad_hv``, ``idx_identity``) and kept until they change (in place or replaced)."""
        tables = (self.pad_hv, self.idx_identity)
        versions = tuple(t._version for t in tables)
        cached = getattr(self, "_placement", None)
        if cached is not None and all(a is b for a, b in zip(cached[0], tables)) and cached[1] == versions:
            return cached[2]
        r, nk, k, g, d = self.rep_channels, self.nk, self.small_kernel, self.n_rep, self.dense_size
        dev = self.pad_hv.device
        tap = torch.arange(k * k, device=dev)
        a, b = tap // k, tap % k                                         # (row, column) inside a small kernel
        kernel = torch.arange(r * nk, device=dev)[:, None, None]
        channel = kernel // nk
        # long-axis index of each placed kernel's first row / column: slot start, slot 0 at d//2 - K//2 (R*nk, 2G, 1)
        slots = (self.big_kernel // 2 - self.padding - self.pad_hv.long()) // k
        start = (d // 2 - self.big_kernel // 2 + slots * k)[:, :, None]
        horizontal = channel * k * d + a * d + start[:, :g] + b                   # (R*nk, G, k*k), in (R, k, D)
        vertical = r * k * d + channel * d * k + (start[:, g:] + a) * k + b       # in (R, D, k), after horizontal
        from_band = (kernel * k * k + tap).expand(-1, g, -1).reshape(-1)  # each (kernel, group): its k*k taps
        ident = self.idx_identity.long()                                  # (R, G) kernel of each channel and group
        centre = 2 * r * k * d + torch.arange(r, device=dev)[:, None, None] * k * k + tap
        src = [from_band, from_band, (ident[:, :, None] * k * k + tap).reshape(-1)]
        dst = [horizontal.reshape(-1), vertical.reshape(-1), centre.expand(-1, g, -1).reshape(-1)]
        placement = torch.cat(src), torch.cat(dst)
        self._placement = (tables, versions, placement)
        return placement

    def cross_kernels(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Eval-mode (k x D kernel with the centre terms and the identity tap, D x k kernel, bias)."""
        if self.form == "cross":
            return self.dense_h.weight, self.dense_v.weight, self.dense_h.bias
        r, h, c0 = self.rep_channels, self.small_kernel // 2, self.dense_size // 2
        horizontal, vertical, centre = self.band_kernels()
        scale, bias = self.term_affine()
        horizontal = scale[0].view(r, 1, 1, 1) * horizontal
        centre = scale[2].view(r, 1, 1, 1) * centre
        centre[:, :, h, h] += 1  # identity shortcut
        horizontal = torch.cat([horizontal[..., :c0 - h], horizontal[..., c0 - h:c0 + h + 1] + centre,
                                horizontal[..., c0 + h + 1:]], dim=-1)
        return horizontal, scale[1].view(r, 1, 1, 1) * vertical, bias

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Merge the ``n_path`` convs into one ``LoRA`` (official ``merge_branches``; exact). Idempotent."""
        if self.form != "train":
            return
        weight = self.small_kernels()
        merged = ShiftwisePathConv(self.rep_channels, self.nk, self.small_kernel)
        merged = merged.to(device=weight.device, dtype=weight.dtype)
        merged.weight.copy_(weight)
        self.LoRA = merged
        del self.LoRAs

    @torch.no_grad()
    def fold_bn(self) -> None:
        """Merge paths and fold the three BNs into per-term scales and one bias (exact in eval mode)."""
        self.reparameterize()
        if self.form != "merged" or not self.use_bn:
            return
        scale, bias = self.term_affine()
        self.term_scale = nn.Parameter(scale.detach().clone())
        self.term_bias = nn.Parameter(bias.detach().clone())
        del self.bn_lora1, self.bn_lora2, self.bn_small

    @torch.no_grad()
    def to_dense_kernel(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Eval-mode dense equivalent: (weight (C, 1, D, D), bias (C,), in_index (C,)), D = ``dense_size``.

        ``out[:, o] = conv2d_same(x[:, in_index[o]], weight[o]) + bias[o]``; identity and ghost channels are
        a centre tap of 1. The rep channels come first (official order), so ``in_index = cat(rep, ghost)``.
        """
        rep_w, rep_b = self.rep_dense_kernel()
        d = self.dense_size
        ghost_w = rep_w.new_zeros(self.ghost_channels, d, d)
        ghost_w[:, d // 2, d // 2] = 1
        weight = torch.cat([rep_w, ghost_w]).unsqueeze(1)
        bias = torch.cat([rep_b, rep_b.new_zeros(self.ghost_channels)])
        return weight, bias, torch.cat([self.rep_idx, self.ghost_idx])

    def rep_dense_kernel(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval-mode dense kernel (R, D, D) and bias (R,) of the rep channels alone (official output order)."""
        if self.form == "dense":
            return self.dense.weight[:, 0].clone(), self.dense.bias.clone()
        horizontal, vertical, bias = self.cross_kernels()
        d, c0, h = self.dense_size, self.dense_size // 2, self.small_kernel // 2
        dense = horizontal.new_zeros(self.rep_channels, d, d)
        dense[:, c0 - h:c0 + h + 1, :] += horizontal[:, 0]
        dense[:, :, c0 - h:c0 + h + 1] += vertical[:, 0]
        return dense, bias.clone()

    @torch.no_grad()
    def to_dense(self, kind: str = "square") -> None:
        """Deploy as large depthwise convs on the rep channels (exact in eval): ``kind="square"``: one D x D
        ``dense`` (with bias); ``"cross"``: ``dense_h`` (k x D, bias) + ``dense_v`` (D x k)."""
        if kind not in ("square", "cross"):
            raise ValueError(f"kind must be 'square' or 'cross', got {kind!r}")
        if self.form in ("dense", "cross"):
            if self.form == ("dense" if kind == "square" else "cross"):
                return
            if self.form == "dense":
                raise ValueError("a square dense layer cannot be converted to the cross form")
        if kind == "square":
            weight, bias = self.rep_dense_kernel()
            built = {"dense": DepthwiseConv2d.from_weights(weight.unsqueeze(1), bias)}
        else:
            horizontal, vertical, bias = self.cross_kernels()
            built = {"dense_h": DepthwiseConv2d.from_weights(horizontal, bias),
                     "dense_v": DepthwiseConv2d.from_weights(vertical)}
        for name in ("LoRAs", "LoRA", "bn_lora1", "bn_lora2", "bn_small", "term_scale", "term_bias", "dense_h",
                     "dense_v"):
            if hasattr(self, name):
                delattr(self, name)
        for name, conv in built.items():
            setattr(self, name, conv)

    # ---- forward -----------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        rep = x.index_select(1, self.rep_idx) if self.ghost_channels else x
        inference = not self.training and not torch.is_grad_enabled()
        form = self.form
        if form == "dense":
            out = self.dense(rep)
        elif form == "cross":
            out = self.dense_h(rep) + self.dense_v(rep)
        elif self.impl == "bands" and inference:
            horizontal, vertical, bias = self.cross_kernels()
            out = depthwise_conv2d(rep, horizontal, bias) + depthwise_conv2d(rep, vertical)
        else:
            if self.impl == "bands":
                t = [depthwise_conv2d(rep, kernel) for kernel in self.band_kernels()]
            else:
                # NCHW: the shift-add reads y (nk times larger than rep) as planes; converting rep is cheaper.
                # In training the fused kernels read y's rows whole when the conv pads them to the kernels' tile
                # (zeros there); the fused inference pass takes plain rows.
                col_pad = 0
                if not inference and shift_add_path(rep) == "triton":
                    col_pad = shift_add_col_pad(rep.shape[3] + 2 * self.extra_pad)
                y = F.conv2d(rep.contiguous(), self.small_kernels(), None, 1, (self.padding, self.padding + col_pad),
                             1, self.rep_channels)
                if inference:  # one fused pass: three terms, BN affine, identity, ghost channels
                    scale, bias = self.term_affine()
                    return shift_add_eval(y, self.pad_hv, self.idx_identity, self.extra_pad, scale, bias, x,
                                          self.rep_idx, self.ghost_idx)
                t = shift_add(y, self.pad_hv, self.idx_identity, self.extra_pad, col_pad).unbind(0)  # one grad
            if form == "folded":
                out = sum(t[i] * self.term_scale[i].view(1, -1, 1, 1) for i in range(3))
                out = out + self.term_bias.view(1, -1, 1, 1)
            elif self.use_bn:
                out = self.bn_lora1(t[0]) + self.bn_lora2(t[1]) + self.bn_small(t[2])
            else:
                out = t[0] + t[1] + t[2]
            out = out + rep
        if self.ghost_channels:
            out = torch.cat([out, x.index_select(1, self.ghost_idx)], dim=1)
        return out

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, big_kernel={self.big_kernel}, small_kernel={self.small_kernel}, "
                f"rep={self.rep_channels}, ghost={self.ghost_channels}, n_path={self.n_path}, "
                f"n_rep={self.n_rep}, bn={self.use_bn}, impl={self.impl}, form={self.form}")

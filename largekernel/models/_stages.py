"""The timm surface shared by the ConvNeXt-style families (SLaK, UniRepLKNet, shift-wise): ``downsample_layers[i]``
(``[0]`` is the stem) then ``stages[i]`` for i = 0..3, a final ``norm`` on pooled features and a linear ``head``.
Each family keeps its own ``__init__``, ``group_matcher`` and ``forward_head``."""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq


class StagedConvNet(nn.Module):
    in_chans: int | None = None   # set by families that validate their input

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv2d, nn.Linear)):   # the shift-wise small kernels too, as in the official code
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set()

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        device = self.downsample_layers[0][0].weight.device
        self.head = nn.Linear(self.num_features, num_classes, device=device) if num_classes > 0 else nn.Identity()

    def _check_input(self, x: torch.Tensor) -> None:
        if self.in_chans is not None and (x.dim() != 4 or x.shape[1] != self.in_chans):
            raise ValueError(f"{type(self).__name__} expects input (N, {self.in_chans}, H, W), got {tuple(x.shape)}")

    def _run_stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample_layers[i](x)
        if self.grad_checkpointing and not torch.jit.is_scripting() and x.requires_grad:
            return checkpoint_seq(self.stages[i], x)
        return self.stages[i](x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs (N, C_i, H/4/2^i, W/4/2^i) for the ``indices`` (timm semantics). The final norm acts on
        pooled features, so ``norm`` has no effect on the maps."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        self._check_input(x)
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last = max_index if (stop_early or intermediates_only) else len(self.stages) - 1
        intermediates = []
        for i in range(last + 1):
            x = self._run_stage(i, x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        self.downsample_layers = self.downsample_layers[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_chans, H, W) -> last stage map (N, C_4, H/32, W/32)."""
        self._check_input(x)
        for i in range(len(self.stages)):
            x = self._run_stage(i, x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

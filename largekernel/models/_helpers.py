"""Safe checkpoint reading and strict loading with messages a user can act on."""
from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn as nn

_WRAPPER_KEYS = ("model", "state_dict", "model_ema", "module")


class CheckpointError(ValueError):
    """A checkpoint file is unreadable or does not fit the model."""


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.safetensors`` file or a torch pickle (``weights_only=True``).

    Official releases wrap the weights in ``{'model': ...}`` (or ``state_dict``/``module``): unwrapped here.
    A leading ``module.`` (DDP) is stripped.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            # official training checkpoints carry their argparse.Namespace next to the weights
            with torch.serialization.safe_globals([argparse.Namespace]):
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types for a damaged file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"corrupt or unreadable checkpoint file {path}: {first}") from None
    if isinstance(state, Mapping):
        for key in _WRAPPER_KEYS:
            if key in state and isinstance(state[key], Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint file {path} does not hold a state dict of tensors")
    return {(k[7:] if k.startswith("module.") else k): v for k, v in state.items()}


def describe_mismatch(model: nn.Module, state: Mapping[str, torch.Tensor], limit: int = 5) -> str:
    """Missing / unexpected keys and shape mismatches between ``state`` and ``model``, first few of each."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    parts = []
    for name, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            parts.append(f"{len(items)} {name}: {', '.join(items[:limit])}{more}")
    return "; ".join(parts)


def load_checkpoint(model: nn.Module, path_or_state: str | os.PathLike | Mapping[str, torch.Tensor],
                    strict: bool = True,
                    filter_fn: Callable[[Mapping[str, torch.Tensor], nn.Module], dict] | None = None) -> nn.Module:
    """Load weights into ``model``; raise :class:`CheckpointError` naming the first mismatches.

    ``filter_fn`` defaults to the model family's ``checkpoint_filter_fn`` when the model declares one.
    """
    state = path_or_state if isinstance(path_or_state, Mapping) else read_state_dict(path_or_state)
    if filter_fn is None:
        filter_fn = getattr(model, "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, model)
    problem = describe_mismatch(model, state)
    if problem and (strict or "shape mismatch" in problem):
        raise CheckpointError(f"checkpoint does not fit {type(model).__name__}: {problem}")
    model.load_state_dict(state, strict=strict)
    return model

"""Model complexity: parameter count and multiply-accumulates (MACs = FLOPs / 2 of ``torch.utils.flop_counter``).

:func:`complexity` builds a model by name under ``FakeTensorMode`` (no storage, like the ``meta`` device but
with a real device type, so device-dependent dispatch code still runs), so counting is free even for the
largest models; the lower-level counters take any materialised model.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _as_input_shape(input_size: int | tuple[int, ...]) -> tuple[int, ...]:
    if isinstance(input_size, int):
        if input_size <= 0:
            raise ValueError(f"input_size must be positive, got {input_size}")
        return (1, 3, input_size, input_size)
    shape = tuple(int(s) for s in input_size)
    if len(shape) == 3:
        shape = (1, *shape)
    if len(shape) != 4 or min(shape) <= 0:
        raise ValueError(f"input_size must be an int, (C, H, W) or (N, C, H, W) of positive sizes, got {input_size}")
    return shape


def count_flops(model: nn.Module, input_size: int | tuple[int, ...] = 224,
                forward: Callable[[nn.Module, torch.Tensor], object] | None = None) -> int:
    """FLOPs of one forward pass (torch's counter: a multiply-add is 2 FLOPs) on the model's device.

    ``input_size``: side of a square RGB image, (C, H, W) or (N, C, H, W). ``forward(model, x)`` overrides
    the call (e.g. ``lambda m, x: m.forward_features(x)``).
    """
    shape = _as_input_shape(input_size)
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.zeros(shape, device=device, dtype=dtype)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        if forward is None:
            model(x)
        else:
            forward(model, x)
    return int(counter.get_total_flops())


def count_macs(model: nn.Module, input_size: int | tuple[int, ...] = 224,
               forward: Callable[[nn.Module, torch.Tensor], object] | None = None) -> int:
    """Multiply-accumulates of one forward pass (FLOPs / 2), the unit papers call "FLOPs"."""
    return count_flops(model, input_size, forward) // 2


def complexity(model_or_name: nn.Module | str, input_size: int | tuple[int, ...] = 224,
               **model_kwargs: object) -> dict[str, float]:
    """Params (M) and GMACs of a module, or of a timm model name built without storage (``FakeTensorMode``).

    Returns ``{"params_m": ..., "gmacs": ...}``. Model kwargs are passed to ``timm.create_model``.
    """
    if isinstance(model_or_name, str):
        import timm

        import largekernel  # noqa: F401  (registers our models)

        with FakeTensorMode():
            model = timm.create_model(model_or_name, pretrained=False, **model_kwargs).eval()
            macs = count_macs(model, input_size)
        return {"params_m": count_params(model) / 1e6, "gmacs": macs / 1e9}
    model = model_or_name
    was_training = model.training
    model.eval()
    try:
        macs = count_macs(model, input_size)
    finally:
        model.train(was_training)
    return {"params_m": count_params(model) / 1e6, "gmacs": macs / 1e9}


@torch.no_grad()
def measure_latency(model: nn.Module, input_size: int | tuple[int, ...] = 224, warmup: int = 2,
                    repeats: int = 5) -> float:
    """Median wall-clock seconds of one eval forward on the model's device (CUDA synchronised)."""
    if repeats <= 0:
        raise ValueError(f"repeats must be positive, got {repeats}")
    shape = _as_input_shape(input_size)
    param = next(iter(model.parameters()))
    x = torch.randn(shape, device=param.device, dtype=param.dtype)
    model.eval()
    sync = torch.cuda.synchronize if param.device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        model(x)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(x)
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]

"""Backend selection for the fast kernels: the one place that decides Triton vs PyTorch."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

_BACKENDS = ("auto", "triton", "native")
_backend = os.environ.get("LARGEKERNEL_BACKEND", "auto")


def set_backend(name: str) -> None:
    """'auto' (fast kernel where it wins), 'triton' (force where supported) or 'native' (PyTorch)."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {name!r}")
    _backend = name


def get_backend() -> str:
    return _backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_usable(x: torch.Tensor) -> bool:
    """Triton can run on this tensor: a CUDA tensor, or any CPU tensor under TRITON_INTERPRET=1."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return x.is_cuda or (triton_interpreting() and x.device.type == "cpu")

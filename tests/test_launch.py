"""The direct-launch cache of largekernel.ops._launch, with stand-in kernels (the real path needs a GPU)."""
from __future__ import annotations

import pytest
import torch

from largekernel.ops import _launch


class _Compiled:
    packed_metadata = object()

    def __init__(self, log: list, fail: bool = False) -> None:
        self.log, self.fail = log, fail

    def __getitem__(self, grid):
        def run(*args):   # like Triton's CompiledKernel runner: reads three grid dimensions
            if self.fail:
                raise TypeError("launcher signature differs")
            self.log.append(("direct", (grid[0], grid[1], grid[2]), args))
        return run


class _Kernel:
    arg_names = ["x", "n", "BLOCK"]

    def __init__(self, fail: bool = False) -> None:
        self.log: list = []
        self.fail = fail

    def __getitem__(self, grid):
        def run(*args, **meta):
            self.log.append(("triton", grid, args, meta))
            return _Compiled(self.log, self.fail)
        return run


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.setattr(_launch, "FAST_LAUNCH", True)
    monkeypatch.setattr(_launch, "_COMPILED", {})
    monkeypatch.setattr(_launch, "FAST_LAUNCH_ERROR", "")
    monkeypatch.setattr(_launch, "FAST_LAUNCH_DESCRIPTORS", True)


def test_second_launch_with_same_specialization_is_direct():
    k = _Kernel()
    x = torch.zeros(64)
    _launch.launch(k, (4,), x, 32, BLOCK=16, num_warps=4)
    _launch.launch(k, (8,), x, 48, BLOCK=16, num_warps=4)
    assert [e[0] for e in k.log] == ["triton", "direct"]
    assert k.log[1] == ("direct", (8, 1, 1), (x, 48, 16))   # runtime args, then the constexprs in signature order


@pytest.mark.parametrize("change", ["int_one", "int_div16", "int_range", "dtype", "align", "meta", "options",
                                    "device"])
def test_a_different_specialization_goes_through_triton(change):
    k = _Kernel()
    x = torch.zeros(64)
    _launch.launch(k, (4,), x, 32, BLOCK=16, num_warps=4)
    args, meta = [x, 32], dict(BLOCK=16, num_warps=4)
    if change == "int_one":
        args[1] = 1
    elif change == "int_div16":
        args[1] = 33
    elif change == "int_range":
        args[1] = 2**32
    elif change == "dtype":
        args[0] = torch.zeros(64, dtype=torch.float64)
    elif change == "align":
        args[0] = x[1:]   # 4 bytes off the 16-byte alignment
    elif change == "device":
        args[0] = torch.zeros(64, device="meta")
    elif change == "meta":
        meta["BLOCK"] = 32
    else:
        meta["num_warps"] = 8
    _launch.launch(k, (4,), *args, **meta)
    assert [e[0] for e in k.log] == ["triton", "triton"]


def test_failing_direct_call_turns_the_shortcut_off():
    k = _Kernel(fail=True)
    x = torch.zeros(64)
    for _ in range(3):
        _launch.launch(k, (4,), x, 32, BLOCK=16)
    assert [e[0] for e in k.log] == ["triton", "triton", "triton"]
    assert _launch.FAST_LAUNCH is False and "launcher signature differs" in _launch.FAST_LAUNCH_ERROR


def test_missing_constexpr_is_not_cached():
    k = _Kernel()
    x = torch.zeros(64)
    _launch.launch(k, (4,), x, 32)            # BLOCK left to a default: no direct entry
    _launch.launch(k, (4,), x, 32)
    assert [e[0] for e in k.log] == ["triton", "triton"]


class TensorDescriptor:   # stands in for triton.tools.tensor_descriptor.TensorDescriptor (matched by name)
    def __init__(self, base: torch.Tensor, block_shape: list, padding: str = "zero") -> None:
        self.base, self.shape, self.strides = base, list(base.shape), list(base.stride())
        self.block_shape, self.padding = block_shape, padding


def test_descriptor_launch_with_same_element_type_and_block_is_direct():
    k = _Kernel()
    _launch.launch(k, (4,), TensorDescriptor(torch.zeros(8, 8), [4, 8]), 32, BLOCK=16)
    other = TensorDescriptor(torch.zeros(16, 8), [4, 8])   # another tensor and shape: launch-time values
    _launch.launch(k, (4,), other, 32, BLOCK=16)
    assert [e[0] for e in k.log] == ["triton", "direct"]
    assert k.log[1][2][0] is other


@pytest.mark.parametrize("change", ["block", "dtype", "padding"])
def test_descriptor_with_another_block_or_type_goes_through_triton(change):
    k = _Kernel()
    _launch.launch(k, (4,), TensorDescriptor(torch.zeros(8, 8), [4, 8]), 32, BLOCK=16)
    if change == "block":
        d = TensorDescriptor(torch.zeros(8, 8), [8, 8])
    elif change == "dtype":
        d = TensorDescriptor(torch.zeros(8, 8, dtype=torch.bfloat16), [4, 8])
    else:
        d = TensorDescriptor(torch.zeros(8, 8), [4, 8], padding="nan")
    _launch.launch(k, (4,), d, 32, BLOCK=16)
    assert [e[0] for e in k.log] == ["triton", "triton"]


def test_failing_descriptor_launch_turns_off_only_descriptor_launches():
    k = _Kernel(fail=True)
    for _ in range(3):
        _launch.launch(k, (4,), TensorDescriptor(torch.zeros(8, 8), [4, 8]), 32, BLOCK=16)
    assert [e[0] for e in k.log] == ["triton", "triton", "triton"]
    assert _launch.FAST_LAUNCH_DESCRIPTORS is False and _launch.FAST_LAUNCH is True
    plain = _Kernel()
    x = torch.zeros(64)
    _launch.launch(plain, (4,), x, 32, BLOCK=16)
    _launch.launch(plain, (4,), x, 32, BLOCK=16)
    assert [e[0] for e in plain.log] == ["triton", "direct"]

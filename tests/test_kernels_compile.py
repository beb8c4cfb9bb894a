"""Every Triton launch the GPU tuner can make compiles for Hopper (sm_90), on a machine without a GPU.

The interpreter tests run the kernels' Python semantics; they cannot see what only Triton's compiler rejects (a
static branch that returns early compiled under the interpreter and failed on the H200, the tuner then silently
skipping that kernel). Here each launch is recorded instead of run, from the launch helpers called with the
candidate configurations the CUDA tuner would try, and compiled with ``triton.compile`` for ``cuda:90`` (Triton's
own ptxas; no driver needed). Launches that differ only in tile sizes are compiled once.
"""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

_PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float64: "*fp64",
        torch.int32: "*i32", torch.int64: "*i64"}
# depthwise (C, H, kh, kw): the RepLKNet-31B stage shapes and SLaK's decomposed kernels
DW_SHAPES = [(128, 56, 31, 31), (256, 28, 29, 29), (512, 14, 27, 27), (1024, 7, 13, 13), (128, 56, 51, 5),
             (128, 56, 5, 51), (96, 30, 4, 6)]


def _record(monkeypatch) -> list:
    """Patch every module's ``launch`` to record (kernel, args, meta) instead of launching."""
    from largekernel.ops import _dw_cross, _dw_kernels, _launch, _triton_shiftadd

    calls: list = []

    def fake(kernel, grid, *args, **meta):
        calls.append((kernel, args, meta))

    for mod in (_launch, _dw_kernels, _triton_shiftadd, _dw_cross):
        monkeypatch.setattr(mod, "launch", fake)
    return calls


def _signature(kernel, args: tuple, meta: dict) -> tuple[dict, dict]:
    values = dict(zip(kernel.arg_names, args))
    values.update({k: v for k, v in meta.items() if k in kernel.arg_names})
    sig, consts = {}, {}
    for i, (name, param) in enumerate(zip(kernel.arg_names, kernel.params)):
        v = values[name]
        if param.is_constexpr or v is None:
            sig[name], consts[(i,)] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[name] = _PTR[v.dtype]
        elif type(v).__name__ == "TensorDescriptor":
            sig[name] = f"tensordesc<{_PTR[v.base.dtype][1:]}{list(v.block_shape)}>".replace(" ", "")
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            sig[name] = "i32" if -2**31 <= v < 2**31 else "i64"
        else:
            sig[name] = "fp32"
    return sig, consts


def _compile_all(calls: list) -> int:
    """Compile each distinct launch (tile sizes aside) for sm_90; returns how many were compiled."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    seen = set()
    for kernel, args, meta in calls:
        sig, consts = _signature(kernel, args, meta)
        # what changes the generated code's structure: argument types and the non-integer constexprs
        # (and one image per program, or padded rows, which take other branches in the shift-add's tensor-core
        # kernels; the "tc3" stacking, and one or two stacked groups per program; not the pipeline depth: the
        # candidates that differ only in it share their code's structure)
        key = (kernel.fn.__name__, tuple(sig.values()), meta.get("NB") == 1, meta.get("CO", 0) > 0,
               meta.get("S", 1) > 1, meta.get("NB") == 2 * meta.get("S", 0),
               tuple((k, v) for k, v in consts.items() if not isinstance(v, int) or isinstance(v, bool)))
        if key in seen:
            continue
        seen.add(key)
        options = {k: meta[k] for k in ("num_warps", "num_stages") if k in meta}
        try:
            triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                           options=options)
        except Exception as e:  # noqa: BLE001 - name the launch that failed
            constexprs = {kernel.arg_names[i[0]]: v for i, v in consts.items()}
            raise AssertionError(f"{kernel.fn.__name__} {constexprs} {options}: {str(e)[-1500:]}") from e
    return len(seen)


def _meta(shape, dtype):
    return torch.empty(shape, device="meta", dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_depthwise_launches_compile_for_hopper(monkeypatch, dtype):
    from largekernel.ops import _dw_kernels as K
    from largekernel.ops import depthwise as dw

    calls = _record(monkeypatch)
    for c, h, kh, kw in DW_SHAPES:
        big = _meta((64, c, h, h), dtype)   # the tuner's candidate lists for the full shape, on the CUDA branch
        x = torch.randn(2, 3, h, h, dtype=dtype)
        w = torch.randn(3, kh, kw, dtype=dtype)
        b = torch.randn(3, dtype=dtype)
        ph, pw = dw._pads(kh, kw)
        for cand in [*dw._fwd_candidates(big, kh, kw), *dw._fwd_candidates(big, kh, kw, bands=False)]:
            if not cand.get("native"):
                prec = dw._precision(dtype, cand)
                K.launch_fwd(x, w, b, torch.empty_like(x), ph, pw, cand, prec, False)
                K.launch_fwd(x, w, None, torch.empty_like(x), kh - 1 - ph, kw - 1 - pw, cand, prec, False, flip=True)
        for cand in dw._wgrad_candidates(big, kh, kw):
            if not cand.get("native"):
                prec = dw._precision(dtype, cand)
                K.launch_wgrad(x, torch.randn_like(x), kh, kw, ph, pw, cand, prec, False)
    assert any(m.get("PRECISION") == "bf16x3" for _, _, m in calls) == (dtype == torch.float32)
    assert _compile_all(calls) >= 8


def test_shift_add_and_layout_launches_compile_for_hopper(monkeypatch):
    from largekernel.ops import _triton_shiftadd as S
    from largekernel.ops.layout import _copy

    calls = _record(monkeypatch)
    for dtype in (torch.float32, torch.bfloat16):
        # large planes, and SW-tiny's first and last stages (the tensor-core kernels at P = 64 and 32), the first in
        # the training layer's layout too (rows padded to the tile: col_pad; at 28, two planes stacked per tile)
        for h, pad, col_pad in ((56, 24, 0), (56, 1, 0), (56, 1, 3), (28, 1, 1), (7, 5, 0)):
            b, r, nk, g, c = 2, 4, 3, 2, 6
            y = torch.randn(b, r * nk, h + 2 * pad, h + 2 * pad + 2 * col_pad, dtype=dtype)
            pad_hv = torch.zeros(r * nk, 4, dtype=torch.int32)
            idx = torch.zeros(r, g, dtype=torch.int32)
            gout = torch.randn(3, b, r, h, h, dtype=dtype)
            x = torch.randn(b, c, h, h, dtype=dtype)
            for force in range(S.N_CANDIDATES):
                monkeypatch.setattr(S, "FORCE", force)
                S.shift_add_forward(y, pad_hv, idx, pad, col_pad)
                S.shift_add_backward(gout, pad_hv, idx, pad, col_pad)
                if col_pad:
                    continue
                S.shift_add_eval_forward(y, pad_hv, idx, pad, torch.ones(3, r), torch.zeros(r), x,
                                         torch.arange(r), torch.arange(r, c))
        _copy(torch.randn(2, 5, 7, 9, dtype=dtype), torch.channels_last)
        _copy(torch.randn(2, 5, 7, 9, dtype=dtype).contiguous(memory_format=torch.channels_last),
              torch.contiguous_format)
    assert _compile_all(calls) >= 8


def test_cross_launches_compile_for_hopper(monkeypatch):
    """The fused cross kernel's candidates at SW-tiny's stage shapes (k = 3) and a k = 5 one, where the op takes it."""
    from largekernel.ops import _dw_cross as X
    from largekernel.ops import depthwise as dw
    from largekernel.ops.layout import padded_rows

    calls = _record(monkeypatch)
    for dtype in (torch.float32, torch.bfloat16):
        for c, h, k, d in ((80, 56, 3, 51), (160, 28, 3, 53), (320, 14, 3, 27), (640, 7, 3, 13), (24, 30, 5, 45)):
            if dtype == torch.float32 and h > dw.CROSS_MAX_PLANE // 2:
                continue
            x = torch.randn(2, 3, h, h, dtype=dtype)
            wh, wv = torch.randn(3, k, d, dtype=dtype), torch.randn(3, d, k, dtype=dtype)
            for cand in dw._cross_candidates(_meta((128, c, h, h), dtype)):   # (meta: the CUDA branch)
                if not cand.get("pair"):
                    src = padded_rows(x) if cand.get("tma") else x   # (TMA: rows at 16-byte strides)
                    X.launch_cross(src, wh, wv, torch.randn(3, dtype=dtype), padded_rows(torch.empty_like(x)),
                                   dw._pads(k, d), dw._pads(d, k), cand, dw._precision(dtype), False)
    assert any(m.get("NB") for _, _, m in calls) and any(k is X._cross_tma_kernel for k, _, _ in calls)
    assert _compile_all(calls) >= 6

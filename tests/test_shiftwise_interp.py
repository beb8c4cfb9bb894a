"""Fused Triton shift-add (forward, backward) vs the PyTorch reference / the dense conv, through Triton's
interpreter on the CPU.

TRITON_INTERPRET must be set before triton is imported, and setting it here would leak into the other
tests, so the checks run in one subprocess (this file run as a script); pytest reads its JSON verdicts.
"""
import json
import os

import pytest

# (name, B, R, nk, G, extra_pad, H, W, dtype, tables)   tables: random shifts (in and out of range) | official
OP_CASES = [
    ("random_f64", 2, 3, 5, 2, 1, 6, 7, "float64", "random"),
    ("official_f64", 1, 4, 5, 4, 1, 5, 9, "float64", "official"),
    ("k5_one_group_f64", 2, 2, 3, 1, 2, 7, 5, "float64", "random"),
    ("official_f32", 2, 4, 5, 4, 1, 8, 6, "float32", "official"),
    ("official_bf16", 1, 4, 5, 3, 1, 6, 6, "bfloat16", "official"),
    ("several_tiles_f64", 1, 2, 3, 2, 1, 40, 130, "float64", "random"),  # 2 x 2 tiles per plane
]
TOL = {"float64": 1e-12, "float32": 1e-5, "bfloat16": 1e-2}
# run once per tuner candidate (``_triton_shiftadd.FORCE``), forward, backward and the fused eval epilogue:
# small planes (several per "flat" program, plane count not a multiple of it), several tiles / strips / chunks per
# plane (40 x 130), extra_pad 2, bf16, and planes that fill the "dot" kernels' 32- and 64-wide tiles
# and y rows with pad columns (an 11th field, col_pad; nonzero values there, which the op must ignore): rows exactly
# as wide as the "tc" tile (16) and narrower than it
CAND_CASES = [OP_CASES[0], OP_CASES[2], OP_CASES[4], OP_CASES[5],
              ("dot32_f32", 2, 2, 3, 2, 1, 26, 29, "float32", "random"),
              ("dot64_f64", 1, 1, 4, 3, 1, 56, 50, "float64", "random"),
              ("colpad_tile_f64", 2, 2, 3, 2, 1, 9, 10, "float64", "official", 2),
              ("colpad_f32", 1, 3, 3, 2, 1, 12, 7, "float32", "random", 1)]
N_CANDIDATES = 18  # == largekernel.ops._triton_shiftadd.N_CANDIDATES (checked in the subprocess)


def _op_case(case, torch, with_eval=False):
    from largekernel.layers.shiftwise import shiftwise_tables
    from largekernel.ops.shiftadd import shift_add, shift_add_path, shift_add_reference

    name, b, r, nk, g, e, h, w, dtype, tables = case[:10]
    cp = case[10] if len(case) > 10 else 0
    dt = getattr(torch, dtype)
    k = 2 * e + 1
    if tables == "official":
        pad_hv, ident = shiftwise_tables(nk * k - 1, k, r, g)
    else:
        pad_hv = torch.randint(-(nk * k), nk * k, (r * nk, 2 * g), dtype=torch.int32)
        ident = (torch.randint(0, nk, (r, g)) + torch.arange(r)[:, None] * nk).int()
    y = torch.randn(b, r * nk, h + 2 * e, w + 2 * e + 2 * cp, dtype=dt, requires_grad=True)
    out = shift_add(y, pad_hv, ident, e, cp)
    gout = torch.randn_like(out)
    out.backward(gout)
    # the reference sees only the data columns; its gradient is zero in the pad columns
    yd = y.detach().double()[..., cp:cp + w + 2 * e].requires_grad_()
    ref = shift_add_reference(yd, pad_hv, ident, e)
    ref.backward(gout.double())
    yd_grad = torch.nn.functional.pad(yd.grad, (cp, cp))

    def rel(a, want):
        return float((a.double() - want).norm() / want.norm()) if torch.isfinite(a).all() else float("nan")

    result = {"path": shift_add_path(y), "y": rel(out, ref), "dy": rel(y.grad, yd_grad)}
    if with_eval:  # fused inference epilogue vs its formula on the float64 reference terms
        from largekernel.ops.shiftadd import shift_add_eval

        n_ghost = 2
        x = torch.randn(b, r + n_ghost, h, w, dtype=dt)
        perm = torch.randperm(r + n_ghost)
        rep_idx, ghost_idx = perm[:r], perm[r:]
        scale, bias = torch.randn(3, r, dtype=torch.float64), torch.randn(r, dtype=torch.float64)
        y_data = y.detach()[..., cp:cp + w + 2 * e].contiguous()  # the fused eval pass reads plain rows
        got = shift_add_eval(y_data, pad_hv, ident, e, scale.to(dt), bias.to(dt), x, rep_idx, ghost_idx)
        xd = x.double()
        scale, bias = scale.to(dt).double(), bias.to(dt).double()  # the values the kernel sees
        want = (ref.detach() * scale.view(3, 1, r, 1, 1)).sum(0) + bias.view(1, r, 1, 1)
        want = torch.cat([want + xd[:, rep_idx], xd[:, ghost_idx]], 1)
        result["eval"] = rel(got, want)
    return result


def _layer_case(torch, width):
    """The layer on the Triton path vs F.conv2d with its dense kernel; gradients vs the native path. At width 28 the
    training path runs on y rows padded to the tensor-core tile (col_pad 1)."""
    import torch.nn.functional as F

    from largekernel.layers.shiftwise import ShiftwiseConv2d
    from largekernel.ops.dispatch import use_backend

    layer = ShiftwiseConv2d(10, 13, 3, ghost_ratio=0.23, n_path=2, n_rep=4).double()
    with torch.no_grad():
        for bn in (layer.bn_lora1, layer.bn_lora2, layer.bn_small):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
        for conv in layer.LoRAs:
            conv.weight.normal_()
    layer.eval()
    x = torch.randn(2, 10, 7, width, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    gout = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, layer.LoRAs[0].weight], gout)
    weight, bias, index = layer.to_dense_kernel()
    dense = F.conv2d(x.detach()[:, index], weight, bias, padding=layer.dense_size // 2, groups=10)
    with use_backend("native"):
        out_n = layer(x)
        grads_n = torch.autograd.grad(out_n, [x, layer.LoRAs[0].weight], gout)

    with torch.no_grad():
        inference = layer(x)  # the fused inference kernel
        half = layer.float()(x.float())  # float32 through the fused kernel

    def rel(a, want):
        return float((a.double() - want).norm() / want.norm())

    return {"y": rel(out, dense), "dx": rel(grads[0], grads_n[0]), "dw": rel(grads[1], grads_n[1]),
            "inference": rel(inference, dense), "inference_f32": rel(half, dense)}


def _main() -> None:
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from conftest import shard_of

    from largekernel.ops.dispatch import set_backend

    seed = torch.seed()
    set_backend("triton")
    import largekernel.ops._triton_shiftadd as kernels

    assert kernels.N_CANDIDATES == N_CANDIDATES, kernels.N_CANDIDATES
    jobs = [(None, "layer"), (None, "layer_padded")] + [(None, case) for case in OP_CASES] + [
        (index, case) for index in range(N_CANDIDATES) for case in CAND_CASES]
    results = {"seed": seed}
    for index, case in shard_of(jobs):
        if case in ("layer", "layer_padded"):
            results[case] = _layer_case(torch, 28 if case == "layer_padded" else 9)
        elif index is None:
            results[case[0]] = _op_case(case, torch)
        else:
            kernels.FORCE = index
            results[f"cand{index}_{case[0]}"] = _op_case(case, torch, with_eval=True)
            kernels.FORCE = None
    print(json.dumps(results))


@pytest.fixture(scope="module")
def results():
    from conftest import run_interpreted

    return run_interpreted(__file__, shards=2)   # two processes at once: CI has two cores


@pytest.mark.parametrize("case", OP_CASES, ids=[c[0] for c in OP_CASES])
def test_triton_shift_add_matches_reference(results, case):
    r = results[case[0]]
    tol = TOL[case[8]]
    assert r["path"] == "triton", r
    for key in ("y", "dy"):
        assert r[key] <= tol, f"{key}: rel err {r[key]} > {tol} (seed {results['seed']})"


@pytest.mark.parametrize("index", range(N_CANDIDATES))
@pytest.mark.parametrize("case", CAND_CASES, ids=[c[0] for c in CAND_CASES])
def test_every_tuner_candidate_matches_reference(results, index, case):
    r = results[f"cand{index}_{case[0]}"]
    tol = TOL[case[8]]
    assert r["path"] == "triton", r
    for key in ("y", "dy", "eval"):
        assert r[key] <= tol, f"candidate {index} {key}: rel err {r[key]} > {tol} (seed {results['seed']})"


@pytest.mark.parametrize("case", ["layer", "layer_padded"])
def test_triton_layer_matches_dense_conv(results, case):
    from largekernel.ops.shiftadd import shift_add_col_pad

    assert shift_add_col_pad(28 + 2) == 1 and shift_add_col_pad(9 + 2) == 0   # the two layouts are exercised
    r = results[case]
    for key in ("y", "dx", "dw", "inference"):
        assert r[key] <= 1e-12, f"{key}: rel err {r[key]} (seed {results['seed']})"
    assert r["inference_f32"] <= 1e-5, r


if __name__ == "__main__":
    _main()

"""Shift-wise conv: dense equivalence built from the definition, deploy forms, official seeding/layout, models."""
from __future__ import annotations

import io
import math
import random

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import largekernel
from largekernel.analysis.complexity import count_macs
from largekernel.layers import CrossDepthwiseConv2d, DepthwiseConv2d, PartialDepthwiseConv2d
from largekernel.layers.shiftwise import ShiftwiseConv2d, ShiftwisePathConv
from largekernel.models.shiftwise import checkpoint_filter_fn
from largekernel.ops.dispatch import triton_interpreting, use_backend

# ---- independent reference: the official draws and the dense kernel, written from the paper/semantics doc ----


def official_split(channels: int, ghost_ratio: float) -> tuple[list[int], list[int]]:
    n_rep = int(channels * (1 - ghost_ratio)) // 2 * 2
    state = np.random.get_state()
    try:
        np.random.seed(123)  # the official global-seed call
        ghost = sorted(np.random.choice(channels, channels - n_rep, replace=False).tolist())
    finally:
        np.random.set_state(state)
    return [c for c in range(channels) if c not in ghost], ghost


def official_draws(big: int, small: int, r: int, n_rep: int):
    """Global torch.manual_seed(123), then randperm per (g, c) horizontal, the same vertical, randint per g."""
    nk = math.ceil(big / small)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        horizontal = [[torch.randperm(nk).tolist() for _ in range(r)] for _ in range(n_rep)]
        vertical = [[torch.randperm(nk).tolist() for _ in range(r)] for _ in range(n_rep)]
        ident = [torch.randint(0, nk, [r]).tolist() for _ in range(n_rep)]
    return horizontal, vertical, ident


def reference_output(layer: ShiftwiseConv2d, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode output via F.conv2d with a dense kernel: slot i of a band holds small kernel perm[i] at
    offsets i*k - K//2 ... along the long axis, the identity kernel and a unit tap at the centre."""
    big, k, g = layer.big_kernel, layer.small_kernel, layer.n_rep
    rep, ghost = official_split(layer.in_channels, layer.ghost_ratio)
    r, nk = len(rep), math.ceil(big / k)
    horizontal, vertical, ident = official_draws(big, k, r, g)
    lo, hi = -(big // 2), nk * k - 1 - big // 2
    d = 2 * max(-lo, hi) + 1
    c0, h = d // 2, k // 2
    w = sum(conv.weight * conv.weight_mask for conv in layer.LoRAs)[:, 0]
    if layer.use_bn:
        bns = (layer.bn_lora1, layer.bn_lora2, layer.bn_small)
        s = [bn.weight / (bn.running_var + bn.eps).sqrt() for bn in bns]
        bias = sum(bn.bias - bn.running_mean * si for bn, si in zip(bns, s))
    else:
        s, bias = [torch.ones(r, dtype=x.dtype)] * 3, torch.zeros(r, dtype=x.dtype)
    ker = torch.zeros(r, d, d, dtype=x.dtype)
    for t in range(r):
        ker[t, c0, c0] += 1
        for grp in range(g):
            for i in range(nk):
                col = c0 + lo + i * k
                ker[t, c0 - h:c0 + h + 1, col:col + k] += s[0][t] * w[t * nk + horizontal[grp][t][i]]
                ker[t, col:col + k, c0 - h:c0 + h + 1] += s[1][t] * w[t * nk + vertical[grp][t][i]]
            ker[t, c0 - h:c0 + h + 1, c0 - h:c0 + h + 1] += s[2][t] * w[t * nk + ident[grp][t]]
    out = F.conv2d(x[:, rep], ker.unsqueeze(1), bias, padding=c0, groups=r)
    return torch.cat([out, x[:, ghost]], dim=1)


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=gen) * 2 - 1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
            elif isinstance(m, ShiftwisePathConv):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * 0.3)
    return module.eval()


def random_configs(n: int) -> list[tuple]:
    rng = random.Random(5)
    cfgs = [(10, 13, 3, 2, 4, 0.23, True), (7, 7, 3, 1, 2, 0.0, False), (12, 11, 5, 3, 3, 0.3, True),
            (6, 5, 5, 1, 1, 0.5, True), (4, 6, 1, 2, 2, 0.0, True)]
    while len(cfgs) < n:
        k = rng.choice([1, 3, 5])
        cfgs.append((rng.randint(4, 16), rng.randint(k, 17), k, rng.randint(1, 3), rng.randint(1, 4),
                     rng.choice([0.0, 0.23, 0.4]), rng.random() < 0.7))
    return cfgs


# ---- the operator --------------------------------------------------------------------------------------------


def test_shift_add_reference_matches_the_scatter_definition():
    """The official CUDA op as a loop (scatter every y element to its three targets), random tables."""
    from largekernel.ops.shiftadd import shift_add, shift_add_path, shift_add_reference

    gen = torch.Generator().manual_seed(3)
    b, r, nk, g, e, h, w = 2, 2, 3, 2, 1, 4, 5
    y = torch.randn(b, r * nk, h + 2 * e, w + 2 * e, dtype=torch.float64, generator=gen)
    pad_hv = torch.randint(-6, 7, (r * nk, 2 * g), generator=gen, dtype=torch.int32)
    ident = (torch.randint(0, nk, (r, g), generator=gen) + torch.arange(r)[:, None] * nk).int()
    want = torch.zeros(3, b, r, h, w, dtype=torch.float64)
    for pb in range(b):
        for pc in range(r * nk):
            oc = pc // nk
            for ph in range(h + 2 * e):
                for pw in range(w + 2 * e):
                    v = y[pb, pc, ph, pw]
                    for grp in range(g):
                        for term, (hh, ww) in enumerate(((ph - e, pw + pad_hv[pc, grp].item()),
                                                         (ph + pad_hv[pc, g + grp].item(), pw - e),
                                                         (ph - e, pw - e))):
                            if term == 2 and pc != ident[oc, grp]:
                                continue
                            if 0 <= hh < h and 0 <= ww < w:
                                want[term, pb, oc, hh, ww] += v
    torch.testing.assert_close(shift_add_reference(y, pad_hv, ident, e), want, rtol=1e-12, atol=1e-12)
    assert shift_add_path(y) == "native"  # CPU: 'auto' never takes the interpreter
    with use_backend("triton"):
        assert shift_add_path(y) == ("triton" if triton_interpreting() else "native")
        torch.testing.assert_close(shift_add(y, pad_hv, ident, e), want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="pad_hv"):
        shift_add(y, pad_hv[:, :3], ident, e)
    with pytest.raises(ValueError, match="extra_pad"):
        shift_add(y, pad_hv, ident, 5)


def test_count_matrices_as_products_give_the_shift_add():
    """The tensor-core kernels' count matrices, used in plain float64 products (out0 = Y @ Mh, out1^T = Y^T @ Mv on
    the zero-padded P x P grid, outputs at offset e), equal the shift-add reference; built once per table tensor."""
    from largekernel.ops._triton_shiftadd import count_matrices
    from largekernel.ops.shiftadd import shift_add_reference

    gen = torch.Generator().manual_seed(5)
    b, r, nk, g, e, h, w, p = 2, 3, 4, 3, 1, 9, 13, 16
    y = torch.randn(b, r * nk, h + 2 * e, w + 2 * e, dtype=torch.float64, generator=gen)
    pad_hv = torch.randint(-12, 12, (r * nk, 2 * g), generator=gen, dtype=torch.int32)
    ident = (torch.randint(0, nk, (r, g), generator=gen) + torch.arange(r)[:, None] * nk).int()
    want = shift_add_reference(y, pad_hv, ident, e)
    mats = count_matrices(pad_hv, nk, e, p, torch.float64)
    assert mats.shape == (r, nk, 2, p, p) and mats.dtype == torch.float64
    grid = F.pad(y, [0, p - (w + 2 * e), 0, p - (h + 2 * e)]).reshape(b, r, nk, p, p)
    out0 = torch.einsum("brjuk,rjkn->brun", grid, mats[:, :, 0])[..., e:h + e, e:w + e]
    out1 = torch.einsum("brjkv,rjkn->brnv", grid, mats[:, :, 1])[..., e:h + e, e:w + e]
    torch.testing.assert_close(out0, want[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out1, want[1], rtol=1e-12, atol=1e-12)
    assert count_matrices(pad_hv, nk, e, p, torch.float64) is mats   # cached for this table
    pad_hv.add_(1)                                                   # an in-place change rebuilds
    assert not torch.equal(count_matrices(pad_hv, nk, e, p, torch.float64), mats)


@pytest.mark.parametrize("cfg", random_configs(10))
@pytest.mark.parametrize("impl", ["shiftadd", "bands"])
def test_dense_equivalence_float64(cfg, impl):
    c, big, small, n_path, n_rep, ghost_ratio, bn = cfg
    layer = randomize(ShiftwiseConv2d(c, big, small, bn=bn, ghost_ratio=ghost_ratio, n_path=n_path,
                                      n_rep=n_rep, impl=impl).double(), seed=c + big)
    x = torch.randn(2, c, 7, 9, dtype=torch.float64)
    want = reference_output(layer, x)
    with use_backend("native"):
        got = layer(x)
        with torch.no_grad():  # the inference path (one fused epilogue)
            got_inference = layer(x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_inference, want, rtol=1e-12, atol=1e-12)
    # the conversion agrees with the independent kernel
    weight, bias, in_index = layer.to_dense_kernel()
    assert weight.shape[-1] == layer.dense_size
    dense = F.conv2d(x[:, in_index], weight, bias, padding=layer.dense_size // 2, groups=c)
    torch.testing.assert_close(dense, want, rtol=1e-12, atol=1e-12)


def test_input_gradient_matches_dense_conv():
    layer = randomize(ShiftwiseConv2d(10, 11, 3, n_rep=3).double())
    x = torch.randn(2, 10, 6, 8, dtype=torch.float64, requires_grad=True)
    gout = torch.randn(2, 10, 6, 8, dtype=torch.float64)
    with use_backend("native"):
        (got,) = torch.autograd.grad(layer(x), x, gout)
    (want,) = torch.autograd.grad(reference_output(layer, x), x, gout)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["square", "cross"])
def test_deploy_forms_fp32(kind):
    layer = randomize(ShiftwiseConv2d(24, 17, 3, ghost_ratio=0.23, n_path=3, n_rep=4))
    x = torch.randn(2, 24, 12, 10)
    ref = layer(x)
    dense_ref = layer.to_dense_kernel()
    scale = ref.abs().max()
    for step in ("reparameterize", "fold_bn", "to_dense"):
        getattr(layer, step)(*([kind] if step == "to_dense" else []))
        err = (layer(x) - ref).abs().max() / scale
        assert err <= 1e-5, (step, err.item())
        with torch.no_grad():
            assert (layer(x) - ref).abs().max() / scale <= 1e-5, step
    names = {"square": {"dense.weight", "dense.bias"},
             "cross": {"dense_h.weight", "dense_h.bias", "dense_v.weight"}}[kind]
    assert set(layer.state_dict()) == {"rep_idx", "ghost_idx", "pad_hv", "idx_identity"} | names
    assert layer.form == ("dense" if kind == "square" else "cross")
    if kind == "cross":
        assert layer.dense_h.weight.shape == (18, 1, 3, 19) and layer.dense_v.weight.shape == (18, 1, 19, 3)
    for got, want in zip(layer.to_dense_kernel(), dense_ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_bands_impl_trains_like_shiftadd():
    """Training mode (batch-statistics BN): same outputs and gradients for both implementations."""
    torch.manual_seed(0)
    a = randomize(ShiftwiseConv2d(12, 11, 3, ghost_ratio=0.23, n_path=2, n_rep=3).double()).train()
    b = ShiftwiseConv2d(12, 11, 3, ghost_ratio=0.23, n_path=2, n_rep=3, impl="bands").double().train()
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 12, 9, 8, dtype=torch.float64, requires_grad=True)
    gout = torch.randn(3, 12, 9, 8, dtype=torch.float64)
    grads = []
    for layer in (a, b):
        with use_backend("native"):
            out = layer(x)
        params = [x, *(p for p in layer.parameters())]
        grads.append((out, *torch.autograd.grad(out, params, gout)))
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(b.bn_lora2.running_var, a.bn_lora2.running_var)


def test_band_placement_follows_the_tables():
    """The bands' cached placement is rebuilt when the tables change (a state dict with other tables loaded in
    place): the bands then equal a layer built with those tables."""
    torch.manual_seed(0)
    layer = randomize(ShiftwiseConv2d(12, 11, 3, n_rep=3).double())
    other = ShiftwiseConv2d(12, 11, 3, n_rep=3).double()
    other.load_state_dict(layer.state_dict())
    before = layer.band_kernels()
    g = layer.n_rep
    swapped = torch.cat([other.pad_hv[:, g:], other.pad_hv[:, :g]], dim=1)   # horizontal and vertical tables swapped
    other.pad_hv.copy_(swapped)
    other.idx_identity.copy_(other.idx_identity.flip(1).roll(1, 0))
    expect = other.band_kernels()
    del other._placement   # (and built afresh)
    for got, want in zip(expect, other.band_kernels()):
        assert torch.equal(got, want)
    layer.load_state_dict(other.state_dict())
    after = layer.band_kernels()
    assert not torch.equal(before[0], after[0])
    for got, want in zip(after, expect):
        assert torch.equal(got, want)


def test_merged_keys_are_official():
    layer = ShiftwiseConv2d(16, 9, 3)
    layer.reparameterize()
    keys = set(layer.state_dict())
    assert "LoRA.weight" in keys and not any(k.startswith("LoRAs.") for k in keys)
    assert {"bn_lora1.running_mean", "bn_lora2.weight", "bn_small.bias"} <= keys


def test_channel_split_and_tables_follow_official_seeding():
    for c, want in ((80, 60), (160, 122), (320, 246), (640, 492), (7, 6)):
        layer_split = official_split(c, 0.23 if c > 7 else 0.0)
        assert len(layer_split[0]) == want
    layer = ShiftwiseConv2d(80, 51, 3, ghost_ratio=0.23, n_rep=4)
    rep, ghost = official_split(80, 0.23)
    assert layer.rep_idx.tolist() == rep and layer.ghost_idx.tolist() == ghost
    horizontal, vertical, ident = official_draws(51, 3, 60, 4)
    nk = 17
    real_pad = [51 // 2 - i * 3 - 2 for i in range(nk)]
    for grp in range(4):
        for t in (0, 1, 37, 59):
            for i in range(nk):  # slot i holds kernel perm[i]: that kernel's shift is slot i's
                assert layer.pad_hv[t * nk + horizontal[grp][t][i], grp].item() == real_pad[i]
                assert layer.pad_hv[t * nk + vertical[grp][t][i], 4 + grp].item() == real_pad[i]
            assert layer.idx_identity[t, grp].item() == t * nk + ident[grp][t]
    assert layer.pad_hv.dtype == torch.int32 and layer.pad_hv.shape == (60 * nk, 8)
    # the tables come from a local generator: the caller's RNG is not reset (the official code reseeds it,
    # which makes every weight init identical whatever the caller's seed)
    torch.manual_seed(7)
    first = ShiftwiseConv2d(8, 7, 3)
    torch.manual_seed(8)
    second = ShiftwiseConv2d(8, 7, 3)
    assert torch.equal(first.pad_hv, second.pad_hv)
    assert not torch.equal(first.LoRAs[0].weight, second.LoRAs[0].weight)


@pytest.mark.parametrize("kwargs, name", [
    (dict(in_channels=8, big_kernel=3, small_kernel=5), "small_kernel"),
    (dict(in_channels=8, big_kernel=9, small_kernel=4), "small_kernel"),
    (dict(in_channels=8, big_kernel=9, ghost_ratio=1.0), "ghost_ratio"),
    (dict(in_channels=8, big_kernel=9, ghost_ratio=-0.1), "ghost_ratio"),
    (dict(in_channels=8, big_kernel=9, stride=2), "stride"),
    (dict(in_channels=2, big_kernel=9, ghost_ratio=0.5), "in_channels"),
    (dict(in_channels=1, big_kernel=9, ghost_ratio=0.0), "in_channels"),
    (dict(in_channels=8, big_kernel=9, n_rep=0), "n_rep"),
    (dict(in_channels=8, big_kernel=9, n_path=0), "n_path"),
])
def test_bad_configs_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ShiftwiseConv2d(**kwargs)


def test_sparsity_protocol_masks_whole_kernels():
    layer = randomize(ShiftwiseConv2d(12, 9, 3, ghost_ratio=0.0))
    convs = [m for m in layer.modules() if getattr(m, "sparse_params", None)]
    assert len(convs) == 2 and all(m.weight_mask.shape == (12 * 3, 1, 1, 1) for m in convs)
    x = torch.randn(1, 12, 8, 8)
    pruned = [1, 5, 20]
    for m in convs:
        m.weight_mask[pruned] = 0
    got = layer(x)
    with torch.no_grad():
        for m in convs:
            m.weight[pruned] = 0
            m.weight_mask.fill_(1)
    torch.testing.assert_close(got, layer(x))


def test_dynamic_sparsity_engine_prunes_whole_kernels_of_all_paths():
    from largekernel.train.sparse import DynamicSparsity

    torch.manual_seed(0)
    model = timm.create_model("shiftwise_v2_test")
    engine = DynamicSparsity(model, sparsity=0.3, init="uniform", scope="protocol", update_every=1)
    layer = model.stages[0][0].large_kernel
    masks = [conv.weight_mask for conv in layer.LoRAs]
    assert torch.equal(masks[0], masks[1])  # tied across paths
    assert abs(1 - masks[0].mean().item() - 0.3) < 0.05
    engine.step()
    masks = [conv.weight_mask for conv in layer.LoRAs]
    assert torch.equal(masks[0], masks[1])
    pruned = masks[0].flatten() == 0
    assert (layer.LoRAs[1].weight.flatten(1)[pruned] == 0).all()  # whole small kernels zeroed


# ---- models --------------------------------------------------------------------------------------------------


def _tiny_model(**kwargs) -> nn.Module:
    model = timm.create_model("shiftwise_v2_test", **kwargs)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def test_model_forward_features_and_intermediates():
    torch.manual_seed(0)
    model = _tiny_model(num_classes=7)
    x = torch.randn(2, 3, 64, 64)
    assert model(x).shape == (2, 7)
    assert model.forward_features(x).shape == (2, 64, 2, 2)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 64)
    feats = timm.create_model("shiftwise_v2_test", features_only=True).eval()(x)
    assert [tuple(f.shape[1:]) for f in feats] == [(16, 16, 16), (32, 8, 8), (48, 4, 4), (64, 2, 2)]
    with pytest.raises(ValueError, match="input"):
        model(torch.randn(1, 4, 32, 32))


def test_model_reparameterize_and_dense_deploy():
    torch.manual_seed(0)
    model = _tiny_model()
    x = torch.randn(2, 3, 64, 64)
    ref = model(x)
    for fold in (False, True):
        deployed = largekernel.reparameterize(model, fold_bn=fold)
        assert ((deployed(x) - ref).abs().max() / ref.abs().max()) <= 1e-5
    deployed.to_dense()
    assert ((deployed(x) - ref).abs().max() / ref.abs().max()) <= 1e-5
    crossed = largekernel.reparameterize(model)
    crossed.to_dense("cross")
    assert ((crossed(x) - ref).abs().max() / ref.abs().max()) <= 1e-5
    mixed = largekernel.reparameterize(model)
    kinds = ["cross"] + ["square"] * (len(mixed.stages) - 1)
    mixed.to_dense(kinds)
    forms = [{type(block.large_kernel.conv) for block in stage} for stage in mixed.stages]
    assert forms == [{CrossDepthwiseConv2d}] + [{DepthwiseConv2d}] * (len(mixed.stages) - 1)
    assert all(isinstance(block.large_kernel, PartialDepthwiseConv2d) for stage in mixed.stages for block in stage)
    assert not any(isinstance(m, (ShiftwiseConv2d, nn.BatchNorm2d)) for m in mixed.stages.modules())
    assert ((mixed(x) - ref).abs().max() / ref.abs().max()) <= 1e-5
    with pytest.raises(ValueError, match="one kind per stage"):
        mixed.to_dense(["square"])
    bands = _tiny_model(impl="bands")
    bands.load_state_dict(model.state_dict())
    assert ((bands(x) - ref).abs().max() / ref.abs().max()) <= 1e-5


def test_dense_deploy_builds_and_counts_without_storage():
    """Both deploy kinds on a model built on the 'meta' device (as the FLOP counters build them) run (shapes only),
    and count the MACs of the same model built with storage."""
    from largekernel.analysis.complexity import count_macs

    with torch.device("meta"):
        cross, square = (timm.create_model("shiftwise_v2_test").eval() for _ in range(2))
    cross.to_dense("cross")
    square.to_dense("square")
    assert cross(torch.empty(1, 3, 64, 64, device="meta")).shape == (1, 1000)
    assert isinstance(cross.stages[0][0].large_kernel, PartialDepthwiseConv2d)
    real = timm.create_model("shiftwise_v2_test").eval()
    real.to_dense("cross")
    assert square(torch.empty(1, 3, 64, 64, device="meta")).shape == (1, 1000)
    assert count_macs(cross, 64) == count_macs(real, 64)


@pytest.mark.parametrize(("kind", "split"), [("square", True), ("cross", True), ("square", False), ("cross", False)])
def test_block_dense_deploy_folds_every_term_float64(kind, split):
    """The block-level deploy (one conv over all channels or over the rep channels beside the ghost channels' scale
    and shift, permutation moved into SE / pwconv1, FFN tail folded)
    against the training-form block in eval mode, with every affine parameter random (the default layer scale
    of 1e-6 would hide errors in the FFN branch)."""
    torch.manual_seed(4)
    model = _tiny_model(drop_path_rate=0.0).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gamma", "beta", "bias")) or ".bn" in name or ".norm." in name:
                p.uniform_(0.5, 1.5)
    block = model.stages[1][0]
    assert block.large_kernel.ghost_channels > 0
    x = torch.randn(2, block.large_kernel.in_channels, 9, 11, dtype=torch.float64)
    block_rep = block.large_kernel.rep_idx.tolist()
    ref = block(x)
    block.to_dense(kind, split)
    conv_type = CrossDepthwiseConv2d if kind == "cross" else DepthwiseConv2d
    if split:   # the rep channels' conv, the ghost channels' scale and shift
        assert isinstance(block.large_kernel, PartialDepthwiseConv2d)
        assert isinstance(block.large_kernel.conv, conv_type)
        assert block.large_kernel.channels.tolist() == block_rep
    else:
        assert isinstance(block.large_kernel, conv_type)
    assert isinstance(block.norm, nn.Identity) and block.gamma is None and len(block.pwconv2) == 2
    torch.testing.assert_close(block(x), ref, rtol=1e-10, atol=1e-10)
    block.to_dense(kind)   # idempotent
    torch.testing.assert_close(block(x), ref, rtol=1e-10, atol=1e-10)


def _official_layout(state: dict, merged: bool) -> dict:
    """What the official model saves: no tables, no masks; merged form sums the paths into LoRA.weight."""
    out = {k: v for k, v in state.items()
           if not k.endswith(("rep_idx", "ghost_idx", "pad_hv", "idx_identity", "weight_mask"))}
    if merged:
        for k in [k for k in out if ".LoRAs.0.weight" in k]:
            prefix = k[:-len("LoRAs.0.weight")]
            paths = [p for p in list(out) if p.startswith(prefix + "LoRAs.")]
            out[prefix + "LoRA.weight"] = sum(out.pop(p) for p in paths)
    return out


def test_state_dict_round_trip_and_official_layout(tmp_path):
    torch.manual_seed(0)
    model = _tiny_model()
    with torch.no_grad():  # a non-default table must come back from the checkpoint
        model.stages[0][0].large_kernel.pad_hv.copy_(model.stages[0][0].large_kernel.pad_hv.roll(1, dims=1))
    x = torch.randn(1, 3, 64, 64)
    ref = model(x)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(1)
    fresh = _tiny_model()
    fresh.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    assert torch.equal(fresh(x), ref)

    torch.manual_seed(0)
    model = _tiny_model()
    ref = model(x)
    official = _official_layout(model.state_dict(), merged=False)
    for key in ("stages.0.0.large_kernel.LoRAs.1.weight", "stages.0.0.large_kernel.bn_small.running_var",
                "stages.2.1.se.down.weight", "stages.2.1.pwconv1.1.weight", "stages.2.1.act.1.gamma",
                "stages.2.1.act.1.beta", "stages.2.1.pwconv2.0.weight", "stages.2.1.pwconv2.2.running_mean",
                "stages.2.1.gamma", "downsample_layers.0.3.weight", "downsample_layers.0.4.bias",
                "downsample_layers.3.1.weight", "norm.weight", "head.bias"):
        assert key in official, key
    torch.manual_seed(2)
    fresh = _tiny_model()
    fresh.load_state_dict(checkpoint_filter_fn({"model": official}, fresh), strict=True)
    assert torch.equal(fresh(x), ref)

    merged = _official_layout(model.state_dict(), merged=True)
    torch.manual_seed(3)
    fresh = _tiny_model()
    fresh.load_state_dict(checkpoint_filter_fn(merged, fresh), strict=True)  # merged -> training form
    torch.testing.assert_close(fresh(x), ref, rtol=1e-6, atol=1e-6)
    fresh = _tiny_model()
    fresh.reparameterize()
    fresh.load_state_dict(checkpoint_filter_fn(merged, fresh), strict=True)  # merged -> merged form
    torch.testing.assert_close(fresh(x), ref, rtol=1e-6, atol=1e-6)
    fresh.load_state_dict(checkpoint_filter_fn(official, fresh), strict=True)  # training -> merged form
    torch.testing.assert_close(fresh(x), ref, rtol=1e-6, atol=1e-6)

    with torch.device("meta"):  # a model materialised without init: the filter recomputes the tables
        lazy = timm.create_model("shiftwise_v2_test")
    lazy = lazy.to_empty(device="cpu").eval()
    lazy.load_state_dict(checkpoint_filter_fn(official, lazy), strict=True)
    assert torch.equal(lazy(x), ref)

    path = tmp_path / "sw_official.pth"  # the timm route: pretrained=True with a local file
    torch.save({"model": official}, path)
    loaded = timm.create_model("shiftwise_v2_test", pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(path))).eval()
    assert torch.equal(loaded(x), ref)


# Official counts (shared/anchors/README.md): params train/merged, MACs train/merged at 224.
ANCHORS = {
    "tiny": (31_790_260, 31_002_670, 5.336e9, 5.024e9),
    "small": (57_312_892, 55_990_108, 9.805e9, 9.334e9),
    "base": (100_250_380, 98_477_182, 17.016e9, 16.383e9),
    "large": (221_808_628, 219_153_178, 37.315e9, 36.368e9),
}


@pytest.mark.parametrize("variant", list(ANCHORS))
def test_params_and_macs_match_official(variant):
    with torch.device("meta"):
        model = timm.create_model(f"shiftwise_v2_{variant}").eval()
    params_train = sum(p.numel() for p in model.parameters())
    # The official training form runs each path's conv separately; ours sums the path weights first.
    extra_path_macs = 0
    for i, stage in enumerate(model.stages):
        side = 224 // 4 // 2 ** i
        for block in stage:
            sw = block.large_kernel
            out_side = side + 2 * sw.extra_pad
            extra_path_macs += ((sw.n_path - 1) * sw.rep_channels * sw.nk * sw.small_kernel ** 2
                                * out_side ** 2)
    macs_train = count_macs(model, 224) + extra_path_macs
    model.reparameterize()
    params_merged = sum(p.numel() for p in model.parameters())
    macs_merged = count_macs(model, 224)
    want = ANCHORS[variant]
    for got, ref in zip((params_train, params_merged, macs_train, macs_merged), want):
        assert abs(got - ref) <= 0.01 * ref, (variant, got, ref)
    assert params_train == want[0] and params_merged == want[1]


@pytest.mark.parametrize("coarse", [True, False])
def test_group_matcher_covers_every_parameter(coarse: bool) -> None:
    from timm.models import group_parameters

    model = timm.create_model("shiftwise_v2_test")
    groups = group_parameters(model, model.group_matcher(coarse))
    assert set().union(*map(set, groups.values())) == {n for n, _ in model.named_parameters()}
    assert len(groups) > 3

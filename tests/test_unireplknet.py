"""UniRepLKNet: dilated-kernel merge, re-parameterization, counts vs the official code, official key layout."""
import copy

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.utils import reparameterize_model
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

import largekernel
from largekernel.layers.dilated import DilatedReparamBlock, dilate_kernel, dilated_branch_config
from largekernel.models.unireplknet import UniRepLKNetBlock  # noqa: F401  (registers the models)

# The official (AILab-CVC/UniRepLKNet, unireplknet.py) kernel-size -> (branch kernels, dilations) table.
OFFICIAL_TABLE = {
    17: ([5, 9, 3, 3, 3], [1, 2, 4, 5, 7]), 15: ([5, 7, 3, 3, 3], [1, 2, 3, 5, 7]),
    13: ([5, 7, 3, 3, 3], [1, 2, 3, 4, 5]), 11: ([5, 5, 3, 3, 3], [1, 2, 3, 4, 5]),
    9: ([5, 5, 3, 3], [1, 2, 3, 4]), 7: ([5, 3, 3], [1, 2, 3]), 5: ([3, 3], [1, 2]),
}

# Measured on the official code (shared/anchors/README.md): params train, deploy; GMACs train, deploy @224.
ANCHORS = {
    "a": (4_649_060, 4_437_300, 0.675, 0.640), "f": (6_489_328, 6_235_216, 0.947, 0.905),
    "p": (11_080_520, 10_741_704, 1.629, 1.573), "n": (18_818_880, 18_318_560, 2.849, 2.767),
    "t": (31_693_420, 31_037_980, 5.004, 4.899), "s": (56_456_704, 55_645_984, 9.219, 9.094),
    "b": (99_089_416, 98_008_456, 16.224, 16.057), "l": (220_076_056, 218_454_616, 36.132, 35.882),
    "xl": (388_690_984, 386_529_064, 63.904, 63.570),
}
ANCHOR_GMACS_384 = {"s": 27.087, "b": 47.668, "l": 106.159, "xl": 187.755}
# The paper's / official README's tables (deploy form): (params M, GFLOPs, resolution, printed precision).
PAPER = {
    "a": (4.4, 0.6, 224, 0.1), "f": (6.2, 0.9, 224, 0.1), "p": (10.7, 1.6, 224, 0.1),
    "n": (18.3, 2.8, 224, 0.1), "t": (31, 4.9, 224, 0.1), "s": (56, 9.1, 224, 0.1),
    "b": (98, 47.2, 384, 0.1), "l": (218, 105.4, 384, 0.1), "xl": (386, 187, 384, 1),
}

# Official configurations (depths, dims, per-block kernel sizes), written out from the official file.
_AFP = ((3, 3), (13, 13), (13,) * 6, (13, 13))
_SBLXL = ((3, 3, 3), (13, 13, 13), (13, 3, 3) * 9, (13, 13, 13))
OFFICIAL_CFGS = {
    "a": ((40, 80, 160, 320), _AFP), "f": ((48, 96, 192, 384), _AFP), "p": ((64, 128, 256, 512), _AFP),
    "n": ((80, 160, 320, 640), ((3, 3), (13, 13), (13,) * 8, (13, 13))),
    "t": ((80, 160, 320, 640), ((3, 3, 3), (13, 13, 13), (13, 3) * 9, (13, 13, 13))),
    "s": ((96, 192, 384, 768), _SBLXL), "b": ((128, 256, 512, 1024), _SBLXL),
    "l": ((192, 384, 768, 1536), _SBLXL), "xl": ((256, 512, 1024, 2048), _SBLXL),
    "test": ((16, 24, 32, 48), ((3,), (7,), (13, 5), (9,))),
}


def official_state_shapes(dims, kernel_sizes, deploy: bool, num_classes: int = 1000) -> dict:
    """Key -> shape of the official UniRepLKNet state dict, built from the official module structure."""
    s = {}

    def bn(prefix, c):
        s.update({f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
                  f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()})

    def conv(prefix, cout, cin, k):
        s.update({f"{prefix}.weight": (cout, cin, k, k), f"{prefix}.bias": (cout,)})

    conv("downsample_layers.0.0", dims[0] // 2, 3, 3)
    s.update({"downsample_layers.0.1.weight": (dims[0] // 2,), "downsample_layers.0.1.bias": (dims[0] // 2,)})
    conv("downsample_layers.0.3", dims[0], dims[0] // 2, 3)
    s.update({"downsample_layers.0.4.weight": (dims[0],), "downsample_layers.0.4.bias": (dims[0],)})
    for i in range(1, 4):
        conv(f"downsample_layers.{i}.0", dims[i], dims[i - 1], 3)
        s.update({f"downsample_layers.{i}.1.weight": (dims[i],), f"downsample_layers.{i}.1.bias": (dims[i],)})
    for i, ks in enumerate(kernel_sizes):
        c = dims[i]
        for j, k in enumerate(ks):
            p = f"stages.{i}.{j}"
            dw = f"{p}.dwconv.lk_origin" if k >= 7 else f"{p}.dwconv"
            s[f"{dw}.weight"] = (c, 1, k, k)
            if deploy:
                s[f"{dw}.bias"] = (c,)
            else:
                if k >= 7:
                    bn(f"{p}.dwconv.origin_bn", c)
                    for kk, r in zip(*OFFICIAL_TABLE[k]):
                        s[f"{p}.dwconv.dil_conv_k{kk}_{r}.weight"] = (c, 1, kk, kk)
                        bn(f"{p}.dwconv.dil_bn_k{kk}_{r}", c)
                bn(f"{p}.norm", c)
            conv(f"{p}.se.down", c // 4, c, 1)
            conv(f"{p}.se.up", c, c // 4, 1)
            s.update({f"{p}.pwconv1.1.weight": (4 * c, c), f"{p}.pwconv1.1.bias": (4 * c,),
                      f"{p}.act.1.gamma": (1, 1, 1, 4 * c), f"{p}.pwconv2.0.weight": (c, 4 * c)})
            if deploy:
                s[f"{p}.pwconv2.0.bias"] = (c,)
            else:
                s[f"{p}.act.1.beta"] = (1, 1, 1, 4 * c)
                bn(f"{p}.pwconv2.2", c)
                s[f"{p}.gamma"] = (c,)
    s.update({"norm.weight": (dims[-1],), "norm.bias": (dims[-1],),
              "head.weight": (num_classes, dims[-1]), "head.bias": (num_classes,)})
    return s


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics/affine, GRN gamma/beta and layer scales (defaults would hide folding bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("gamma", "beta") and p.dim() == 4:  # GRN
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif leaf == "gamma":  # layer scale
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.2 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=g))
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# ---- the dilated kernel merge ---------------------------------------------------------------------------------
def test_branch_table_is_official():
    for k, (ks, rs) in OFFICIAL_TABLE.items():
        assert dilated_branch_config(k) == (tuple(ks), tuple(rs))
    with pytest.raises(ValueError, match="kernel_size"):
        dilated_branch_config(19)


@pytest.mark.parametrize("k,r", [(3, 2), (3, 7), (5, 3), (9, 2), (7, 3)])
def test_dilated_kernel_equals_dilated_conv(k, r):
    torch.manual_seed(k * 10 + r)
    w = torch.randn(4, 1, k, k, dtype=torch.float64)
    x = torch.randn(2, 4, 23, 23, dtype=torch.float64)
    pad = r * (k - 1) // 2
    ref = F.conv2d(x, w, padding=pad, dilation=r, groups=4)
    dense = dilate_kernel(w, r)
    assert dense.shape[-1] == r * (k - 1) + 1
    torch.testing.assert_close(F.conv2d(x, dense, padding=pad, groups=4), ref, rtol=1e-12, atol=1e-12)


def _dense_reference(block: DilatedReparamBlock) -> tuple[torch.Tensor, torch.Tensor]:
    """Merged kernel built tap by tap in float64 (BN folded by its formula)."""
    big = block.kernel_size
    c = block.channels
    kernel = torch.zeros(c, 1, big, big, dtype=torch.float64)

    def fold(bn):
        scale = bn.weight.double() / (bn.running_var.double() + bn.eps).sqrt()
        return scale, bn.bias.double() - bn.running_mean.double() * scale

    scale, bias = fold(block.origin_bn)
    kernel += block.lk_origin.weight.double() * scale[:, None, None, None]
    centre = big // 2
    for k, r in zip(*OFFICIAL_TABLE[big]):
        w = getattr(block, f"dil_conv_k{k}_{r}").weight.double()
        s, b = fold(getattr(block, f"dil_bn_k{k}_{r}"))
        bias = bias + b
        for i in range(k):
            for j in range(k):
                kernel[:, 0, centre + (i - k // 2) * r, centre + (j - k // 2) * r] += w[:, 0, i, j] * s
    return kernel, bias


@pytest.mark.parametrize("kernel_size", [5, 7, 9, 11, 13, 15, 17])
def test_merged_kernel_equals_sum_of_dilated_branches(kernel_size):
    torch.manual_seed(kernel_size)
    block = randomize_(DilatedReparamBlock(6, kernel_size), seed=kernel_size).eval()
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.normal_()
    ref_w, ref_b = _dense_reference(block)
    w, b = block.merged_kernel()
    torch.testing.assert_close(w.double(), ref_w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.double(), ref_b, rtol=1e-5, atol=1e-5)
    x = torch.randn(2, 6, 20, 20)
    with torch.no_grad():
        y = block(x)
        ref_y = F.conv2d(x.double(), ref_w, ref_b, padding=kernel_size // 2, groups=6)
        assert rel_err(y.double(), ref_y) < 1e-5
        block.reparameterize()
        assert set(block.state_dict()) == {"lk_origin.weight", "lk_origin.bias"}
        assert isinstance(block.lk_origin, largekernel.layers.DepthwiseConv2d)
        assert rel_err(block(x).double(), ref_y) < 1e-5
        block.reparameterize()  # idempotent
        assert rel_err(block(x).double(), ref_y) < 1e-5


def test_dilated_block_bad_arguments():
    with pytest.raises(ValueError, match="fit"):
        DilatedReparamBlock(4, 7, kernel_sizes=(5,), dilations=(2,))
    with pytest.raises(ValueError, match="together"):
        DilatedReparamBlock(4, 7, kernel_sizes=(3,))


# ---- the block and the model --------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel_size", [0, 3, 5, 7, 13])
def test_block_reparam_equivalence(kernel_size):
    torch.manual_seed(kernel_size)
    block = randomize_(UniRepLKNetBlock(8, kernel_size), seed=kernel_size + 1).eval()
    x = torch.randn(2, 8, 15, 15)
    with torch.no_grad():
        y = block(x)
        block.reparameterize()
        deployed = UniRepLKNetBlock(8, kernel_size, deploy=True)
        assert set(block.state_dict()) == set(deployed.state_dict())
        assert rel_err(block(x), y) < 1e-5
        deployed.load_state_dict(block.state_dict(), strict=True)
        assert rel_err(deployed.eval()(x), y) < 1e-5


def test_block_bad_kernel_size():
    with pytest.raises(ValueError, match="kernel_size"):
        UniRepLKNetBlock(8, 4)


def test_model_reparam_equivalence_three_ways():
    torch.manual_seed(0)
    model = randomize_(timm.create_model("unireplknet_test"), seed=3).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y = model(x)
        outs = [largekernel.reparameterize(model)(x), reparameterize_model(copy.deepcopy(model))(x)]
        official = copy.deepcopy(model)
        official.reparameterize_unireplknet()
        outs.append(official(x))
    for out in outs:
        assert rel_err(out, y) < 1e-5
    deploy = timm.create_model("unireplknet_test", deploy=True)
    deploy.load_state_dict(official.state_dict(), strict=True)
    with torch.no_grad():
        assert rel_err(deploy.eval()(x), y) < 1e-5


def test_forward_backward_and_surface():
    torch.manual_seed(0)
    model = timm.create_model("unireplknet_test", num_classes=7, drop_path_rate=0.1)
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert out.shape == (2, 7)
    out.square().sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    assert model.stages[2][0].dwconv.dil_conv_k7_2.weight.grad.abs().sum() > 0
    assert model.forward_features(x).shape == (2, 48, 2, 2)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 48)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    with pytest.raises(ValueError, match="expects input"):
        model(torch.randn(1, 4, 64, 64))


def test_features_only():
    model = timm.create_model("unireplknet_test", features_only=True)
    feats = model(torch.randn(1, 3, 64, 64))
    assert [f.shape for f in feats] == [(1, 16, 16, 16), (1, 24, 8, 8), (1, 32, 4, 4), (1, 48, 2, 2)]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    model = timm.create_model("unireplknet_test", features_only=True, out_indices=(1, 2))
    assert [f.shape[1] for f in model(torch.randn(1, 3, 64, 64))] == [24, 32]


@pytest.mark.parametrize("coarse", [False, True])
def test_group_matcher_covers_every_parameter(coarse):
    from timm.models import group_parameters

    model = timm.create_model("unireplknet_test")
    groups = group_parameters(model, model.group_matcher(coarse=coarse))
    names = [n for g in groups.values() for n in g]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    first = groups[min(groups)]
    assert all(n.startswith("downsample_layers.0.") for n in first)
    assert len(groups) == (6 if coarse else 7)


def test_sync_bn_falls_back_without_process_group():
    model = timm.create_model("unireplknet_test", use_sync_bn=True)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())


def _count(name: str, deploy: bool, size: int = 224) -> tuple[int, float]:
    # FakeTensorMode: no storage (like 'meta') but a real device type, so device-dependent dispatch runs.
    with FakeTensorMode():
        model = timm.create_model(name, deploy=deploy).eval()
        params = sum(p.numel() for p in model.parameters())
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(torch.empty(1, 3, size, size))
    return params, counter.get_total_flops() / 2e9


@pytest.mark.parametrize("variant", list(ANCHORS))
def test_counts_match_official(variant):
    params_train, params_deploy, gmacs_train, gmacs_deploy = ANCHORS[variant]
    p, m = _count(f"unireplknet_{variant}", deploy=False)
    assert p == params_train
    assert abs(m - gmacs_train) <= 6e-4 and abs(m / gmacs_train - 1) < 0.01
    p, m = _count(f"unireplknet_{variant}", deploy=True)
    assert p == params_deploy
    assert abs(m - gmacs_deploy) <= 6e-4 and abs(m / gmacs_deploy - 1) < 0.01
    if variant in ANCHOR_GMACS_384:
        _, m384 = _count(f"unireplknet_{variant}", deploy=False, size=384)
        assert abs(m384 / ANCHOR_GMACS_384[variant] - 1) < 1e-3
    # Paper numbers are rounded: equal within 1% or within the printed precision.
    paper_params, paper_gflops, size, unit = PAPER[variant]
    if size != 224:
        _, m = _count(f"unireplknet_{variant}", deploy=True, size=size)
    assert abs(p / 1e6 - paper_params) <= max(0.01 * paper_params, 0.5)
    assert abs(m - paper_gflops) <= max(0.01 * paper_gflops, 0.5 * unit)


# ---- official state-dict layout ------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(OFFICIAL_CFGS))
@pytest.mark.parametrize("deploy", [False, True])
def test_official_key_layout(variant, deploy):
    dims, kernel_sizes = OFFICIAL_CFGS[variant]
    expected = official_state_shapes(dims, kernel_sizes, deploy)
    with torch.device("meta"):
        model = timm.create_model(f"unireplknet_{variant}", deploy=deploy)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected


@pytest.mark.parametrize("variant", ["test", "a"])
@pytest.mark.parametrize("deploy", [False, True])
def test_strict_load_official_state_dict(variant, deploy, tmp_path):
    dims, kernel_sizes = OFFICIAL_CFGS[variant]
    g = torch.Generator().manual_seed(1)
    state = {}
    for k, shape in official_state_shapes(dims, kernel_sizes, deploy).items():
        if k.endswith("num_batches_tracked"):
            state[k] = torch.tensor(3)
        elif k.endswith("running_var"):
            state[k] = 0.5 + torch.rand(shape, generator=g)
        else:
            state[k] = 0.05 * torch.randn(shape, generator=g)
    model = timm.create_model(f"unireplknet_{variant}", deploy=deploy)
    model.load_state_dict(state, strict=True)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    # The official release wraps weights in {'model': ...}; load through timm's pretrained path, from a file.
    path = tmp_path / "official.pth"
    torch.save({"model": state}, path)
    loaded = timm.create_model(f"unireplknet_{variant}", deploy=deploy, pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(path)))
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
    with torch.no_grad():
        assert torch.isfinite(loaded.eval()(torch.randn(1, 3, 64, 64))).all()


def test_training_checkpoint_into_deploy_model(tmp_path):
    torch.manual_seed(0)
    train = randomize_(timm.create_model("unireplknet_test"), seed=5).eval()
    assert not train.deploy
    path = tmp_path / "train_form.pth"
    torch.save({"model": train.state_dict()}, path)
    deploy = timm.create_model("unireplknet_test", deploy=True, pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(path))).eval()
    assert deploy.deploy
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(deploy(x), train(x)) < 1e-5
        assert largekernel.reparameterize(train).deploy


def test_pretrained_cfgs():
    cfg = timm.models.get_pretrained_cfg("unireplknet_b.in22k_ft_in1k_384")
    assert cfg.file == "unireplknet_b_in22k_to_in1k_384_acc87.40.pth" and cfg.input_size == (3, 384, 384)
    assert "87.4" in cfg.notes[0]
    assert timm.models.get_pretrained_cfg("unireplknet_l.in22k").num_classes == 21841
    assert set(timm.list_models("unireplknet_*")) >= {f"unireplknet_{v}" for v in ANCHORS}

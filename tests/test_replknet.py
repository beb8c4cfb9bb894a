"""RepLKNet: shapes, counts vs the paper/official code, re-parameterization, official layout, timm surface."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import randomize_bn, rel_err
from torch.utils.flop_counter import FlopCounterMode

import largekernel
from largekernel.layers import PointwiseConv2d
from largekernel.models.replknet import MODEL_CFGS

ALL = sorted(MODEL_CFGS)
BIG = ["replknet_31b", "replknet_31l", "replknet_xl", "replknet_3", "replknet_7", "replknet_13", "replknet_25"]


def narrow(name: str) -> dict:
    """Same kernels/depths/small kernel as ``name`` but 16x narrower and with 2 blocks in stage 3: fast on CPU."""
    cfg = MODEL_CFGS[name]
    if name in BIG:
        return dict(channels=tuple(c // 16 for c in cfg.channels), layers=(1, 1, 2, 1))
    return {}


@pytest.mark.parametrize("name", ALL)
def test_forward_backward_shapes(name: str) -> None:
    model = timm.create_model(name, num_classes=7, **narrow(name))
    x = torch.randn(2, 3, 64, 48, requires_grad=True)
    y = model(x)
    assert y.shape == (2, 7)
    y.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", BIG)
def test_full_size_shapes_on_meta(name: str) -> None:
    with torch.device("meta"):
        model = timm.create_model(name)
        y = model(torch.empty(2, 3, 224, 224))
        feats = model.forward_features(torch.empty(1, 3, 224, 224))
    assert y.shape == (2, 1000)
    assert feats.shape == (1, MODEL_CFGS[name].channels[-1], 7, 7)


def _count(name: str) -> tuple[int, int]:
    with torch.device("meta"):
        model = timm.create_model(name)
    train = sum(p.numel() for p in model.parameters())
    deploy = sum(p.numel() for p in largekernel.reparameterize(model, inplace=True).parameters())
    return train, deploy


@pytest.mark.parametrize("name, train, deploy", [
    ("replknet_31b", 79_864_168, 79_527_272),   # official code: 79.864M / 79.527M
    ("replknet_31l", 172_671_016, 172_165_672),  # 172.671M / 172.166M
    ("replknet_xl", 335_435_752, 335_399_656),   # 335.436M / 335.400M
])
def test_params_equal_official(name: str, train: int, deploy: int) -> None:
    assert _count(name) == (train, deploy)


@pytest.mark.parametrize("name, res, paper_gmacs", [
    ("replknet_31b", 224, 15.3), ("replknet_31b", 384, 45.1), ("replknet_31l", 384, 96.0), ("replknet_xl", 320, 128.7),
])
def test_macs_match_paper(name: str, res: int, paper_gmacs: float) -> None:
    with torch.device("meta"):
        model = timm.create_model(name).eval()
        x = torch.empty(1, 3, res, res)
    with FlopCounterMode(display=False) as counter:
        model(x)
    gmacs = counter.get_total_flops() / 2e9
    assert abs(gmacs - paper_gmacs) / paper_gmacs < 0.01, gmacs


@pytest.mark.parametrize("name", ALL)
def test_reparameterize_is_exact(name: str) -> None:
    model = randomize_bn(timm.create_model(name, **narrow(name))).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        deploy = largekernel.reparameterize(model)
        out = deploy(x)
        folded_model = largekernel.reparameterize(model, fold_bn=True)
        folded = folded_model(x)
    # fold_bn folds the conv-BN pairs and the pre-BNs before the 1x1 convs: only the final BN (before pooling) stays
    bns = [n for n, m in folded_model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == 1 and "." not in bns[0], bns
    assert not any("lkb_origin" in k or "small_conv" in k for k in deploy.state_dict())
    assert any("lkb_reparam" in k for k in deploy.state_dict())
    assert rel_err(out, ref) <= 1e-5
    assert rel_err(folded, ref) <= 1e-5
    # channels_last: the folded 1x1 convs (PointwiseConv2d, with bias) take their GEMM path
    assert any(isinstance(m, PointwiseConv2d) and m.bias is not None for m in folded_model.modules())
    with torch.no_grad():
        folded_cl = folded_model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    assert rel_err(folded_cl, ref) <= 1e-5
    # the original is untouched (inplace=False)
    assert any("lkb_origin" in k for k in model.state_dict())


def test_timm_reparameterize_model_works() -> None:
    from timm.utils import reparameterize_model

    model = randomize_bn(timm.create_model("replknet_test")).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(reparameterize_model(model)(x), model(x)) <= 1e-5


def test_deploy_params_exclude_branch_bns() -> None:
    model = timm.create_model("replknet_test")
    deploy = largekernel.reparameterize(model)
    lk = deploy.stages[0].blocks[0].large_kernel
    assert set(dict(lk.named_parameters())) == {"lkb_reparam.weight", "lkb_reparam.bias"}
    assert lk.lkb_reparam.weight.shape == (8, 1, 7, 7)


# ---- the official layout, checked against an independent functional forward ------------------------------
def official_keys(cfg, in_chans: int = 3, num_classes: int = 10) -> dict[str, tuple[int, ...]]:
    """Parameter/buffer names and shapes of the official RepLKNet (training form), written from its structure."""
    shapes: dict[str, tuple[int, ...]] = {}

    def cb(prefix: str, cin: int, cout: int, k: int, groups: int = 1) -> None:
        shapes[f"{prefix}.conv.weight"] = (cout, cin // groups, k, k)
        bn(f"{prefix}.bn", cout)

    def bn(prefix: str, c: int) -> None:
        for n in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{n}"] = (c,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    c0 = cfg.channels[0]
    cb("stem.0", in_chans, c0, 3)
    cb("stem.1", c0, c0, 3, c0)
    cb("stem.2", c0, c0, 1)
    cb("stem.3", c0, c0, 3, c0)
    for i, (c, d, k) in enumerate(zip(cfg.channels, cfg.layers, cfg.large_kernel_sizes)):
        dw = int(c * cfg.dw_ratio)
        for j in range(d):
            p = f"stages.{i}.blocks.{2 * j}"
            bn(f"{p}.prelkb_bn", c)
            cb(f"{p}.pw1", c, dw, 1)
            cb(f"{p}.large_kernel.lkb_origin", dw, dw, k, dw)
            if cfg.small_kernel:
                cb(f"{p}.large_kernel.small_conv", dw, dw, cfg.small_kernel, dw)
            cb(f"{p}.pw2", dw, c, 1)
            p = f"stages.{i}.blocks.{2 * j + 1}"
            bn(f"{p}.preffn_bn", c)
            cb(f"{p}.pw1", c, int(c * cfg.ffn_ratio), 1)
            cb(f"{p}.pw2", int(c * cfg.ffn_ratio), c, 1)
        if i < len(cfg.channels) - 1:
            cn = cfg.channels[i + 1]
            cb(f"transitions.{i}.0", c, cn, 1)
            cb(f"transitions.{i}.1", cn, cn, 3, cn)
    bn("norm", cfg.channels[-1])
    shapes["head.weight"] = (num_classes, cfg.channels[-1])
    shapes["head.bias"] = (num_classes,)
    return shapes


def random_state(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    sd = {}
    for k, s in shapes.items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(7)
        elif k.endswith("running_var"):
            sd[k] = torch.rand(s) + 0.5
        elif k.endswith(("bn.weight", "norm.weight")) or (k.endswith(".weight") and len(s) == 1):
            sd[k] = torch.rand(s) + 0.5
        else:
            sd[k] = torch.randn(s) * (0.3 if len(s) == 4 else 0.1)
    return sd


def functional_forward(sd: dict[str, torch.Tensor], cfg, x: torch.Tensor) -> torch.Tensor:
    """RepLKNet eval forward from a state dict with F.conv2d / F.batch_norm only (the paper's Fig. 4)."""
    def bn(p, t):
        return F.batch_norm(t, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"],
                            False, 0.0, 1e-5)

    def cb(p, t, stride=1, relu=False):
        w = sd[f"{p}.conv.weight"]
        groups = t.shape[1] // w.shape[1]
        t = bn(f"{p}.bn", F.conv2d(t, w, stride=stride, padding=w.shape[-1] // 2, groups=groups))
        return F.relu(t) if relu else t

    x = cb("stem.0", x, 2, True)
    x = cb("stem.1", x, 1, True)
    x = cb("stem.2", x, 1, True)
    x = cb("stem.3", x, 2, True)
    for i, d in enumerate(cfg.layers):
        for j in range(d):
            p = f"stages.{i}.blocks.{2 * j}"
            t = cb(f"{p}.pw1", bn(f"{p}.prelkb_bn", x), relu=True)
            lk = cb(f"{p}.large_kernel.lkb_origin", t)
            if cfg.small_kernel:
                lk = lk + cb(f"{p}.large_kernel.small_conv", t)
            x = x + cb(f"{p}.pw2", F.relu(lk))
            p = f"stages.{i}.blocks.{2 * j + 1}"
            x = x + cb(f"{p}.pw2", F.gelu(cb(f"{p}.pw1", bn(f"{p}.preffn_bn", x))))
        if i < len(cfg.layers) - 1:
            x = cb(f"transitions.{i}.1", cb(f"transitions.{i}.0", x, relu=True), 2, True)
    x = bn("norm", x).mean((2, 3))
    return F.linear(x, sd["head.weight"], sd["head.bias"])


@pytest.mark.parametrize("name", ["replknet_test", "replknet_micro"])
def test_official_layout_loads_strictly_and_matches_reference(name: str, tmp_path) -> None:
    cfg = MODEL_CFGS[name]
    sd = random_state(official_keys(cfg))
    path = tmp_path / "official.pth"
    torch.save({"model": sd}, path)  # the official releases wrap the weights in {'model': ...}
    model = timm.create_model(name, num_classes=10)
    largekernel.load_checkpoint(model, path, strict=True)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = functional_forward({k: v.double() for k, v in sd.items()}, cfg, x.double())
        assert rel_err(model(x), ref) <= 1e-5
        # merged form: the official structural_reparam layout (lkb_reparam) round-trips strictly too
        deploy = largekernel.reparameterize(model)
        merged = timm.create_model(name, num_classes=10, deploy=True).eval()
        largekernel.load_checkpoint(merged, deploy.state_dict(), strict=True)
        assert rel_err(merged(x), ref) <= 1e-5


def test_timm_pretrained_from_local_file(tmp_path) -> None:
    src = randomize_bn(timm.create_model("replknet_test")).eval()
    path = tmp_path / "w.pth"
    torch.save({"model": src.state_dict()}, path)
    model = timm.create_model("replknet_test", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), src(x))


def test_mismatched_checkpoint_names_the_keys(tmp_path) -> None:
    other = timm.create_model("replknet_test", num_classes=5)
    path = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file(other.state_dict(), str(path))
    with pytest.raises(largekernel.CheckpointError, match=r"shape mismatch: head\.weight"):
        largekernel.load_checkpoint(timm.create_model("replknet_test", num_classes=10), path)
    with pytest.raises(largekernel.CheckpointError, match="unexpected: .*small_conv"):
        largekernel.load_checkpoint(timm.create_model("replknet_test", num_classes=5, small_kernel=0), path)
    wrapped = tmp_path / "official_style.pth"  # as official main.py saves: weights + argparse.Namespace
    import argparse

    torch.save({"model": other.state_dict(), "args": argparse.Namespace(lr=1.0)}, wrapped)
    largekernel.load_checkpoint(timm.create_model("replknet_test", num_classes=5), wrapped)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(largekernel.CheckpointError, match="corrupt"):
        largekernel.load_checkpoint(other, corrupt)


# ---- timm surface --------------------------------------------------------------------------------------------
def test_features_only() -> None:
    model = timm.create_model("replknet_test", features_only=True)
    feats = model(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [(1, 8, 16, 24), (1, 16, 8, 12), (1, 16, 4, 6), (1, 32, 2, 3)]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    sub = timm.create_model("replknet_test", features_only=True, out_indices=(1, 3))
    assert [f.shape[1] for f in sub(torch.randn(1, 3, 64, 64))] == [16, 32]


def test_forward_intermediates_and_head() -> None:
    model = timm.create_model("replknet_test", num_classes=3).eval()
    x = torch.randn(2, 3, 64, 64)
    final, inter = model.forward_intermediates(x)
    assert len(inter) == 4
    with torch.no_grad():
        assert torch.allclose(model.forward_head(final.detach()), model(x), atol=1e-6)
        assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 32)
    model.reset_classifier(11)
    assert model(x).shape == (2, 11) and model.get_classifier().out_features == 11
    model.reset_classifier(0)
    assert model(x).shape == (2, 32)
    assert model.no_weight_decay() == set()
    from timm.models import group_parameters

    names = {n for n, _ in model.named_parameters()}
    for coarse in (True, False):
        groups = group_parameters(model, model.group_matcher(coarse))
        assert set().union(*map(set, groups.values())) == names
        assert len(groups) > 3


def test_grad_checkpointing_same_gradients() -> None:
    model = timm.create_model("replknet_test", drop_path_rate=0.0)
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for a, b in zip(ref, (p.grad for p in model.parameters())):
        assert torch.allclose(a, b, atol=1e-6)


def test_sync_bn_only_with_process_group() -> None:
    model = timm.create_model("replknet_test", sync_bn=True)
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())


def test_torch_compile_tiny_model() -> None:
    model = timm.create_model("replknet_test").eval()
    x = torch.randn(1, 3, 32, 32)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert rel_err(compiled(x), model(x)) <= 1e-6


# ---- bad input ----------------------------------------------------------------------------------------------
def test_wrong_input_channels() -> None:
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        timm.create_model("replknet_test")(torch.randn(1, 4, 32, 32))


@pytest.mark.parametrize("small, match", [(9, "small_kernel=9 is larger"), (4, "small_kernel=4 .* parity")])
def test_bad_small_kernel(small: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        timm.create_model("replknet_test", small_kernel=small)


def test_unknown_model_name() -> None:
    with pytest.raises(ValueError, match="unknown model name 'replknet_31x'.*replknet_31"):
        largekernel.create_model("replknet_31x")


def test_mismatched_config_lengths() -> None:
    with pytest.raises(ValueError, match="same, non-zero length"):
        timm.create_model("replknet_test", layers=(1, 1, 1))


def test_fold_pre_bn_rejects_what_it_cannot_fold_exactly() -> None:
    from largekernel.layers.conv import fold_pre_bn

    bn = torch.nn.BatchNorm2d(4).eval()
    with pytest.raises(ValueError, match="1x1"):
        fold_pre_bn(bn, torch.nn.Conv2d(4, 8, 3, padding=1))
    randomize_bn(torch.nn.Sequential(bn))
    x = torch.randn(2, 4, 5, 5)
    for bias in (False, True):
        conv = torch.nn.Conv2d(4, 8, 1, bias=bias)
        with torch.no_grad():
            assert rel_err(fold_pre_bn(bn, conv)(x), conv(bn(x))) <= 1e-6

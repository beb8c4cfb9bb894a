"""SLaK: decomposed large kernel (merge exactness vs a dense F.conv2d construction), the timm models, counts
against the official implementation, strict loading of the official state-dict layout."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

import largekernel  # noqa: F401  (registers the models)
from largekernel.analysis.complexity import complexity
from largekernel.layers.decomposed import DecomposedLargeKernelConv
from largekernel.models.slak import SLaK, checkpoint_filter_fn

# Official models/SLaK.py with Decom=True, width_factor=1.3, kernel_size=[51,49,47,13,5], bn=True
# (shared/anchors/README.md), and the paper's / README's sparse counts (non-zero params, sparsity 0.4).
OFFICIAL = {"slak_tiny": (50_703_838, 8.705e9, 30e6), "slak_small": (91_131_820, 16.604e9, 55e6),
            "slak_base": (157_950_792, 28.509e9, 95e6)}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def randomize_bn(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial BN statistics and affine parameters, so a wrong fold cannot pass."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
    return model


def _dense_reference(mod: DecomposedLargeKernelConv, x: torch.Tensor) -> torch.Tensor:
    """float64: fold each BN by hand, place each (masked) kernel at the centre of a KxK zero kernel, one conv."""
    k = mod.kernel_size
    c = mod.channels
    kernel = torch.zeros(c, 1, k, k, dtype=torch.float64)
    bias = torch.zeros(c, dtype=torch.float64)
    for name in ("LoRA1", "LoRA2", "small_conv"):
        branch = getattr(mod, name)
        w = branch.conv.weight.detach().double()
        if hasattr(branch.conv, "weight_mask"):
            w = w * branch.conv.weight_mask.double()
        bn = branch.bn
        scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
        kh, kw = w.shape[-2:]
        top, left = (k - kh) // 2, (k - kw) // 2
        kernel[:, :, top:top + kh, left:left + kw] += w * scale.view(-1, 1, 1, 1)
        bias += bn.bias.double() - bn.running_mean.double() * scale
    return F.conv2d(x.double(), kernel, bias, padding=k // 2, groups=c)


@pytest.mark.parametrize("kernel, small", [(51, 5), (13, 3), (7, 5)])
def test_decomposed_merge_equals_dense_construction(kernel: int, small: int) -> None:
    mod = DecomposedLargeKernelConv(6, kernel, small)
    randomize_bn(mod)
    with torch.no_grad():
        for p in (mod.LoRA1.conv.weight, mod.LoRA2.conv.weight, mod.small_conv.conv.weight):
            p.normal_()
        mod.LoRA1.conv.weight_mask.bernoulli_(0.6)  # a sparse state: merged kernel must honour the masks
    mod.eval()
    x = torch.randn(2, 6, 19, 23)
    ref = _dense_reference(mod, x)
    assert mod.LoRA1.conv.weight.shape == (6, 1, kernel, small)
    assert mod.LoRA2.conv.weight.shape == (6, 1, small, kernel)
    with torch.no_grad():
        branches = mod(x)
        mod.reparameterize()
        merged = mod(x)
    assert rel_err(branches, ref) <= 1e-5
    assert rel_err(merged, ref) <= 1e-5
    assert set(mod.state_dict()) == {"lkb_reparam.weight", "lkb_reparam.bias"}
    assert mod.lkb_reparam.weight.shape == (6, 1, kernel, kernel)


def test_rectangular_branch_is_same_padded_and_centred() -> None:
    # The official cutlass kernel pads (kh//2, kw//2): check one K x s branch against explicit padding.
    mod = DecomposedLargeKernelConv(3, 9, 3, bn=False)
    x = torch.randn(1, 3, 11, 12)
    w = mod.LoRA1.conv.weight
    ref = F.conv2d(x, w, padding=(4, 1), groups=3)
    assert rel_err(mod.LoRA1(x), ref) <= 1e-6
    assert not hasattr(mod.LoRA1, "bn")
    full = ref + F.conv2d(x, mod.LoRA2.conv.weight, padding=(1, 4), groups=3)
    full = full + F.conv2d(x, mod.small_conv.conv.weight, padding=1, groups=3)
    with torch.no_grad():
        assert rel_err(mod(x), full) <= 1e-6
        mod.reparameterize()  # no BN: the merged bias is zero
        assert rel_err(mod(x), full) <= 1e-5
    assert torch.count_nonzero(mod.lkb_reparam.bias) == 0


def test_undecomposed_variant_merges() -> None:
    mod = DecomposedLargeKernelConv(4, 11, 3, decompose=False)
    randomize_bn(mod).eval()
    assert set(k.split(".")[0] for k in mod.state_dict()) == {"lkb_origin", "small_conv"}
    x = torch.randn(2, 4, 13, 13)
    with torch.no_grad():
        ref = mod(x)
        mod.reparameterize()
        assert rel_err(mod(x), ref) <= 1e-5


def test_model_forward_backward_and_features() -> None:
    model = timm.create_model("slak_test", num_classes=7)
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert out.shape == (2, 7)
    out.square().mean().backward()
    assert model.stages[0][0].large_kernel.LoRA1.conv.weight.grad is not None
    assert all(p.grad is not None for p in model.parameters())
    assert model.num_features == 83 and model.get_classifier().out_features == 7

    feats = timm.create_model("slak_test", features_only=True)
    maps = feats(x)
    assert [m.shape for m in maps] == [(2, 20, 16, 16), (2, 41, 8, 8), (2, 62, 4, 4), (2, 83, 2, 2)]
    assert feats.feature_info.reduction() == [4, 8, 16, 32]

    model.eval()
    with torch.no_grad():
        last, inter = model.forward_intermediates(x)
        assert torch.equal(last, model.forward_features(x))
        assert [t.shape[1] for t in inter] == [20, 41, 62, 83]
        assert model.forward_head(last, pre_logits=True).shape == (2, 83)
    model.reset_classifier(0)
    assert model(x).shape == (2, 83)


def test_model_reparameterize_equivalence() -> None:
    model = timm.create_model("slak_test")
    randomize_bn(model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, DecomposedLargeKernelConv):
                m.LoRA2.conv.weight_mask.bernoulli_(0.5)
                for branch in (m.LoRA1, m.LoRA2, m.small_conv):
                    branch.conv.weight.normal_()
        for stage in model.stages:
            for block in stage:
                block.gamma.uniform_(0.5, 1.5)  # the default 1e-6 layer scale would hide a wrong merge
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        deployed = largekernel.reparameterize(model)
        out = deployed(x)
    assert rel_err(out, ref) <= 1e-5
    keys = deployed.state_dict().keys()
    assert "stages.0.0.large_kernel.lkb_reparam.weight" in keys
    assert not any("LoRA" in k or "small_conv" in k for k in keys)
    assert deployed.state_dict()["stages.3.0.large_kernel.lkb_reparam.weight"].shape == (83, 1, 7, 7)

    # deploy form built directly loads the merged state dict strictly; a training-form checkpoint is merged
    direct = timm.create_model("slak_test", deploy=True).eval()
    direct.load_state_dict(deployed.state_dict(), strict=True)
    merged = timm.create_model("slak_test", deploy=True).eval()
    merged.load_state_dict(checkpoint_filter_fn({"model": model.state_dict()}, merged), strict=True)
    with torch.no_grad():
        assert rel_err(direct(x), ref) <= 1e-5
        assert rel_err(merged(x), ref) <= 1e-5


def _official_state_dict(depths, dims, kernels) -> dict[str, torch.Tensor]:
    """Key names and shapes of the official SLaK (Decom=True, bn=True), written out independently."""
    g = torch.Generator().manual_seed(1)
    sd: dict[str, torch.Tensor] = {}

    def put(name: str, *shape: int) -> None:
        sd[name] = torch.randn(*shape, generator=g)

    def bn(prefix: str, c: int) -> None:
        put(prefix + ".weight", c)
        put(prefix + ".bias", c)
        put(prefix + ".running_mean", c)
        sd[prefix + ".running_var"] = torch.rand(c, generator=g) + 0.5
        sd[prefix + ".num_batches_tracked"] = torch.tensor(7)

    put("downsample_layers.0.0.weight", dims[0], 3, 4, 4)
    put("downsample_layers.0.0.bias", dims[0])
    put("downsample_layers.0.1.weight", dims[0])
    put("downsample_layers.0.1.bias", dims[0])
    for i in range(1, 4):
        put(f"downsample_layers.{i}.0.weight", dims[i - 1])
        put(f"downsample_layers.{i}.0.bias", dims[i - 1])
        put(f"downsample_layers.{i}.1.weight", dims[i], dims[i - 1], 2, 2)
        put(f"downsample_layers.{i}.1.bias", dims[i])
    s = kernels[-1]
    for i, depth in enumerate(depths):
        c, k = dims[i], kernels[i]
        for j in range(depth):
            p = f"stages.{i}.{j}."
            put(p + "large_kernel.LoRA1.conv.weight", c, 1, k, s)
            bn(p + "large_kernel.LoRA1.bn", c)
            put(p + "large_kernel.LoRA2.conv.weight", c, 1, s, k)
            bn(p + "large_kernel.LoRA2.bn", c)
            put(p + "large_kernel.small_conv.conv.weight", c, 1, s, s)
            bn(p + "large_kernel.small_conv.bn", c)
            put(p + "norm.weight", c)
            put(p + "norm.bias", c)
            put(p + "pwconv1.weight", 4 * c, c)
            put(p + "pwconv1.bias", 4 * c)
            put(p + "pwconv2.weight", c, 4 * c)
            put(p + "pwconv2.bias", c)
            put(p + "gamma", c)
    put("norm.weight", dims[-1])
    put("norm.bias", dims[-1])
    put("head.weight", 1000, dims[-1])
    put("head.bias", 1000)
    return sd


def test_strict_load_of_official_layout() -> None:
    sd = _official_state_dict((1, 1, 1, 1), (20, 41, 62, 83), (13, 11, 9, 7, 3))
    model = timm.create_model("slak_test")
    wrapped = {"model": {"module." + k: v for k, v in sd.items()}}  # as saved by the official main.py (DDP)
    model.load_state_dict(checkpoint_filter_fn(wrapped, model), strict=True)
    own = {k for k in model.state_dict() if not k.endswith("_mask")}
    assert own == set(sd)
    lora2 = model.stages[2][0].large_kernel.LoRA2.conv
    assert torch.equal(lora2.weight, sd["stages.2.0.large_kernel.LoRA2.conv.weight"])
    assert torch.equal(lora2.weight_mask, torch.ones_like(lora2.weight))
    # a bare official state dict loads with plain load_state_dict(strict=True) too (masks default to ones)
    timm.create_model("slak_test").load_state_dict(sd, strict=True)


def test_slak_tiny_official_key_layout_meta() -> None:
    with torch.device("meta"):
        model = timm.create_model("slak_tiny")
    sd = model.state_dict()
    assert sd["stages.0.0.large_kernel.LoRA1.conv.weight"].shape == (124, 1, 51, 5)
    assert sd["stages.0.0.large_kernel.LoRA2.conv.weight"].shape == (124, 1, 5, 51)
    assert sd["stages.0.0.large_kernel.small_conv.conv.weight"].shape == (124, 1, 5, 5)
    assert sd["stages.3.2.large_kernel.LoRA1.conv.weight"].shape == (998, 1, 13, 5)
    assert sd["stages.2.8.large_kernel.LoRA1.conv.weight"].shape == (499, 1, 47, 5)
    assert sd["downsample_layers.1.1.weight"].shape == (249, 124, 2, 2)
    assert sd["head.weight"].shape == (1000, 998)


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_counts_match_official(name: str) -> None:
    params, macs, _ = OFFICIAL[name]
    got = complexity(name)
    assert abs(got["params_m"] * 1e6 - params) / params < 0.01
    assert abs(got["gmacs"] * 1e9 - macs) / macs < 0.01


def test_nonzero_params_at_sparsity_04_match_paper() -> None:
    from largekernel.train.sparse import DynamicSparsity

    model = timm.create_model("slak_tiny")
    engine = DynamicSparsity(model, sparsity=0.4, init="uniform", update_every=0)
    nonzero = engine.nonzero_params()
    assert 29.5e6 <= nonzero < 30.5e6  # the paper's "30M"
    assert abs(engine.current_density() - 0.6) < 1e-4


def test_bad_configs_raise() -> None:
    with pytest.raises(ValueError, match="kernel_size"):
        DecomposedLargeKernelConv(4, 50, 5)
    with pytest.raises(ValueError, match="small_kernel"):
        DecomposedLargeKernelConv(4, 5, 7)
    with pytest.raises(ValueError, match="kernel_size"):
        SLaK(kernel_size=(51, 49, 47, 13))
    with pytest.raises(ValueError, match="width_factor"):
        SLaK(width_factor=0.0)

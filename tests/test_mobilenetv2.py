"""LKMobileNetV2: structure vs the reference MobileNetV2, shortcuts, re-param merge equivalence, timm surface."""
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import largekernel
import largekernel.models.mobilenetv2  # noqa: F401  (registers lk_mobilenetv2*)
from largekernel.models.mobilenetv2 import LKInvertedResidual
from tests.conftest import randomize_bn, rel_err


def test_default_matches_timm_mobilenetv2_size() -> None:
    from largekernel.analysis.complexity import complexity

    ours, ref = complexity("lk_mobilenetv2"), complexity("mobilenetv2_100")
    assert ours["params_m"] == pytest.approx(ref["params_m"], abs=1e-9)
    assert ours["gmacs"] == pytest.approx(ref["gmacs"], rel=1e-9)
    # a 13x13 depthwise kernel adds (169 - 9) * sum(depthwise channels) weights
    k13 = complexity("lk_mobilenetv2_k13")
    dw_channels = sum(m.conv_dw.channels for m in timm.create_model("lk_mobilenetv2").modules()
                      if isinstance(m, LKInvertedResidual))
    assert (k13["params_m"] - ours["params_m"]) * 1e6 == pytest.approx((169 - 9) * dw_channels)


def test_per_stage_kernel_and_shortcut_switch() -> None:
    m = timm.create_model("lk_mobilenetv2_tiny", kernel_size=(3, 3, 3, 3, 3, 13, 13), shortcut=False)
    blocks = [b for b in m.modules() if isinstance(b, LKInvertedResidual)]
    assert not any(b.has_shortcut for b in blocks)
    assert blocks[-1].conv_dw.kernel_size == 13 and blocks[0].conv_dw.kernel_size == 3
    on = timm.create_model("lk_mobilenetv2_tiny")
    assert sum(b.has_shortcut for b in on.modules() if isinstance(b, LKInvertedResidual)) == 5
    with pytest.raises(ValueError, match="kernel_size"):
        timm.create_model("lk_mobilenetv2_tiny", kernel_size=4)
    with pytest.raises(ValueError, match="small_kernel"):
        timm.create_model("lk_mobilenetv2_tiny", kernel_size=9, small_kernel=11)


def test_block_against_functional_reference() -> None:
    torch.manual_seed(1)
    blk = randomize_bn(LKInvertedResidual(8, 8, 1, 2, 5, small_kernel=3)).double().eval()
    x = torch.randn(2, 8, 11, 11, dtype=torch.float64)

    def cbn(mod, t, groups=1, pad=0):
        y = F.conv2d(t, mod.conv.weight, None, padding=pad, groups=groups)
        return F.batch_norm(y, mod.bn.running_mean, mod.bn.running_var, mod.bn.weight, mod.bn.bias, False, 0.0,
                            mod.bn.eps)

    h = F.relu6(cbn(blk.conv_pw, x))
    h = cbn(blk.conv_dw.lkb_origin, h, 16, 2) + cbn(blk.conv_dw.small_conv, h, 16, 1)
    ref = x + cbn(blk.conv_pwl, F.relu6(h))
    assert rel_err(blk(x), ref) < 1e-12


@pytest.mark.parametrize("kernel", [9, 13])
def test_reparameterize_equivalence_random_bn(kernel: int) -> None:
    torch.manual_seed(0)
    model = timm.create_model("lk_mobilenetv2_tiny", kernel_size=kernel, small_kernel=3, num_classes=5)
    randomize_bn(model).eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        before = model(x)
        deployed = largekernel.reparameterize(model)
        after = deployed(x)
    assert not any(hasattr(m, "small_conv") for m in deployed.modules())
    assert any(hasattr(m, "lkb_reparam") for m in deployed.modules())
    assert (before - after).abs().max().item() <= 1e-5
    assert rel_err(after, before) < 1e-5


def test_timm_surface_and_intermediates() -> None:
    model = timm.create_model("lk_mobilenetv2_tiny", num_classes=3)
    x = torch.randn(2, 3, 64, 64)
    assert model(x).shape == (2, 3)
    feats = model.forward_intermediates(x, intermediates_only=True)
    assert [f.shape[-1] for f in feats] == [16, 8, 4, 2]
    final, inter = model.forward_intermediates(x, indices=[3])
    assert torch.allclose(final, model.forward_features(x)) and len(inter) == 1
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)
    fo = timm.create_model("lk_mobilenetv2_tiny", features_only=True, out_indices=(1, 3))
    assert [f.shape[1] for f in fo(x)] == [c for i, c in enumerate(fo.feature_info.channels())]
    with pytest.raises(ValueError, match="input"):
        model(torch.randn(2, 1, 32, 32))
    assert isinstance(model.get_classifier(), nn.Identity)

"""Shared small blocks (GRN, SE, LayerNorm) against explicit float64 formulas."""
import pytest
import torch
import torch.nn as nn

from largekernel.layers.blocks import GRN, LayerNorm, SEBlock, get_bn


def test_grn_matches_formula_and_keys():
    torch.manual_seed(0)
    grn = GRN(6).double()
    nn.init.normal_(grn.gamma)
    nn.init.normal_(grn.beta)
    assert set(grn.state_dict()) == {"gamma", "beta"}
    assert grn.gamma.shape == (1, 1, 1, 6)
    x = torch.randn(2, 5, 4, 6, dtype=torch.float64)
    # ConvNeXt V2 Alg. 1, written with explicit sums.
    gx = (x ** 2).sum(dim=(1, 2), keepdim=True).sqrt()
    nx = gx / (gx.sum(dim=-1, keepdim=True) / 6 + 1e-6)
    ref = grn.gamma * (x * nx) + grn.beta + x
    torch.testing.assert_close(grn(x), ref, rtol=1e-12, atol=1e-12)
    nobias = GRN(6, use_bias=False)
    assert set(nobias.state_dict()) == {"gamma"}


def test_grn_zero_init_is_identity():
    x = torch.randn(1, 3, 3, 4)
    torch.testing.assert_close(GRN(4)(x), x)


def test_grn_keeps_a_low_precision_activation_dtype():
    # fp32 parameters on a bf16 activation (what bf16 autocast gives): the output stays bf16 (a promotion to fp32
    # doubled the bytes of the full-size product) and matches the float64 formula to bf16 precision
    torch.manual_seed(2)
    grn = GRN(6)
    with torch.no_grad():
        grn.gamma.normal_()
        grn.beta.normal_()
    x = torch.randn(2, 5, 4, 6).to(torch.bfloat16)
    y = grn(x)
    assert y.dtype == torch.bfloat16
    xd = x.double()
    gx = (xd ** 2).sum(dim=(1, 2), keepdim=True).sqrt()
    nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
    ref = grn.gamma.double() * (xd * nx) + grn.beta.double() + xd
    assert float((y.double() - ref).norm() / ref.norm()) < 1e-2


def test_se_matches_formula():
    torch.manual_seed(1)
    se = SEBlock(8, 2).double()
    assert set(se.state_dict()) == {"down.weight", "down.bias", "up.weight", "up.bias"}
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    pooled = x.sum(dim=(2, 3)) / 25
    hidden = torch.clamp(pooled @ se.down.weight[:, :, 0, 0].T + se.down.bias, min=0)
    scale = 1 / (1 + torch.exp(-(hidden @ se.up.weight[:, :, 0, 0].T + se.up.bias)))
    torch.testing.assert_close(se(x), x * scale[:, :, None, None], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("data_format", ["channels_first", "channels_last"])
def test_layernorm_matches_formula(data_format):
    torch.manual_seed(2)
    ln = LayerNorm(5, data_format=data_format).double()
    nn.init.normal_(ln.weight)
    nn.init.normal_(ln.bias)
    assert set(ln.state_dict()) == {"weight", "bias"}
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64) * 3 + 1
    u = x.mean(1, keepdim=True)
    s = ((x - u) ** 2).mean(1, keepdim=True)
    ref = ln.weight[:, None, None] * (x - u) / torch.sqrt(s + 1e-6) + ln.bias[:, None, None]
    if data_format == "channels_last":
        out = ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    else:
        out = ln(x)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_bad_arguments():
    with pytest.raises(ValueError, match="data_format"):
        LayerNorm(4, data_format="nchw")
    with pytest.raises(ValueError, match="dim"):
        GRN(0)
    with pytest.raises(ValueError, match="channels"):
        SEBlock(4, 0)


def test_get_bn_without_process_group_is_plain_bn():
    assert type(get_bn(4, use_sync_bn=True)) is nn.BatchNorm2d
    assert type(get_bn(4)) is nn.BatchNorm2d


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_pointwise_conv_matches_conv2d_float64(channels_last, bias):
    from largekernel.layers import PointwiseConv2d

    torch.manual_seed(3)
    conv = PointwiseConv2d(13, 21, bias=bias)
    x = torch.randn(3, 13, 5, 7)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    y = conv(x)
    assert y.shape == (3, 21, 5, 7)
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    g = torch.randn_like(y)
    y.backward(g)
    xd = x.detach().double().requires_grad_(True)
    wd = conv.weight.detach().double().requires_grad_(True)
    bd = conv.bias.detach().double().requires_grad_(True) if bias else None
    ref = torch.nn.functional.conv2d(xd, wd, bd)
    ref.backward(g.double())
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(conv.weight.grad.double(), wd.grad, rtol=1e-5, atol=1e-5)
    if bias:
        torch.testing.assert_close(conv.bias.grad.double(), bd.grad, rtol=1e-5, atol=1e-5)


def test_create_conv2d_picks_pointwise_for_dense_1x1_only():
    from largekernel.layers import PointwiseConv2d, create_conv2d

    assert type(create_conv2d(8, 16, 1)) is PointwiseConv2d
    assert type(create_conv2d(8, 16, 1, stride=2)) is nn.Conv2d
    assert type(create_conv2d(8, 16, 1, groups=2)) is nn.Conv2d
    assert type(create_conv2d(8, 16, 3)) is nn.Conv2d
    assert set(create_conv2d(8, 16, 1, bias=True).state_dict()) == {"weight", "bias"}


def test_cross_depthwise_conv_is_the_dense_cross_kernel_float64():
    from largekernel.layers import CrossDepthwiseConv2d

    torch.manual_seed(5)
    c, k, d = 5, 3, 9
    horizontal, vertical, bias = torch.randn(c, 1, k, d), torch.randn(c, 1, d, k), torch.randn(c)
    layer = CrossDepthwiseConv2d(horizontal, vertical, bias).double()
    dense = torch.zeros(c, 1, d, d, dtype=torch.float64)
    dense[:, :, d // 2 - k // 2:d // 2 + k // 2 + 1, :] += horizontal.double()
    dense[:, :, :, d // 2 - k // 2:d // 2 + k // 2 + 1] += vertical.double()
    x = torch.randn(2, c, 11, 8, dtype=torch.float64)
    ref = torch.nn.functional.conv2d(x, dense, bias.double(), padding=d // 2, groups=c)
    torch.testing.assert_close(layer(x), ref, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="cross"):
        CrossDepthwiseConv2d(horizontal, horizontal)
    with pytest.raises(ValueError, match="odd"):
        CrossDepthwiseConv2d(torch.randn(c, 1, 3, 8), torch.randn(c, 1, 8, 3))


def test_partial_depthwise_conv_is_the_dense_conv_with_1x1_kernels_elsewhere_float64():
    """PartialDepthwiseConv2d (a conv on some channels, a scale and shift on the others) against one F.conv2d whose
    other channels hold a centre tap (the scale) and the shift as bias; bad channel lists and shapes raise."""
    from largekernel.layers import DepthwiseConv2d, PartialDepthwiseConv2d

    torch.manual_seed(6)
    c, k, channels = 7, 5, torch.tensor([1, 2, 4, 6])
    weight, bias = torch.randn(4, 1, k, k, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    scale, shift = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    layer = PartialDepthwiseConv2d(DepthwiseConv2d.from_weights(weight, bias), channels, c, scale, shift)
    dense, dense_bias = torch.zeros(c, 1, k, k, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
    dense[channels], dense_bias[channels] = weight, bias
    dense[[0, 3, 5], 0, k // 2, k // 2], dense_bias[[0, 3, 5]] = scale, shift
    x = torch.randn(2, c, 9, 10, dtype=torch.float64)
    ref = torch.nn.functional.conv2d(x, dense, dense_bias, padding=k // 2, groups=c)
    torch.testing.assert_close(layer(x), ref, rtol=1e-10, atol=1e-10)
    assert set(layer.state_dict()) == {"conv.weight", "conv.bias", "channels", "rest_scale", "rest_shift"}
    with pytest.raises(ValueError, match="distinct"):
        PartialDepthwiseConv2d(DepthwiseConv2d.from_weights(weight), torch.tensor([1, 1, 2, 3]), c)
    with pytest.raises(ValueError, match="distinct"):
        PartialDepthwiseConv2d(DepthwiseConv2d.from_weights(weight), torch.tensor([1, 2, 3, 7]), c)
    with pytest.raises(ValueError, match=r"rest_scale must be \(3,\)"):
        PartialDepthwiseConv2d(DepthwiseConv2d.from_weights(weight), channels, c, torch.ones(4), torch.ones(4))
    with pytest.raises(ValueError, match="input"):
        layer(torch.randn(1, c + 1, 9, 9, dtype=torch.float64))

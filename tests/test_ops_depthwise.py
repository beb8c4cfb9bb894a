"""The depthwise dispatch point on the CPU: paths, layouts, the torch.library op, torch.compile, ONNX.

The Triton kernels' numerics are checked in test_ops_depthwise_interp.py (interpreter) and on the GPU by
benchmarks/gpu_check.py.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from largekernel.layers.conv import DepthwiseConv2d
from largekernel.ops import cross_depthwise_conv2d, depthwise_conv2d, depthwise_path, set_backend, use_backend
from largekernel.ops.depthwise import crop_to_reach


def _ref(x, w, b=None):
    return F.conv2d(x.double(), w.double(), None if b is None else b.double(), padding="same", groups=w.shape[0])


@pytest.mark.parametrize("kh,kw", [(3, 3), (13, 13), (17, 17), (4, 4), (7, 2), (31, 5)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cpu_matches_reference_and_keeps_layout(kh, kw, channels_last):
    x = torch.randn(2, 5, 11, 9)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(5, 1, kh, kw), torch.randn(5)
    y = depthwise_conv2d(x, w, b)
    torch.testing.assert_close(y.double(), _ref(x, w, b), rtol=1e-5, atol=1e-5)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("kh,kw,h,w", [(49, 49, 14, 14), (51, 5, 7, 7), (12, 16, 5, 4), (3, 27, 6, 14)])
def test_taps_beyond_reach_are_cut_exactly(kh, kw, h, w):
    x = torch.randn(2, 3, h, w, requires_grad=True)
    wt = torch.randn(3, 1, kh, kw, requires_grad=True)
    cut = crop_to_reach(wt, h, w)   # (the Triton path cuts; here the cut kernel runs natively, so the cut is checked)
    assert cut.shape[-2:] == (min(kh, 2 * h - 1), min(kw, 2 * w - 1))
    y = depthwise_conv2d(x, cut)
    g = torch.randn_like(y)
    y.backward(g)
    xd, wd = x.detach().double().requires_grad_(), wt.detach().double().requires_grad_()
    _ref(xd, wd).backward(g.double())
    torch.testing.assert_close(y.double(), _ref(x, wt), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(wt.grad.double(), wd.grad, rtol=1e-5, atol=1e-5)   # zeros where the cut taps were


def test_cross_conv_with_autograd_is_the_pair_of_convs():
    x = torch.randn(2, 3, 9, 8, requires_grad=True)
    wh, wv = torch.randn(3, 1, 3, 21, requires_grad=True), torch.randn(3, 1, 21, 3, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    y = cross_depthwise_conv2d(x, wh, wv, b)
    g = torch.randn_like(y)
    y.backward(g)
    leaves = [t.detach().double().requires_grad_() for t in (x, wh, wv, b)]
    ref = _ref(leaves[0], leaves[1], leaves[3]) + _ref(leaves[0], leaves[2])
    ref.backward(g.double())
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    for t, r in zip((x, wh, wv, b), leaves):
        torch.testing.assert_close(t.grad.double(), r.grad, rtol=1e-5, atol=1e-5)


def test_cpu_layout_choice_by_kernel_size():
    x = torch.randn(1, 4, 8, 8)
    assert depthwise_path(x, torch.randn(4, 1, 31, 31)) == "native-channels_last"
    assert depthwise_path(x, torch.randn(4, 1, 51, 5)) == "native-channels_last"
    assert depthwise_path(x, torch.randn(4, 1, 13, 13)) == "native-nchw"
    with use_backend("native"):
        assert depthwise_path(x, torch.randn(4, 1, 31, 31)) == "native"
    with use_backend("triton"):   # no Triton on the CPU without the interpreter: falls back
        assert depthwise_path(x, torch.randn(4, 1, 31, 31)).startswith("native")


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="weight"):
        depthwise_conv2d(torch.randn(1, 4, 8, 8), torch.randn(4, 2, 3, 3))
    with pytest.raises(ValueError, match="channels"):
        depthwise_conv2d(torch.randn(1, 4, 8, 8), torch.randn(3, 1, 3, 3))
    with pytest.raises(ValueError, match="bias"):
        depthwise_conv2d(torch.randn(1, 4, 8, 8), torch.randn(4, 1, 3, 3), torch.randn(3))
    with pytest.raises(ValueError, match="backend"):
        set_backend("cuda")


@pytest.mark.parametrize("kh,kw,bias", [(5, 5, True), (4, 6, False)])
def test_custom_op_registration(kh, kw, bias):
    """torch.library's own checks: schema, fake (meta) impl, autograd registration."""
    x = torch.randn(2, 3, 7, 8, requires_grad=True)
    w = torch.randn(3, 1, kh, kw, requires_grad=True)
    b = torch.randn(3, requires_grad=True) if bias else None
    torch.library.opcheck(torch.ops.largekernel.depthwise_conv2d.default, (x, w, b))


def test_custom_op_gradients_even_kernel():
    x = torch.randn(2, 3, 7, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 1, 4, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: torch.ops.largekernel.depthwise_conv2d(*a), (x, w, b))


def test_torch_compile_fullgraph_through_custom_op():
    def f(x, w, b):
        return torch.ops.largekernel.depthwise_conv2d(x, w, b).square().sum()

    x = torch.randn(2, 3, 9, 7, requires_grad=True)
    w = torch.randn(3, 1, 5, 3, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    compiled(x, w, b).backward()
    got = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    F.conv2d(x, w, b, padding="same", groups=3).square().sum().backward()
    for g, t in zip(got, (x, w, b)):
        torch.testing.assert_close(g, t.grad, rtol=1e-4, atol=1e-4)


def test_torch_compile_fullgraph_through_dispatch_point():
    layer = DepthwiseConv2d(4, 7, bias=True)
    x = torch.randn(1, 4, 10, 10)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), layer(x))


def test_layer_reports_its_path():
    layer = DepthwiseConv2d(4, 31)
    assert layer.conv_path(torch.randn(1, 4, 8, 8)) == "native-channels_last"
    assert DepthwiseConv2d(4, 3, stride=2).conv_path(torch.randn(1, 4, 8, 8)) == "native (not stride-1 same)"
    assert "backend=" in repr(layer)


@pytest.mark.parametrize("dynamo", [False, True])
def test_onnx_export_emits_standard_conv(tmp_path, dynamo):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = nn.Sequential(DepthwiseConv2d(4, 13, bias=True), nn.ReLU(), DepthwiseConv2d(4, 7)).eval()
    x = torch.randn(1, 4, 16, 12)
    path = tmp_path / "dw.onnx"
    if dynamo:
        pytest.importorskip("onnxscript")
    torch.onnx.export(model, (x,), str(path), dynamo=dynamo, opset_version=18)
    graph = onnx.load(str(path)).graph
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert len(convs) == 2
    assert all(a.i == 4 for n in convs for a in n.attribute if a.name == "group")
    assert {n.op_type for n in graph.node} <= {"Conv", "Relu", "Identity", "Constant"}
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(out), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("splits", [["bf16x6", "bf16x3"], ["bf16x6"], []])
def test_fp32_tuner_candidates_follow_the_allowed_splits(monkeypatch, splits):
    """The CUDA tuner's fp32 candidates use only the splits LARGEKERNEL_FP32_SPLITS allows (bf16x3 and the split band
    copies carry ~5e-6 relative error; without them every fp32 pass stays at ~1e-7); other dtypes never get them."""
    import largekernel.ops.depthwise as dw

    monkeypatch.setattr(dw, "FP32_SPLITS", splits)
    for h, k in ((56, 31), (28, 29), (14, 27), (7, 13)):
        x = torch.empty(64, 128, h, h, device="meta", dtype=torch.float32)
        cands = [*dw._fwd_candidates(x, k, k), *dw._fwd_candidates(x, k, k, bands=False),
                 *dw._wgrad_candidates(x, k, k)]
        used = {c["precision"] for c in cands if "precision" in c}
        assert used <= set(splits)
        assert any(c.get("split") for c in cands) == ("bf16x3" in splits and h == 56)
        if splits:
            assert set(splits) <= used
        xb = x.to(torch.bfloat16)
        assert not any("precision" in c or c.get("split") for c in
                       [*dw._fwd_candidates(xb, k, k), *dw._wgrad_candidates(xb, k, k)])


@pytest.mark.parametrize("env, expected", [({}, "tf32x3 bf16x6,bf16x3"),
                                           ({"LARGEKERNEL_FP32_PRECISION": "ieee"}, "ieee "),
                                           ({"LARGEKERNEL_FP32_PRECISION": "ieee", "LARGEKERNEL_FP32_SPLITS": "bf16x6"},
                                            "ieee bf16x6")])
def test_fp32_precision_environment(env, expected):
    """A precision named in LARGEKERNEL_FP32_PRECISION is the only one used unless splits are named too."""
    import os
    import subprocess
    import sys

    clean = {k: v for k, v in os.environ.items() if not k.startswith("LARGEKERNEL_FP32")}
    out = subprocess.run([sys.executable, "-c", "import largekernel.ops.depthwise as d; "
                          "print(d.FP32_PRECISION, ','.join(d.FP32_SPLITS))"],
                         env={**clean, **env}, capture_output=True, text=True, check=True).stdout
    assert out.rstrip("\n") == expected


@pytest.mark.parametrize(("h", "w", "kh", "kw"), [(6, 6, 5, 5), (5, 7, 4, 6), (4, 5, 7, 9)])
def test_plane_operator_is_the_conv_as_a_matrix(h, w, kh, kw):
    """Each channel's dense (HW x HW) operator, applied as a plain matrix product, is F.conv2d 'same' in float64
    (odd, even and plane-covering kernels); its zero padding to a multiple of 16 is zero."""
    from largekernel.ops._dw_kernels import plane_operator
    from largekernel.ops.depthwise import _pads

    torch.manual_seed(0)
    x, weight = torch.randn(3, 4, h, w, dtype=torch.float64), torch.randn(4, kh, kw, dtype=torch.float64)
    op = plane_operator(weight, h, w, *_pads(kh, kw))
    p = h * w
    assert op.shape == (4, -(-p // 16) * 16, -(-p // 16) * 16)
    assert not op[:, p:].any() and not op[:, :, p:].any()
    y = torch.einsum("nci,cio->nco", x.reshape(3, 4, p), op[:, :p, :p]).reshape(3, 4, h, w)
    torch.testing.assert_close(y, F.conv2d(x, weight.unsqueeze(1), padding="same", groups=4), rtol=1e-12, atol=1e-12)


def test_dense_plane_operator_only_where_it_fits():
    """The dense plane-operator GEMM is a candidate for packed 2-byte planes of at most 256 pixels with a batch whose
    activations outweigh a quarter of the operator, nowhere else."""
    from largekernel.ops.depthwise import _dense_fits

    def planes(n, c, h, w, dtype=torch.bfloat16):
        return torch.empty(n, c, h, w, dtype=dtype, device="meta")

    assert _dense_fits(planes(128, 246, 14, 14)) and _dense_fits(planes(64, 640, 7, 7))
    assert not _dense_fits(planes(128, 246, 14, 14, torch.float32))      # fp32: not offered
    assert not _dense_fits(planes(128, 160, 28, 28))                      # 784 pixels: operator too large
    assert not _dense_fits(planes(1, 246, 14, 14))                        # one image: the operator dominates
    assert not _dense_fits(planes(128, 246, 14, 14).contiguous(memory_format=torch.channels_last))

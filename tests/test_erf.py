"""ERF (RepLKNet's method) against analytic cases, the area ratio on known maps, and the end-to-end driver."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from largekernel.analysis.erf import area_ratio, area_ratios, compute_erf, erf_main, iter_images, scale_erf


def _ones_stack(layers: int, k: int, in_ch: int = 3) -> nn.Sequential:
    convs = []
    for i in range(layers):
        conv = nn.Conv2d(in_ch if i == 0 else 1, 1, k, padding=k // 2, bias=False)
        nn.init.ones_(conv.weight)
        convs.append(conv)
    return nn.Sequential(*convs).double()


def _path_counts(layers: int, k: int) -> np.ndarray:
    """Number of paths from each input pixel to the centre through ``layers`` KxK all-ones convs (2-D)."""
    one_d = np.array([1.0])
    for _ in range(layers):
        one_d = np.convolve(one_d, np.ones(k))
    return np.outer(one_d, one_d)


@pytest.mark.parametrize("layers,k", [(1, 3), (1, 7), (2, 5), (3, 3)])
def test_stack_of_ones_convs_has_analytic_support_and_values(layers: int, k: int) -> None:
    size = 33
    model = _ones_stack(layers, k)
    images = torch.rand(4, 3, size, size, dtype=torch.float64) + 0.1  # positive: ReLU at the centre passes
    erf = compute_erf(model, images, feature="output", batch_size=3, device="cpu")
    side = layers * (k - 1) + 1
    assert erf.shape == (size, size)
    nz = np.argwhere(erf > 0)
    assert (nz.max(0) - nz.min(0) + 1).tolist() == [side, side]
    assert (erf > 0).sum() == side * side
    c, r = size // 2, side // 2
    # each RGB channel gets the path count, summed over the 3 channels
    expected = 3 * _path_counts(layers, k)
    np.testing.assert_allclose(erf[c - r:c + r + 1, c - r:c + r + 1], expected, rtol=1e-12)


def test_even_feature_map_uses_lower_right_centre_and_relu_gates() -> None:
    # 1x1 conv: the ERF is the single input pixel under the central point (h//2, w//2), even sizes included.
    conv = nn.Conv2d(3, 2, 1, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [-1.0, -1.0, -1.0]]).view(2, 3, 1, 1))
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64) + 0.1
    erf = compute_erf(conv, x, feature="output", device="cpu")
    expected = np.zeros((8, 8))
    expected[4, 4] = 6.0  # channel 2 is negative -> ReLU gates it out; negative input gradients are dropped too
    np.testing.assert_allclose(erf, expected)


def test_nan_images_are_skipped() -> None:
    model = _ones_stack(1, 3)
    x = torch.rand(3, 3, 9, 9, dtype=torch.float64) + 0.1
    x[1, :, 4, 4] = float("nan")
    erf = compute_erf(model, x, feature="output", device="cpu")
    np.testing.assert_allclose(erf[3:6, 3:6], 3 * np.ones((3, 3)))


def test_area_ratio_known_maps() -> None:
    uniform = np.ones((11, 11))
    # share of a centred s x s square is s^2 / 121: first above 20% is s=5 (25/121), above 50% s=9 (81/121)
    assert area_ratio(uniform, 0.2) == (5, pytest.approx(25 / 121))
    assert area_ratio(uniform, 0.5) == (9, pytest.approx(81 / 121))
    assert area_ratio(uniform, 0.99) is None  # the official loop stops at side 9 for an 11x11 map (81/121)
    delta = np.zeros((20, 20))
    delta[10, 10] = 1.0
    for t in (0.2, 0.3, 0.5, 0.99):
        assert area_ratio(delta, t) == (3, pytest.approx(9 / 400))
    ring = np.zeros((21, 21))
    ring[10, 10] = 1.0
    ring[10, 16] = 3.0  # 25% of the mass at the centre, 75% at distance 6
    assert area_ratio(ring, 0.2)[0] == 3
    r = area_ratios(ring)
    assert r["t=30%"]["side"] == 13 and r["t=99%"]["side"] == 13
    with pytest.raises(ValueError, match="threshold"):
        area_ratio(uniform, 1.5)


def test_scale_erf_is_log_then_max() -> None:
    m = np.array([[0.0, 9.0], [99.0, 999.0]])
    np.testing.assert_allclose(scale_erf(m), np.array([[0.0, 1.0], [2.0, 3.0]]) / 3.0)


def test_iter_images_skimage_shapes_and_count() -> None:
    batches = list(iter_images("skimage", num_images=5, input_size=32, batch_size=2))
    assert [b.shape[0] for b in batches] == [2, 2, 1]
    assert batches[0].shape[1:] == (3, 32, 32)
    with pytest.raises(ValueError, match="images"):
        next(iter_images("/nonexistent/folder", 1, 32))


def test_erf_main_end_to_end_on_timm_model(tmp_path) -> None:
    erf_main(["resnet18", "--num-images", "3", "--input-size", "64", "--batch-size", "2", "--device", "cpu",
              "--out-dir", str(tmp_path)])
    data = json.loads((tmp_path / "erf_ratios.json").read_text())
    assert set(data["models"]["resnet18"]["ratios"]) == {"t=20%", "t=30%", "t=50%", "t=99%"}
    assert (tmp_path / "resnet18_erf.png").stat().st_size > 0
    assert (tmp_path / "erf_combined.png").stat().st_size > 0
    assert np.load(tmp_path / "resnet18_erf.npy").shape == (64, 64)


def test_feature_last_stage_matches_layer4_of_timm_resnet() -> None:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=0).double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    a = compute_erf(model, x, feature="last_stage", device="cpu")
    b = compute_erf(model, x, feature="module:layer4", device="cpu")
    np.testing.assert_allclose(a, b, rtol=1e-10)
    with pytest.raises(ValueError, match="feature"):
        compute_erf(model, x, feature="bogus", device="cpu")


def test_cli_plugin_erf(tmp_path) -> None:
    from largekernel.cli import main

    rc = main(["erf", "resnet18", "--model-arg", "resnet18:zero_init_last=False", "--num-images", "2",
               "--input-size", "64", "--device", "cpu", "--out-dir", str(tmp_path)])
    assert rc == 0 and (tmp_path / "erf_ratios.json").is_file()
    assert main(["erf", "resnet18", "--model-arg", "vgg:x=1", "--out-dir", str(tmp_path)]) == 2  # one-line error


def test_build_model_loads_local_checkpoint(tmp_path) -> None:
    import timm
    from safetensors.torch import save_file

    from largekernel.analysis.erf import build_model

    torch.manual_seed(3)
    src = timm.create_model("lk_mobilenetv2_tiny", num_classes=4)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    model = build_model("lk_mobilenetv2_tiny", str(path), num_classes=4, seed=0)
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    with pytest.raises(ValueError):
        build_model("lk_mobilenetv2_tiny", str(tmp_path / "missing.pth"))


def test_iter_images_folder(tmp_path) -> None:
    from PIL import Image

    for i, size in enumerate([(40, 30), (20, 50), (33, 33)]):
        Image.fromarray(np.full((size[1], size[0], 3), 50 * i, np.uint8)).save(tmp_path / f"im{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    batches = list(iter_images(str(tmp_path), num_images=10, input_size=16, batch_size=2, mean=(0, 0, 0),
                               std=(1, 1, 1)))
    x = torch.cat(batches)
    assert x.shape == (3, 3, 16, 16)  # capped at the 3 images present, resized
    np.testing.assert_allclose(x[:, 0, 0, 0].numpy(), np.array([0, 50, 100]) / 255, atol=1e-6)

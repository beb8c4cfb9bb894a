"""Each guideline experiment runs end-to-end at its tiny setting and reports what it claims to measure."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from largekernel.experiments.guidelines import (
    IGNORE,
    DenseTargets,
    SegmentationModel,
    _dense_metrics,
    _densify_large_kernels,
    guidelines_main,
    run_guideline,
)


def test_guideline_1_counts(tmp_path) -> None:
    r = run_guideline(1, quick=True, out_dir=str(tmp_path), verbose=False)
    rows = r["complexity"]
    small = rows["replknet_test 3-3-3-3 depthwise (deploy)"]
    large = rows["replknet_test 7-7-5-5 depthwise (deploy)"]
    dense = rows["replknet_test 7-7-5-5 DENSE (deploy)"]
    assert large["gmacs"] > small["gmacs"] and dense["gmacs"] > large["gmacs"]
    assert r["increase_lk_vs_3"]["macs_pct"] == pytest.approx(100 * (large["gmacs"] / small["gmacs"] - 1))
    lat = r["cpu_latency_1thread"]
    # MACs of one 31x31 layer: depthwise C*K^2*H*W, dense C times more (analytic)
    assert lat["depthwise 31x31, 32 ch @16x16 (MMACs)"] == pytest.approx(32 * 31 * 31 * 16 * 16 / 1e6)
    assert lat["dense 31x31, 32 ch @16x16 (MMACs)"] == pytest.approx(32 * 32 * 31 * 31 * 16 * 16 / 1e6)
    assert json.loads((tmp_path / "guideline_1.json").read_text())["guideline"] == 1
    assert (tmp_path / "guideline_1.png").stat().st_size > 0


def test_densify_replaces_only_large_depthwise() -> None:
    m = nn.Sequential(nn.Conv2d(8, 8, 7, padding=3, groups=8), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                      nn.Conv2d(8, 8, 7, padding=3))
    _densify_large_kernels(m)
    assert [c.groups for c in m] == [1, 8, 1]
    assert m(torch.randn(1, 8, 9, 9)).shape == (1, 8, 9, 9)


@pytest.mark.parametrize("n", [2, 3])
def test_guidelines_2_3_run(n: int, tmp_path) -> None:
    r = run_guideline(n, quick=True, out_dir=str(tmp_path), verbose=False)
    assert len(r["runs"]) == 4
    for run in r["runs"].values():
        assert 0 <= run["dense_miou"] <= 100 and 0 <= run["cls_acc"] <= 100
    if n == 2:
        p = {k: v["backbone_params"] for k, v in r["runs"].items()}
        assert p["3x3, with shortcut"] == p["3x3, no shortcut"] < p["13x13, with shortcut"]
    else:
        merged = [v for k, v in r["runs"].items() if "re-param" in k]
        assert len(merged) == 2
        for v in merged:
            assert v["dense_merge_diff"] < 1e-4 and v["cls_merge_diff"] < 1e-4
    assert "| run |" in (tmp_path / f"guideline_{n}.md").read_text()


def test_guidelines_4_5_run(tmp_path) -> None:
    r4 = run_guideline(4, quick=True, out_dir=str(tmp_path), verbose=False)
    assert list(r4["runs"]) == ["3x3", "13x13", "31x31"]
    assert r4["runs"]["3x3"]["dense_gain"] == 0.0
    r = r4["runs"]["31x31"]
    assert r["cls_gain"] == pytest.approx(r["cls_acc"] - r4["runs"]["3x3"]["cls_acc"])
    r5 = run_guideline(5, quick=True, out_dir=str(tmp_path), verbose=False)
    assert len(r5["runs"]) == 3 and all(0 <= v["dense_miou"] <= 100 for v in r5["runs"].values())


def test_stride8_arch_gives_7x7_maps_at_56() -> None:
    import timm

    from largekernel.experiments.guidelines import STRIDE8_ARCH

    m = timm.create_model("lk_mobilenetv2_tiny", arch=STRIDE8_ARCH, in_chans=1)
    feats = m.forward_intermediates(torch.randn(1, 1, 56, 56), intermediates_only=True)
    assert feats[-1].shape[-2:] == (7, 7)


def test_dense_targets_mark_marker_curves() -> None:
    from largekernel.data import create_dataset

    base = create_dataset("pathfinder", "val", n=6, size=24, length=14)
    ds = DenseTargets(base)
    for i in range(len(ds)):
        img, tgt = ds[i]
        ink = img[0] > 0
        assert ((tgt == IGNORE) == ~ink).all()
        (py, px), (qy, qx) = base.arrays["markers"][i]
        assert tgt[py, px] == 1 and tgt[qy, qx] == 1
        # a positive image (markers joined) has its marker curve equal to the generator's P-component mask
        if base.arrays["labels"][i] == 1:
            np.testing.assert_array_equal((tgt == 1).numpy(), base.arrays["masks"][i].astype(bool))


def test_dense_metrics_known_values() -> None:
    y = torch.tensor([[[1, 0, IGNORE, 1]]])
    logits = torch.zeros(1, 2, 1, 4)
    logits[0, 1] = torch.tensor([1.0, 1.0, 1.0, -1.0])  # predicts 1, 1, (ignored), 0
    m = _dense_metrics(logits, y)
    assert m["pixel_acc"] == pytest.approx(100 / 3)
    assert m["miou"] == pytest.approx(100 * (0 / 2 + 1 / 3) / 2)


def test_segmentation_model_shape() -> None:
    m = SegmentationModel("lk_mobilenetv2_tiny", kernel_size=5)
    assert m(torch.randn(2, 1, 32, 32)).shape == (2, 2, 32, 32)


def test_cli_rejects_bad_guideline(capsys) -> None:
    with pytest.raises(SystemExit):
        guidelines_main(["7"])
    with pytest.raises(ValueError, match="guideline"):
        run_guideline(9, quick=True, out_dir=None)


def test_cli_plugin_guidelines(tmp_path) -> None:
    from largekernel.cli import main

    assert main(["guidelines", "1", "--quick", "--out-dir", str(tmp_path)]) == 0
    assert (tmp_path / "guideline_1.md").is_file()

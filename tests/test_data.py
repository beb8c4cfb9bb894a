"""Datasets: the Pathfinder generator is deterministic and its labels/masks agree with an independent flood
fill; digits and folders load; bad data folders give one-line errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from largekernel.data import (
    PathfinderConfig,
    create_dataset,
    create_loader,
    generate,
    generate_arrays,
)
from largekernel.train.config import DEFAULT_PATHFINDER

CFG = PathfinderConfig(size=32, length=24, distractors=1, scale=1)


def test_generator_deterministic_and_seed_dependent():
    a = generate_arrays(CFG, seed=3, n=20)
    b = generate_arrays(CFG, seed=3, n=20)
    c = generate_arrays(CFG, seed=4, n=20)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["images"], c["images"])
    # sample i does not depend on how many were generated before it
    np.testing.assert_array_equal(generate(CFG, 3, 7)["image"], a["images"][7])


@pytest.mark.parametrize("cfg", [CFG, PathfinderConfig(), PathfinderConfig(size=32, length=40, margin=1),
                                 PathfinderConfig(**DEFAULT_PATHFINDER)])
def test_labels_and_masks_match_flood_fill(cfg):
    a = generate_arrays(cfg, seed=0, n=150)
    labels = a["labels"]
    assert 0.3 < labels.mean() < 0.7
    for img, mask, y, (p, q) in zip(a["images"], a["masks"], labels, a["markers"]):
        assert set(np.unique(img)) <= {0, 1}
        comp, _ = ndimage.label(img, structure=np.ones((3, 3), int))
        assert comp[tuple(p)] > 0 and comp[tuple(q)] > 0
        assert int(comp[tuple(p)] == comp[tuple(q)]) == y
        np.testing.assert_array_equal(mask, (comp == comp[tuple(p)]).astype(np.uint8))
        # several separate curves are present: the marker curve is not the only ink
        assert comp.max() >= 3


def test_classes_have_same_ink():
    a = generate_arrays(PathfinderConfig(), seed=1, n=300)
    ink = a["images"].reshape(len(a["images"]), -1).sum(1)
    pos, neg = ink[a["labels"] == 1].mean(), ink[a["labels"] == 0].mean()
    assert abs(pos - neg) / neg < 0.05


def test_pathfinder_dataset_and_loader(tmp_path, monkeypatch):
    monkeypatch.setenv("LARGEKERNEL_CACHE", str(tmp_path))
    ds = create_dataset("pathfinder", "train", n=40, size=32, length=24, distractors=1, scale=1,
                        return_mask=True, augment=False)
    x, y, m = ds[0]
    assert x.shape == (1, 32, 32) and m.shape == (32, 32) and y in (0, 1)
    assert ds.num_classes == 2 and ds.in_chans == 1
    assert list(tmp_path.glob("pathfinder-*.npz"))  # cached
    again = create_dataset("pathfinder", "train", n=40, size=32, length=24, distractors=1, scale=1,
                           augment=False)
    torch.testing.assert_close(again[5][0], ds[5][0], rtol=0, atol=0)
    val = create_dataset("pathfinder", "val", n=40, size=32, length=24, distractors=1, scale=1)
    assert not torch.equal(val[0][0], ds[0][0])
    loader = create_loader(ds, batch_size=8, train=True, seed=1)
    loader.sampler.set_epoch(0)
    order0 = torch.cat([b[1] for b in loader])
    loader.sampler.set_epoch(0)
    assert torch.equal(order0, torch.cat([b[1] for b in loader]))


def test_augment_preserves_mask_alignment(tmp_path, monkeypatch):
    monkeypatch.setenv("LARGEKERNEL_CACHE", str(tmp_path))
    ds = create_dataset("pathfinder", "train", n=8, size=16, length=12, distractors=1,
                        return_mask=True)
    torch.manual_seed(0)
    for i in range(8):
        x, _, m = ds[i]
        assert torch.all(x[0][m > 0] == 1)


def test_digits():
    tr, va = create_dataset("digits", "train"), create_dataset("digits", "val")
    assert len(tr) + len(va) == 1797 and tr.num_classes == 10
    assert tr[0][0].shape == (1, 32, 32)


def test_folder_dataset_and_unreadable_images(tmp_path):
    from PIL import Image
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            d = tmp_path / split / c
            d.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)).save(d / f"{i}.png")
    (tmp_path / "train" / "cat" / "broken.png").write_bytes(b"not a png")
    ds = create_dataset(str(tmp_path), "train", img_size=16)
    assert ds.num_classes == 2 and len(ds) == 7
    loader = create_loader(ds, batch_size=7, train=False)
    xs = [x for x, _ in loader]
    assert loader.skipped == 1 and sum(len(x) for x in xs) == 6 and xs[0].shape[1:] == (3, 16, 16)
    strict = create_loader(ds, batch_size=7, train=False, max_skipped=0)
    with pytest.raises(ValueError, match="unreadable"):
        list(strict)


@pytest.mark.parametrize("setup,match", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: p, "no class sub-folders"),
    (lambda p: (p / "train" / "a").mkdir(parents=True) or p, "contains no images"),
])
def test_bad_folders(tmp_path, setup, match):
    with pytest.raises(ValueError, match=match):
        create_dataset("folder", "train", root=str(setup(tmp_path)))


def test_bad_options():
    with pytest.raises(ValueError, match="unknown dataset"):
        create_dataset("nope", "train")
    with pytest.raises(ValueError, match="does not take"):
        create_dataset("digits", "train", n=3)
    with pytest.raises(ValueError, match="margin"):
        create_dataset("pathfinder", "train", margin=0)

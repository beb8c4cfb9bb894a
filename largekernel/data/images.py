"""Real images: scikit-learn digits (ships with a dependency), ImageNet-style folders and timm dataset names.

Folders and timm names go through timm's ``create_dataset`` / ``create_transform``; the only addition is
:class:`SkippingDataset`, which turns an unreadable image into a counted skip instead of a crash.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

IMG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")


class DigitsDataset(Dataset):
    """scikit-learn's 1797 handwritten 8x8 digits, bilinearly upsampled to ``img_size`` (1 channel).

    Deterministic 80/20 split (permutation of ``seed``). Items: ``(image (1, S, S) float in [0, 1], label)``.
    """

    num_classes = 10
    in_chans = 1

    def __init__(self, split: str = "train", img_size: int = 32, seed: int = 0) -> None:
        from sklearn.datasets import load_digits
        if split not in ("train", "val", "test"):
            raise ValueError(f"digits split must be 'train', 'val' or 'test', got {split!r}")
        if img_size < 8:
            raise ValueError(f"digits img_size must be >= 8, got {img_size}")
        d = load_digits()
        order = np.random.default_rng(seed).permutation(len(d.target))
        cut = int(0.8 * len(order))
        idx = order[:cut] if split == "train" else order[cut:]
        x = torch.from_numpy(d.images[idx]).float().unsqueeze(1) / 16.0
        self.images = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
        self.targets = d.target[idx].tolist()
        self.split = split

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.images[i], self.targets[i]


def check_image_folder(root: str | os.PathLike, split: str) -> Path:
    """The class-folder directory for ``split`` under ``root`` (``root/train``, ``root/val``, or root itself),
    or a ``ValueError`` saying what is missing."""
    root = Path(root)
    if not root.exists():
        raise ValueError(f"data folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise ValueError(f"data folder {str(root)!r} is not a directory")
    names = ("train",) if split == "train" else ("val", "validation", "valid", "test")
    sub = next((root / n for n in names if (root / n).is_dir()), root)
    classes = [d for d in sorted(sub.iterdir()) if d.is_dir()] if sub.is_dir() else []
    if not classes:
        raise ValueError(f"data folder {str(sub)!r} has no class sub-folders (expected {sub}/<class>/<image>)")
    for c in classes:
        for _dirpath, _dirs, files in os.walk(c):
            if any(f.lower().endswith(IMG_EXTENSIONS) for f in files):
                return sub
    raise ValueError(f"data folder {str(sub)!r} contains no images ({', '.join(IMG_EXTENSIONS[:4])}, ...)")


class SkippingDataset(Dataset):
    """Wraps a timm ``ImageDataset``: an image that fails to decode yields ``None`` (dropped and counted by
    :func:`largekernel.data.collate_skipping`) instead of an exception."""

    def __init__(self, base, transform=None) -> None:
        self.base = base
        self.transform = transform
        self.num_classes = len(getattr(base.reader, "class_to_idx", {}) or {}) or None
        self.targets = [t for _, t in getattr(base.reader, "samples", [])] or None

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        from PIL import Image
        try:
            f, target, *_ = self.base.reader[i]
            img = Image.open(f)
            img = img.convert(self.base.input_img_mode or "RGB")
        except (OSError, ValueError, SyntaxError):
            return None
        if self.transform is not None:
            img = self.transform(img)
        return img, target


def create_image_dataset(name: str, split: str, root: str | None, img_size: int, train_transform: bool,
                         mean: tuple[float, ...], std: tuple[float, ...], crop_pct: float = 0.875,
                         auto_augment: str | None = None, download: bool = False,
                         interpolation: str = "bicubic") -> SkippingDataset:
    """A timm dataset (folder when ``name`` is '' / 'folder', else a timm name such as 'torch/cifar10')
    with timm's train or eval transform."""
    from timm.data import create_dataset as timm_create_dataset
    from timm.data import create_transform
    if name in ("", "folder"):
        if root is None:
            raise ValueError("data folder: --data-dir (root) is required")
        root = str(check_image_folder(root, split))
        base = timm_create_dataset("", root=root, split=split, search_split=False)
    else:
        try:
            base = timm_create_dataset(name, root=root, split="train" if split == "train" else "validation",
                                       download=download, is_training=split == "train")
        except Exception as e:  # timm raises many kinds; one line for the user
            raise ValueError(f"cannot open timm dataset {name!r} (root={root!r}): {str(e).splitlines()[0]}") from e
    transform = create_transform(img_size, is_training=train_transform, auto_augment=auto_augment,
                                 interpolation=interpolation, mean=mean, std=std, crop_pct=crop_pct)
    if not hasattr(base, "reader"):  # torchvision datasets: no reader, plain transform
        base.transform = transform
        return base
    return SkippingDataset(base, transform)

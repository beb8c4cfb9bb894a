"""Datasets and loaders.

Programmatic API::

    from largekernel.data import create_dataset, create_loader
    train_ds = create_dataset("pathfinder", "train", n=4000, size=48)       # embedded long-range task
    val_ds = create_dataset("pathfinder", "val", n=500, size=48, return_mask=True)  # + curve masks
    digits = create_dataset("digits", "train", img_size=32)                 # real images (scikit-learn)
    folder = create_dataset("folder", "train", root="/data/imagenet", img_size=224)  # train/ val/ classes
    cifar = create_dataset("torch/cifar10", "val", root="/data", img_size=32)         # any timm name
    loader = create_loader(train_ds, batch_size=64, train=True, seed=0)

Every dataset has ``num_classes``, ``in_chans`` and ``default_img_size`` attributes.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import fields

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torch.utils.data.dataloader import default_collate

from largekernel.data.images import DigitsDataset, SkippingDataset, check_image_folder, create_image_dataset
from largekernel.data.pathfinder import PathfinderConfig, PathfinderDataset, generate, generate_arrays

BUILTIN = ("pathfinder", "digits")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def create_dataset(name: str, split: str = "train", *, root: str | None = None, img_size: int | None = None,
                   seed: int = 0, augment: bool | None = None, **kw) -> Dataset:
    """Dataset ``name`` for ``split`` ('train' or 'val').

    name: 'pathfinder' (kw: n, size or img_size, length, distractors, curvature, margin, marker,
    return_mask, cache, progress), 'digits' (img_size), 'folder' or an existing directory (ImageNet-style
    ``train/`` and ``val/`` class folders, with ``root``), or a timm dataset name ('torch/cifar10', 'hfds/..').
    augment: default True for 'train'. Folder/timm kw: mean, std, crop_pct, auto_augment, download,
    interpolation. Raises ``ValueError`` (one line) for unknown names, bad options or empty folders.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    augment = (split == "train") if augment is None else augment
    if name == "pathfinder":
        cfg_keys = {f.name for f in fields(PathfinderConfig)}
        if img_size is not None:
            kw.setdefault("size", img_size // kw.get("scale", 1))
        cfg = PathfinderConfig(**{k: kw.pop(k) for k in list(kw) if k in cfg_keys})
        allowed = {"n", "return_mask", "cache", "progress"}
        _reject_unknown(name, kw, allowed)
        ds = PathfinderDataset(split, seed=seed, config=cfg, augment=augment, **kw)
        ds.default_img_size = cfg.size * cfg.scale
        return ds
    if name == "digits":
        _reject_unknown(name, kw, set())
        ds = DigitsDataset(split, img_size=img_size or 32, seed=seed)
        ds.default_img_size = img_size or 32
        return ds
    if name != "folder" and os.path.isdir(name):
        name, root = "folder", name
    if name == "folder" or "/" in name:
        allowed = {"mean", "std", "crop_pct", "auto_augment", "download", "interpolation"}
        _reject_unknown(name, kw, allowed)
        size = img_size or 224
        ds = create_image_dataset(name, split, root, size, augment, mean=kw.get("mean", IMAGENET_MEAN),
                                  std=kw.get("std", IMAGENET_STD), crop_pct=kw.get("crop_pct", 0.875),
                                  auto_augment=kw.get("auto_augment"), download=kw.get("download", False),
                                  interpolation=kw.get("interpolation", "bicubic"))
        if getattr(ds, "num_classes", None) is None:
            classes = getattr(ds, "classes", None)
            ds.num_classes = len(classes) if classes is not None else None
        ds.in_chans = 3
        ds.default_img_size = size
        return ds
    raise ValueError(f"unknown dataset {name!r}: use 'pathfinder', 'digits', a folder path, or a timm name "
                     "like 'torch/cifar10'")


def _reject_unknown(name: str, kw: dict, allowed: set[str]) -> None:
    bad = sorted(set(kw) - allowed)
    if bad:
        raise ValueError(f"dataset {name!r} does not take option(s) {bad}; it takes {sorted(allowed) or 'none'}")


def collate_skipping(batch: list) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Default collate after dropping ``None`` items (unreadable images); returns ``(x, y, n_skipped)``."""
    good = [b for b in batch if b is not None]
    skipped = len(batch) - len(good)
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    out = default_collate(good)
    return out[0], out[1], skipped


class SkipCountingLoader:
    """Iterates ``(x, y)`` from a loader built on :func:`collate_skipping`, counting skipped images in
    ``self.skipped`` and raising ``ValueError`` once more than ``max_skipped`` were unreadable."""

    def __init__(self, loader: DataLoader, max_skipped: int = 100) -> None:
        self.loader, self.max_skipped, self.skipped = loader, max_skipped, 0
        self.sampler = loader.sampler
        self.dataset = loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y, n in self.loader:
            self.skipped += n
            if self.skipped > self.max_skipped:
                raise ValueError(f"more than {self.max_skipped} unreadable images in the data (raise "
                                 "--max-skipped to tolerate more)")
            if len(x):
                yield x, y


def create_loader(dataset: Dataset, batch_size: int, train: bool, seed: int = 0, num_workers: int = 0,
                  world_size: int = 1, rank: int = 0, drop_last: bool | None = None,
                  max_skipped: int = 100, pin_memory: bool = False):
    """A ``DataLoader`` with a seeded sampler: the order of epoch ``e`` depends only on ``(seed, e)`` (call
    ``loader.sampler.set_epoch(e)``), so a resumed run sees the same batches. Shards across ``world_size``
    ranks (DDP). Folder/timm datasets get skip-counting of unreadable images."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    drop_last = train if drop_last is None else drop_last
    if train and len(dataset) < batch_size * world_size:
        raise ValueError(f"batch_size {batch_size} x {world_size} process(es) is larger than the training "
                         f"set ({len(dataset)} images)")
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=train, seed=seed,
                                 drop_last=train)
    skipping = isinstance(dataset, SkippingDataset)
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        drop_last=drop_last, pin_memory=pin_memory, generator=gen,
                        collate_fn=collate_skipping if skipping else None,
                        persistent_workers=False)
    return SkipCountingLoader(loader, max_skipped) if skipping else loader


__all__ = [
    "BUILTIN", "DigitsDataset", "PathfinderConfig", "PathfinderDataset", "SkipCountingLoader", "SkippingDataset",
    "check_image_folder", "collate_skipping", "create_dataset", "create_loader", "generate", "generate_arrays",
]

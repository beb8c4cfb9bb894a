"""Pathfinder-style long-range dataset, generated procedurally and deterministically from a seed.

Each image shows two square markers and several smooth curves (drawn 1 cell wide on a ``size`` grid, then
upsampled ``scale`` times). Label 1: the markers sit at the two ends of one curve; label 0: each marker ends
its own curve. Whether the markers are joined is a
property of the whole path, not of any local patch, so a model needs a receptive field (or an effective
one) spanning the curve length -- the setting where large kernels should help (RepLKNet, Sec. 3).

Construction (balanced so that no local statistic gives the label away):
  * a path C of ``length`` steps is grown from marker P to marker Q;
  * positive: keep C whole and add two distractors of ``length // 2`` steps;
  * negative: keep the first half of C (ending free), regrow a fresh half-length curve from Q, and add one
    distractor of ``length`` steps;
  * both: ``distractors`` extra half-length curves.
So both classes have the same marker distance distribution, the same ink, three same-length pieces and
four free curve ends. Different curves never come within ``margin`` pixels (Chebyshev) of each other, so
the label equals 8-connectivity of the two markers in the image and can be checked by a flood fill.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset


@dataclass(frozen=True)
class PathfinderConfig:
    """Generator parameters (grid cells / steps). ``largekernel train`` uses ``size=24, scale=2, length=18,
    curvature=0.05`` (see ``largekernel.train.config.DEFAULT_PATHFINDER``): 48x48 images whose 2-px wide
    marker-to-marker path is 36 px long, with 4 other curves."""

    size: int = 48            # drawing grid; the image is size * scale pixels
    length: int = 44          # steps of the marker-to-marker path (1 grid cell per step)
    distractors: int = 2      # extra half-length curves
    curvature: float = 0.35   # std of the heading change per step, radians
    margin: int = 2           # min Chebyshev gap between different curves (>= 1 keeps curves apart)
    marker: int = 1           # marker half-size: a (2m+1)^2 square
    scale: int = 1            # nearest-neighbour upsampling of the drawn image (curves ``scale`` px wide)

    def validate(self) -> None:
        if self.size < 16:
            raise ValueError(f"pathfinder size must be >= 16, got {self.size}")
        if not 4 <= self.length <= 4 * self.size:
            raise ValueError(f"pathfinder length must be in [4, 4*size], got {self.length}")
        if self.distractors < 0:
            raise ValueError(f"pathfinder distractors must be >= 0, got {self.distractors}")
        if self.margin < 1:
            raise ValueError(f"pathfinder margin must be >= 1 (curves must not touch), got {self.margin}")
        if self.scale < 1:
            raise ValueError(f"pathfinder scale must be >= 1, got {self.scale}")
        if self.marker < 0 or self.curvature < 0:
            raise ValueError(f"pathfinder marker/curvature must be >= 0, got {self.marker}/{self.curvature}")


class _Canvas:
    """Occupancy bookkeeping: ``owner`` holds the curve id of each pixel, ``blocked`` the dilated union of
    all finished curves (a new curve may not enter it)."""

    def __init__(self, cfg: PathfinderConfig, rng: np.random.Generator) -> None:
        self.cfg, self.rng = cfg, rng
        self.owner = np.full((cfg.size, cfg.size), -1, np.int16)
        self.blocked = np.zeros((cfg.size, cfg.size), bool)
        self.lo = cfg.marker + 1
        self.hi = cfg.size - cfg.marker - 2

    def _free(self, y: int, x: int) -> bool:
        return self.lo <= y <= self.hi and self.lo <= x <= self.hi and not self.blocked[y, x]

    def _square_free(self, y: int, x: int) -> bool:
        m = self.cfg.marker
        return self._free(y, x) and not self.blocked[y - m:y + m + 1, x - m:x + m + 1].any()

    def grow(self, steps: int, start: tuple[int, int] | None = None,
             tries: int = 60) -> list[tuple[int, int]] | None:
        """A smooth random walk of ``steps`` 1-px steps avoiding blocked pixels; None if none found."""
        cfg, rng = self.cfg, self.rng
        for _ in range(tries):
            if start is None:
                y0, x0 = (int(v) for v in rng.integers(self.lo, self.hi + 1, size=2))
                if not self._square_free(y0, x0):
                    continue
            else:
                y0, x0 = start
            fy, fx = float(y0), float(x0)
            theta = rng.uniform(0, 2 * math.pi)
            pts = [(y0, x0)]
            seen = {(y0, x0): 0}
            ok = True
            for _ in range(steps):
                for attempt in range(8):
                    spread = cfg.curvature * (1 + attempt)
                    t = theta + rng.normal(0.0, spread)
                    ny, nx = fy + math.sin(t), fx + math.cos(t)
                    py, px = math.floor(ny + 0.5), math.floor(nx + 0.5)
                    if (py, px) == pts[-1] or (self._free(py, px) and not _near_self(py, px, seen, len(pts))):
                        theta, fy, fx = t, ny, nx
                        if (py, px) != pts[-1]:
                            seen[(py, px)] = len(pts)
                            pts.append((py, px))
                        break
                else:
                    ok = False
                    break
            if ok:
                return pts
        return None

    def commit(self, cid: int, pts: list[tuple[int, int]], markers: tuple[tuple[int, int], ...] = ()) -> None:
        cfg, m, g = self.cfg, self.cfg.marker, self.cfg.margin
        for y, x in pts:
            self.owner[y, x] = cid
        for y, x in markers:
            self.owner[y - m:y + m + 1, x - m:x + m + 1] = cid
        ys, xs = np.nonzero(self.owner == cid)
        for y, x in zip(ys, xs):
            self.blocked[max(0, y - g):y + g + 1, max(0, x - g):x + g + 1] = True
        del cfg


def _near_self(py: int, px: int, seen: dict[tuple[int, int], int], n: int) -> bool:
    # a new pixel may touch only the last two pixels of its own curve: no self-contact, no loops
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            j = seen.get((py + dy, px + dx))
            if j is not None and j < n - 2:
                return True
    return False


def _sample(cfg: PathfinderConfig, rng: np.random.Generator, label: int):
    """One image: (ink uint8 (H, W), curve-id map, marker P, marker Q) or None if the canvas got stuck."""
    cv = _Canvas(cfg, rng)
    half = cfg.length // 2
    path = cv.grow(cfg.length)
    if path is None:
        return None
    p, q = path[0], path[-1]
    if max(abs(p[0] - q[0]), abs(p[1] - q[1])) <= 2 * cfg.marker + cfg.margin + 1:
        return None  # markers would touch each other
    if label == 1:
        cv.commit(0, path, (p, q))
        pieces = [half, half]
    else:
        first = path[:half + 1]
        cv.commit(0, first, (p,))
        if not cv._square_free(*q):
            return None
        regrown = cv.grow(half, start=q)
        if regrown is None:
            return None
        cv.commit(1, regrown, (q,))
        pieces = [cfg.length]
    pieces += [half] * cfg.distractors
    for i, steps in enumerate(pieces):
        pts = cv.grow(steps)
        if pts is None:
            return None
        cv.commit(2 + i, pts)
    return cv.owner, p, q


def generate(cfg: PathfinderConfig, seed: int, index: int) -> dict:
    """Sample ``index`` of the dataset with this seed. Deterministic.

    Returns dict(image=uint8 (H, W) in {0, 1}, label=int, p=(y, x), q=(y, x), mask=uint8 (H, W)) where
    ``mask`` marks every pixel of the curve(s) touching marker P (the connected component of P).
    H = W = ``size * scale``; marker coordinates are in the upsampled image.
    """
    label = int(np.random.default_rng([seed, index, 7]).integers(0, 2))
    for attempt in range(1000):
        rng = np.random.default_rng([seed, index, attempt])
        out = _sample(cfg, rng, label)
        if out is not None:
            owner, p, q = out
            image, mask = (owner >= 0).astype(np.uint8), (owner == owner[p]).astype(np.uint8)
            if cfg.scale > 1:
                k = cfg.scale
                image, mask = (np.kron(a, np.ones((k, k), np.uint8)) for a in (image, mask))
                p, q = (p[0] * k, p[1] * k), (q[0] * k, q[1] * k)
            return dict(image=image, label=label, p=p, q=q, mask=mask)
    raise RuntimeError(f"pathfinder generator could not place the curves with {cfg}; lower length/distractors")


def generate_arrays(cfg: PathfinderConfig, seed: int, n: int, start: int = 0,
                    progress: bool = False) -> dict[str, np.ndarray]:
    """Samples ``start .. start+n-1`` stacked: images/masks (n, H, W) uint8, labels (n,), markers (n, 2, 2)."""
    from tqdm.auto import tqdm
    side = cfg.size * cfg.scale
    imgs = np.zeros((n, side, side), np.uint8)
    masks = np.zeros_like(imgs)
    labels = np.zeros(n, np.int64)
    markers = np.zeros((n, 2, 2), np.int64)
    it = range(n)
    if progress:
        it = tqdm(it, desc="generating pathfinder", unit="img", leave=False, dynamic_ncols=True)
    for i in it:
        s = generate(cfg, seed, start + i)
        imgs[i], masks[i], labels[i] = s["image"], s["mask"], s["label"]
        markers[i] = (s["p"], s["q"])
    return dict(images=imgs, masks=masks, labels=labels, markers=markers)


def _cache_dir() -> Path:
    return Path(os.environ.get("LARGEKERNEL_CACHE", Path.home() / ".cache" / "largekernel"))


class PathfinderDataset(Dataset):
    """Pathfinder split as a map-style dataset of ``(image (1, H, W) float, label)``.

    split: 'train' (samples 0..n-1 of ``seed``) or 'val'/'test' (an independent seed ``seed + 1000``).
    ``return_mask=True`` yields ``(image, label, mask (H, W) float)`` for dense prediction.
    ``augment=True`` applies a random one of the 8 dihedral symmetries (label-preserving; drawn from
    torch's global RNG so a resumed run repeats it). Arrays are cached under ``$LARGEKERNEL_CACHE`` or
    ``~/.cache/largekernel`` (set ``cache=False`` to skip).
    """

    num_classes = 2
    in_chans = 1

    def __init__(self, split: str = "train", n: int | None = None, seed: int = 0,
                 config: PathfinderConfig | None = None, augment: bool = False, return_mask: bool = False,
                 cache: bool = True, progress: bool = False) -> None:
        if split not in ("train", "val", "test"):
            raise ValueError(f"pathfinder split must be 'train', 'val' or 'test', got {split!r}")
        self.config = cfg = config or PathfinderConfig()
        cfg.validate()
        if n is None:
            n = 8000 if split == "train" else 1000
        if n < 1:
            raise ValueError(f"pathfinder n must be >= 1, got {n}")
        self.split, self.n, self.augment, self.return_mask = split, n, augment, return_mask
        self.seed = seed if split == "train" else seed + 1000
        self.arrays = self._load(cfg, self.seed, n, cache, progress)
        self.targets = self.arrays["labels"].tolist()

    @staticmethod
    def _load(cfg: PathfinderConfig, seed: int, n: int, cache: bool, progress: bool) -> dict[str, np.ndarray]:
        key = hashlib.sha1(json.dumps([asdict(cfg), seed, n, 1]).encode()).hexdigest()[:16]
        path = _cache_dir() / f"pathfinder-{key}.npz"
        if cache and path.is_file():
            try:
                with np.load(path) as z:
                    return {k: z[k] for k in ("images", "masks", "labels", "markers")}
            except (OSError, ValueError, KeyError):
                pass  # unreadable cache: regenerate and overwrite
        arrays = generate_arrays(cfg, seed, n, progress=progress)
        if cache:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
                np.savez_compressed(tmp, **arrays)
                os.replace(tmp, path)
            except OSError:
                pass  # read-only home: just don't cache
        return arrays

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        img = torch.from_numpy(self.arrays["images"][i]).float()
        mask = torch.from_numpy(self.arrays["masks"][i]).float() if self.return_mask else None
        if self.augment:
            k = int(torch.randint(0, 8, ()))
            img = torch.rot90(img, k % 4, (0, 1))
            mask = torch.rot90(mask, k % 4, (0, 1)) if mask is not None else None
            if k >= 4:
                img = img.flip(1)
                mask = mask.flip(1) if mask is not None else None
        label = int(self.arrays["labels"][i])
        img = img.unsqueeze(0)
        if self.return_mask:
            return img, label, mask
        return img, label

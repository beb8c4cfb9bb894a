"""Effective receptive field (ERF) of any timm model, measured as in RepLKNet (Ding et al., CVPR 2022, Sec. 5.3).

Method (the official ``erf/`` scripts): for each image (resized to ``input_size``, ImageNet-normalised), take
the model's last feature map (N, C, h, w), the ReLU of its central point ``y[:, :, h//2, w//2]`` summed over
channels, and its gradient with respect to the input; apply ReLU to the gradient, sum over the RGB channels
and average the (H, W) maps over the images. For display and analysis the map is scaled as
``log10(m + 1) / max``; the *high-contribution area ratio* at threshold ``t`` is the area of the smallest
centred square (side 3, 5, ...) whose share of the scaled map's total exceeds ``t``, over the image area.

Images are processed in batches: the model is in eval mode, so every sample's gradient is independent of the
others and one backward of the batch sum gives all per-image gradients at once.
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

THRESHOLDS: tuple[float, ...] = (0.2, 0.3, 0.5, 0.99)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm")
# Photographs bundled with scikit-image (no download needed); grey ones are replicated to RGB.
SKIMAGE_PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "rocket", "coins", "clock", "moon", "page",
                  "text", "brick", "grass", "gravel", "immunohistochemistry", "hubble_deep_field", "retina")

FeatureSpec = str | Callable[[torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------------------------- feature map
def feature_fn(model: nn.Module, feature: FeatureSpec = "last_stage") -> Callable[[torch.Tensor], torch.Tensor]:
    """The function image (N, 3, H, W) -> feature map (N, C, h, w) whose central point is analysed.

    ``feature``:
      * ``"last_stage"`` (default): output of the last stage, before any final norm/head, as in the official
        scripts (ResNet ``layer4``, RepLKNet ``forward_features``); via ``forward_intermediates`` when the
        model has it, else ``forward_features``.
      * ``"features"``: ``model.forward_features(x)`` (NHWC outputs are permuted to NCHW).
      * ``"stage:i"``: the i-th ``forward_intermediates`` map (negative i counts from the end).
      * ``"module:<name>"``: output of the named submodule (forward hook).
      * ``"output"``: ``model(x)`` itself (for plain conv stacks).
      * a callable ``x -> feature map``.
    """
    if callable(feature):
        return feature
    if not isinstance(feature, str):
        raise ValueError(f"feature must be a string or a callable, got {feature!r}")
    if feature == "output":
        return model
    if feature == "features":
        if not hasattr(model, "forward_features"):
            raise ValueError(f"feature='features' needs forward_features, which {type(model).__name__} lacks")
        return lambda x: _to_nchw(model.forward_features(x), model)
    if feature == "last_stage" or feature.startswith("stage:"):
        index = -1
        if feature.startswith("stage:"):
            try:
                index = int(feature.split(":", 1)[1])
            except ValueError:
                raise ValueError(f"feature must look like 'stage:<int>', got {feature!r}") from None
        if hasattr(model, "forward_intermediates"):
            def _intermediate(x: torch.Tensor) -> torch.Tensor:
                feats = model.forward_intermediates(x, indices=None, intermediates_only=True)
                if not -len(feats) <= index < len(feats):
                    raise ValueError(f"feature index {index} out of range for {len(feats)} stages")
                return feats[index]
            return _intermediate
        if feature == "last_stage" and hasattr(model, "forward_features"):
            return lambda x: _to_nchw(model.forward_features(x), model)
        raise ValueError(f"feature={feature!r} needs forward_intermediates, which {type(model).__name__} lacks")
    if feature.startswith("module:"):
        name = feature.split(":", 1)[1]
        modules = dict(model.named_modules())
        if name not in modules:
            raise ValueError(f"feature module {name!r} not found in {type(model).__name__}")
        target = modules[name]

        def _hooked(x: torch.Tensor) -> torch.Tensor:
            store: list[torch.Tensor] = []
            handle = target.register_forward_hook(lambda m, i, o: store.append(o))
            try:
                model(x)
            finally:
                handle.remove()
            return store[-1]
        return _hooked
    raise ValueError(f"feature must be 'last_stage', 'features', 'stage:<i>', 'module:<name>', 'output' or a "
                     f"callable, got {feature!r}")


def _to_nchw(y: torch.Tensor, model: nn.Module) -> torch.Tensor:
    if y.dim() != 4:
        raise ValueError(f"the feature map must be 4-D (N, C, h, w), got shape {tuple(y.shape)}")
    # timm's NHWC models (Swin, ...) declare it in ``output_fmt``
    return y.permute(0, 3, 1, 2) if str(getattr(model, "output_fmt", "NCHW")) == "NHWC" else y


# ----------------------------------------------------------------------------------------------- the ERF itself
def input_gradients(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """Per-image contribution maps (N, H, W): ReLU(d sum_c ReLU(y[:, c, h//2, w//2]) / dx) summed over RGB."""
    x = images.detach().clone().requires_grad_(True)
    y = fn(x)
    if y.dim() != 4:
        raise ValueError(f"the feature map must be 4-D (N, C, h, w), got shape {tuple(y.shape)}")
    h, w = y.shape[-2:]
    central = F.relu(y[:, :, h // 2, w // 2]).sum()
    (grad,) = torch.autograd.grad(central, x)
    return F.relu(grad).sum(1)


def compute_erf(model: nn.Module, images: torch.Tensor | Iterable[torch.Tensor], feature: FeatureSpec = "last_stage",
                batch_size: int = 8, device: str | torch.device | None = None) -> np.ndarray:
    """Mean contribution map (H, W) in float64 over all images (un-scaled; see :func:`scale_erf`).

    ``images``: one (N, 3, H, W) tensor (split into ``batch_size`` chunks) or an iterable of such batches.
    The model is put in eval mode (BN statistics fixed, no drop-path) and restored afterwards; images whose
    map contains NaN are skipped, as in the official script.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    device = torch.device(device) if device is not None else _default_device()
    model = model.to(device)
    fn = feature_fn(model, feature)
    batches = images.split(batch_size) if isinstance(images, torch.Tensor) else images
    was_training = model.training
    grad_flags = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():  # only input gradients are needed; this also saves activation memory
        p.requires_grad_(False)
    total: torch.Tensor | None = None
    count = 0
    try:
        for batch in batches:
            maps = input_gradients(fn, batch.to(device=device, dtype=next(model.parameters()).dtype))
            ok = ~torch.isnan(maps).flatten(1).any(1)
            s = maps[ok].double().sum(0)
            total = s if total is None else total + s
            count += int(ok.sum())
    finally:
        model.train(was_training)
        for p, flag in zip(model.parameters(), grad_flags):
            p.requires_grad_(flag)
    if count == 0:
        raise ValueError("no image produced a finite ERF (all NaN or no images given)")
    return (total / count).cpu().numpy()


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def scale_erf(erf: np.ndarray) -> np.ndarray:
    """``log10(m + 1)`` rescaled to [0, 1] (official analysis; scores span orders of magnitude)."""
    data = np.log10(np.asarray(erf, dtype=np.float64) + 1.0)
    peak = data.max()
    return data / peak if peak > 0 else data


def area_ratio(data: np.ndarray, threshold: float) -> tuple[int, float] | None:
    """Smallest centred square (side 2i+1, i >= 1) holding more than ``threshold`` of ``data``'s sum.

    Returns (side, side**2 / (H * W)), or None when no square up to side ``2 * (H // 2 - 1) + 1`` does (as the
    official script, which stops one ring short of the border).
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    data = np.asarray(data, dtype=np.float64)
    if data.ndim != 2:
        raise ValueError(f"data must be a 2-D map, got shape {data.shape}")
    h, w = data.shape
    total = data.sum()
    if total <= 0:
        return None
    # cumulative sums over growing centred squares via a 2-D prefix sum
    ps = np.zeros((h + 1, w + 1))
    ps[1:, 1:] = data.cumsum(0).cumsum(1)
    ch, cw = h // 2, w // 2
    for i in range(1, h // 2):
        r0, r1, c0, c1 = max(ch - i, 0), min(ch + i + 1, h), max(cw - i, 0), min(cw + i + 1, w)
        s = ps[r1, c1] - ps[r0, c1] - ps[r1, c0] + ps[r0, c0]
        if s / total > threshold:
            side = 2 * i + 1
            return side, side / h * side / w
    return None


def area_ratios(scaled: np.ndarray, thresholds: Sequence[float] = THRESHOLDS) -> dict[str, dict[str, float | None]]:
    """``{"t=20%": {"side": 41, "ratio": 0.0016}, ...}`` for the scaled map."""
    out: dict[str, dict[str, float | None]] = {}
    for t in thresholds:
        r = area_ratio(scaled, t)
        out[f"t={round(100 * t)}%"] = {"side": r[0] if r else None, "ratio": r[1] if r else None}
    return out


# ----------------------------------------------------------------------------------------------- images
def _image_paths(folder: str) -> list[str]:
    paths = []
    for root, _, files in os.walk(folder):
        paths += [os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(paths)


def _skimage_photos() -> list[np.ndarray]:
    import skimage.data

    photos = []
    for name in SKIMAGE_PHOTOS:
        try:
            img = getattr(skimage.data, name)()
        except Exception:  # a photo that would need a download: skip it
            continue
        photos.append(img)
    if not photos:
        raise ValueError("no scikit-image sample photo could be loaded")
    return photos


def _to_rgb_uint8(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3]).astype(np.uint8)


def iter_images(source: str = "skimage", num_images: int = 50, input_size: int = 1024,
                batch_size: int = 8, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                seed: int = 0) -> Iterator[torch.Tensor]:
    """Normalised image batches (B, 3, input_size, input_size), bicubic-resized as the official script.

    ``source``: a folder (searched recursively, sorted, the first ``num_images`` files) or ``"skimage"``: the
    scikit-image sample photos; beyond the first pass each photo is re-used as a seeded random crop (40-100%
    of its area) with a random horizontal flip, so ``num_images`` distinct inputs come out.
    """
    from PIL import Image

    if num_images <= 0:
        raise ValueError(f"num_images must be positive, got {num_images}")
    if input_size <= 0:
        raise ValueError(f"input_size must be positive, got {input_size}")
    if source == "skimage":
        photos = [Image.fromarray(_to_rgb_uint8(p)) for p in _skimage_photos()]
        rng = np.random.default_rng(seed)

        def _get(k: int) -> Image.Image:
            img = photos[k % len(photos)]
            if k < len(photos):
                return img
            w, h = img.size
            scale = math.sqrt(rng.uniform(0.4, 1.0))
            cw, ch = max(1, int(w * scale)), max(1, int(h * scale))
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            img = img.crop((x0, y0, x0 + cw, y0 + ch))
            return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else img
        n = num_images
    elif os.path.isdir(source):
        paths = _image_paths(source)
        if not paths:
            raise ValueError(f"images folder {source!r} holds no image files {IMAGE_EXTENSIONS}")
        n = min(num_images, len(paths))

        def _get(k: int) -> Image.Image:
            with Image.open(paths[k]) as im:
                return im.convert("RGB")
    else:
        raise ValueError(f"images must be 'skimage' or an existing folder, got {source!r}")
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    batch: list[torch.Tensor] = []
    for k in range(n):
        img = _get(k).resize((input_size, input_size), Image.Resampling.BICUBIC)
        t = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
        batch.append((t - m) / s)
        if len(batch) == batch_size:
            yield torch.stack(batch)
            batch = []
    if batch:
        yield torch.stack(batch)


# ----------------------------------------------------------------------------------------------- plots
def _cmap():  # noqa: ANN202
    # The official heat map is seaborn 'RdYlGn' centred at 0 on data in [0, 1]: i.e. its upper half.
    import matplotlib
    from matplotlib.colors import LinearSegmentedColormap

    base = matplotlib.colormaps["RdYlGn"]
    return LinearSegmentedColormap.from_list("RdYlGn_upper", base(np.linspace(0.5, 1.0, 256)))


def save_heatmap(scaled: np.ndarray, path: str, title: str | None = None) -> None:
    """One model's scaled ERF as a PNG; fixed colour scale [0, 1] so panels of different models compare."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5.4))
    im = ax.imshow(scaled, cmap=_cmap(), vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, orientation="horizontal", fraction=0.046, pad=0.04)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def save_combined(scaled: dict[str, np.ndarray], path: str, ratios: dict[str, dict] | None = None) -> None:
    """All models side by side with one shared colour bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(scaled)
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 4.6), squeeze=False)
    im = None
    for ax, (name, data) in zip(axes[0], scaled.items()):
        im = ax.imshow(data, cmap=_cmap(), vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        title = name
        if ratios and name in ratios:
            r = ratios[name]
            title += "\n" + ", ".join(f"{k}: {_fmt_ratio(v['ratio'])}" for k, v in r.items() if k != "t=99%")
        ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), orientation="horizontal", fraction=0.05, pad=0.04)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def _fmt_ratio(r: float | None) -> str:
    return "n/a" if r is None else f"{100 * r:.1f}%"


def format_table(ratios: dict[str, dict[str, dict[str, float | None]]]) -> str:
    """Markdown table of the area ratios, one row per model."""
    keys = list(next(iter(ratios.values())).keys()) if ratios else [f"t={round(100 * t)}%" for t in THRESHOLDS]
    lines = ["| model | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for name, r in ratios.items():
        lines.append(f"| {name} | " + " | ".join(_fmt_ratio(r[k]["ratio"]) for k in keys) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- driver
def load_weights(model: nn.Module, path: str) -> None:
    """Load a local checkpoint safely (safetensors or ``torch.load(weights_only=True)``), strict keys, through
    the package's shared loader (official wrappers unwrapped, the family's ``checkpoint_filter_fn`` applied)."""
    from largekernel.models._helpers import load_checkpoint

    filt = getattr(model, "checkpoint_filter_fn", None) or getattr(
        sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    load_checkpoint(model, path, strict=True, filter_fn=filt)


def build_model(name: str, checkpoint: str | None = None, pretrained: bool = False, seed: int = 0,
                **kwargs: object) -> nn.Module:
    """A timm model (``import largekernel`` registers ours) with random (seeded) or loaded weights."""
    import timm

    import largekernel  # noqa: F401  (registers the models)

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    if checkpoint:
        load_weights(model, checkpoint)
    return model


def run_erf(models: dict[str, nn.Module] | Sequence[str], images: str = "skimage", num_images: int = 50,
            input_size: int = 1024, batch_size: int = 8, feature: FeatureSpec = "last_stage",
            device: str | torch.device | None = None, out_dir: str | None = None,
            thresholds: Sequence[float] = THRESHOLDS, verbose: bool = True) -> dict[str, dict]:
    """ERF of several models on the same images; writes ``<out_dir>/<name>_erf.{npy,png}``, ``erf_combined.png``
    and ``erf_ratios.json`` when ``out_dir`` is given. Returns ``{name: {"ratios", "seconds", "erf"}}``."""
    if not isinstance(models, dict):
        models = {name: build_model(name) for name in models}
    if not models:
        raise ValueError("models must name at least one model")
    results: dict[str, dict] = {}
    scaled: dict[str, np.ndarray] = {}
    for name, model in models.items():
        cfg = getattr(model, "pretrained_cfg", None) or {}
        mean, std = cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD)
        batches = iter_images(images, num_images, input_size, batch_size, mean, std)
        dev = torch.device(device) if device is not None else _default_device()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        erf = compute_erf(model, batches, feature=feature, batch_size=batch_size, device=dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        scaled[name] = scale_erf(erf)
        results[name] = {"ratios": area_ratios(scaled[name], thresholds), "seconds": seconds, "erf": erf}
        if verbose:
            print(f"{name}: {seconds:.1f}s for {num_images} images at {input_size} on {dev}", flush=True)
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
            np.save(os.path.join(out_dir, f"{name}_erf.npy"), erf)
            save_heatmap(scaled[name], os.path.join(out_dir, f"{name}_erf.png"), title=name)
    ratios = {n: r["ratios"] for n, r in results.items()}
    if verbose:
        print("high-contribution area ratio (share of the image area):")
        print(format_table(ratios))
    if out_dir:
        save_combined(scaled, os.path.join(out_dir, "erf_combined.png"), ratios)
        meta = {"images": images, "num_images": num_images, "input_size": input_size,
                "feature": feature if isinstance(feature, str) else "callable"}
        with open(os.path.join(out_dir, "erf_ratios.json"), "w") as f:
            json.dump({"settings": meta, "models": {n: {"ratios": r["ratios"], "seconds": r["seconds"]}
                                                    for n, r in results.items()}}, f, indent=2)
    return results


def _parse_kv(items: Sequence[str], what: str) -> dict[str, object]:
    out: dict[str, object] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"{what} must be KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k] = v
    return out


def add_erf_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``largekernel erf`` (for a subparser)."""
    parser.add_argument("models", nargs="+", help="timm model names, e.g. resnet101 replknet_31b")
    parser.add_argument("--images", default="skimage", help="folder of images, or 'skimage' (bundled photos)")
    parser.add_argument("--num-images", type=int, default=50)
    parser.add_argument("--input-size", type=int, default=1024, help="images are resized to this (paper: 1024)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--feature", default="last_stage",
                        help="last_stage | features | stage:<i> | module:<name> | output")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="MODEL=PATH",
                        help="local weights for a model (safetensors or .pth); otherwise random weights")
    parser.add_argument("--pretrained", action="store_true", help="timm pretrained=True for every model")
    parser.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="extra timm.create_model kwargs for every model; MODEL:KEY=VALUE for one model "
                             "(e.g. resnet101:zero_init_last=False: timm zero-inits ResNet's last BN, which "
                             "silences every residual branch of a randomly initialised ResNet)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--out-dir", default="erf_out")
    return parser


def erf_from_args(args: argparse.Namespace) -> dict[str, dict]:
    ckpts = {k: str(v) for k, v in _parse_kv(args.checkpoint, "--checkpoint").items()}
    unknown = set(ckpts) - set(args.models)
    if unknown:
        raise ValueError(f"--checkpoint names models not requested: {sorted(unknown)}")
    kwargs = _parse_kv(args.model_arg, "--model-arg")
    per_model: dict[str, dict[str, object]] = {name: {} for name in args.models}
    for key in [k for k in kwargs if ":" in k]:
        name, arg = key.split(":", 1)
        if name not in per_model:
            raise ValueError(f"--model-arg names a model that was not requested: {name!r}")
        per_model[name][arg] = kwargs.pop(key)
    models = {name: build_model(name, ckpts.get(name), args.pretrained, args.seed, **{**kwargs, **per_model[name]})
              for name in args.models}
    return run_erf(models, images=args.images, num_images=args.num_images, input_size=args.input_size,
                   batch_size=args.batch_size, feature=args.feature, device=args.device, out_dir=args.out_dir)


def erf_main(argv: Sequence[str] | None = None) -> int:
    """``largekernel erf MODEL [MODEL ...] [options]``."""
    parser = add_erf_args(argparse.ArgumentParser(prog="largekernel erf", description=__doc__.split("\n")[0]))
    erf_from_args(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(erf_main())

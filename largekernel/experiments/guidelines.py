"""The five guidelines of RepLKNet (Ding et al., CVPR 2022, Sec. 3) as small reproducible experiments.

``run_guideline(n, quick=False)`` runs guideline ``n`` and returns its result dict (also written as JSON, a
Markdown table and a PNG under ``out_dir``). The trained experiments use the embedded Pathfinder long-range
task (:mod:`largekernel.data`) and the shared training loop :func:`largekernel.train.engine.fit`; they are
CPU-sized stand-ins for the paper's ImageNet / Cityscapes / ADE20K runs, so only the direction of an effect
can be compared with the paper, not its size.

1. Large depthwise convs are efficient: params / MACs of RepLKNet-31B with kernels 3-3-3-3 vs 31-29-27-13
   (and 31-29-27-23), depthwise vs dense large kernels, CPU latency of a compact variant and of single layers.
2. Identity shortcuts are vital: MobileNetV2 (tiny) 3x3 vs 13x13 depthwise, with / without shortcuts.
3. Re-parameterizing with a small kernel helps: 9x9 and 13x13 with / without a parallel 3x3 branch, merged
   after training; the merge is checked on the validation set.
4. Large kernels help dense prediction more than classification: per-pixel "curve ends at a marker"
   segmentation vs the image-level "markers connected" label, on the same images, kernels 3 / 13 / 31.
5. Large kernels work on small feature maps: last-stage kernels 3 / 7 / 13 on 7x7 maps.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

import largekernel
import largekernel.models.mobilenetv2  # noqa: F401  (registers lk_mobilenetv2*)
from largekernel.analysis.complexity import count_macs, count_params, measure_latency
from largekernel.layers import ConvNorm

IGNORE = -100  # target of background pixels in the dense task (CrossEntropyLoss's default ignore_index)
# Stride pattern with total stride 8: a 56x56 input gives 7x7 maps from stage 2 on (guideline 5).
STRIDE8_ARCH = ((1, 8, 1, 1), (4, 12, 2, 2), (4, 16, 2, 2), (4, 24, 2, 1), (4, 32, 1, 1), (4, 48, 2, 1),
                (4, 64, 1, 1))


@dataclass(frozen=True)
class Scale:
    """Data and training budget of one trained run (identical for all arms of a guideline).

    Dense task: Pathfinder ``size`` x ``size``, ``n_train`` / ``n_val`` images, ``epochs``. Classification task:
    scikit-learn digits (1437 / 360 images) at the same size for ``cls_epochs`` (0: skip it).
    """

    size: int = 32            # image side
    length: int = 28          # Pathfinder marker-to-marker path length (steps)
    n_train: int = 3000
    n_val: int = 600
    epochs: int = 4
    cls_epochs: int = 6
    cls_n_train: int | None = None  # digits training images (None: all 1437)
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0


FULL = Scale()
QUICK = Scale(size=24, length=14, n_train=64, n_val=32, epochs=1, cls_epochs=1, cls_n_train=64, batch_size=32)


# ----------------------------------------------------------------------------------------------- data
class DenseTargets(Dataset):
    """Pathfinder images with a per-pixel target: 1 on curves that end at a marker, 0 on distractor curves,
    ``IGNORE`` on the background. Deciding it at a pixel means following its curve to an end, which can be
    the full image away -- the dense counterpart of the image-level "markers connected" label.

    Items: (image (1, H, W) float, target (H, W) long); ``augment`` applies one of the 8 dihedral symmetries.
    """

    def __init__(self, base: Dataset, augment: bool = False) -> None:
        from skimage.measure import label as label_components

        arrays = base.arrays
        self.images = torch.from_numpy(arrays["images"]).float()
        targets = np.full(arrays["images"].shape, IGNORE, np.int64)
        for i, (img, (p, q)) in enumerate(zip(arrays["images"], arrays["markers"])):
            comp = label_components(img, connectivity=2)
            keep = {comp[tuple(p)], comp[tuple(q)]} - {0}
            targets[i][img > 0] = np.isin(comp[img > 0], list(keep)).astype(np.int64)
        self.targets = torch.from_numpy(targets)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img, tgt = self.images[i], self.targets[i]
        if self.augment:
            k = int(torch.randint(0, 8, ()))
            img, tgt = torch.rot90(img, k % 4, (0, 1)), torch.rot90(tgt, k % 4, (0, 1))
            if k >= 4:
                img, tgt = img.flip(1), tgt.flip(1)
        return img.unsqueeze(0).contiguous(), tgt.contiguous()


def _pathfinder(scale: Scale, split: str) -> Dataset:
    from largekernel.data import create_dataset

    n = scale.n_train if split == "train" else scale.n_val
    return create_dataset("pathfinder", split, n=n, size=scale.size, length=scale.length, seed=scale.seed)


# ----------------------------------------------------------------------------------------------- models
class SegmentationModel(nn.Module):
    """Backbone pyramid (``features_only``) -> per level 1x1 conv-BN-ReLU to ``dim`` -> upsample to the
    finest level and sum -> 1x1 conv to classes -> bilinear upsample to the input. The head has no spatial
    kernel, so all context comes from the backbone. (N, C, H, W) -> (N, num_classes, H, W)."""

    def __init__(self, backbone: str, num_classes: int = 2, in_chans: int = 1, dim: int = 32, **kwargs) -> None:
        super().__init__()
        import timm

        self.backbone = timm.create_model(backbone, features_only=True, in_chans=in_chans, **kwargs)
        self.lateral = nn.ModuleList(ConvNorm(c, dim, 1, act_layer=nn.ReLU)
                                     for c in self.backbone.feature_info.channels())
        self.classifier = nn.Conv2d(dim, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.backbone(x)
        size = feats[0].shape[-2:]
        y = sum(F.interpolate(lat(f), size=size, mode="bilinear", align_corners=False) if f.shape[-2:] != size
                else lat(f) for lat, f in zip(self.lateral, feats))
        return F.interpolate(self.classifier(y), size=x.shape[-2:], mode="bilinear", align_corners=False)


# ----------------------------------------------------------------------------------------------- training
def _train_cfg(scale: Scale):
    from largekernel.train.config import TrainConfig

    return TrainConfig(epochs=scale.epochs, batch_size=scale.batch_size, lr=scale.lr, min_lr=scale.lr * 0.01,
                       warmup_epochs=min(0.5, scale.epochs), weight_decay=0.05, seed=scale.seed, device="cpu",
                       progress=False, drop_path=None)


def _fit(model: nn.Module, train_ds: Dataset, scale: Scale, epochs: int) -> dict:
    from largekernel.data import create_loader
    from largekernel.train.engine import fit

    torch.manual_seed(scale.seed)
    loader = create_loader(train_ds, scale.batch_size, train=True, seed=scale.seed)
    t0 = time.perf_counter()
    res = fit(model, loader, None, replace(_train_cfg(scale), epochs=epochs, warmup_epochs=min(0.5, epochs)),
              device="cpu")
    return {"train_loss": float(np.mean(res.step_losses[-max(1, len(res.step_losses) // 5):])),
            "train_s": time.perf_counter() - t0, "steps": len(res.step_losses)}


@torch.no_grad()
def _logits(model: nn.Module, ds: Dataset, batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    xs, ys = zip(*(ds[i][:2] for i in range(len(ds))))
    x, y = torch.stack(xs), torch.as_tensor(np.array([np.asarray(v) for v in ys]))
    out = torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    return out, y


def _cls_metrics(out: torch.Tensor, y: torch.Tensor) -> dict:
    return {"acc": 100.0 * (out.argmax(1) == y).float().mean().item()}


def _dense_metrics(out: torch.Tensor, y: torch.Tensor) -> dict:
    """Over curve pixels: accuracy and the mean IoU of the two classes (marker curve / distractor)."""
    pred, valid = out.argmax(1), y != IGNORE
    p, t = pred[valid], y[valid]
    ious = []
    for c in (0, 1):
        inter = ((p == c) & (t == c)).sum().item()
        union = ((p == c) | (t == c)).sum().item()
        ious.append(inter / union if union else 1.0)
    return {"pixel_acc": 100.0 * (p == t).float().mean().item(), "miou": 100.0 * float(np.mean(ious))}


def _check_merge(model: nn.Module, val: Dataset, metric_fn, prefix: str) -> dict:
    """Re-parameterize ``model`` and verify its outputs on ``val`` against the training form (eval mode)."""
    out_train, y = _logits(model, val)
    deployed = largekernel.reparameterize(model)
    out_dep, _ = _logits(deployed, val)
    diff = (out_dep - out_train).abs().max().item()
    if diff > 1e-3 * max(1.0, out_train.abs().max().item()):
        raise RuntimeError(f"re-parameterized model differs from its training form by {diff:.2e}")
    deploy_metrics = {f"{prefix}deploy_{k}": v for k, v in metric_fn(out_dep, y).items()}
    return {f"{prefix}merge_max_abs_diff": diff, **deploy_metrics, f"{prefix}deploy_params": count_params(deployed)}


def _digits(scale: Scale, split: str) -> Dataset:
    from largekernel.data import create_dataset

    ds = create_dataset("digits", split, img_size=scale.size, seed=scale.seed)
    n = scale.cls_n_train if split == "train" else None
    return Subset(ds, range(min(n, len(ds)))) if n else ds


def train_classifier(scale: Scale, model_name: str = "lk_mobilenetv2_tiny", check_merge: bool = False,
                     **model_kwargs) -> tuple[dict, nn.Module]:
    """Digit classification (real images, short-range cues); returns (metrics, trained model)."""
    torch.manual_seed(scale.seed)
    model = _timm(model_name, in_chans=1, num_classes=10, **model_kwargs)
    info = _fit(model, _digits(scale, "train"), scale, scale.cls_epochs)
    val = _digits(scale, "val")
    out, y = _logits(model, val)
    metrics = {**info, **_cls_metrics(out, y), "params": count_params(model)}
    if check_merge:
        metrics.update(_check_merge(model, val, _cls_metrics, ""))
    return metrics, model


def train_dense(scale: Scale, model_name: str = "lk_mobilenetv2_tiny", check_merge: bool = False,
                **model_kwargs) -> tuple[dict, nn.Module]:
    """Pathfinder "curve ends at a marker" segmentation (long-range); returns (metrics, trained model)."""
    torch.manual_seed(scale.seed)
    model = SegmentationModel(model_name, **model_kwargs)
    info = _fit(model, DenseTargets(_pathfinder(scale, "train"), augment=True), scale, scale.epochs)
    val = DenseTargets(_pathfinder(scale, "val"))
    out, y = _logits(model, val)
    metrics = {**info, **_dense_metrics(out, y), "params": count_params(model)}
    if check_merge:
        metrics.update(_check_merge(model, val, _dense_metrics, ""))
    return metrics, model


def dense_erf(model: SegmentationModel, scale: Scale, num_images: int = 32, upscale: int = 3) -> np.ndarray:
    """ERF (RepLKNet method) of a trained dense model's last backbone stage on Pathfinder images ``upscale``
    times larger than the training ones (the model is fully convolutional; at the training size every ERF
    covers the whole image, as the paper's 1024-pixel inputs avoid for ImageNet models)."""
    from largekernel.analysis.erf import compute_erf
    from largekernel.data import create_dataset

    big = create_dataset("pathfinder", "val", n=num_images, size=scale.size * upscale,
                         length=scale.length * upscale, seed=scale.seed)
    images = torch.stack([big[i][0] for i in range(len(big))])
    return compute_erf(model.backbone, images, feature=lambda x: model.backbone(x)[-1], device="cpu")


def train_both(scale: Scale, check_merge: bool = False, erf: bool = False, **model_kwargs) -> dict:
    """The dense run and, when ``scale.cls_epochs``, the classification run of one architecture.

    ``erf=True`` adds the dense model's ERF area ratios (and the raw map under the private key ``_erf``)."""
    dense, dense_model = train_dense(scale, check_merge=False, **model_kwargs)
    row = {"dense_miou": dense["miou"], "dense_pixel_acc": dense["pixel_acc"], "dense_train_s": dense["train_s"]}
    if erf:
        from largekernel.analysis.erf import area_ratios, scale_erf

        m = dense_erf(dense_model, scale)
        for key, v in area_ratios(scale_erf(m)).items():  # high-contribution area ratio, % of the image
            row[f"erf_{key.replace('=', '').replace('%', '')}_pct"] = None if v["ratio"] is None else 100 * v["ratio"]
        row["_erf"] = m
    if check_merge:
        dense.update(_check_merge(dense_model, DenseTargets(_pathfinder(scale, "val")), _dense_metrics, ""))
    if check_merge:
        row.update({"dense_deploy_miou": dense["deploy_miou"], "dense_merge_diff": dense["merge_max_abs_diff"]})
    if scale.cls_epochs:
        cls, _ = train_classifier(scale, check_merge=check_merge, **model_kwargs)
        row.update({"cls_acc": cls["acc"], "cls_train_s": cls["train_s"]})
        if check_merge:
            row.update({"cls_deploy_acc": cls["deploy_acc"], "cls_merge_diff": cls["merge_max_abs_diff"]})
    row["backbone_params"] = count_params(_timm("lk_mobilenetv2_tiny", in_chans=1, num_classes=0, **model_kwargs))
    return row


# ----------------------------------------------------------------------------------------------- guideline 1
def _densify_large_kernels(model: nn.Module, min_kernel: int = 5) -> nn.Module:
    """Swap every depthwise conv with kernel >= ``min_kernel`` for a dense (groups=1) conv of the same shape."""
    for mod in list(model.modules()):
        for cname, child in list(mod.named_children()):
            if (isinstance(child, nn.Conv2d) and child.groups == child.in_channels > 1
                    and child.kernel_size[0] >= min_kernel):
                dense = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride,
                                  child.padding, bias=child.bias is not None, device=child.weight.device)
                setattr(mod, cname, dense)
    return model


def _complexity_row(model_name: str, input_size: int, dense: bool = False, **kwargs) -> dict:
    import timm
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        model = timm.create_model(model_name, **kwargs).eval()
        if dense:
            _densify_large_kernels(model)
        macs = count_macs(model, input_size)
    return {"params_m": count_params(model) / 1e6, "gmacs": macs / 1e9}


def guideline_1(quick: bool = False, seed: int = 0) -> dict:
    """Counts are deterministic; ``seed`` is accepted for a uniform signature."""
    big, size = ("replknet_test", 64) if quick else ("replknet_31b", 224)
    rows: dict[str, dict] = {}
    variants = {
        "3-3-3-3": dict(large_kernel_sizes=(3, 3, 3, 3), small_kernel=0),
        "31-29-27-13": dict(large_kernel_sizes=(31, 29, 27, 13)),
        "31-29-27-23": dict(large_kernel_sizes=(31, 29, 27, 23)),
    }
    if quick:
        variants = {"3-3-3-3": dict(large_kernel_sizes=(3, 3, 3, 3), small_kernel=0),
                    "7-7-5-5": dict(large_kernel_sizes=(7, 7, 5, 5))}
    for label, kw in variants.items():
        rows[f"{big} {label} depthwise (train form)"] = _complexity_row(big, size, **kw)
        rows[f"{big} {label} depthwise (deploy)"] = _complexity_row(big, size, deploy=True, **kw)
        if label != "3-3-3-3":
            rows[f"{big} {label} DENSE (deploy)"] = _complexity_row(big, size, dense=True, deploy=True, **kw)
    base, lk = list(variants)[:2]
    b, k = rows[f"{big} {base} depthwise (deploy)"], rows[f"{big} {lk} depthwise (deploy)"]
    increase = {"params_pct": 100 * (k["params_m"] / b["params_m"] - 1),
                "macs_pct": 100 * (k["gmacs"] / b["gmacs"] - 1)}

    # CPU latency, one thread, batch 1: a compact RepLKNet (deploy form) and single 32-channel layers.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    latency: dict[str, float] = {}
    try:
        small, lsize = ("replknet_test", 64) if quick else ("replknet_micro", 224)
        for label, kw in (("3-3-3-3", dict(large_kernel_sizes=(3, 3, 3, 3), small_kernel=0)),
                          ("31-29-27-13", dict(large_kernel_sizes=(31, 29, 27, 13)))):
            torch.manual_seed(0)
            m = largekernel.reparameterize(_timm(small, **kw))
            latency[f"{small} {label} @{lsize} (ms)"] = 1e3 * measure_latency(m, lsize, 1, 2 if quick else 5)
        res = 16 if quick else 32
        for k_ in (3, 13, 31):
            for kind, groups in (("depthwise", 32), ("dense", 1)):
                conv = nn.Conv2d(32, 32, k_, padding=k_ // 2, groups=groups, bias=False)
                latency[f"{kind} {k_}x{k_}, 32 ch @{res}x{res} (ms)"] = 1e3 * measure_latency(
                    conv, (1, 32, res, res), 1, 2 if quick else 5)
                latency[f"{kind} {k_}x{k_}, 32 ch @{res}x{res} (MMACs)"] = count_macs(conv, (1, 32, res, res)) / 1e6
    finally:
        torch.set_num_threads(threads)
    return {"complexity": rows, "increase_lk_vs_3": increase, "cpu_latency_1thread": latency,
            "paper": "RepLKNet Sec. 3 G1: kernels 3-3-3-3 -> 31-29-27-13 raise FLOPs by 18.6% and params by 10.4%"}


def _timm(name: str, **kwargs) -> nn.Module:
    import timm

    return timm.create_model(name, **kwargs)


# ----------------------------------------------------------------------------------------------- guidelines 2-5
_TASKS = ("Dense: Pathfinder 'curve ends at a marker' segmentation, mIoU over curve pixels (long-range). "
          "Classification: scikit-learn digits top-1 (Pathfinder's image-level label stays at chance within a "
          "CPU budget for every arm, so it cannot rank them).")


def guideline_2(quick: bool = False, seed: int = 0) -> dict:
    scale = replace(QUICK if quick else FULL, seed=seed)
    runs = {}
    for k in (3, 13):
        for shortcut in (True, False):
            runs[f"{k}x{k}, {'with' if shortcut else 'no'} shortcut"] = train_both(scale, kernel_size=k,
                                                                                  shortcut=shortcut)
    return {"scale": asdict(scale), "tasks": _TASKS, "runs": runs,
            "paper": "MobileNetV2 ImageNet top-1: shortcut 3x3 71.76, 13x13 72.53; no shortcut 3x3 68.67, 13x13 53.98"}


def guideline_3(quick: bool = False, seed: int = 0) -> dict:
    scale = replace(QUICK if quick else FULL, seed=seed)
    runs = {}
    for k in (9, 13):
        for small in (None, 3):
            name = f"{k}x{k}{' + 3x3 re-param' if small else ''}"
            runs[name] = train_both(scale, check_merge=small is not None, kernel_size=k, small_kernel=small)
    return {"scale": asdict(scale), "tasks": _TASKS, "runs": runs,
            "paper": "MobileNetV2 with a parallel 3x3 merged after training beats the plain 9x9 / 13x13 on "
                     "ImageNet and Cityscapes (Table 3)"}


def guideline_4(quick: bool = False, seed: int = 0) -> dict:
    scale = replace(QUICK if quick else FULL, seed=seed)
    runs = {f"{k}x{k}": train_both(scale, erf=True, kernel_size=k) for k in (3, 13, 31)}
    base = runs["3x3"]
    for r in runs.values():
        r["cls_gain"] = r["cls_acc"] - base["cls_acc"]
        r["dense_gain"] = r["dense_miou"] - base["dense_miou"]
    return {"scale": asdict(scale), "tasks": _TASKS, "runs": runs,
            "paper": "RepLKNet kernels 3-3-3-3 -> 31-29-27-13: ImageNet top-1 about +1 point, ADE20K mIoU about "
                     "+3 points (Table 5); MobileNetV2 13x13: small ImageNet gain, larger Cityscapes gain"}


def guideline_5(quick: bool = False, seed: int = 0) -> dict:
    # 7x7 maps: a 56x56 input through the total-stride-8 MobileNetV2; only stages 5-6 (on 7x7) change kernel.
    scale = replace(QUICK, size=56, length=40, seed=seed) if quick else replace(FULL, size=56, length=48, seed=seed)
    runs = {f"last stage {k}x{k} on 7x7 maps": train_both(scale, arch=STRIDE8_ARCH, kernel_size=(3, 3, 3, 3, 3, k, k))
            for k in (3, 7, 13)}
    return {"scale": asdict(scale), "tasks": _TASKS, "runs": runs,
            "paper": "MobileNetV2 last stage (7x7 maps) 3x3 / 7x7 / 13x13: ImageNet 71.76 / 72.00 / 71.97, "
                     "Cityscapes mIoU best with 13x13 (Table 4)"}


GUIDELINES = {1: guideline_1, 2: guideline_2, 3: guideline_3, 4: guideline_4, 5: guideline_5}


# ----------------------------------------------------------------------------------------------- reporting
def _table(result: dict) -> str:
    runs = result.get("runs")
    if runs is None:  # guideline 1
        lines = ["| model | params (M) | GMACs |", "|---|---:|---:|"]
        lines += [f"| {k} | {v['params_m']:.2f} | {v['gmacs']:.2f} |" for k, v in result["complexity"].items()]
        inc = result["increase_lk_vs_3"]
        lines += ["", f"large vs 3x3 kernels (deploy form): params +{inc['params_pct']:.1f}%, "
                  f"MACs +{inc['macs_pct']:.1f}%", "", "| CPU, 1 thread, batch 1 | value |", "|---|---:|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in result["cpu_latency_1thread"].items()]
        return "\n".join(lines)
    keys: list[str] = []
    for r in runs.values():
        keys += [k for k, v in r.items() if isinstance(v, float | int) and k not in keys]
    lines = ["| run | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for name, r in runs.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(r.get(k)) for k in keys) + " |")
    return "\n".join(lines)


def _fmt(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 and v != 0 else f"{v:.2f}"
    return str(v)


def _plot(n: int, result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    if n == 1:
        rows = result["complexity"]
        names = list(rows)
        ax.barh(range(len(names)), [rows[k]["gmacs"] for k in names], color="tab:blue")
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("GMACs (log)")
    else:
        runs = result["runs"]
        metrics = [m for m in ("dense_miou", "dense_deploy_miou", "cls_acc", "cls_deploy_acc")
                   if any(m in r for r in runs.values())]
        names = list(runs)
        width = 0.8 / len(metrics)
        for j, m in enumerate(metrics):
            ax.bar(np.arange(len(names)) + j * width, [runs[r].get(m, np.nan) for r in names], width, label=m)
        ax.set_xticks(np.arange(len(names)) + width * (len(metrics) - 1) / 2, names, fontsize=7, rotation=15)
        ax.set_ylabel("%")
        ax.legend(fontsize=7)
    ax.set_title(f"Guideline {n}", fontsize=10)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def run_guideline(n: int, quick: bool = False, out_dir: str | None = "runs/guidelines", threads: int | None = None,
                  verbose: bool = True, seed: int = 0) -> dict:
    """Run guideline ``n`` (1-5); write ``guideline_<n>.{json,md,png}`` under ``out_dir`` (None: no files).

    ``seed`` seeds the data (Pathfinder generator, digits split), the initialisation and the batch order.
    """
    if n not in GUIDELINES:
        raise ValueError(f"guideline must be one of {sorted(GUIDELINES)}, got {n!r}")
    prev = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    try:
        result = GUIDELINES[n](quick=quick, seed=seed)
    finally:
        torch.set_num_threads(prev)
    result = {"guideline": n, "quick": quick, "seed": seed, "seconds": time.perf_counter() - t0, **result}
    erf_maps = {name: r.pop("_erf") for name, r in result.get("runs", {}).items() if "_erf" in r}
    table = _table(result)
    if verbose:
        tag = " [quick]" if quick else ""
        print(f"Guideline {n} ({result['seconds']:.0f}s){tag}\n{table}\npaper: {result['paper']}")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        stem = os.path.join(out_dir, f"guideline_{n}")
        with open(stem + ".json", "w") as f:
            json.dump(result, f, indent=2)
        with open(stem + ".md", "w") as f:
            f.write(table + "\n")
        _plot(n, result, stem + ".png")
        if erf_maps:
            from largekernel.analysis.erf import area_ratios, save_combined, scale_erf

            scaled = {name: scale_erf(m) for name, m in erf_maps.items()}
            save_combined(scaled, stem + "_erf.png", {name: area_ratios(m) for name, m in scaled.items()})
    return result


def add_guidelines_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``largekernel guidelines N`` (for a subparser)."""
    parser.add_argument("n", type=int, nargs="+", choices=sorted(GUIDELINES), help="guideline number(s), 1-5")
    parser.add_argument("--quick", action="store_true", help="tiny setting (seconds; for tests)")
    parser.add_argument("--out-dir", default="runs/guidelines")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, initialisation and batch order")
    return parser


def guidelines_from_args(args: argparse.Namespace) -> list[dict]:
    return [run_guideline(n, quick=args.quick, out_dir=args.out_dir, threads=args.threads, seed=args.seed)
            for n in args.n]


def guidelines_main(argv: Sequence[str] | None = None) -> int:
    """``largekernel guidelines N [N ...] [--quick] [--out-dir DIR] [--threads T]``."""
    parser = add_guidelines_args(argparse.ArgumentParser(prog="largekernel guidelines",
                                                         description="RepLKNet's five guidelines as experiments"))
    guidelines_from_args(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(guidelines_main())

"""Training configuration: one dataclass shared by the CLI and the Python API."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

AMP_MODES = ("none", "bf16", "fp16")
# The embedded task of `largekernel train`: 48x48 Pathfinder (24-cell grid drawn 2x: 2-px curves), gently
# curving 36-px paths, 4 other curves. ``data_kwargs`` given for 'pathfinder' are applied on top of this.
DEFAULT_PATHFINDER: dict[str, Any] = {"size": 24, "scale": 2, "length": 18, "distractors": 2, "curvature": 0.05}
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class TrainConfig:
    """Everything a run needs. The defaults are the embedded CPU job of ``largekernel train``: RepLKNet-micro
    (kernels 13/13/13/7 with parallel 3x3, Sec. 3 Guideline 2) on the 48x48 Pathfinder task, 8 epochs of
    187 steps (batch 32), ~5 min on 2 free CPU cores.

    model / model_kwargs: any timm model name (ours are registered on ``import largekernel``) and extra
    constructor arguments (e.g. ``{"large_kernel_sizes": (3, 3, 3, 3), "small_kernel": None}``).
    data: 'pathfinder', 'digits', 'folder' (with data_dir) / a folder path, or a timm dataset name.
    train_samples / val_samples: size of the generated Pathfinder splits.
    batch_size is per process; the global batch is batch_size x world size x accum_steps.
    """

    model: str = "replknet_micro"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    data: str = "pathfinder"
    data_dir: str | None = None
    data_kwargs: dict[str, Any] = field(default_factory=dict)   # pathfinder: on top of DEFAULT_PATHFINDER
    train_samples: int = 6000
    val_samples: int = 1000
    img_size: int | None = None
    num_classes: int | None = None
    epochs: int = 8
    steps_per_epoch: int | None = None
    batch_size: int = 32
    accum_steps: int = 1
    opt: str = "adamw"
    lr: float = 2e-3
    min_lr: float = 1e-5
    warmup_epochs: float = 0.5
    warmup_lr: float = 1e-5
    weight_decay: float = 0.05
    layer_decay: float | None = None
    clip_grad: float | None = None
    label_smoothing: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    drop_path: float | None = 0.0
    ema_decay: float = 0.0
    amp: str = "none"
    channels_last: bool = False
    grad_checkpointing: bool = False
    compile: bool = False
    cuda_graph: bool = False
    sync_bn: bool = False
    finetune: str | None = None
    sparse: float | None = None
    sparse_kwargs: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    workers: int = 0
    device: str = "auto"
    threads: int | None = None
    output: str = "runs"
    name: str | None = None
    max_skipped: int = 100
    reparam: bool = True
    progress: bool = True

    def validate(self) -> TrainConfig:
        """Raise a one-line ``ValueError`` naming the first impossible option."""
        def bad(name: str, value: Any, why: str) -> None:
            raise ValueError(f"{name} {why}, got {value!r}")
        for name in ("epochs", "batch_size", "accum_steps", "train_samples", "val_samples"):
            if getattr(self, name) < 1:
                bad(name, getattr(self, name), "must be >= 1")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            bad("steps_per_epoch", self.steps_per_epoch, "must be >= 1")
        if not self.lr > 0:
            bad("lr", self.lr, "must be > 0")
        if self.min_lr < 0 or self.warmup_lr < 0 or self.weight_decay < 0:
            bad("min_lr/warmup_lr/weight_decay", (self.min_lr, self.warmup_lr, self.weight_decay), "must be >= 0")
        if self.warmup_epochs < 0 or self.warmup_epochs > self.epochs:
            bad("warmup_epochs", self.warmup_epochs, f"must be in [0, epochs={self.epochs}]")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            bad("layer_decay", self.layer_decay, "must be in (0, 1]")
        if self.clip_grad is not None and self.clip_grad <= 0:
            bad("clip_grad", self.clip_grad, "must be > 0")
        if not 0 <= self.label_smoothing < 1:
            bad("label_smoothing", self.label_smoothing, "must be in [0, 1)")
        if self.mixup < 0 or self.cutmix < 0:
            bad("mixup/cutmix", (self.mixup, self.cutmix), "must be >= 0")
        if self.drop_path is not None and not 0 <= self.drop_path < 1:
            bad("drop_path", self.drop_path, "must be in [0, 1)")
        if not 0 <= self.ema_decay < 1:
            bad("ema_decay", self.ema_decay, "must be in [0, 1) (0 disables EMA)")
        if self.amp not in AMP_MODES:
            bad("amp", self.amp, f"must be one of {AMP_MODES}")
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            bad("device", self.device, f"must be one of {DEVICES} or cuda:N")
        if self.img_size is not None and self.img_size < 8:
            bad("img_size", self.img_size, "must be >= 8")
        if self.num_classes is not None and self.num_classes < 1:
            bad("num_classes", self.num_classes, "must be >= 1")
        if self.workers < 0:
            bad("workers", self.workers, "must be >= 0")
        if self.threads is not None and self.threads < 1:
            bad("threads", self.threads, "must be >= 1")
        if self.sparse is not None and not 0 < self.sparse < 1:
            bad("sparse", self.sparse, "must be a sparsity in (0, 1)")
        if self.max_skipped < 0:
            bad("max_skipped", self.max_skipped, "must be >= 0")
        if self.data in ("folder",) and not self.data_dir:
            bad("data_dir", self.data_dir, "is required for data 'folder'")
        if self.cuda_graph:   # what a captured update cannot take (graph.GraphedTrainStep)
            if self.device == "cpu":
                bad("cuda_graph", self.device, "needs a CUDA device")
            for name, ok in (("accum_steps", self.accum_steps == 1), ("amp", self.amp != "fp16"),
                             ("sparse", self.sparse is None), ("compile", not self.compile),
                             ("opt", self.opt.lower() in ("adam", "adamw"))):
                if not ok:
                    bad("cuda_graph", f"{name}={getattr(self, name)!r}",
                        "takes accum_steps 1, amp none/bf16, no sparse training, no compile, opt adam/adamw")
        if (self.mixup > 0 or self.cutmix > 0) and self.data == "pathfinder":
            bad("mixup/cutmix", (self.mixup, self.cutmix), "would destroy the Pathfinder label (use 0)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}")
        return cls(**d)

"""The training loop: timm factories for optimizer, scheduler, mixup, EMA; exact resume; DDP via torchrun.

Programmatic API::

    from largekernel.train import TrainConfig, train, fit, evaluate
    result = train(TrainConfig(epochs=2, model_kwargs={"large_kernel_sizes": (3, 3, 3, 3), "small_kernel": None}))
    result.metrics["val_top1"], result.run_dir

    # or any model on any loaders (the guideline experiments do this):
    history = fit(model, train_loader, val_loader, TrainConfig(epochs=3, lr=1e-3), run_dir=None)
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from largekernel.ops import clear_plane_operators
from largekernel.train.checkpoint import (
    create_model,
    load_into,
    load_state,
    load_weights,
    resolve_checkpoint,
    save_state,
)
from largekernel.train.config import TrainConfig

STATE_FILE = "last.pth"
KILL_ENV = "LARGEKERNEL_TEST_KILL_AT_STEP"  # tests: SIGKILL the process after this optimizer step


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


@dataclass
class RunResult:
    """What :func:`train` returns: final metrics, per-epoch history, per-step losses, files written."""

    run_dir: Path | None
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    step_losses: list[float]
    files: dict[str, str] = field(default_factory=dict)
    model: nn.Module | None = None
    deploy_model: nn.Module | None = None
    ema_model: nn.Module | None = None
    sparsity: Any = None  # the DynamicSparsity engine of a --sparse run


# ---------------------------------------------------------------------------------------------- helpers
def _dist_info() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))


def setup_device(cfg: TrainConfig) -> tuple[torch.device, int, int]:
    """Pick the device and, under torchrun (WORLD_SIZE > 1), join the process group (NCCL on GPUs, gloo
    on CPUs). Returns (device, world_size, rank)."""
    world, rank, local = _dist_info()
    if cfg.device == "auto":
        device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    elif cfg.device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but no CUDA GPU is available")
        device = torch.device(f"cuda:{local}")
    else:
        device = torch.device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if device.type == "cpu" or cfg.threads is not None:
        # Default 1 on the CPU: these small models gain little from intra-op threads, and on a shared
        # machine 2 threads per process were measured 15x slower than 1 (oversubscription).
        torch.set_num_threads(cfg.threads or 1)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, world, rank


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)          # DDP
    return getattr(model, "_orig_mod", model)        # torch.compile


def _autocast(device: torch.device, amp: str, cache_enabled: bool = True):
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16,
                          cache_enabled=cache_enabled)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device | str = "cpu", amp: str = "none",
             channels_last: bool = False, progress: bool = False, desc: str = "eval") -> dict[str, float]:
    """Top-1, top-5 (when there are >= 5 classes) in percent, mean cross-entropy, and count on ``loader``."""
    from tqdm.auto import tqdm
    device = torch.device(device)
    was_training = model.training
    model.eval()
    n = correct1 = correct5 = 0
    loss_sum = 0.0
    it = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=not progress)
    for x, y in it:
        x, y = x.to(device), y.to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(device, amp):
            out = model(x)
        out = out.float()
        loss_sum += F.cross_entropy(out, y, reduction="sum").item()
        k = min(5, out.shape[1])
        top = out.topk(k, dim=1).indices
        correct1 += (top[:, 0] == y).sum().item()
        correct5 += (top == y[:, None]).any(1).sum().item()
        n += len(y)
    model.train(was_training)
    clear_plane_operators()   # (the weights may change after this evaluation: free what inference kept for them)
    if n == 0:
        raise ValueError("evaluation set is empty")
    res = {"loss": loss_sum / n, "top1": 100.0 * correct1 / n, "n": n}
    if out.shape[1] >= 5:
        res["top5"] = 100.0 * correct5 / n
    return res


# ---------------------------------------------------------------------------------------------- fit
def fit(model: nn.Module, train_loader, val_loader, cfg: TrainConfig | None = None,
        run_dir: str | os.PathLike | None = None, resume_state: dict | None = None,
        device: torch.device | str | None = None, world_size: int = 1, rank: int = 0,
        meta: dict[str, Any] | None = None) -> RunResult:
    """Train ``model`` on ``train_loader`` for ``cfg.epochs`` and evaluate on ``val_loader`` after each epoch.

    Uses timm's ``create_optimizer_v2`` (AdamW, layer-wise lr decay), ``create_scheduler_v2`` (cosine with
    warm-up, stepped per update), ``Mixup``, ``ModelEmaV3``. ``run_dir`` (optional): a resumable
    ``last.pth`` is written atomically after every epoch, plus ``metrics.csv``/``metrics.json``.
    ``resume_state``: a loaded ``last.pth`` to continue from (exactly: RNG, sampler epoch, optimizer).
    A non-finite loss raises :class:`TrainingDiverged` (the last good ``last.pth`` is left in place).
    Returns a :class:`RunResult` (the model is trained in place).
    """
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3
    from tqdm.auto import tqdm

    cfg = (cfg or TrainConfig()).validate()
    device = torch.device(device) if device is not None else setup_device(cfg)[0]
    main = rank == 0
    run_dir = Path(run_dir) if run_dir is not None else None
    model.to(device)
    base = model
    if cfg.grad_checkpointing:
        if not hasattr(base, "set_grad_checkpointing"):
            raise ValueError(f"grad_checkpointing: model {type(base).__name__} has no set_grad_checkpointing()")
        base.set_grad_checkpointing(True)
    if cfg.channels_last:
        base.to(memory_format=torch.channels_last)

    steps_per_epoch = len(train_loader) // cfg.accum_steps
    if cfg.steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, cfg.steps_per_epoch)
    if steps_per_epoch < 1:
        raise ValueError(f"accum_steps {cfg.accum_steps} is larger than the {len(train_loader)} batches per epoch")
    total_steps = steps_per_epoch * cfg.epochs

    try:
        optimizer = create_optimizer_v2(base, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                        layer_decay=cfg.layer_decay)
    except (AssertionError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"cannot create optimizer {cfg.opt!r}: {str(e).splitlines()[0] if str(e) else e!r}") from e
    # per-update cosine with linear warm-up; warmup_epochs may be fractional
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=cfg.epochs, min_lr=cfg.min_lr,
                                       warmup_lr=cfg.warmup_lr, warmup_epochs=cfg.warmup_epochs,
                                       step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    ema = ModelEmaV3(base, decay=cfg.ema_decay, use_warmup=True) if cfg.ema_decay > 0 else None
    mixup = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        ncls = getattr(base, "num_classes", None)
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                      num_classes=ncls)
        criterion = SoftTargetCrossEntropy()
    else:
        criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    sparsity = None
    if cfg.sparse is not None:
        from largekernel.train.sparse import DynamicSparsity
        kw = dict(init="erk", total_steps=total_steps)
        kw.update(cfg.sparse_kwargs)
        if kw.get("init") == "snip" and "snip_batch" not in kw:
            xs, ys = zip(*(train_loader.dataset[i][:2] for i in range(min(64, len(train_loader.dataset)))))
            kw["snip_batch"] = (torch.stack(xs).to(device), torch.tensor(ys, device=device))
        try:
            sparsity = DynamicSparsity(base, sparsity=cfg.sparse, optimizer=optimizer, seed=cfg.seed, **kw)
        except TypeError as e:
            raise ValueError(f"sparse options {cfg.sparse_kwargs}: {e}") from e

    net = base
    if world_size > 1:
        if cfg.sync_bn and not any(isinstance(m, nn.SyncBatchNorm) for m in base.modules()):
            raise ValueError("sync_bn must be applied before fit(); use train() or convert the model first")
        net = nn.parallel.DistributedDataParallel(base, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)
    graphed = None
    if cfg.cuda_graph:   # config.validate() ruled out the options a captured step cannot take
        if device.type != "cuda" or world_size > 1:
            raise ValueError(f"cuda_graph needs one CUDA device, got {device} with {world_size} process(es)")
        from largekernel.train.graph import GraphedTrainStep

        graphed = GraphedTrainStep(net, criterion, optimizer, lambda cache: _autocast(device, cfg.amp, cache),
                                   cfg.clip_grad)

    history: list[dict[str, Any]] = []
    step_losses: list[float] = []
    start_epoch = global_step = 0
    if resume_state is not None:
        base.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        scaler.load_state_dict(resume_state["scaler"])
        if ema is not None and resume_state.get("ema") is not None:
            ema.module.load_state_dict(resume_state["ema"])
        if sparsity is not None and resume_state.get("sparse") is not None:
            sparsity.load_state_dict(resume_state["sparse"])
        start_epoch, global_step = int(resume_state["epoch"]), int(resume_state["global_step"])
        history, step_losses = list(resume_state["history"]), list(resume_state["step_losses"])
        _set_rng_state(resume_state["rng"][rank] if isinstance(resume_state["rng"], list) else resume_state["rng"])
    scheduler.step_update(global_step)
    kill_at = int(os.environ.get(KILL_ENV, "0"))

    def save_epoch_state(epoch: int) -> None:
        rngs = [None] * world_size
        if world_size > 1:
            dist.all_gather_object(rngs, _rng_state())
        else:
            rngs = [_rng_state()]
        if run_dir is None or not main:
            return
        state = dict(model=base.state_dict(), optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                     ema=ema.module.state_dict() if ema is not None else None,
                     sparse=sparsity.state_dict() if sparsity is not None else None,
                     epoch=epoch, global_step=global_step, history=history, step_losses=step_losses,
                     rng=rngs, config=cfg.to_dict(), meta=meta or {})
        save_state(run_dir / STATE_FILE, state)
        write_metrics(run_dir, history, step_losses)

    t_start = time.time()
    epochs = range(start_epoch, cfg.epochs)
    # On a terminal the bar redraws in place; into a log file every redraw is a new line, so redraw rarely there.
    bar = tqdm(total=total_steps, initial=global_step, desc="train", unit="step", dynamic_ncols=True,
               disable=not (cfg.progress and main), file=sys.stderr, mininterval=0.1 if sys.stderr.isatty() else 15.0)
    for epoch in epochs:
        net.train()
        sampler = getattr(train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        inner = getattr(train_loader, "loader", train_loader)
        if getattr(inner, "generator", None) is not None:
            inner.generator.manual_seed(cfg.seed * 100003 + epoch)
        t_epoch = time.time()
        loss_sum, n_steps, micro, acc_loss = 0.0, 0, 0, 0.0
        optimizer.zero_grad(set_to_none=True)
        for x, y in train_loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if mixup is not None:
                if len(x) % 2:
                    x, y = x[:-1], y[:-1]
                x, y = mixup(x, y)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            micro += 1
            if graphed is not None:   # the whole update, replayed from a CUDA graph (the step is already applied)
                loss_val = float(graphed(x, y))
            else:
                last_micro = micro % cfg.accum_steps == 0
                sync = contextlib.nullcontext() if (last_micro or world_size == 1) else net.no_sync()
                with sync:
                    with _autocast(device, cfg.amp):
                        loss = criterion(net(x), y)
                    scaler.scale(loss / cfg.accum_steps).backward()
                acc_loss += loss.detach().float()
                if not last_micro:
                    continue
                loss_val = acc_loss / cfg.accum_steps
                if world_size > 1:
                    dist.all_reduce(loss_val)
                    loss_val = loss_val / world_size
                loss_val = float(loss_val)
                acc_loss = 0.0
            if not math.isfinite(loss_val):
                where = f"epoch {epoch + 1}, step {global_step + 1}"
                kept = (f"; last good checkpoint kept: {run_dir / STATE_FILE}"
                        if run_dir is not None and (run_dir / STATE_FILE).exists() else "")
                raise TrainingDiverged(f"loss became {loss_val} at {where} (lower --lr, use --clip-grad or "
                                       f"--amp none){kept}")
            if graphed is None:
                if cfg.clip_grad is not None:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(base.parameters(), cfg.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
            global_step += 1
            scheduler.step_update(global_step)
            if sparsity is not None:
                sparsity.step()
            if ema is not None:
                ema.update(base, step=global_step)
            step_losses.append(loss_val)
            loss_sum += loss_val
            n_steps += 1
            bar.update(1)
            bar.set_postfix(epoch=f"{epoch + 1}/{cfg.epochs}", loss=f"{loss_val:.4f}",
                            lr=f"{optimizer.param_groups[0]['lr']:.2e}")
            if kill_at and global_step == kill_at:
                import signal
                os.kill(os.getpid(), signal.SIGKILL)
            if n_steps >= steps_per_epoch:
                break
        row: dict[str, Any] = dict(epoch=epoch + 1, step=global_step, train_loss=loss_sum / max(n_steps, 1),
                                   lr=optimizer.param_groups[0]["lr"], epoch_time_s=time.time() - t_epoch)
        if getattr(train_loader, "skipped", 0):
            row["skipped_images"] = train_loader.skipped  # unreadable images so far (not fatal up to max_skipped)
        if val_loader is not None and main:
            ev = evaluate(base, val_loader, device, cfg.amp, cfg.channels_last)
            row.update({f"val_{k}": v for k, v in ev.items() if k != "n"})
            if ema is not None:
                ev = evaluate(ema.module, val_loader, device, cfg.amp, cfg.channels_last)
                row.update({f"val_ema_{k}": v for k, v in ev.items() if k != "n"})
        history.append(row)
        if main:
            msg = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
            bar.write(msg, file=sys.stderr)
        save_epoch_state(epoch + 1)
    bar.close()
    metrics = dict(history[-1]) if history else {}
    metrics["train_time_s"] = time.time() - t_start
    return RunResult(run_dir, metrics, history, step_losses, model=base,
                     ema_model=ema.module if ema is not None else None, sparsity=sparsity)


def write_metrics(run_dir: Path, history: list[dict[str, Any]], step_losses: list[float],
                  summary: dict[str, Any] | None = None) -> None:
    """metrics.csv (one row per epoch) and metrics.json (epochs, per-step losses, summary)."""
    from largekernel.train.checkpoint import atomic_write
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]

    def write_csv(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(history)

    atomic_write(run_dir / "metrics.csv", write_csv)
    doc = dict(epochs=history, step_losses=step_losses, summary=summary or {})
    atomic_write(run_dir / "metrics.json", lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=1)))


# ---------------------------------------------------------------------------------------------- train
def data_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """The dataset options a run uses: for 'pathfinder', ``cfg.data_kwargs`` over ``DEFAULT_PATHFINDER``."""
    from largekernel.train.config import DEFAULT_PATHFINDER
    if cfg.data == "pathfinder":
        kw = {**DEFAULT_PATHFINDER, **cfg.data_kwargs}
        if cfg.img_size is not None and "size" not in cfg.data_kwargs:
            kw.pop("size")  # derived from img_size // scale
        return kw
    return dict(cfg.data_kwargs)


def _datasets(cfg: TrainConfig):
    from largekernel.data import create_dataset
    kw = data_kwargs(cfg)
    common = dict(root=cfg.data_dir, img_size=cfg.img_size, seed=cfg.seed)
    if cfg.data == "pathfinder":
        tr = create_dataset("pathfinder", "train", n=cfg.train_samples, progress=cfg.progress, **common, **kw)
        va = create_dataset("pathfinder", "val", n=cfg.val_samples, progress=cfg.progress, **common, **kw)
    else:
        tr = create_dataset(cfg.data, "train", **common, **kw)
        va = create_dataset(cfg.data, "val", **common, **kw)
    return tr, va


def _model_meta(cfg: TrainConfig, num_classes: int, in_chans: int, img_size: int) -> dict[str, Any]:
    data = dict(name=cfg.data, data_dir=cfg.data_dir, data_kwargs=data_kwargs(cfg), seed=cfg.seed,
                val_samples=cfg.val_samples)
    return dict(model=cfg.model, model_kwargs=cfg.model_kwargs, num_classes=num_classes, in_chans=in_chans,
                img_size=img_size, data=data)


def prepare(cfg: TrainConfig, device: torch.device | None = None):
    """Datasets, loaders and model for ``cfg`` (used by :func:`train`; handy for custom loops).
    Returns (model, train_loader, val_loader, meta)."""
    from largekernel.data import create_loader
    from largekernel.train.checkpoint import check_model_kwargs, check_model_name
    check_model_name(cfg.model)   # (before the datasets, which may take minutes to generate)
    check_model_kwargs(cfg.model_kwargs)
    world, rank, _ = _dist_info()
    tr, va = _datasets(cfg)
    ncls = cfg.num_classes or getattr(tr, "num_classes", None)
    if not ncls:
        raise ValueError(f"cannot tell the number of classes of dataset {cfg.data!r}: pass --num-classes")
    if cfg.num_classes is not None and getattr(tr, "num_classes", None) not in (None, cfg.num_classes):
        raise ValueError(f"num_classes {cfg.num_classes} does not match dataset {cfg.data!r} "
                         f"({tr.num_classes} classes)")
    in_chans = getattr(tr, "in_chans", 3)
    img_size = cfg.img_size or getattr(tr, "default_img_size", 224)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model = create_model(cfg.model, ncls, in_chans, cfg.drop_path, **cfg.model_kwargs)
    if cfg.finetune:
        state, _ = load_weights(resolve_checkpoint(cfg.finetune))
        load_into(model, state, cfg.finetune, new_head=True)
    if cfg.sync_bn and world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    pin = device is not None and device.type == "cuda"
    train_loader = create_loader(tr, cfg.batch_size, train=True, seed=cfg.seed, num_workers=cfg.workers,
                                 world_size=world, rank=rank, max_skipped=cfg.max_skipped, pin_memory=pin)
    val_loader = create_loader(va, max(cfg.batch_size, 128), train=False, num_workers=cfg.workers,
                               max_skipped=cfg.max_skipped, pin_memory=pin)
    meta = _model_meta(cfg, ncls, in_chans, img_size)
    return model, train_loader, val_loader, meta


def _new_run_dir(cfg: TrainConfig) -> Path:
    name = cfg.name or f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.model}-{cfg.data.replace('/', '_')}"
    path = Path(cfg.output) / name
    if (path / STATE_FILE).exists():
        raise ValueError(f"run folder {str(path)!r} already holds a run: continue it with --resume {path} "
                         "or pick another --name")
    return path


def train(cfg: TrainConfig | None = None, resume: str | os.PathLike | None = None) -> RunResult:
    """Run a whole job: data, model, :func:`fit`, then (rank 0) save the training checkpoint, re-parameterize,
    evaluate the deploy form, check it against the training form, save it, plot the curves.

    ``resume``: a run folder (or its ``last.pth``) to continue exactly; its saved config is used.
    Files in the run folder: config.json, metrics.csv, metrics.json, last.pth, model.safetensors,
    deploy.safetensors (+ model_ema.safetensors with EMA), curves.png.
    """
    from largekernel.train.report import finish_run
    resume_state = None
    if resume is not None:
        path = Path(resume)
        state_file = path / STATE_FILE if path.is_dir() else path
        resume_state = load_state(state_file)
        if not isinstance(resume_state, dict) or "config" not in resume_state:
            raise ValueError(f"{str(state_file)!r} is not a largekernel training state")
        cfg = TrainConfig.from_dict(resume_state["config"])
        run_dir = state_file.parent
        if int(resume_state["epoch"]) >= cfg.epochs:
            raise ValueError(f"run {str(run_dir)!r} already finished all {cfg.epochs} epochs")
    cfg = (cfg or TrainConfig()).validate()
    device, world, rank = setup_device(cfg)
    if resume is None:
        run_dir = _new_run_dir(cfg)
    if cfg.amp == "fp16" and device.type == "cpu":
        raise ValueError("amp 'fp16' needs a GPU; use --amp bf16 on the CPU")
    model, train_loader, val_loader, meta = prepare(cfg, device)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    try:
        result = fit(model, train_loader, val_loader, cfg, run_dir=run_dir, resume_state=resume_state,
                     device=device, world_size=world, rank=rank, meta=meta)
        if rank == 0:
            finish_run(result, cfg, meta, val_loader, device)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    return result

"""The ``largekernel`` command line: train, eval, reparam, export, info, bench (+ plug-in subcommands).

Adding a subcommand: write a module with ``HELP: str``, ``add_arguments(parser)`` and ``run(args) -> int``
and add one line to :data:`PLUGINS` (name -> module). A plug-in whose module is missing is not offered.
Errors: any ``ValueError``/``OSError``/:class:`TrainingDiverged` becomes one line on stderr and exit code 2
(set ``LARGEKERNEL_DEBUG=1`` for the traceback).
"""
from __future__ import annotations

import argparse
import ast
import importlib
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

PROG = "largekernel"

# Plug-in subcommands living in other modules: name -> module (HELP, add_arguments, run).
PLUGINS: dict[str, str] = {
    "erf": "largekernel.analysis.erf_cli",
    "guidelines": "largekernel.experiments.guidelines_cli",
}


@dataclass
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    """Register ``fn(args) -> int`` as subcommand ``name``."""
    def deco(fn: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = Command(name, help, add_arguments, fn)
        return fn
    return deco


# ------------------------------------------------------------------------------------------- parsing
def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_kv(items: list[str] | None, option: str) -> dict[str, Any]:
    """``["a=1", "b=(3,3)", "c=x"]`` -> ``{"a": 1, "b": (3, 3), "c": "x"}``."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"{option} expects key=value items, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip().replace("-", "_")] = _literal(v.strip())
    return out


_TRAIN_HELP = {
    "model": "timm model name (ours: replknet_micro, replknet_31b, ...; or any timm model)",
    "model_kwargs": "constructor overrides, e.g. large_kernel_sizes=(3,3,3,3) small_kernel=None",
    "data": "pathfinder | digits | folder | <folder path> | <timm name, e.g. torch/cifar10>",
    "data_dir": "root of an ImageNet-style folder (train/ and val/ class folders) or of a timm dataset",
    "data_kwargs": "dataset options, e.g. length=60 distractors=3 (pathfinder)",
    "train_samples": "generated Pathfinder training images",
    "val_samples": "generated Pathfinder validation images",
    "steps_per_epoch": "cap optimizer steps per epoch (quick runs)",
    "batch_size": "per process; global batch = batch size x processes x accum steps",
    "accum_steps": "gradient accumulation steps per optimizer step",
    "warmup_epochs": "linear warm-up length (may be fractional)",
    "layer_decay": "layer-wise lr decay (fine-tuning), e.g. 0.7",
    "drop_path": "stochastic depth rate (None: the model's default)",
    "ema_decay": "EMA of the weights (0 = off), e.g. 0.999",
    "amp": "mixed precision: none | bf16 | fp16 (GPU)",
    "finetune": "checkpoint (ours or an official .pth) to start from; the head is replaced if classes differ",
    "sparse": "dynamic sparse training (SLaK) at this sparsity, e.g. 0.4",
    "sparse_kwargs": "DynamicSparsity options, e.g. init=snip update_every=100 scope=protocol",
    "threads": "torch CPU threads (None: 1 on the CPU, fastest for small models on shared machines)",
    "output": "parent folder of run folders",
    "name": "run folder name (default: timestamp-model-data)",
    "max_skipped": "unreadable images tolerated before stopping",
    "workers": "data loader worker processes",
    "reparam": "re-parameterize at the end and check the deploy form",
    "progress": "progress bars",
    "cuda_graph": "capture one training update in a CUDA graph and replay it (one GPU, adam/adamw, no "
                  "accumulation / fp16 / sparse / compile): a CPU-bound step then runs at the GPU's pace",
}


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    from largekernel.train.config import TrainConfig
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        ann = str(f.type)
        default = getattr(defaults, f.name)
        help_ = _TRAIN_HELP.get(f.name, "")
        help_ = f"{help_} (default: {default})" if help_ else f"default: {default}"
        if "dict" in ann:
            p.add_argument(flag, nargs="*", metavar="KEY=VALUE", default=None, help=help_)
        elif ann == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_)
        else:
            typ = int if ann.startswith("int") else float if ann.startswith("float") else str
            p.add_argument(flag, type=_optional(typ) if "None" in ann else typ, default=default, help=help_)
    p.add_argument("--resume", metavar="RUN", default=None,
                   help="continue a run folder (or its last.pth) exactly where it stopped; uses its saved config")


def _optional(typ):
    def conv(text: str):
        return None if text.lower() in ("none", "null") else typ(text)
    conv.__name__ = typ.__name__
    return conv


def config_from_args(args: argparse.Namespace):
    from largekernel.train.config import TrainConfig
    kw = {}
    for f in fields(TrainConfig):
        v = getattr(args, f.name)
        if "dict" in str(f.type):
            v = parse_kv(v, "--" + f.name.replace("_", "-"))
        kw[f.name] = v
    return TrainConfig(**kw)


# ------------------------------------------------------------------------------------------- train
@command("train", "train a model (no arguments: RepLKNet-micro on the embedded Pathfinder task, ~5 min CPU)",
         _add_train_arguments)
def cmd_train(args: argparse.Namespace) -> int:
    from largekernel.train import train
    if args.resume:
        given = [f"--{k.replace('_', '-')}" for k, v in vars(args).items()
                 if k not in ("resume", "command", "func") and v != _train_default(k)]
        if given:
            raise ValueError(f"--resume continues with the run's saved config; drop {' '.join(given[:3])}")
        result = train(resume=args.resume)
    else:
        result = train(config_from_args(args))
    if "deploy_matches" in result.metrics and not result.metrics["deploy_matches"]:
        print(f"{PROG}: warning: the deploy form does not match the training form", file=sys.stderr)
        return 1
    return 0


def _train_default(name: str) -> Any:
    from largekernel.train.config import TrainConfig
    d = TrainConfig()
    if not hasattr(d, name):
        return None
    v = getattr(d, name)
    return None if isinstance(v, dict) else v


# ------------------------------------------------------------------------------------------- eval
def _add_ckpt_arguments(p: argparse.ArgumentParser, form: bool = True) -> None:
    p.add_argument("checkpoint", help="run folder or weights file (.safetensors, or an official .pth)")
    if form:
        p.add_argument("--form", choices=("train", "deploy", "ema"), default=None,
                       help="which file of a run folder (default: model.safetensors)")
    p.add_argument("--model", default=None, help="model name (needed for files without largekernel metadata)")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--in-chans", type=int, default=None)
    p.add_argument("--model-kwargs", nargs="*", metavar="KEY=VALUE", default=None)


def _add_eval_arguments(p: argparse.ArgumentParser) -> None:
    _add_ckpt_arguments(p)
    p.add_argument("--data", default=None, help="dataset (default: the one the checkpoint was trained on)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--data-kwargs", nargs="*", metavar="KEY=VALUE", default=None)
    p.add_argument("--val-samples", type=int, default=None, help="Pathfinder validation images")
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    p.add_argument("--workers", type=int, default=0)


def _device(name: str):
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but no CUDA GPU is available")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"device {name!r} is not a device") from e


def _load(args: argparse.Namespace, form: str | None = None):
    from largekernel.train import model_from_checkpoint
    return model_from_checkpoint(args.checkpoint, form=form or getattr(args, "form", None), model=args.model,
                                 num_classes=args.num_classes, model_kwargs=parse_kv(args.model_kwargs,
                                                                                   "--model-kwargs"),
                                 in_chans=args.in_chans)


def _val_dataset(meta: dict, data: str | None = None, data_dir: str | None = None, data_kwargs: dict | None = None,
                 val_samples: int | None = None, img_size: int | None = None):
    from largekernel.data import create_dataset
    stored = meta.get("data") or {}
    name = data or stored.get("name")
    if name is None:
        raise ValueError("the checkpoint does not say which data it was trained on: pass --data")
    kw = dict(stored.get("data_kwargs") or {}) if name == stored.get("name") else {}
    kw.update(data_kwargs or {})
    root = data_dir or (stored.get("data_dir") if name == stored.get("name") else None)
    if name == "pathfinder":
        kw["n"] = val_samples or stored.get("val_samples") or 1000
    size = img_size or (meta.get("img_size") if name == stored.get("name") else None)
    return create_dataset(name, "val", root=root, img_size=size, seed=int(stored.get("seed", 0)), **kw)


def _sample_batch(meta: dict, n: int = 8):
    """A real batch from the checkpoint's validation data, or (None, reason)."""
    import torch
    try:
        ds = _val_dataset(meta)
    except ValueError as e:
        return None, str(e)
    xs = [ds[i][0] for i in range(min(n, len(ds)))]
    return torch.stack(xs), f"{len(xs)} images of {meta['data']['name']} (val)"


@command("eval", "top-1/top-5 and loss of a checkpoint (training or deploy form) on a dataset",
         _add_eval_arguments)
def cmd_eval(args: argparse.Namespace) -> int:
    from largekernel.data import create_loader
    from largekernel.train import evaluate
    from largekernel.train.report import format_table
    model, meta = _load(args)
    ds = _val_dataset(meta, args.data, args.data_dir, parse_kv(args.data_kwargs, "--data-kwargs"),
                      args.val_samples, args.img_size)
    ncls = getattr(ds, "num_classes", None)
    if ncls is not None and ncls != meta["num_classes"]:
        name = args.data or meta["data"]["name"]
        raise ValueError(f"checkpoint has {meta['num_classes']} classes but dataset {name!r} has {ncls}")
    device = _device(args.device)
    loader = create_loader(ds, args.batch_size, train=False, num_workers=args.workers)
    res = evaluate(model.to(device), loader, device, args.amp, progress=True)
    rows = [("checkpoint", meta["file"]), ("model", f"{meta['model']} ({meta.get('form', 'train')} form)"),
            ("images", str(res["n"])), ("top-1", f"{res['top1']:.2f} %")]
    if "top5" in res:
        rows.append(("top-5", f"{res['top5']:.2f} %"))
    rows.append(("loss", f"{res['loss']:.4f}"))
    print(format_table(rows))
    return 0


# ------------------------------------------------------------------------------------------- reparam
def _add_reparam_arguments(p: argparse.ArgumentParser) -> None:
    _add_ckpt_arguments(p, form=False)
    p.add_argument("-o", "--output", default=None, help="deploy weights (default: deploy.safetensors beside it)")
    p.add_argument("--fold-bn", action="store_true", help="also fold remaining conv-BN pairs")


@command("reparam", "training checkpoint -> deploy checkpoint, verified on a real batch", _add_reparam_arguments)
def cmd_reparam(args: argparse.Namespace) -> int:
    import torch

    from largekernel import reparameterize
    from largekernel.train import save_weights
    model, meta = _load(args, form="train")
    if meta.get("form") == "deploy":
        raise ValueError(f"{meta['file']!r} is already a deploy checkpoint")
    deploy = reparameterize(model, inplace=False, fold_bn=args.fold_bn)
    x, source = _sample_batch(meta)
    if x is None:
        x = torch.randn(4, meta.get("in_chans", 3), meta.get("img_size") or 224, meta.get("img_size") or 224)
        source = f"random input ({source})"
    with torch.no_grad():
        a, b = model(x), deploy(x)
    diff = (a - b).abs().max().item()
    rel = diff / max(a.abs().max().item(), 1e-12)
    ok = rel < 1e-4
    out = Path(args.output) if args.output else Path(meta["file"]).with_name("deploy.safetensors")
    save_weights(out, deploy, {k: v for k, v in meta.items() if k != "file"} | {"form": "deploy"})
    n_train = sum(p.numel() for p in model.parameters())
    n_dep = sum(p.numel() for p in deploy.parameters())
    print(f"deploy checkpoint: {out}")
    print(f"params {n_train / 1e6:.3f} M -> {n_dep / 1e6:.3f} M; on {source}: max |logit diff| {diff:.2e} "
          f"(relative {rel:.1e}) -> {'equivalent' if ok else 'NOT EQUIVALENT'}")
    return 0 if ok else 1


# ------------------------------------------------------------------------------------------- export
def _add_export_arguments(p: argparse.ArgumentParser) -> None:
    _add_ckpt_arguments(p, form=False)
    p.add_argument("-o", "--output", default=None, help="ONNX file (default: model.onnx beside the checkpoint)")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--img-size", type=int, default=None)


@command("export", "ONNX of the deploy form, checked with onnxruntime against PyTorch on a real batch",
         _add_export_arguments)
def cmd_export(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from largekernel import reparameterize
    model, meta = _load(args)
    deploy = model if meta.get("form") == "deploy" else reparameterize(model, inplace=False)
    x, source = _sample_batch(meta, n=4)
    size = args.img_size or meta.get("img_size") or 224
    if x is None or args.img_size:
        x = torch.randn(4, meta.get("in_chans", 3), size, size)
        source = "random input"
    out = Path(args.output) if args.output else Path(meta["file"]).with_name("model.onnx")
    out.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(deploy, x, out, args.opset)
    import onnxruntime as ort
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = deploy(x).numpy()
    diff = float(np.abs(got - ref).max())
    rel = diff / max(float(np.abs(ref).max()), 1e-12)
    ok = rel < 1e-4 and (got.argmax(1) == ref.argmax(1)).all()
    print(f"ONNX: {out} ({out.stat().st_size / 1e6:.2f} MB, opset {args.opset}, dynamic batch)")
    print(f"onnxruntime vs PyTorch on {source}: max |diff| {diff:.2e} (relative {rel:.1e}) -> "
          f"{'match' if ok else 'MISMATCH'}")
    return 0 if ok else 1


def export_onnx(model, x, path: Path, opset: int = 18) -> None:
    """Export with a dynamic batch axis; a single file (weights embedded)."""
    import warnings

    import torch
    model.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            prog = torch.onnx.export(model, (x,), dynamo=True, opset_version=opset, input_names=["input"],
                                     output_names=["logits"], dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
                                     verbose=False)
            prog.save(str(path), external_data=False)
        except Exception:
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=min(opset, 17),
                              input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})


# ------------------------------------------------------------------------------------------- info
def _add_info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model name or checkpoint / run folder")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--in-chans", type=int, default=None)
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--model-kwargs", nargs="*", metavar="KEY=VALUE", default=None)
    p.add_argument("--deploy", action="store_true", help="describe the re-parameterized form")
    p.add_argument("--device", default="auto", help="device whose conv paths are reported")


def model_info(model, img_size: int, in_chans: int, device) -> dict[str, Any]:
    """Params, MACs (FLOPs/2 of torch.utils.flop_counter, on the meta device), and every depthwise conv with
    its stage, kernel, stride, input shape and the path the dispatch takes on ``device``."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    layers: list[dict[str, Any]] = []
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d) and m.groups == m.in_channels == m.out_channels and m.groups > 1:
            def hook(mod, inp, _out, name=name):
                layers.append(dict(name=name, kernel=tuple(mod.kernel_size), stride=tuple(mod.stride),
                                   shape=tuple(inp[0].shape), module=mod))
            hooks.append(m.register_forward_hook(hook))
    params = sum(p.numel() for p in model.parameters())
    counter = FlopCounterMode(display=False)
    x = torch.zeros(1, in_chans, img_size, img_size, device="meta")
    with counter, torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    try:
        from largekernel.ops import depthwise_path
    except ImportError:
        depthwise_path = None
    from largekernel.layers import DepthwiseConv2d
    for d in layers:
        mod = d.pop("module")
        if depthwise_path is None:
            d["path"] = "native"
        elif not isinstance(mod, DepthwiseConv2d) or not mod._is_same():
            d["path"] = "native (strided/padded nn.Conv2d)"
        else:
            xs = torch.empty(d["shape"], device=device)
            w = torch.empty(tuple(mod.weight.shape), device=device)
            d["path"] = depthwise_path(xs, w, None)
        parts = d["name"].split(".")
        d["stage"] = next((".".join(parts[:i + 2]) for i, p in enumerate(parts)
                           if p in ("stages", "layers", "blocks", "features") and i + 1 < len(parts)), parts[0])
    return dict(params=params, macs=int(counter.get_total_flops()) // 2, depthwise=layers)


@command("info", "params, MACs at a resolution, per-stage kernel sizes and each depthwise conv's path",
         _add_info_arguments)
def cmd_info(args: argparse.Namespace) -> int:
    import torch

    import largekernel
    from largekernel.train.checkpoint import check_model_name, create_model
    from largekernel.train.report import format_table
    kwargs = parse_kv(args.model_kwargs, "--model-kwargs")
    if os.path.exists(args.model):
        from largekernel.train.checkpoint import load_weights, resolve_checkpoint
        _, meta = load_weights(resolve_checkpoint(args.model))
        if "model" not in meta:
            raise ValueError(f"{args.model!r} has no largekernel metadata; pass a model name")
        name, kwargs = meta["model"], {**(meta.get("model_kwargs") or {}), **kwargs}
        ncls, chans = meta["num_classes"], meta.get("in_chans", 3)
    else:
        name, ncls, chans = args.model, args.num_classes or 1000, args.in_chans or 3
        check_model_name(name)
    if args.img_size < 8:
        raise ValueError(f"--img-size must be >= 8, got {args.img_size}")
    device = _device(args.device)
    with torch.device("meta"):
        model = create_model(name, ncls, chans, **kwargs)
    if args.deploy:
        model = largekernel.reparameterize(model, inplace=True)
    info = model_info(model, args.img_size, chans, device)
    stages: dict[str, list[str]] = {}
    for d in info["depthwise"]:
        k = "x".join(map(str, d["kernel"])) + (f"/s{d['stride'][0]}" if d["stride"][0] > 1 else "")
        stages.setdefault(d["stage"], [])
        if k not in stages[d["stage"]]:
            stages[d["stage"]].append(k)
    rows = [("model", f"{name} {kwargs or ''}".strip()), ("form", "deploy" if args.deploy else "training"),
            ("params", f"{info['params'] / 1e6:.3f} M"),
            ("MACs", (f"{info['macs'] / 1e9:.3f} G" if info["macs"] >= 1e9 else f"{info['macs'] / 1e6:.2f} M")
             + f" at {chans}x{args.img_size}x{args.img_size}"),
            ("depthwise convs", str(len(info["depthwise"])))]
    rows += [(f"kernels {s}", ", ".join(ks)) for s, ks in stages.items()]
    print(format_table(rows))
    if info["depthwise"]:
        print(f"\ndepthwise conv paths on {device}:")
        w = max(len(d["name"]) for d in info["depthwise"])
        for d in info["depthwise"]:
            k = "x".join(map(str, d["kernel"]))
            print(f"  {d['name']:<{w}}  {k:>7} s{d['stride'][0]}  in {tuple(d['shape'][1:])}  -> {d['path']}")
    return 0


# ------------------------------------------------------------------------------------------- bench
def _add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default="replknet_micro")
    p.add_argument("--peer", default="resnet18", help="model to compare with (any timm name; 'none' to skip)")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--in-chans", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--model-kwargs", nargs="*", metavar="KEY=VALUE", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--iters", type=int, default=5, help="timed iterations (after 2 warm-up)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--deploy", action=argparse.BooleanOptionalAction, default=True,
                   help="time inference in the re-parameterized form")


def bench_model(model, batch: int, img_size: int, in_chans: int, device, iters: int = 5, amp: str = "none",
                channels_last: bool = False) -> dict[str, float]:
    """img/s of inference (no grad) and of a training step (forward, backward, SGD update)."""
    import torch

    from largekernel import reparameterize
    from largekernel.train.engine import _autocast

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, in_chans, img_size, img_size, device=device).contiguous(memory_format=fmt)
    model = model.to(device).to(memory_format=fmt)
    y = torch.randint(0, model.num_classes if hasattr(model, "num_classes") else 2, (batch,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    model.train()
    for i in range(iters + 2):
        if i == 2:
            sync()
            t = time.perf_counter()
        with _autocast(device, amp):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync()
    train_ips = batch * iters / (time.perf_counter() - t)
    inf = reparameterize(model, inplace=False).eval() if getattr(bench_model, "deploy", True) else model.eval()
    with torch.no_grad():
        for i in range(iters + 2):
            if i == 2:
                sync()
                t = time.perf_counter()
            with _autocast(device, amp):
                inf(x)
        sync()
    infer_ips = batch * iters / (time.perf_counter() - t)
    return dict(infer=infer_ips, train=train_ips)


@command("bench", "img/s (inference and a training step) on this device vs a named peer", _add_bench_arguments)
def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from largekernel.train.checkpoint import check_model_name, create_model
    device = _device(args.device)
    for name, v in (("--batch-size", args.batch_size), ("--iters", args.iters), ("--img-size", args.img_size)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if args.amp == "fp16" and device.type == "cpu":
        raise ValueError("--amp fp16 needs a GPU; use bf16 on the CPU")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    names = [args.model] + ([args.peer] if args.peer and args.peer.lower() != "none" else [])
    for n in names:
        check_model_name(n)
    bench_model.deploy = args.deploy  # type: ignore[attr-defined]
    rows = []
    for i, name in enumerate(names):
        kwargs = parse_kv(args.model_kwargs, "--model-kwargs") if i == 0 else {}
        torch.manual_seed(0)
        model = create_model(name, args.num_classes, args.in_chans, **kwargs)
        params = sum(p.numel() for p in model.parameters())
        r = bench_model(model, args.batch_size, args.img_size, args.in_chans, device, args.iters, args.amp,
                        args.channels_last)
        rows.append((name, params, r))
        del model
    desc = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{desc}, batch {args.batch_size}, {args.in_chans}x{args.img_size}x{args.img_size}, amp {args.amp}, "
          f"{args.iters} timed iterations")
    w = max(len(n) for n, _, _ in rows)
    print(f"{'model':<{w}}  {'params':>9}  {'infer img/s':>11}  {'train img/s':>11}")
    for name, params, r in rows:
        print(f"{name:<{w}}  {params / 1e6:>8.2f}M  {r['infer']:>11.1f}  {r['train']:>11.1f}")
    if len(rows) == 2:
        a, b = rows[0][2], rows[1][2]
        print(f"{rows[0][0]} / {rows[1][0]}: inference x{a['infer'] / b['infer']:.2f}, "
              f"training x{a['train'] / b['train']:.2f}")
    return 0


# ------------------------------------------------------------------------------------------- main
def _load_plugins() -> None:
    for name, module in PLUGINS.items():
        if name in COMMANDS:
            continue
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        COMMANDS[name] = Command(name, getattr(mod, "HELP", ""), mod.add_arguments, mod.run)


def build_parser() -> argparse.ArgumentParser:
    _load_plugins()
    parser = _Parser(prog=PROG, description="Large-kernel ConvNets: train, evaluate, deploy.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        p.set_defaults(func=cmd.run)
    return parser


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``largekernel`` console script. Returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if os.environ.get("LARGEKERNEL_DEBUG"):
        return int(args.func(args) or 0)
    from largekernel.train.engine import TrainingDiverged
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # output piped into `head`
        return 0
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted (a run folder can be continued with `largekernel train --resume <run>`)",
              file=sys.stderr)
        return 130
    except (ValueError, OSError, TrainingDiverged) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"{PROG} {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except Exception as e:  # never a traceback for the user; LARGEKERNEL_DEBUG=1 shows it
        msg = str(e).splitlines()[0] if str(e) else ""
        print(f"{PROG} {args.command}: error: {type(e).__name__}: {msg} (set LARGEKERNEL_DEBUG=1 for details)",
              file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())

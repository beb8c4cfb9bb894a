"""Whole-model throughput: img/s for inference (deploy form) and a training step, ours vs timm peers, one run.

    PYTHONPATH=. python benchmarks/models.py                      # the default set, on the current GPU
    PYTHONPATH=. python benchmarks/models.py --models replknet_31b swin_base_patch4_window7_224 --backends auto native

Inference: eval mode, re-parameterized (``largekernel.reparameterize(fold_bn=True)``; timm models via
``timm.utils.reparameterize_model``), ``torch.no_grad``, bf16 autocast, ``--layouts`` (default channels_last).
Training: one SGD step (forward, cross-entropy, backward, step) under bf16 autocast. Median of ``--iters``
CUDA-event-timed iterations after ``--warmup``; random inputs. ``--rounds R`` builds every model first and times
them in turn R times (median over rounds; the host's drift then hits all alike). Writes ``$OUT/models.json``
when ``$OUT`` is set.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import timm
import torch
import torch.nn.functional as F
from _timing import cuda_time  # benchmarks/ is the script directory

import largekernel
from largekernel.ops.dispatch import use_backend

DEFAULT = [
    "replknet_31b", "slak_tiny", "slak_small", "unireplknet_t", "unireplknet_s", "shiftwise_v2_tiny",
    "convnext_tiny", "convnext_base", "swin_tiny_patch4_window7_224", "swin_base_patch4_window7_224",
]


OUR_MODULES = ("replknet", "slak", "unireplknet", "shiftwise", "mobilenetv2")


def is_ours(name: str) -> bool:
    return any(name.split(".")[0] in timm.list_models(module=m) for m in OUR_MODULES)


SW_FORMS = ("merged", "square", "cross", "mixed", "mixed-full")


def sw_deploy(model: torch.nn.Module, kind: str) -> None:
    """Shift-wise deploy form: 'merged' (fused shift-add), 'square' / 'cross' dense depthwise convs, 'mixed' (cross on
    the two high-resolution stages, square on the others: the fastest inference form of each SW-tiny stage in the
    layer benchmark, docs/performance.md); the ghost channels skip the conv, except in 'mixed-full' (the same
    forms, every conv on all channels)."""
    if kind != "merged":
        kinds = ("cross", "cross", "square", "square") if kind.startswith("mixed") else kind
        model.to_dense(kinds, split_ghosts=kind != "mixed-full")


def deploy_form(name: str, model: torch.nn.Module, sw_form: str = "merged") -> torch.nn.Module:
    """The inference form the benchmarks time: ours re-parameterized with every BN folded (shift-wise nets then in
    ``sw_form``, see :func:`sw_deploy`), timm's through ``timm.utils.reparameterize_model``. In place."""
    if is_ours(name):
        model = largekernel.reparameterize(model, inplace=True, fold_bn=True)
        if name.startswith("shiftwise"):
            sw_deploy(model, sw_form)
        return model
    from timm.utils import reparameterize_model

    return reparameterize_model(model)


def train_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer | None = None,
               zero_grad: bool = True):
    """One SGD step (momentum 0.9) under bf16 autocast: forward, cross-entropy, backward, step (then the grads are
    set to None unless ``zero_grad=False``: a step captured in a CUDA graph keeps its static grads)."""
    opt = opt if opt is not None else torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> torch.Tensor:
        # the autocast weight-cast cache would hand a captured graph tensors from outside its memory pool
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=zero_grad):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if zero_grad:
            opt.zero_grad(set_to_none=True)
        return loss

    return step


def infer_step(model: torch.nn.Module, x: torch.Tensor, cache: bool = True):
    """One no-grad forward under bf16 autocast; returns the logits."""

    @torch.no_grad()
    def step() -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=cache):
            return model(x)

    return step


def graphed(step, before_capture=lambda: None, warmup: int = 3):
    """``step`` captured once in a CUDA graph (PyTorch's whole-network recipe: ``warmup`` runs on a side stream,
    which also compile and tune our kernels, then one capture); returns a replay function that returns the
    captured step's (static) output."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            before_capture()
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    before_capture()
    with torch.cuda.graph(graph):
        out = step()

    def replay():
        graph.replay()
        return out

    # the graph reads and writes the step's tensors (model, optimizer state, inputs) in place: keep them alive with
    # it (without this, the model and optimizer built for the step were freed once the builder returned, and the
    # next capture's empty_cache() gave their memory back: replays then crashed or hit illegal addresses)
    replay.graph, replay.step = graph, step
    return replay


def build_model(name: str, batch: int, train_batch: int, res: int, train: bool = True, channels_last: bool = True,
                sw_impl: str = "shiftadd", sw_form: str = "merged", graph: bool = False,
                drop_path_rate: float | None = None) -> dict:
    """One benchmark entry: the row's labels, a training step (training form, SGD) and an inference step (deploy
    form of a separate copy), with their random inputs on the GPU; graph: both steps captured in CUDA graphs and
    replayed (:func:`graphed`)."""
    device = "cuda"
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    row: dict = {"model": name, "layout": "channels_last" if channels_last else "NCHW"}
    shiftwise = name.startswith("shiftwise")
    kwargs = {"impl": sw_impl} if shiftwise else {}
    if drop_path_rate is not None:   # else each model's default (a training-recipe setting, not the architecture's)
        kwargs["drop_path_rate"] = drop_path_rate
        row["drop_path_rate"] = drop_path_rate
    model = timm.create_model(name, num_classes=1000, **kwargs)
    if shiftwise:
        row.update(sw_impl=sw_impl, sw_deploy=sw_form)
    row["params_M"] = sum(p.numel() for p in model.parameters()) / 1e6
    model = model.to(device).to(memory_format=fmt)
    entry: dict = {"row": row, "train": None, "batch": batch, "train_batch": train_batch}
    deploy = copy.deepcopy(model).eval()
    if train:
        x = torch.randn(train_batch, 3, res, res, device=device).to(memory_format=fmt)
        y = torch.randint(0, 1000, (train_batch,), device=device)
        if graph:
            opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
            entry["train"] = graphed(train_step(model.train(), x, y, opt, zero_grad=False),
                                     before_capture=lambda: opt.zero_grad(set_to_none=True))
        else:
            entry["train"] = train_step(model.train(), x, y)
    deploy = deploy_form(name, deploy, sw_form)
    x = torch.randn(batch, 3, res, res, device=device).to(memory_format=fmt)
    entry["infer"] = graphed(infer_step(deploy, x, cache=False)) if graph else infer_step(deploy, x)
    return entry


def time_model(entry: dict, warmup: int, iters: int) -> dict:
    """img/s of the entry's training and inference steps (median of ``iters`` after ``warmup``)."""
    out = {}
    if entry["train"] is not None:
        torch.cuda.reset_peak_memory_stats()
        out["train_img_s"] = entry["train_batch"] / (cuda_time(entry["train"], iters, 0, warmup) / 1e3)
        out["train_peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    out["infer_img_s"] = entry["batch"] / (cuda_time(entry["infer"], iters, 0, warmup) / 1e3)
    return out


def bench_model(name: str, batch: int, train_batch: int, warmup: int, iters: int, res: int,
                train: bool = True, channels_last: bool = True, sw_impl: str = "shiftadd",
                sw_form: str = "merged") -> dict:
    entry = build_model(name, batch, train_batch, res, train, channels_last, sw_impl, sw_form)
    return {**entry["row"], **time_model(entry, warmup, iters)}


def _rounds(variants: list[tuple], args) -> list[dict]:
    """Every variant built (and tuned) first, then ``args.rounds`` rounds that time each in turn: the host's
    CPU-speed drift (these steps are partly CPU-bound) then hits every model alike. Reports the median over
    rounds and each round's value."""
    entries, failed = [], []
    for name, backend, layout, impl in variants:
        try:
            with use_backend(backend if is_ours(name) else "auto"):
                entry = build_model(name, args.batch, args.train_batch, args.res, not args.no_train,
                                    layout == "channels_last", impl, args.sw_deploy, args.cuda_graph,
                                    args.drop_path_rate)
                time_model(entry, args.warmup, 2)   # compile / tune outside the rounds
        except Exception as err:  # report and go on
            failed.append({"model": name, "backend": backend, "layout": layout,
                           "error": f"{type(err).__name__}: {str(err)[:200]}"})
            print(json.dumps(failed[-1]), flush=True)
            continue
        entry["row"].update(backend=backend, layout=layout)
        entries.append((backend, entry))
        print(f"built {name} ({backend}, {layout}, {impl})", flush=True)
    samples: list[dict] = [{} for _ in entries]
    for r in range(args.rounds):
        for (backend, entry), got in zip(entries, samples):
            with use_backend(backend if is_ours(entry["row"]["model"]) else "auto"):
                for key, value in time_model(entry, 2, args.iters).items():
                    got.setdefault(key, []).append(value)
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    rows = []
    for (_, entry), got in zip(entries, samples):
        row = dict(entry["row"])
        for key, values in got.items():
            row[key] = statistics.median(values)
            row[key + "_rounds"] = [round(v, 1) for v in values]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows + failed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=DEFAULT)
    p.add_argument("--backends", nargs="+", default=["auto", "native"],
                   help="depthwise backends to run our models under ('auto' = fast kernels)")
    p.add_argument("--native-models", nargs="*", default=["replknet_31b"],
                   help="our models that also run under the non-first backends (the rest: first backend only)")
    p.add_argument("--batch", type=int, default=128, help="inference batch")
    p.add_argument("--train-batch", type=int, default=64)
    p.add_argument("--res", type=int, default=224)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--no-train", action="store_true")
    p.add_argument("--drop-path-rate", type=float, default=None,
                   help="stochastic depth of every model's training step (default: each model's own default)")
    p.add_argument("--no-cudnn-benchmark", action="store_true", help="cuDNN's heuristics instead of its benchmark mode")
    p.add_argument("--cuda-graph", action="store_true",
                   help="with --rounds: time CUDA-graph replays of each step (no CPU launch cost: the GPU-bound rate)")
    p.add_argument("--rounds", type=int, default=1,
                   help="> 1: build every model first, then time them in turn this many times (median over rounds)")
    p.add_argument("--sw-impl", nargs="+", default=["shiftadd"], choices=["shiftadd", "bands"],
                   help="shift-wise models: how the trainable layers compute (one run per value)")
    p.add_argument("--sw-deploy", default="merged", choices=SW_FORMS,
                   help="shift-wise models: inference form")
    p.add_argument("--layouts", nargs="+", default=["channels_last"], choices=["channels_last", "NCHW"],
                   help="memory layouts to run every model in")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/models.py needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark
    variants = []
    for name in args.models:
        if not timm.is_model(name):
            print(f"skip {name}: not registered", file=sys.stderr)
            continue
        ours = is_ours(name)
        backends = (args.backends if name in args.native_models else args.backends[:1]) if ours else ["-"]
        impls = args.sw_impl if name.startswith("shiftwise") else ["shiftadd"]
        variants += [(name, b, lay, i) for b in backends for lay in args.layouts for i in impls]
    rows = []
    if args.rounds == 1 and not args.cuda_graph:   # one model at a time (less memory)
        for name, backend, layout, impl in variants:
            t0 = time.time()
            try:
                with use_backend(backend if is_ours(name) else "auto"):
                    row = bench_model(name, args.batch, args.train_batch, args.warmup, args.iters, args.res,
                                      train=not args.no_train, channels_last=layout == "channels_last",
                                      sw_impl=impl, sw_form=args.sw_deploy)
            except Exception as err:  # report and go on: one model's failure must not lose the run
                row = {"model": name, "error": f"{type(err).__name__}: {str(err)[:200]}"}
            torch.cuda.empty_cache()
            row["backend"], row["layout"] = backend, layout
            row["wall_s"] = round(time.time() - t0, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    else:
        rows = _rounds(variants, args)
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "timm": timm.__version__,
            "batch": args.batch, "train_batch": args.train_batch, "res": args.res, "iters": args.iters,
            "rounds": args.rounds, "cuda_graph": args.cuda_graph,
            "date": time.strftime("%Y-%m-%d"), "rows": rows}
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "models.json"), "w") as f:
            json.dump(meta, f, indent=1)
    print(f"\n{meta['gpu']}, torch {meta['torch']}, bf16 autocast, {args.res}px")
    print(f"| model | backend | layout | params (M) | infer img/s (b{args.batch}) "
          f"| train img/s (b{args.train_batch}) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['backend']} | {r['layout']} | error: {r['error'][:80]} | | |")
        else:
            label = r["model"] + (f" ({r['sw_impl']}, {r['sw_deploy']})" if "sw_impl" in r else "")
            print(f"| {label} | {r['backend']} | {r['layout']} | {r['params_M']:.1f} | {r['infer_img_s']:.0f} | "
                  f"{r.get('train_img_s', float('nan')):.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

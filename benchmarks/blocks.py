"""Where a model's time goes, block by block: GPU time (CUDA-graph replay) of every block of every stage, alone on
its real input shape, for inference (deploy form) and training (forward + backward of the training form).

    PYTHONPATH=. python3 benchmarks/blocks.py --models shiftwise_v2_tiny unireplknet_t [--sw-impl bands]

Per stage: the sum over its blocks (ms) and the token mixer's share (the block's ``large_kernel`` / ``dwconv``
timed alone on the same input); then the whole model (its excess over the blocks: stem, downsamples, head).
bf16 autocast, channels_last, batch 128 (inference) / 64 (training), no stochastic depth. Writes
``$OUT/blocks.json`` when ``$OUT`` is set.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import timm
import torch
from _timing import cuda_graph_time  # benchmarks/ is the script directory
from models import SW_FORMS, deploy_form

MIXERS = ("large_kernel", "dwconv")


def _mixer(block: torch.nn.Module) -> torch.nn.Module | None:
    for name in MIXERS:
        if hasattr(block, name):
            return getattr(block, name)
    return None


def _time(run) -> float:
    if torch.cuda.is_available():
        return cuda_graph_time(run)
    run()   # CPU (a dry run of the script): one timed call
    t0 = time.perf_counter()
    run()
    return (time.perf_counter() - t0) * 1e3


def _infer(module: torch.nn.Module, x: torch.Tensor) -> float:
    @torch.no_grad()
    def run():
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return module(x)

    return _time(run)


def _train(module: torch.nn.Module, x: torch.Tensor) -> float:
    x = x.detach().requires_grad_()

    def run():
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            y = module(x)
        y.backward(torch.ones_like(y))   # param grads accumulate across calls: same work per call

    return _time(run)


def _stage_inputs(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The input of every stage (the downsample's output), computed once."""
    inputs = []
    with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16):
        for down, stage in zip(model.downsample_layers, model.stages):
            x = down(x)
            inputs.append(x.float().contiguous(memory_format=torch.channels_last))
            x = stage(x)
    return inputs


def profile_model(name: str, batch: int, train_batch: int, res: int, sw_impl: str, sw_form: str,
                  mode: str) -> dict:
    kwargs = {"drop_path_rate": 0.0}
    if name.startswith("shiftwise"):
        kwargs["impl"] = sw_impl
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = timm.create_model(name, num_classes=1000, **kwargs).to(device, memory_format=torch.channels_last)
    b = batch if mode == "infer" else train_batch
    x = torch.randn(b, 3, res, res, device=device).to(memory_format=torch.channels_last)
    if mode == "infer":
        model = deploy_form(name, model.eval(), sw_form)
    else:
        model.train()
    inputs = _stage_inputs(model, x)
    timer = _infer if mode == "infer" else _train
    stages = []
    for i, (stage, xs) in enumerate(zip(model.stages, inputs)):
        blocks, mixers = [], []
        for block in stage:
            blocks.append(timer(block, xs))
            mixer = _mixer(block)
            mixers.append(timer(mixer, xs) if mixer is not None and not isinstance(mixer, torch.nn.Identity) else 0.0)
        stages.append({"stage": i, "shape": list(xs.shape), "blocks_ms": round(sum(blocks), 4),
                       "mixers_ms": round(sum(mixers), 4), "per_block_ms": [round(t, 4) for t in blocks],
                       "per_mixer_ms": [round(t, 4) for t in mixers]})
    whole = timer(model, x)
    return {"model": name, "mode": mode, "batch": b, "sw_impl": sw_impl if name.startswith("shiftwise") else None,
            "sw_deploy": sw_form if name.startswith("shiftwise") else None, "model_ms": round(whole, 4),
            "stages": stages}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["shiftwise_v2_tiny", "unireplknet_t"])
    p.add_argument("--modes", nargs="+", default=["infer", "train"], choices=["infer", "train"])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--train-batch", type=int, default=64)
    p.add_argument("--res", type=int, default=224)
    p.add_argument("--sw-impl", nargs="+", default=["shiftadd"], choices=["shiftadd", "bands"])
    p.add_argument("--sw-deploy", nargs="+", default=["mixed"], choices=SW_FORMS)
    args = p.parse_args(argv)
    torch.backends.cudnn.benchmark = True
    import largekernel.models  # noqa: F401  (registers our models with timm)

    rows = []
    for name in args.models:
        for mode in args.modes:
            sw = name.startswith("shiftwise")
            combos = [(i, f) for i in (args.sw_impl if sw and mode == "train" else args.sw_impl[:1])
                      for f in (args.sw_deploy if sw and mode == "infer" else args.sw_deploy[:1])]
            for impl, form in combos:
                t0 = time.time()
                try:
                    row = profile_model(name, args.batch, args.train_batch, args.res, impl, form, mode)
                except Exception as err:   # report and go on
                    row = {"model": name, "mode": mode, "error": f"{type(err).__name__}: {str(err)[:300]}"}
                row["wall_s"] = round(time.time() - t0, 1)
                rows.append(row)
                print(json.dumps(row), flush=True)
                torch.cuda.empty_cache()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    meta = {"gpu": gpu, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "rows": rows}
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "blocks.json"), "w") as f:
            json.dump(meta, f, indent=1)
    print(f"\n{meta['gpu']}, bf16 autocast, channels_last, {args.res}px; ms of GPU time (CUDA-graph replay)")
    print("| model | mode | stage ms (blocks / of which mixers) | sum of blocks | whole model |")
    print("|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['mode']} | error: {r['error'][:100]} | | |")
            continue
        label = r["model"] + (f" ({r['sw_impl'] if r['mode'] == 'train' else r['sw_deploy']})" if r["sw_impl"] else "")
        cells = " ; ".join(f"{s['blocks_ms']:.2f} / {s['mixers_ms']:.2f}" for s in r["stages"])
        total = sum(s["blocks_ms"] for s in r["stages"])
        print(f"| {label} | {r['mode']} | {cells} | {total:.2f} | {r['model_ms']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

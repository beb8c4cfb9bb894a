"""ERF timing (and the paper's comparison) on the GPU: seconds for N images per model, plus area ratios.

    PYTHONPATH=. python3 benchmarks/erf.py [--models replknet_31b resnet101] [--num-images 50] [--input-size 224]
        [--batch-size 25] [--images skimage|FOLDER] [--repeats 2]

Random weights (no download; ResNets without timm's zero-init of the last BN); pass
``--checkpoint MODEL=PATH`` for trained ones. Uses :func:`largekernel.analysis.erf.run_erf` (forward +
backward of the central point, batched); the first repeat includes cuDNN autotuning / Triton compilation,
the printed time is the best repeat. Writes heat maps, the combined figure and ``erf_ratios.json`` to
``$OUT/erf`` (or ``--out-dir``) and ``erf_bench.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from largekernel.analysis.erf import build_model, format_table, run_erf


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["replknet_31b", "resnet101"])
    p.add_argument("--num-images", type=int, default=50)
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=25)
    p.add_argument("--images", default="skimage")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--checkpoint", action="append", default=[], metavar="MODEL=PATH")
    p.add_argument("--keep-zero-init", action="store_true",
                   help="keep timm's zero-init of ResNet's last BN per block (random ResNets then have no "
                        "active residual branch, so their ERF is only the downsampling path)")
    p.add_argument("--out-dir", default=os.path.join(os.environ.get("OUT", "."), "erf"))
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ckpts = dict(item.split("=", 1) for item in args.checkpoint)
    timings: dict[str, list[float]] = {}
    last: dict[str, dict] = {}
    for name in args.models:
        kwargs = {}
        if name.startswith(("resnet", "resnext")) and not args.keep_zero_init and name not in ckpts:
            kwargs["zero_init_last"] = False
        model = build_model(name, ckpts.get(name), **kwargs).to(device)
        for r in range(args.repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            res = run_erf({name: model}, images=args.images, num_images=args.num_images,
                          input_size=args.input_size, batch_size=args.batch_size, device=device,
                          out_dir=args.out_dir if r == args.repeats - 1 else None, verbose=False)
            timings.setdefault(name, []).append(time.perf_counter() - t0)
        last[name] = res[name]
        print(f"{name}: {min(timings[name]):.2f}s for {args.num_images} images at {args.input_size} on {device} "
              f"(ERF part {res[name]['seconds']:.2f}s; all repeats {[round(t, 2) for t in timings[name]]})",
              flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(format_table({n: r["ratios"] for n, r in last.items()}))
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "erf_bench.json"), "w") as f:
        json.dump({"device": str(torch.cuda.get_device_name() if device.type == "cuda" else "cpu"),
                   "num_images": args.num_images, "input_size": args.input_size, "batch_size": args.batch_size,
                   "seconds_best": {n: min(t) for n, t in timings.items()},
                   "erf_seconds_last": {n: r["seconds"] for n, r in last.items()},
                   "ratios": {n: r["ratios"] for n, r in last.items()}}, f, indent=2)


if __name__ == "__main__":
    main()

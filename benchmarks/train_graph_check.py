"""``largekernel train --cuda-graph`` on the GPU: the same run (same seed, same batches) eager and with the update
replayed from a CUDA graph; the losses must agree and the graphed epoch should be faster.

    PYTHONPATH=. python3 benchmarks/train_graph_check.py [--model replknet_micro] [--steps 100] [--batch 32]

Two epochs of ``--steps`` updates each (bf16 autocast, channels_last), the embedded Pathfinder data. Compares the first
ten step losses (the first three updates are eager in both runs; the rest differ only by the capturable optimizer's
arithmetic, amplified by bf16 roundings), how far apart the final weights are against how far training moved them
(exit status 1 above 0.2), and the second epoch's wall time (the first holds compilation, tuning and the capture).
Writes ``$OUT/train_graph_check.json`` when ``$OUT`` is set.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time

import torch

from largekernel.train import TrainConfig, prepare, train


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="replknet_micro")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    out: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                 "model": args.model, "batch": args.batch, "steps": args.steps}
    with tempfile.TemporaryDirectory() as tmp:
        base = TrainConfig(model=args.model, device="cuda", epochs=2, steps_per_epoch=args.steps,
                           batch_size=args.batch, train_samples=args.steps * args.batch, val_samples=256,
                           amp="bf16", channels_last=True, reparam=False, progress=False, output=tmp)
        # the runs' initial weights (prepare() seeds and builds the model as train() does)
        init = {k: v.detach().float().cpu() for k, v in prepare(base)[0].state_dict().items()}
        params = {}
        for graph in (False, True):
            result = train(dataclasses.replace(base, cuda_graph=graph, name=f"graph{int(graph)}"))
            key = "graph" if graph else "eager"
            params[key] = {k: v.detach().float().cpu() for k, v in result.model.state_dict().items()}
            out[key] = {"losses": result.step_losses[:10], "epoch_s": [r["epoch_time_s"] for r in result.history],
                        "last_loss": result.history[-1]["train_loss"],
                        "val_top1": result.history[-1].get("val_top1")}
    first = [abs(g - e) / abs(e) for g, e in zip(out["graph"]["losses"], out["eager"]["losses"])]
    out["max_rel_diff_first_10"] = max(first)
    # did the replays apply the same updates? distance between the runs' final weights against how far training moved
    # them (a replay with a stale learning rate or lost gradients would put this near 1)
    keys = [k for k in init if init[k].is_floating_point()]
    moved = sum(float((params["eager"][k] - init[k]).norm() ** 2) for k in keys) ** 0.5
    apart = sum(float((params["graph"][k] - params["eager"][k]).norm() ** 2) for k in keys) ** 0.5
    out["weights_apart_over_moved"] = apart / moved
    out["speedup_epoch2"] = out["eager"]["epoch_s"][-1] / out["graph"]["epoch_s"][-1]
    print(json.dumps(out, indent=1))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "train_graph_check.json"), "w") as f:
            json.dump(out, f, indent=1)
    return 0 if out["weights_apart_over_moved"] < 0.2 else 1


if __name__ == "__main__":
    raise SystemExit(main())

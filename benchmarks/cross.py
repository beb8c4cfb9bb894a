"""The shift-wise deploy forms of SW-tiny's token mixers, one layer at a time: the cross op (a k x D plus a D x k
depthwise conv, ``cross_depthwise_conv2d``) with each of its candidates forced, against the square D x D depthwise
conv and UniRepLKNet-T's mixers at the same shape (13 x 13 through our kernels, 3 x 3 through cuDNN).

    PYTHONPATH=. python3 benchmarks/cross.py [--batch 128] [--stages 0,1,2,3]

GPU time per call (ms, CUDA-graph replays), bf16, channels_last, inference (no autograd), random weights: the SW-tiny
stage shapes C = 80 / 160 / 320 / 640 at 56 / 28 / 14 / 7 px with D = 51 / 53 / 49 / 17 (the dense sizes of the
big kernels 51 / 49 / 47 / 13 with small kernel 3). Writes ``$OUT/cross.json`` when ``$OUT`` is set.
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F
from _timing import cuda_graph_time  # benchmarks/ is the script directory

from largekernel.ops import cross_depthwise_conv2d, depthwise_conv2d
from largekernel.ops import depthwise as dw

STAGES = [(80, 56, 51), (160, 28, 53), (320, 14, 49), (640, 7, 17)]   # (C, H = W, D)


def _time(fn) -> float:
    with torch.no_grad():
        return cuda_graph_time(fn)


def bench_stage(batch: int, c: int, hw: int, d: int, k: int = 3) -> dict:
    dt = torch.bfloat16
    x = torch.randn(batch, c, hw, hw, device="cuda", dtype=dt).contiguous(memory_format=torch.channels_last)
    wh = torch.randn(c, 1, k, d, device="cuda", dtype=dt)
    wv = torch.randn(c, 1, d, k, device="cuda", dtype=dt)
    square = torch.randn(c, 1, d, d, device="cuda", dtype=dt)
    w13, w3 = torch.randn(c, 1, 13, 13, device="cuda", dtype=dt), torch.randn(c, 1, 3, 3, device="cuda", dtype=dt)
    b = torch.randn(c, device="cuda", dtype=dt)
    row = dict(shape=(batch, c, hw, hw), d=d)
    row["cross_tuned"] = _time(lambda: cross_depthwise_conv2d(x, wh, wv, b))
    row["cross_pick"] = next(v for key, v in dw.tuned_choices().items() if key[0] == "cross" and key[2] == x.shape)
    row["square_tuned"] = _time(lambda: depthwise_conv2d(x, square, b))
    row["unirep_13x13"] = _time(lambda: depthwise_conv2d(x, w13, b))
    row["unirep_3x3_cudnn"] = _time(lambda: F.conv2d(x, w3, b, padding=1, groups=c))
    cands = {}
    for cand in dw._cross_candidates(x):
        dw.CROSS_CFG = cand
        try:
            cands[json.dumps(cand, sort_keys=True)] = _time(lambda: cross_depthwise_conv2d(x, wh, wv, b))
        except Exception as e:  # noqa: BLE001 - a configuration that does not launch: say why, go on
            cands[json.dumps(cand, sort_keys=True)] = repr(e)[:160]
        finally:
            dw.CROSS_CFG = {}
    row["candidates"] = cands
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--stages", default="0,1,2,3")
    args = ap.parse_args()
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    rows = []
    for s in (int(i) for i in args.stages.split(",")):
        row = bench_stage(args.batch, *STAGES[s])
        rows.append(row)
        print(f"stage {s + 1} {row['shape']} D={row['d']}: cross {row['cross_tuned']:.4f} ms ({row['cross_pick']}), "
              f"square {row['square_tuned']:.4f}, UniRepLKNet-T 13x13 {row['unirep_13x13']:.4f} / 3x3 cuDNN "
              f"{row['unirep_3x3_cudnn']:.4f}", flush=True)
        for cand, ms in row["candidates"].items():
            print(f"    {cand}: {ms if isinstance(ms, str) else f'{ms:.4f} ms'}", flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "cross.json"), "w") as f:
            json.dump(rows, f, indent=1, default=str)


if __name__ == "__main__":
    main()

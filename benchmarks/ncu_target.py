"""A small program for Nsight Compute: each depthwise pass of a few shapes with one fixed kernel configuration.

    ncu --clock-control none -k regex:_dw_ --section SpeedOfLight --section Occupancy --section WarpStateStats \
        python3 benchmarks/ncu_target.py [--only NAME]

Each case compiles once (a first call), then calls its pass twice; profile with ``--launch-skip`` / ``-c`` as
needed. The configurations are the tuner's picks of the last GPU run (docs/performance.md).
"""
from __future__ import annotations

import argparse

import torch

import largekernel.ops.depthwise as dwmod
from largekernel.ops import _dw_kernels as K

CASES = {  # name: (dtype, N, C, H, K, pass, cfg)
    "plane14": (torch.bfloat16, 64, 512, 14, 27, "fwd",
                dict(plane=True, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, num_warps=8)),
    "plane7": (torch.bfloat16, 64, 1024, 7, 13, "fwd",
               dict(plane=True, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4)),
    "row56": (torch.bfloat16, 64, 128, 56, 31, "fwd",
              dict(BLOCK_M=128, BLOCK_W=64, BLOCK_U=32, num_warps=8, num_stages=2, prefetch=True)),
    "row56f32": (torch.float32, 64, 128, 56, 31, "fwd",
                 dict(BLOCK_M=128, BLOCK_W=64, BLOCK_U=32, num_warps=8, num_stages=2, prefetch=True)),
    "wgrad14": (torch.bfloat16, 64, 512, 14, 27, "wgrad", dict(NB=4, programs=4224, num_warps=4, prefetch=False)),
    "wgrad56": (torch.bfloat16, 64, 128, 56, 31, "wgrad", dict(BLOCK_V=32, programs=2112, num_warps=4, num_stages=2)),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    for name, (dt, n, c, h, k, kind, cfg) in CASES.items():
        if args.only and name not in args.only.split(","):
            continue
        x = torch.randn(n, c, h, h, device="cuda", dtype=dt)
        w = torch.randn(c, k, k, device="cuda", dtype=dt)
        y = torch.empty_like(x)
        prec = dwmod._precision(dt)
        for _ in range(3):
            if kind == "fwd":
                K.launch_fwd(x, w, None, y, k // 2, k // 2, cfg, prec, False)
            else:
                K.launch_wgrad(x, x, k, k, k // 2, k // 2, cfg, prec, False)
        torch.cuda.synchronize()
        print(name, "done", flush=True)


if __name__ == "__main__":
    main()

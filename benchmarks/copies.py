"""The copies around our kernels at SW-tiny's four stage shapes: channels_last fp32 -> row-major bf16 planes (v11's
``padded_rows``) and back (``from_padded_rows`` at 56 / 28 px, ``to_memory_format`` at 14 / 7 px), against the split
into convolved and passed-through planes (``split_rows``, with the ghost channels' scale) and its merge
(``merge_rows``), per tile configuration; 20 calls replayed from a CUDA graph (no host time), microseconds per call
and GB/s, and PyTorch's fp32 copy of the same tensor for scale.

    PYTHONPATH=. python3 benchmarks/copies.py [--batch 128]
"""
from __future__ import annotations

import argparse

import torch
from _timing import cuda_graph_time  # benchmarks/ is the script directory

import largekernel.ops.layout as L
from largekernel.ops.depthwise import _channel_table


def graph_us(fn) -> float:
    """Microseconds per call, 20 calls replayed from a CUDA graph (no host time)."""
    return cuda_graph_time(fn, calls=20) * 1e3


def stage(c: int, h: int, align: int, batch: int) -> None:
    """One stage shape: every copy at each tile configuration, printed."""
    r = int(c * 0.77) // 2 * 2   # SW-tiny's rep channels
    x = torch.randn(batch, c, h, h, device="cuda").to(memory_format=torch.channels_last)
    plane, _ = _channel_table(torch.randperm(c, device="cuda")[:r].sort().values, c)
    affine = torch.randn(c - r, device="cuda"), torch.randn(c - r, device="cuda")
    gb_in, gb_out = x.numel() * 6 / 1e9, x.numel() * 4 / 1e9   # fp32 read + bf16 write; bf16 read + write
    for tile in ((), (64, 64, 4), (128, 32, 4)):
        L.PADDED_TILE = tile
        rows = L.padded_rows(x, align, torch.bfloat16)
        dense = rows.contiguous()
        mine, rest = L.split_rows(x, plane, r, align, torch.bfloat16, affine)
        t_in = graph_us(lambda: L.padded_rows(x, align, torch.bfloat16))
        t_out = graph_us(lambda rows=rows, dense=dense: L.from_padded_rows(rows, torch.channels_last)
                         if align == 16 else L.to_memory_format(dense, torch.channels_last))
        t_split = graph_us(lambda: L.split_rows(x, plane, r, align, torch.bfloat16, affine))
        t_merge = graph_us(lambda mine=mine, rest=rest: L.merge_rows(mine, rest, plane))
        name = tile or L._tile(rows.shape[2] * rows.stride(2))
        print(f"C{c} {h}px tile {name}: in {t_in:.1f} ({gb_in / t_in * 1e6:.0f}) out {t_out:.1f} "
              f"({gb_out / t_out * 1e6:.0f}) | split {t_split:.1f} ({gb_in / t_split * 1e6:.0f}) merge "
              f"{t_merge:.1f} ({gb_out / t_merge * 1e6:.0f})", flush=True)
    L.PADDED_TILE = ()
    y = torch.empty_like(x)
    t_copy = graph_us(lambda: y.copy_(x))
    print(f"  PyTorch fp32 copy {t_copy:.1f} ({x.numel() * 8 / t_copy / 1e3:.0f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}; us per call (GB/s)")
    for c, h, align in ((80, 56, 16), (160, 28, 16), (320, 14, 2), (640, 7, 2)):
        stage(c, h, align, args.batch)


if __name__ == "__main__":
    main()

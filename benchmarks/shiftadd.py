"""Shift-add and shift-wise layer benchmark (CUDA): fused Triton shift-add vs the copy ceiling, SW layer vs
its dense-equivalent large depthwise conv.

    PYTHONPATH=. python3 benchmarks/shiftadd.py [--batch 64] [--dtypes float32,bfloat16] [--quick] [--sweep]

Shapes: the four SW-tiny stages at 224 (C 80/160/320/640 at 56/28/14/7, kernels 51/49/47/13 from 3x3, ghost
ratio 0.23, N_rep 4). For each:

* shift-add forward / backward (Triton) and the PyTorch reference: HBM bytes = read y (B, R*nk, H+2, W+2) +
  write the three terms (3, B, R, H, W) (backward: the reverse), y in the layer's training layout (rows padded to
  the tensor-core tile, ``shift_add_col_pad``; the pad columns' bytes are not counted); GB/s and % of the
  measured device-to-device copy bandwidth (``clone`` of y: bytes read + written) and of the 2.96 TB/s H100
  anchor; the write-only bandwidth (``fill_`` of y in the training layout: the backward's ceiling, which writes
  y's bytes and reads a sixth as many); the fused inference epilogue (``shift_add_eval``: read y and x, write
  the (B, C, H, W) output).
* the SW layer, inference (eval, no grad): merged form with the fused shift-add pass, the ``bands``
  implementation (k x D + D x k depthwise convs built from the small kernels), and the deploy forms
  ``to_dense("square")`` (one D x D depthwise conv) and ``to_dense("cross")`` (k x D + D x k convs), all
  through ``largekernel.ops.depthwise_conv2d``; training fwd+bwd: ``impl="shiftadd"`` (official structure),
  ``impl="bands"``, and the square dense depthwise conv as a plain trainable large kernel.

``--sweep`` instead times every tuner candidate of the three kernels (``_triton_shiftadd.FORCE``) on the four
stages next to the copy, checks each against the float64/float32 reference, then the tuned pick; writes
``$OUT/shiftadd_sweep.json``. A candidate that fails to compile or run is recorded and skipped; past
``--time-limit`` seconds the remaining ones are skipped.

Before timing, the Triton shift-add is checked against the reference on the GPU (forward and backward).
Median of >= 20 CUDA-event-timed runs after warm-up. Prints a table; writes ``$OUT/shiftadd.json`` if $OUT.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch
import torch.nn.functional as F
from _timing import cuda_queued_time, cuda_time  # benchmarks/ is the script directory

import largekernel.ops._triton_shiftadd as kernels
from largekernel.layers.shiftwise import ShiftwiseConv2d
from largekernel.ops.dispatch import use_backend
from largekernel.ops.shiftadd import shift_add, shift_add_col_pad, shift_add_reference

COPY_ANCHOR_GBS = 2960.0
# (C, H=W, big kernel, small kernel): SW-tiny stages
SHAPES = [(80, 56, 51, 3), (160, 28, 49, 3), (320, 14, 47, 3), (640, 7, 13, 3)]


def check_gpu_correctness(device: torch.device) -> dict:
    """Triton vs reference (float32 and float64) on a small SW-shaped case; relative errors."""
    out = {}
    layer = ShiftwiseConv2d(40, 25, 3, ghost_ratio=0.23, n_rep=4)
    for dtype in (torch.float32, torch.float64):
        y = torch.randn(2, layer.rep_channels * layer.nk, 20, 22, device=device, dtype=dtype, requires_grad=True)
        pad, ident = layer.pad_hv.to(device), layer.idx_identity.to(device)
        with use_backend("triton"):
            got = shift_add(y, pad, ident, 1)
        gout = torch.randn_like(got)
        (g_got,) = torch.autograd.grad(got, y, gout)
        want = shift_add_reference(y, pad, ident, 1)
        (g_want,) = torch.autograd.grad(want, y, gout)
        out[str(dtype).split(".")[-1]] = {
            "fwd_rel": float((got - want).detach().norm() / want.detach().norm()),
            "bwd_rel": float((g_got - g_want).norm() / g_want.norm()),
        }
    # the layer in training on the Triton path (y rows padded to the tensor-core tile) vs the native path
    layer = ShiftwiseConv2d(40, 25, 3, ghost_ratio=0.23, n_rep=4).to(device).train()
    x = torch.randn(4, 40, 30, 30, device=device, requires_grad=True)
    grads = {}
    for backend in ("triton", "native"):
        with use_backend(backend):
            got = layer(x)
        gout = torch.randn(got.shape, device=device, generator=torch.Generator(device).manual_seed(0))
        grads[backend] = (got, *torch.autograd.grad(got, (x, layer.LoRAs[0].weight), gout))
    out["layer_train_fp32"] = {name: float((a - b).norm() / b.norm())
                               for name, a, b in zip(("y", "dx", "dw"), grads["triton"], grads["native"])}
    return out


def bench_shape(c: int, hw: int, big: int, small: int, batch: int, dtype: torch.dtype,
                device: torch.device) -> dict:
    layer = ShiftwiseConv2d(c, big, small, ghost_ratio=0.23, n_path=2, n_rep=4).to(device)
    r, nk, e = layer.rep_channels, layer.nk, layer.extra_pad
    esize = torch.finfo(dtype).bits // 8
    y = torch.randn(batch, r * nk, hw + 2 * e, hw + 2 * e, device=device, dtype=dtype)
    cp = shift_add_col_pad(hw + 2 * e)   # the training layout: rows padded to the tensor-core tile
    y_rows = F.pad(y, (cp, cp))
    gout = torch.randn(3, batch, r, hw, hw, device=device, dtype=dtype)
    pad, ident = layer.pad_hv, layer.idx_identity
    moved = (y.numel() + gout.numel()) * esize
    row = {"C": c, "H": hw, "K": big, "k": small, "R": r, "nk": nk, "dtype": str(dtype).split(".")[-1],
           "batch": batch, "bytes_MB": moved / 1e6}

    copy_ms = cuda_queued_time(lambda: y.clone())
    row["copy_GBs"] = 2 * y.numel() * esize / copy_ms / 1e6
    # the write-only ceiling of the backward: filling a tensor of y's training layout (no reads)
    row["fill_GBs"] = y_rows.numel() * esize / cuda_queued_time(lambda: y_rows.fill_(0.5)) / 1e6

    fwd = torch.ops.largekernel.shift_add
    bwd = torch.ops.largekernel.shift_add_backward
    row["sa_fwd_ms"] = cuda_queued_time(lambda: fwd(y_rows, pad, ident, e, cp))
    row["sa_bwd_ms"] = cuda_queued_time(lambda: bwd(gout, pad, ident, e, cp))
    # fused inference epilogue: reads y and x, writes the (B, C, H, W) output
    x = torch.randn(batch, c, hw, hw, device=device, dtype=dtype)
    scale, bias = torch.rand(3, r, device=device), torch.rand(r, device=device)
    ev = torch.ops.largekernel.shift_add_eval
    row["eval_ms"] = cuda_queued_time(lambda: ev(y, pad, ident, e, scale, bias, x, layer.rep_idx, layer.ghost_idx))
    row["eval_GBs"] = (y.numel() + 2 * x.numel()) * esize / row["eval_ms"] / 1e6
    row["eval_pct_copy"] = 100 * row["eval_GBs"] / row["copy_GBs"]
    row["ref_fwd_ms"] = cuda_time(lambda: shift_add_reference(y, pad, ident, e), min_runs=5, budget_ms=100)
    for key in ("sa_fwd", "sa_bwd"):
        gbs = moved / row[f"{key}_ms"] / 1e6
        row[f"{key}_GBs"] = gbs
        row[f"{key}_pct_copy"] = 100 * gbs / row["copy_GBs"]
        row[f"{key}_pct_anchor"] = 100 * gbs / COPY_ANCHOR_GBS

    # the layer: inference forms and training implementations, vs its dense equivalent
    layer = layer.to(dtype)
    forms = {}
    merged = copy.deepcopy(layer).eval()
    merged.reparameterize()
    forms["shiftadd"] = merged  # fused shift-add inference pass
    forms["bands"] = copy.deepcopy(merged)
    forms["bands"].impl = "bands"  # k x D + D x k depthwise convs from the small kernels
    forms["square"] = copy.deepcopy(merged)
    forms["square"].to_dense("square")
    forms["cross"] = copy.deepcopy(merged)
    forms["cross"].to_dense("cross")
    row["D"] = merged.dense_size
    with torch.no_grad():
        for name, module in forms.items():
            row[f"infer_{name}_ms"] = cuda_time(lambda m=module: m(x))
    xg = x.clone().requires_grad_()

    def train_step(module):
        def run():
            out = module(xg)
            out.backward(torch.ones_like(out))
        return run

    bands = copy.deepcopy(layer).train()
    bands.impl = "bands"
    square = forms["square"].train()
    for name, module in (("shiftadd", layer.train()), ("bands", bands), ("square", square)):
        row[f"train_{name}_ms"] = cuda_time(train_step(module))
    return row


SWEEP_OPS = ("fwd", "bwd", "eval")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def sweep_shape(c: int, hw: int, big: int, small: int, batch: int, dtype: torch.dtype, device: torch.device,
                deadline: float, cands: list | None = None, padded: bool = True) -> dict:
    """Every candidate of the forward, backward and eval kernels on one stage, timed and checked. ``padded``: the
    forward reads (and the backward writes) y in the layer's training layout, rows padded to the tensor-core
    tile (:func:`shift_add_col_pad`); the bytes counted are those of the plain y all the same."""
    layer = ShiftwiseConv2d(c, big, small, ghost_ratio=0.23, n_path=2, n_rep=4)
    r, nk, e = layer.rep_channels, layer.nk, layer.extra_pad
    esize = torch.finfo(dtype).bits // 8
    pad = layer.pad_hv.to(device=device, dtype=torch.int32).contiguous()
    ident = layer.idx_identity.to(device=device, dtype=torch.int32).contiguous()
    rep_idx, ghost_idx = layer.rep_idx.to(device), layer.ghost_idx.to(device)
    cp = shift_add_col_pad(hw + 2 * e) if padded else 0
    y_rows = torch.randn(batch, r * nk, hw + 2 * e, hw + 2 * e + 2 * cp, device=device, dtype=dtype)
    if cp:
        y_rows[..., :cp] = 0
        y_rows[..., -cp:] = 0
    y = y_rows[..., cp:cp + hw + 2 * e].contiguous()   # plain rows: the references and the fused eval pass
    gout = torch.randn(3, batch, r, hw, hw, device=device, dtype=dtype)
    x = torch.randn(batch, c, hw, hw, device=device, dtype=dtype)
    scale, bias = torch.rand(3, r, device=device), torch.rand(r, device=device)
    # references in float32 (float64 would double the memory of the largest stage)
    yr = y.detach().float().requires_grad_()  # an alias of y for float32: detached first
    t_ref = shift_add_reference(yr, pad, ident, e)
    (gy_ref,) = torch.autograd.grad(t_ref, yr, gout.float())
    t_ref = t_ref.detach()
    ev_ref = (t_ref * scale.view(3, 1, r, 1, 1)).sum(0) + bias.view(1, r, 1, 1) + x.float()[:, rep_idx]
    ev_ref = torch.cat([ev_ref, x.float()[:, ghost_idx]], 1)
    del yr
    moved = (y.numel() + gout.numel()) * esize
    calls = {
        "fwd": (lambda: kernels.shift_add_forward(y_rows, pad, ident, e, cp), t_ref, moved),
        "bwd": (lambda: kernels.shift_add_backward(gout, pad, ident, e, cp), F.pad(gy_ref, (cp, cp)), moved),
        "eval": (lambda: kernels.shift_add_eval_forward(y, pad, ident, e, scale, bias, x, rep_idx, ghost_idx),
                 ev_ref, (y.numel() + 2 * x.numel()) * esize),
    }
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    copy_ms = cuda_queued_time(lambda: y.clone())
    copy_gbs = 2 * y.numel() * esize / copy_ms / 1e6
    row = {"C": c, "H": hw, "K": big, "R": r, "nk": nk, "dtype": str(dtype).split(".")[-1], "batch": batch,
           "col_pad": cp, "copy_ms": copy_ms, "copy_GBs": copy_gbs, "cands": [], "tuned": {}}
    fwd_cands, bwd_cands = kernels.candidates(hw, hw, e, cp), kernels.candidates(hw + 2 * e, hw + 2 * e, 0, cp)
    for index in list(cands if cands is not None else range(kernels.N_CANDIDATES)) + [None]:
        entry = {"index": index}
        if index is not None:
            entry["fwd_name"] = kernels.candidate_name(fwd_cands[index])
            entry["bwd_name"] = kernels.candidate_name(bwd_cands[index])
        kernels.FORCE = index
        for op in SWEEP_OPS:
            fn, ref, nbytes = calls[op]
            if time.time() > deadline:
                entry[op] = {"error": "skipped (time limit)"}
                continue
            try:
                err = _rel(fn(), ref)
                ms = cuda_queued_time(fn)
                gbs = nbytes / ms / 1e6
                entry[op] = {"ms": ms, "GBs": gbs, "pct_copy": 100 * gbs / copy_gbs, "rel_err": err,
                             "ok": err <= tol}
            except Exception as exc:  # compile/launch failure of one candidate: record it, go on
                lines = str(exc).strip().splitlines() or [""]
                entry[op] = {"error": f"{type(exc).__name__}: {lines[0][:200]}"}
        kernels.FORCE = None
        if index is None:
            g = ident.shape[1]
            key_f = ("fwd", batch, r, hw, hw, nk, g, e, dtype, cp)
            key_b = ("bwd", batch, r, hw, hw, nk, g, e, dtype, cp)
            key_e = ("eval", batch, r, c, hw, hw, nk, g, e, dtype, dtype)
            for op, key in (("fwd", key_f), ("bwd", key_b), ("eval", key_e)):
                pick = kernels._TUNED.get(key)
                row["tuned"][op] = kernels.candidate_name(pick) if pick else None
            row["auto"] = entry
        else:
            row["cands"].append(entry)
    return row


def print_sweep(rows: list[dict]) -> None:
    for row in rows:
        print(f"\n{row['dtype']} C{row['C']} H{row['H']} K{row['K']} R{row['R']} nk{row['nk']} batch {row['batch']} "
              f"col_pad {row['col_pad']}: copy {row['copy_ms']:.3f} ms = {row['copy_GBs']:.0f} GB/s")
        best = {}
        for op in SWEEP_OPS:
            ok = [e for e in row["cands"] if "ms" in e[op] and e[op]["ok"]]
            best[op] = min(ok, key=lambda e, op=op: e[op]["ms"])["index"] if ok else None
        print(f"{'#':>2} {'fwd/eval cand':16}{'bwd cand':16}" + "".join(f"{op + ' ms':>10}{'GB/s':>7}{'%cp':>4} "
                                                                       for op in SWEEP_OPS))
        for e in row["cands"] + [row["auto"]]:
            label = (f"{e['index']:>2} {e['fwd_name']:16}{e['bwd_name']:16}" if e["index"] is not None
                     else f"{'':>2} {'tuned: ' + str(row['tuned'].get('fwd')):16}{str(row['tuned'].get('bwd')):16}")
            cells = []
            for op in SWEEP_OPS:
                r = e[op]
                if "ms" not in r:
                    cells.append(f"{r['error'][:21]:>21} ")
                    continue
                mark = "*" if e["index"] is not None and e["index"] == best[op] else ("!" if not r["ok"] else " ")
                cells.append(f"{r['ms']:>10.3f}{r['GBs']:>7.0f}{r['pct_copy']:>4.0f}{mark}")
            print(label + "".join(cells))
    print("\n* fastest correct candidate; ! rel. error above tolerance; %cp = % of the copy bandwidth (y.clone())")


def run_sweep(args, device: torch.device, batch: int, dtypes: list) -> None:
    start = time.time()
    deadline = start + args.time_limit
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton_version(),
              "batch": batch, "rows": []}
    for dtype in dtypes:
        for c, hw, big, small in SHAPES:
            result["rows"].append(sweep_shape(c, hw, big, small, batch, dtype, device, deadline,
                                              [int(i) for i in args.cands.split(",")] if args.cands else None,
                                              not args.plain_rows))
            print(".", end="", flush=True)
            torch.cuda.empty_cache()
    result["seconds"] = time.time() - start
    print_sweep(result["rows"])
    print(f"sweep took {result['seconds']:.0f} s")
    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(os.path.join(out_dir, "shiftadd_sweep.json"), "w") as f:
            json.dump(result, f, indent=1)


def triton_version() -> str:
    import triton

    return triton.__version__


LAYER_COLS = ["infer_shiftadd", "infer_bands", "infer_square", "infer_cross", "train_shiftadd", "train_bands",
              "train_square"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--quick", action="store_true", help="batch 16, float32 only")
    parser.add_argument("--sweep", action="store_true", help="time every tuner candidate of the shift-add kernels")
    parser.add_argument("--time-limit", type=float, default=200.0, help="--sweep: skip what is left after this (s)")
    parser.add_argument("--cands", default=None, help="--sweep: comma-separated candidate indices (default: all)")
    parser.add_argument("--plain-rows", action="store_true",
                        help="--sweep: y rows without the training layout's pad columns")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/shiftadd.py needs a CUDA device")
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    batch = 16 if args.quick else args.batch
    dtypes = [torch.float32] if args.quick else [getattr(torch, d) for d in args.dtypes.split(",")]
    if args.sweep:
        return run_sweep(args, device, batch, dtypes)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "correctness": check_gpu_correctness(device), "rows": []}
    print("GPU correctness (Triton vs reference):", json.dumps(result["correctness"]))
    rows = []
    for dtype in dtypes:
        for c, hw, big, small in SHAPES:
            row = bench_shape(c, hw, big, small, batch, dtype, device)
            rows.append(row)
            # each stage as soon as it is measured (a call cut short by its time limit keeps what it printed)
            print(f"\n{row['dtype']} C{c} H{hw}: fwd {row['sa_fwd_ms']:.3f} ms ({row['sa_fwd_pct_copy']:.0f}% copy), "
                  f"bwd {row['sa_bwd_ms']:.3f} ms ({row['sa_bwd_pct_copy']:.0f}%); layer ms "
                  + ", ".join(f"{col} {row[col + '_ms']:.3f}" for col in LAYER_COLS), flush=True)
    result["rows"] = rows
    print(f"\nshift-add op, batch {batch} (GB/s = HBM bytes / time; %copy of the measured copy bandwidth)")
    print(f"{'dtype':9}{'C':>5}{'H':>4}{'K':>4}{'MB':>8}{'copy GB/s':>10}{'fill GB/s':>10}{'fwd ms':>8}{'fwd GB/s':>9}"
          f"{'%copy':>6}"
          f"{'bwd ms':>8}{'bwd GB/s':>9}{'%copy':>6}{'eval ms':>8}{'%copy':>6}{'ref fwd ms':>11}")
    for row in rows:
        print(f"{row['dtype']:9}{row['C']:>5}{row['H']:>4}{row['K']:>4}{row['bytes_MB']:>8.1f}"
              f"{row['copy_GBs']:>10.0f}{row['fill_GBs']:>10.0f}{row['sa_fwd_ms']:>8.3f}{row['sa_fwd_GBs']:>9.0f}"
              f"{row['sa_fwd_pct_copy']:>6.0f}{row['sa_bwd_ms']:>8.3f}{row['sa_bwd_GBs']:>9.0f}"
              f"{row['sa_bwd_pct_copy']:>6.0f}{row['eval_ms']:>8.3f}{row['eval_pct_copy']:>6.0f}"
              f"{row['ref_fwd_ms']:>11.2f}")
    print(f"\nSW layer, batch {batch}, ms: inference (no grad, eval) and training fwd+bwd")
    print(f"{'dtype':9}{'C':>5}{'H':>4}{'K':>4}{'D':>4}" + "".join(f"{col:>15}" for col in LAYER_COLS))
    for row in rows:
        print(f"{row['dtype']:9}{row['C']:>5}{row['H']:>4}{row['K']:>4}{row['D']:>4}"
              + "".join(f"{row[col + '_ms']:>15.3f}" for col in LAYER_COLS))
    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(os.path.join(out_dir, "shiftadd.json"), "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

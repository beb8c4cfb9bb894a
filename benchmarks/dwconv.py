"""Depthwise 'same' conv benchmark: our Triton path vs PyTorch native (best of NCHW / channels_last).

    PYTHONPATH=. python3 benchmarks/dwconv.py [--batch 64] [--dtypes float32,bfloat16] [--quick]

Times the forward and forward+backward (output, input grad, weight grad: 3 passes; ``torch.autograd.grad``)
of batch-64 RepLKNet-31B stage shapes, K=51 and 3/7/13 kernels. Median of >= 20 CUDA-event-timed runs
after warm-up. Effective TFLOP/s counts 2*kh*kw*C*H*W*N per pass. Prints a table and, when $OUT is set,
writes ``$OUT/dwconv.json``.
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F
from _timing import cuda_graph_time, cuda_time  # benchmarks/ is the script directory

# (C, H=W, kh, kw)
SHAPES = [(128, 56, 31, 31), (256, 28, 29, 29), (512, 14, 27, 27), (1024, 7, 13, 13), (128, 56, 51, 51),
          (128, 56, 3, 3), (128, 56, 7, 7), (128, 56, 13, 13), (128, 56, 51, 5), (128, 56, 5, 51)]


def flops(n: int, c: int, h: int, kh: int, kw: int) -> float:
    return 2.0 * kh * kw * c * h * h * n


def _native(x, w, b):
    return F.conv2d(x, w, b, padding="same", groups=w.shape[0])


def _ours(x, w, b):
    """What a model layer runs: the public dispatch point with the Triton path forced (eager: the kernels through
    an autograd.Function; until commit 6293f21 this called the custom op, whose Python wrapper adds ~0.4 ms to a
    forward+backward)."""
    from largekernel.ops import depthwise_conv2d, use_backend

    with use_backend("triton"):
        return depthwise_conv2d(x, w, b)


def time_impl(fn, x, w, b, graph: bool = False) -> tuple[float, float]:
    """(fwd ms, fwd+bwd ms) of fn on leaf tensors x, w, b that require grad. Default: wall time of one call
    (CUDA events around it, CPU launch cost included); graph: GPU time per call (CUDA graph replay)."""
    timer = cuda_graph_time if graph else cuda_time
    with torch.no_grad():
        t_fwd = timer(lambda: fn(x, w, b))
    g = torch.randn_like(fn(x, w, b))

    def step():
        y = fn(x, w, b)
        torch.autograd.grad(y, (x, w, b), g)

    return t_fwd, timer(step)


def make_inputs(n, c, h, kh, kw, dtype, channels_last=False):
    x = torch.randn(n, c, h, h, device="cuda", dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.randn(c, 1, kh, kw, device="cuda", dtype=dtype) / (kh * kw) ** 0.5)
    b = torch.randn(c, device="cuda", dtype=dtype)
    return x.requires_grad_(), w.requires_grad_(), b.requires_grad_()


def _native_rows(path: str) -> dict:
    with open(path) as f:
        data = json.load(f)
    rows = data.get("bench", data.get("rows", []))
    return {(r["dtype"], r["C"], r["H"], r["kh"], r["kw"]): r for r in rows}


def run(batch: int = 64, dtypes=("float32", "bfloat16"), shapes=SHAPES, ours_cl: bool = False,
        native_from: str | None = None, graph: bool = False) -> list[dict]:
    """Time ours and native per shape. native_from: take the native columns from an earlier run's JSON
    (same script, same GPU kind) instead of timing them again."""
    import largekernel.ops  # noqa: F401  (registers the op)

    old = _native_rows(native_from) if native_from else None
    torch.backends.cudnn.benchmark = old is None
    rows = []
    for dt_name in dtypes:
        dt = getattr(torch, dt_name)
        for (c, h, kh, kw) in shapes:
            x, w, b = make_inputs(batch, c, h, kh, kw, dt)
            xc = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
            row = dict(dtype=dt_name, C=c, H=h, kh=kh, kw=kw, N=batch, gflop_pass=flops(batch, c, h, kh, kw) / 1e9)
            if old is not None:
                prev = old[(dt_name, c, h, kh, kw)]
                row.update({k: prev[k] for k in prev if k.startswith("native")}, native_source=native_from)
            else:
                nat = [time_impl(_native, x, w, b), time_impl(_native, xc, w, b)]
                row.update(native_nchw_fwd=nat[0][0], native_nchw_fwdbwd=nat[0][1],
                           native_cl_fwd=nat[1][0], native_cl_fwdbwd=nat[1][1],
                           native_fwd=min(nat[0][0], nat[1][0]), native_fwdbwd=min(nat[0][1], nat[1][1]))
            ours = time_impl(_ours, x, w, b)
            row.update(ours_fwd=ours[0], ours_fwdbwd=ours[1])
            if graph and old is None:   # GPU time without launch cost; native in its faster layout per column
                fwd_x = x if row["native_nchw_fwd"] <= row["native_cl_fwd"] else xc
                fb_x = x if row["native_nchw_fwdbwd"] <= row["native_cl_fwdbwd"] else xc
                for name, fn, xf, xb in (("native", _native, fwd_x, fb_x), ("ours", _ours, x, x)):
                    try:
                        row[f"{name}_gpu_fwd"] = time_impl(fn, xf, w, b, graph=True)[0]
                        row[f"{name}_gpu_fwdbwd"] = time_impl(fn, xb, w, b, graph=True)[1]
                    except Exception as e:  # noqa: BLE001 - a capture failure is reported, not fatal
                        row[f"{name}_gpu_error"] = repr(e)[:300]
            if ours_cl:
                oc = time_impl(_ours, xc, w, b)
                row.update(ours_cl_fwd=oc[0], ours_cl_fwdbwd=oc[1])
            rows.append(row)
            if os.environ.get("OUT"):   # survives a timeout, with the tuner's picks and timings so far
                with open(os.path.join(os.environ["OUT"], "dwconv_partial.json"), "w") as f:
                    json.dump(dict(rows=rows, tuned=tuned(), tuning_log=tuning_log()), f, indent=1)
            del x, w, b, xc
            torch.cuda.empty_cache()
            print(format_row(row), flush=True)
    return rows


def tuned() -> dict:
    from largekernel.ops.depthwise import tuned_choices

    return {str(k): v for k, v in tuned_choices().items()}


def tuning_log() -> dict:
    from largekernel.ops.depthwise import tuned_choices

    return {str(k): [[str(c), t] for c, t in v] for k, v in tuned_choices(with_times=True).items()}


HEADER = ("| dtype | C | H | K | native fwd ms | ours fwd ms | TFLOP/s | x | native f+b ms | ours f+b ms | "
          "TFLOP/s | x | GPU-time fwd x | GPU-time f+b x |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def format_row(r: dict) -> str:
    gf = r["gflop_pass"]
    k = f"{r['kh']}" if r["kh"] == r["kw"] else f"{r['kh']}x{r['kw']}"
    return (f"| {r['dtype']} | {r['C']} | {r['H']} | {k} | {r['native_fwd']:.3f} | {r['ours_fwd']:.3f} | "
            f"{gf / r['ours_fwd']:.1f} | {r['native_fwd'] / r['ours_fwd']:.1f} | {r['native_fwdbwd']:.2f} | "
            f"{r['ours_fwdbwd']:.3f} | {3 * gf / r['ours_fwdbwd']:.1f} | {r['native_fwdbwd'] / r['ours_fwdbwd']:.1f} |"
            + (f" {r['native_gpu_fwd'] / r['ours_gpu_fwd']:.1f} | {r['native_gpu_fwdbwd'] / r['ours_gpu_fwdbwd']:.1f} |"
               if "ours_gpu_fwd" in r and "native_gpu_fwd" in r else ""))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--quick", action="store_true", help="the four RepLKNet stage shapes only")
    ap.add_argument("--native-from", default=None, help="JSON of an earlier run to take native timings from")
    ap.add_argument("--graph", action="store_true", help="also GPU time per call (CUDA graph replay, no launch cost)")
    ap.add_argument("--shapes", default=None, help="comma-separated indices into SHAPES (default: all)")
    args = ap.parse_args()
    shapes = SHAPES[:4] if args.quick else SHAPES
    if args.shapes:
        shapes = [SHAPES[int(i)] for i in args.shapes.split(",")]
    rows = run(args.batch, tuple(args.dtypes.split(",")), shapes, native_from=args.native_from, graph=args.graph)
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, batch {args.batch}")
    print(HEADER)
    for r in rows:
        print(format_row(r))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "dwconv.json"), "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows, tuned=tuned(),
                           tuning_log=tuning_log()),
                      f, indent=1)


if __name__ == "__main__":
    main()

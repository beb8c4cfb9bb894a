"""Where a model's training step (or inference) spends its GPU time: torch.profiler's kernel table.

    PYTHONPATH=. python3 benchmarks/profile_model.py --model replknet_31b [--infer] [--layout NCHW] [--tuning]

Two warm-up steps (they compile and tune the depthwise kernels), then 3 profiled steps; prints the top kernels by
total CUDA time and the step's CPU and CUDA totals (--tuning: every depthwise pass's tuning log too). Random
inputs, bf16 autocast, SGD, batch 64 (train) or 128.
"""
from __future__ import annotations

import argparse

import timm
import torch
from models import SW_FORMS, deploy_form, infer_step, train_step  # benchmarks/ is the script directory
from torch.profiler import ProfilerActivity, profile


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="replknet_31b")
    ap.add_argument("--infer", action="store_true")
    ap.add_argument("--layout", default="channels_last", choices=["channels_last", "NCHW"])
    ap.add_argument("--rows", type=int, default=30)
    ap.add_argument("--sort", default="cuda", choices=["cuda", "cpu"], help="rank ops by total CUDA or self CPU time")
    ap.add_argument("--tuning", action="store_true", help="also print every depthwise pass's tuning log")
    ap.add_argument("--sw-deploy", default="merged", choices=SW_FORMS,
                    help="shift-wise models: the deploy form profiled with --infer (see models.py)")
    args = ap.parse_args()
    fmt = torch.channels_last if args.layout == "channels_last" else torch.contiguous_format
    model = timm.create_model(args.model, num_classes=1000).cuda().to(memory_format=fmt)
    batch = 128 if args.infer else 64
    x = torch.randn(batch, 3, 224, 224, device="cuda").to(memory_format=fmt)
    y = torch.randint(0, 1000, (batch,), device="cuda")
    if args.infer:
        step = infer_step(deploy_form(args.model, model.eval(), args.sw_deploy), x)
    else:
        step = train_step(model, x, y)

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    sort_by = "cuda_time_total" if args.sort == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort_by, row_limit=args.rows, max_name_column_width=70))
    if not args.tuning:
        return
    from largekernel.ops import depthwise

    for key, log in depthwise.tuned_choices(with_times=True).items():   # every depthwise pass's tuning
        best = min((t for _, t in log if isinstance(t, float)), default=float("nan"))
        print(key[0], tuple(key[2]), key[3], f"best {best:.4f} ms", [(c, t if isinstance(t, str) else round(t, 4))
                                                                     for c, t in log])


if __name__ == "__main__":
    main()

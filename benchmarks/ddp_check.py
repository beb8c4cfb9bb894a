"""DDP check: 2 processes (torchrun) vs 1 process at the same global batch must give the same loss curve.

    PYTHONPATH=. python benchmarks/ddp_check.py --gpus 2          # on a machine with 2 GPUs

Both runs use the same seed, the same seeded DistributedSampler order (the global batch of step s holds the same
images), no augmentation (its symmetry draw comes from each process's own RNG), SyncBN (on CUDA; a CPU dry
run has per-process BN), no drop path and fp32, so the only differences are reduction order and cuDNN non-determinism.
Prints the per-step losses side by side and the max relative difference; writes ``$OUT/ddp_check.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def run(nproc: int, batch: int, out: Path, args: argparse.Namespace) -> list[float]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port", "29533",
           "-m", "largekernel.cli", "train", "--model", args.model, "--data", "pathfinder",
           "--train-samples", str(args.samples), "--val-samples", "256", "--epochs", "1",
           "--batch-size", str(batch), "--seed", "0", "--drop-path", "0", "--amp", "none", "--device", args.device,
           "--sync-bn" if args.device == "cuda" else "--no-sync-bn", "--no-reparam", "--no-progress",
           "--output", str(out), "--name", f"p{nproc}",
           "--warmup-epochs", "0.2", "--data-kwargs", "augment=False"]
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
        raise SystemExit(f"{nproc}-process run failed ({proc.returncode})")
    return json.loads((out / f"p{nproc}" / "metrics.json").read_text())["step_losses"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--model", default="replknet_micro")
    p.add_argument("--global-batch", type=int, default=64)
    p.add_argument("--samples", type=int, default=3200)
    p.add_argument("--device", default="cuda", help="cuda (NCCL) or cpu (gloo, for a dry run)")
    p.add_argument("--tol-first", type=float, default=1e-3,
                   help="max relative difference of each of the first 3 steps (same weights, same batch)")
    p.add_argument("--tol-mean", type=float, default=0.05,
                   help="max relative difference of the 10-step means (later steps drift apart: training "
                        "amplifies the reduction-order rounding, as it does between two 1-process runs)")
    args = p.parse_args()
    out = Path(os.environ.get("OUT") or tempfile.mkdtemp())
    single = run(1, args.global_batch, out, args)
    multi = run(args.gpus, args.global_batch // args.gpus, out, args)
    n = min(len(single), len(multi))
    rel = [abs(a - b) / max(abs(a), 1e-12) for a, b in zip(single[:n], multi[:n])]
    print(f"step | 1 process | {args.gpus} processes | rel diff")
    for i in range(0, n, max(n // 10, 1)):
        print(f"{i:4d} | {single[i]:.6f} | {multi[i]:.6f} | {rel[i]:.2e}")
    means = [(sum(single[i:i + 10]) / 10, sum(multi[i:i + 10]) / 10) for i in range(0, n - 9, 10)]
    rel_means = [abs(a - b) / abs(a) for a, b in means]
    ok = len(single) == len(multi) and max(rel[:3]) <= args.tol_first and max(rel_means) <= args.tol_mean
    summary = dict(model=args.model, global_batch=args.global_batch, gpus=args.gpus, steps=n,
                   max_rel_diff_first3=max(rel[:3]), max_rel_diff_10step_means=max(rel_means),
                   max_rel_diff=max(rel), mean_rel_diff=sum(rel) / n, final_single=single[-1], final_multi=multi[-1],
                   tol_first=args.tol_first, tol_mean=args.tol_mean, ok=ok, single=single, multi=multi)
    (out / "ddp_check.json").write_text(json.dumps(summary, indent=1))
    print(f"steps {n}: first 3 steps max rel diff {max(rel[:3]):.2e} (tol {args.tol_first}), 10-step means "
          f"{max(rel_means):.2e} (tol {args.tol_mean}), any step {max(rel):.2e} -> {'OK' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

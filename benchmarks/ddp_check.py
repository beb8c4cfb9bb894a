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
    p.add_argument("--tol", type=float, default=0.02, help="max relative difference of any step's loss")
    args = p.parse_args()
    out = Path(os.environ.get("OUT") or tempfile.mkdtemp())
    single = run(1, args.global_batch, out, args)
    multi = run(args.gpus, args.global_batch // args.gpus, out, args)
    n = min(len(single), len(multi))
    rel = [abs(a - b) / max(abs(a), 1e-12) for a, b in zip(single[:n], multi[:n])]
    print(f"step | 1 process | {args.gpus} processes | rel diff")
    for i in range(0, n, max(n // 10, 1)):
        print(f"{i:4d} | {single[i]:.6f} | {multi[i]:.6f} | {rel[i]:.2e}")
    ok = len(single) == len(multi) and max(rel) <= args.tol
    summary = dict(model=args.model, global_batch=args.global_batch, gpus=args.gpus, steps=n,
                   max_rel_diff=max(rel), mean_rel_diff=sum(rel) / n, final_single=single[-1], final_multi=multi[-1],
                   tol=args.tol, ok=ok, single=single, multi=multi)
    (out / "ddp_check.json").write_text(json.dumps(summary, indent=1))
    print(f"steps {n}: max rel diff {max(rel):.2e}, mean {summary['mean_rel_diff']:.2e} -> {'OK' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

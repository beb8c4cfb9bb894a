import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def randomize_bn(model: torch.nn.Module, generator: torch.Generator | None = None) -> torch.nn.Module:
    """Give every BN non-trivial running statistics and affine parameters (never the identity defaults)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=generator) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=generator) * 1.0 + 0.5)
                m.bias.copy_(torch.randn(n, generator=generator) * 0.2)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def run_interpreted(script: str, shards: int = 1) -> dict:
    """Run ``script`` (a test module's ``__main__``) in fresh interpreters with ``TRITON_INTERPRET=1`` (Triton
    reads it at import, so it cannot be set inside this process) and return the JSON it prints last.

    ``shards`` > 1 starts that many processes at once, each with ``LARGEKERNEL_SHARD=i/shards`` (the script runs
    its share of the checks, see :func:`shard_of`), and merges their results; "seed" becomes the shards' seeds."""
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs = []
    for i in range(shards):
        env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", LARGEKERNEL_SHARD=f"{i}/{shards}")
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(script)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    merged, seeds = {}, []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err[-3000:]
            part = json.loads(out.strip().splitlines()[-1])
            seeds.append(part.pop("seed", None))
            merged.update(part)
    finally:
        for proc in procs:
            proc.kill()
    merged["seed"] = seeds[0] if shards == 1 else seeds
    return merged


def shard_of(items: list) -> list:
    """The items this process checks: every n-th from i, for ``LARGEKERNEL_SHARD=i/n`` (all without it)."""
    i, n = (int(v) for v in os.environ.get("LARGEKERNEL_SHARD", "0/1").split("/"))
    return items[i::n]

"""CUDA-event timing shared by the benchmark scripts."""
from __future__ import annotations

import statistics
from collections.abc import Callable

import torch


def cuda_time(fn: Callable[[], object], min_runs: int = 20, budget_ms: float = 300.0, warmup: int = 3) -> float:
    """Median ms of ``fn`` over ``max(min_runs, budget_ms / estimate)`` (at most 200) CUDA-event-timed runs,
    after ``warmup`` untimed ones (compilation, autotuning). ``budget_ms=0`` times exactly ``min_runs`` runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(end), 1e-3)
    runs = max(min_runs, min(200, int(budget_ms / est)))
    times = []
    for _ in range(runs):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)

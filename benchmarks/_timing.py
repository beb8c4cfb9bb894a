"""CUDA-event timing shared by the benchmark scripts."""
from __future__ import annotations

import statistics
from collections.abc import Callable

import torch


def cuda_time(fn: Callable[[], object], min_runs: int = 20, budget_ms: float = 300.0, warmup: int = 3) -> float:
    """Median ms of ``fn`` over ``max(min_runs, budget_ms / estimate)`` (at most 200) CUDA-event-timed runs,
    after ``warmup`` untimed ones (compilation, autotuning). ``budget_ms=0`` times exactly ``min_runs`` runs. Each run
    starts on an idle GPU, so the host's launch time is inside the window: for kernels of ~0.1 ms use
    :func:`cuda_queued_time` (or :func:`cuda_graph_time`)."""
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


def cuda_queued_time(fn: Callable[[], object], calls: int = 10, repeats: int = 7,
                     sleep_cycles: int = 4_000_000) -> float:
    """GPU time per call of ``fn`` (ms) without the CPU launch cost, for work that cannot be captured in a CUDA graph
    (one-time tuning, caches): the GPU is kept busy (``torch.cuda._sleep``) while ``calls`` back-to-back calls are
    queued behind it, then runs them; median over ``repeats``. ``fn`` is run twice first."""
    fn()
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(sleep_cycles)
        s.record()
        for _ in range(calls):
            fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / calls)
    return statistics.median(times)


def cuda_graph_time(fn: Callable[[], object], calls: int = 10, replays: int = 7) -> float:
    """GPU time per call of ``fn`` (ms) without the CPU launch cost: ``calls`` calls captured in one CUDA graph,
    median of ``replays`` timed replays. ``fn`` is run twice first (compilation, one-time tuning, cuDNN
    autotuning happen outside the capture)."""
    fn()
    fn()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        graph.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / calls)
    del graph
    return statistics.median(times)

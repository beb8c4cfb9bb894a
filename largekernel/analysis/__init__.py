"""Analysis tools: effective receptive field (RepLKNet's method) and model complexity."""
from largekernel.analysis.complexity import complexity, count_flops, count_macs, count_params, measure_latency
from largekernel.analysis.erf import area_ratio, area_ratios, compute_erf, erf_main, run_erf, scale_erf

__all__ = [
    "area_ratio", "area_ratios", "complexity", "compute_erf", "count_flops", "count_macs", "count_params",
    "erf_main", "measure_latency", "run_erf", "scale_erf",
]

"""Reproducible experiments: RepLKNet's five guidelines (``run_guideline(n, quick=False)``)."""
from largekernel.experiments.guidelines import guidelines_main, run_guideline

__all__ = ["guidelines_main", "run_guideline"]

"""``largekernel guidelines N``: the CLI plug-in (``HELP``, ``add_arguments``, ``run``) around
:mod:`largekernel.experiments.guidelines`."""
from __future__ import annotations

import argparse

from largekernel.experiments.guidelines import add_guidelines_args, guidelines_from_args

HELP = "RepLKNet's five design guidelines as small reproducible experiments (tables, plots, JSON)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_guidelines_args(parser)


def run(args: argparse.Namespace) -> int:
    guidelines_from_args(args)
    return 0

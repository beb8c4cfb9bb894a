"""``largekernel erf``: CLI plug-in (``HELP``, ``add_arguments``, ``run``) around :mod:`largekernel.analysis.erf`."""
from __future__ import annotations

import argparse

from largekernel.analysis.erf import add_erf_args, erf_from_args

HELP = "effective receptive field (RepLKNet's method) of timm models: heat maps, area-ratio table + JSON"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_erf_args(parser)


def run(args: argparse.Namespace) -> int:
    erf_from_args(args)
    return 0

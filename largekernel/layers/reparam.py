"""The one structural re-parameterization protocol: modules own ``reparameterize()`` (timm's convention)."""
from __future__ import annotations

import copy

import torch.nn as nn


def _walk(module: nn.Module, method: str) -> None:
    # Parents first: a block merging its branches needs its children's BNs intact.
    for child in list(module.children()):
        fn = getattr(child, method, None)
        if callable(fn):
            fn()
        _walk(child, method)


def reparameterize(model: nn.Module, inplace: bool = False, fold_bn: bool = False) -> nn.Module:
    """Return the deploy form of ``model``: every module with ``reparameterize()`` merges its branches.

    ``fold_bn=True`` additionally folds each remaining conv-BN pair (``fold_bn()``) where that is exact.
    The result is put in eval mode; outputs equal the training form's eval outputs.
    """
    if not inplace:
        model = copy.deepcopy(model)
    fn = getattr(model, "reparameterize", None)
    if callable(fn):
        fn()
    _walk(model, "reparameterize")
    if fold_bn:
        _walk(model, "fold_bn")
    return model.eval()

"""``create_model``: timm's factory with a clear error for unknown names."""
from __future__ import annotations

import difflib
from typing import Any

import timm
import torch.nn as nn


def create_model(model_name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` for any registered model (ours or timm's); unknown names raise ``ValueError``."""
    base = model_name.split(".", 1)[0]
    if not timm.is_model(base):
        close = difflib.get_close_matches(base, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model name {model_name!r}{hint}")
    return timm.create_model(model_name, pretrained=pretrained, **kwargs)

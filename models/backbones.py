"""Backbones come from timm only, so every exported backbone is rebuildable by plain timm
from ``(architecture, model_args)``."""
from __future__ import annotations

from typing import Any

import timm
import torch.nn as nn


def create_backbone(name: str, **model_args: Any) -> nn.Module:
    """A timm model without classifier (``num_classes=0``): ``forward`` returns pooled features
    of size ``model.num_features``."""
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:10]
        raise KeyError(f"model.backbone: '{name}' is not a timm model. Similar: {', '.join(close)}")
    return timm.create_model(name, pretrained=False, num_classes=0, **model_args)

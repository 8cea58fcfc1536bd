"""What every video method shares: the per-frame backbone call, the error a clip too short for a
pretext task raises, and the check of data.clip_frames against the frames a method needs.

A video method sets ``input_kind = "clip"`` (``models.method.Method``); its ``views`` are
``num_views`` tensors of shape ``(B, T, 3, H, W)``: B clips of T frames, evenly spaced in time
and in time order, augmented consistently across the frames of a clip. The backbone is a plain
2-D timm image model applied to every frame, so the exported backbone works on images and on
frames alike.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn as nn

from ssl_foundry.models.method import Method


def require_frames(method: str, frames: int, needed: int, why: str, args: str) -> None:
    """Raise the error a too-short clip gives: which data key to raise, which method args to lower."""
    if frames < needed:
        raise ValueError(f"{method}: {why} needs clips of at least {needed} frames, got T={frames}: "
                         f"raise data.clip_frames to {needed} or more, or lower {args}")


def min_clip_frames(method_cls: type[Method], method_args: dict[str, Any]) -> int:
    """The fewest frames per clip that video method ``method_cls`` needs with ``method_args`` (its
    signature's defaults filled in), from its ``frames_needed(args)``. For a config check of
    data.clip_frames before any process starts."""
    params = inspect.signature(method_cls.__init__).parameters
    args = {name: p.default for name, p in params.items() if p.default is not inspect.Parameter.empty}
    return method_cls.frames_needed({**args, **method_args})


def encode_frames(backbone: nn.Module, clips: torch.Tensor) -> torch.Tensor:
    """The image backbone on every frame, in one call: ``(B, T, C, H, W) -> (B, T, F)``.

    One call over the ``B * T`` frames, so BatchNorm statistics are those of all frames of the
    batch (as the per-frame Siamese towers of TCN / Shuffle and Learn see them)."""
    return backbone(clips.flatten(0, 1)).unflatten(0, clips.shape[:2])


def select_frames(clips: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Frames ``index[b, k]`` of clip ``b``: ``(B, T, ...)`` and ``(B, K)`` -> ``(B, K, ...)``."""
    rows = torch.arange(clips.shape[0], device=clips.device).unsqueeze(1)
    return clips[rows, index.to(clips.device)]

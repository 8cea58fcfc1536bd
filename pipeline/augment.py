"""The augmentation recipe is data (``data.views`` in the config: per view, a list of
``{op, p, args}``); a backend compiles it. This module is the torchvision-v2 backend; the DALI
backend (issue 4) compiles the same spec. An op a backend cannot do is an error at build time
that names the op and the backend.

Every view ends with ``to float + normalize(mean, std)``, appended here rather than written
in each recipe.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torchvision.transforms import v2

from launch.config import AugmentOp, ConfigError, ViewSpec


def _pair(value: Any) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value, value)


# op name -> factory(**args) returning a transform that always applies (p is handled by the
# compiler). Argument names and meanings are the spec's, shared with the DALI backend.
TORCH_OPS: dict[str, Callable[..., Callable]] = {
    "random_resized_crop": lambda size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3): v2.RandomResizedCrop(
        _pair(size), scale=tuple(scale), ratio=tuple(ratio), antialias=True
    ),
    "resize": lambda size: v2.Resize(_pair(size), antialias=True),
    "center_crop": lambda size: v2.CenterCrop(_pair(size)),
    "horizontal_flip": lambda: v2.RandomHorizontalFlip(p=1.0),
    "color_jitter": lambda brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0: v2.ColorJitter(
        brightness, contrast, saturation, hue
    ),
    "grayscale": lambda: v2.Grayscale(num_output_channels=3),
    "gaussian_blur": lambda kernel_size, sigma=(0.1, 2.0): v2.GaussianBlur(kernel_size, sigma=tuple(sigma)),
    "solarize": lambda threshold=128: v2.RandomSolarize(threshold, p=1.0),
}


def _compile_op(op: AugmentOp, backend: str, ops: dict[str, Callable[..., Callable]]) -> Callable:
    if op.op not in ops:
        raise ConfigError(
            f"augmentation op '{op.op}' is not available on the {backend} backend. "
            f"Available: {', '.join(sorted(ops))}"
        )
    try:
        transform = ops[op.op](**op.args)
    except TypeError as err:
        raise ConfigError(f"augmentation op '{op.op}': bad args {op.args} ({err})") from None
    if not 0.0 <= op.p <= 1.0:
        raise ConfigError(f"augmentation op '{op.op}': p={op.p} is not a probability")
    if op.p == 0.0:
        return v2.Identity()
    return transform if op.p == 1.0 else v2.RandomApply([transform], p=op.p)


def build_view_transform(view: ViewSpec, mean: list[float], std: list[float]) -> Callable:
    """uint8 (3, H, W) tensor -> float (3, h, w) normalised view."""
    steps = [_compile_op(op, "torch", TORCH_OPS) for op in view.ops]
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(steps)


class MultiViewTransform:
    """Applies every view of the spec to one image: returns the list of views in spec order
    (a view with ``count: 2`` contributes two independently augmented views)."""

    def __init__(self, views: list[ViewSpec], mean: list[float], std: list[float]):
        self.transforms = [build_view_transform(v, mean, std) for v in views for _ in range(v.count)]

    def __call__(self, image: torch.Tensor) -> list[torch.Tensor]:
        return [t(image) for t in self.transforms]


def eval_transform(image_size: int, mean: list[float], std: list[float]) -> MultiViewTransform:
    """Deterministic single view for feature extraction: resize, normalise."""
    resize = AugmentOp(op="resize", args={"size": image_size})
    return MultiViewTransform([ViewSpec(count=1, ops=[resize])], mean, std)

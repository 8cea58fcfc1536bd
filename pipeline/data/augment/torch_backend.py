"""The torchvision-v2 backend of the augmentation spec (``pipeline.data.augment.spec``): uint8
(3, H, W) tensors in, normalised float views out, one sample at a time in loader workers."""
from __future__ import annotations

from typing import Callable

import torch
from torchvision.transforms import v2

from ssl_foundry.pipeline.data.augment import spec
from ssl_foundry.pipeline.data.augment.spec import AugmentOp, ViewSpec

BACKEND = "torch"

# op name -> params -> a transform that always applies (p is RandomApply's, added below).
TORCH_OPS: dict[str, Callable[..., Callable]] = {
    "random_resized_crop": lambda a: v2.RandomResizedCrop(a.size, scale=a.scale, ratio=a.ratio, antialias=True),
    "resize": lambda a: v2.Resize(a.size, antialias=True),
    "center_crop": lambda a: v2.CenterCrop(a.size),
    "horizontal_flip": lambda a: v2.RandomHorizontalFlip(p=1.0),
    "color_jitter": lambda a: v2.ColorJitter(a.brightness, a.contrast, a.saturation, a.hue),
    "grayscale": lambda a: v2.Grayscale(num_output_channels=3),
    "gaussian_blur": lambda a: v2.GaussianBlur(a.kernel_size, sigma=a.sigma),
    "solarize": lambda a: v2.RandomSolarize(a.threshold, p=1.0),
}


def _with_probability(transform: Callable, p: float) -> Callable:
    return transform if p == 1.0 else v2.RandomApply([transform], p=p)


def build_view_transforms(views: list[ViewSpec], mean: list[float], std: list[float]) -> list[Callable]:
    """One transform per output view: uint8 (3, H, W) -> float (3, h, w), normalised."""
    tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return [v2.Compose([_with_probability(make(step.params), step.p) for step, make in steps] + tail)
            for steps in spec.compile_views(views, BACKEND, TORCH_OPS)]


class MultiViewTransform:
    """Applies every view of the spec to one image: returns the list of views in spec order
    (a view with ``count: 2`` contributes two independently augmented views)."""

    def __init__(self, views: list[ViewSpec], mean: list[float], std: list[float]):
        self.transforms = build_view_transforms(views, mean, std)

    def __call__(self, image: torch.Tensor) -> list[torch.Tensor]:
        return [t(image) for t in self.transforms]


def eval_views(image_size: int) -> list[ViewSpec]:
    """Deterministic single view for feature extraction: resize."""
    return [ViewSpec(count=1, ops=[AugmentOp(op="resize", args={"size": image_size})])]


def eval_transform(image_size: int, mean: list[float], std: list[float]) -> MultiViewTransform:
    return MultiViewTransform(eval_views(image_size), mean, std)

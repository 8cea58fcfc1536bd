"""The NVIDIA DALI backend of the augmentation spec (``pipeline.data.augment.spec``).

``augment_views`` builds the part of a DALI pipeline graph that turns a batch of decoded images
(HWC uint8) into the recipe's normalised CHW float views. The graph is the same on both
devices: with GPU images (``fn.decoders.image(device="mixed")``, nvJPEG) every op runs on the
GPU, with CPU images (``device="cpu"``) on DALI's CPU backend. Random parameters are drawn per
sample by ``fn.random.*`` (CPU argument inputs, as DALI requires); an op applied with
probability ``p`` sits in a DALI conditional (``if fn.random.coin_flip(...)``), which splits
the batch so that only the chosen samples pay for the op. The pipeline must therefore be
defined with ``enable_conditionals=True``.

Spec op -> DALI ops (torchvision's behaviour reproduced where DALI's default differs):

- random_resized_crop: ``fn.random_resized_crop`` (random_area, random_aspect_ratio, antialias)
- resize: ``fn.resize`` (antialias); center_crop: ``fn.crop`` (out_of_bounds_policy="pad")
- horizontal_flip: ``fn.flip(horizontal=1)``
- color_jitter: brightness ``fn.brightness_contrast(brightness=f)``; contrast as torchvision
  does it, a blend with the image's mean grey level (``fn.color_space_conversion`` to GRAY,
  ``fn.reductions.mean``, arithmetic), not DALI's fixed contrast centre; saturation
  ``fn.hsv(saturation=f)`` (DALI's linear YIQ transform: with hue 0 it is exactly torchvision's
  blend with the luma image); hue an exact HSV hue rotation in DALI arithmetic (``fn.hsv``'s hue
  is a YIQ rotation, up to ~60 grey levels away from torchvision's at 0.1 turn). The parts are
  applied in a random order per sample, as torchvision does (a permutation id per sample,
  ``fn.lookup_table`` and conditionals).
- grayscale: ``fn.color_space_conversion(output_type=GRAY)`` concatenated to 3 channels
- gaussian_blur: ``fn.gaussian_blur(window_size, sigma=fn.random.uniform)``
- solarize: arithmetic (``where(x >= t, 255 - x, x)`` as masks, like DALI's auto_aug)
- every view ends with ``fn.crop_mirror_normalize`` (float, CHW, (x / 255 - mean) / std).
"""
from __future__ import annotations

import itertools
from typing import Any, Callable

import nvidia.dali.math as dmath
from nvidia.dali import fn, types
from nvidia.dali.data_node import DataNode

from ssl_foundry.pipeline.data.augment import spec
from ssl_foundry.pipeline.data.augment.spec import ViewSpec

BACKEND = "dali"


def _uniform(low: float, high: float) -> DataNode | float:
    """A per-sample float drawn uniformly from [low, high] (a CPU argument input); the constant
    itself for an empty range (``fn.random.uniform`` refuses one, e.g. a fixed blur sigma)."""
    return low if low == high else fn.random.uniform(range=[low, high])


def _random_resized_crop(images: DataNode, a: spec.RandomResizedCrop) -> DataNode:
    return fn.random_resized_crop(images, size=list(a.size), random_area=list(a.scale),
                                  random_aspect_ratio=list(a.ratio), antialias=True)


def _resize(images: DataNode, a: spec.Resize) -> DataNode:
    return fn.resize(images, size=list(a.size), antialias=True)


def _center_crop(images: DataNode, a: spec.CenterCrop) -> DataNode:
    return fn.crop(images, crop=list(a.size), out_of_bounds_policy="pad")


def _horizontal_flip(images: DataNode, a: spec.HorizontalFlip) -> DataNode:
    return fn.flip(images, horizontal=1)


def _grey(images: DataNode) -> DataNode:
    """HW1 uint8 luma (ITU-R 601, the weights torchvision uses)."""
    return fn.color_space_conversion(images, image_type=types.RGB, output_type=types.GRAY)


def _contrast(images: DataNode, factor: DataNode) -> DataNode:
    """torchvision's adjust_contrast: blend with the mean grey level of each image."""
    centre = fn.reductions.mean(fn.cast(_grey(images), dtype=types.FLOAT))
    blended = centre + factor * (fn.cast(images, dtype=types.FLOAT) - centre)
    return fn.cast(dmath.clamp(blended, 0.0, 255.0), dtype=types.UINT8)


def _hue(images: DataNode, turns: DataNode) -> DataNode:
    """torchvision's adjust_hue: RGB -> HSV, hue + ``turns``, -> RGB; the hexagonal HSV hue as
    arithmetic (``h6`` in sixths of a turn; HSV -> RGB as ``v - v s clamp(min(k, 4 - k), 0, 1)``
    with ``k = (n + h6) mod 6``, n = 5, 3, 1 for R, G, B)."""
    rgb = fn.cast(images, dtype=types.FLOAT)
    r, g, b = rgb[:, :, 0], rgb[:, :, 1], rgb[:, :, 2]
    value = dmath.max(dmath.max(r, g), b)
    chroma = value - dmath.min(dmath.min(r, g), b)  # v s
    divisor = chroma + (chroma == 0)  # grey pixels: no hue, and no division by 0
    red_max = value == r
    green_max = (value == g) & (red_max ^ True)
    blue_max = (red_max | green_max) ^ True
    h6 = (red_max * ((g - b) / divisor) + green_max * (2 + (b - r) / divisor)
          + blue_max * (4 + (r - g) / divisor) + 6 * turns)

    def channel(n: int) -> DataNode:
        k = n + h6
        k = k - 6 * dmath.floor(k / 6)
        return value - chroma * dmath.clamp(dmath.min(k, 4 - k), 0.0, 1.0)

    return fn.cast(fn.stack(channel(5), channel(3), channel(1), axis=2, axis_name="C"), dtype=types.UINT8)


def _jitter_parts(a: spec.ColorJitter) -> list[Callable[[DataNode], DataNode]]:
    """The adjustments the spec turns on, each drawing its own factor per sample."""
    parts = []
    if a.brightness:
        parts.append(lambda x: fn.brightness_contrast(x, brightness=_uniform(*a.factor_range("brightness"))))
    if a.contrast:
        parts.append(lambda x: _contrast(x, _uniform(*a.factor_range("contrast"))))
    if a.saturation:
        parts.append(lambda x: fn.hsv(x, saturation=_uniform(*a.factor_range("saturation"))))
    if a.hue:
        parts.append(lambda x: _hue(x, _uniform(-a.hue, a.hue)))
    return parts


def _color_jitter(images: DataNode, a: spec.ColorJitter) -> DataNode:
    """The parts in a random order per sample: a permutation id drawn per sample; at each slot,
    the conditional of the part that permutation puts there."""
    parts = _jitter_parts(a)
    orders = list(itertools.permutations(range(len(parts))))
    order = fn.random.uniform(values=list(range(len(orders))), dtype=types.INT32)
    for slot in range(len(parts)):
        chosen = fn.lookup_table(order, keys=list(range(len(orders))), values=[o[slot] for o in orders],
                                 dtype=types.INT32)
        for index, part in enumerate(parts):
            if chosen == index:  # a DALI conditional: only these samples run this part
                images = part(images)
    return images


def _grayscale(images: DataNode, a: spec.Grayscale) -> DataNode:
    grey = _grey(images)
    return fn.cat(grey, grey, grey, axis=2)


def _gaussian_blur(images: DataNode, a: spec.GaussianBlur) -> DataNode:
    return fn.gaussian_blur(images, window_size=a.kernel_size, sigma=_uniform(*a.sigma))


def _solarize(images: DataNode, a: spec.Solarize) -> DataNode:
    above = images >= a.threshold
    return fn.cast(above * (255 - images) + (above ^ True) * images, dtype=types.UINT8)


# op name -> (images, params) -> images: the op always applied (p is handled by augment_views).
DALI_OPS: dict[str, Callable[[DataNode, Any], DataNode]] = {
    "random_resized_crop": _random_resized_crop,
    "resize": _resize,
    "center_crop": _center_crop,
    "horizontal_flip": _horizontal_flip,
    "color_jitter": _color_jitter,
    "grayscale": _grayscale,
    "gaussian_blur": _gaussian_blur,
    "solarize": _solarize,
}


def compile_views(views: list[ViewSpec]) -> list[list[tuple[spec.Step, Callable]]]:
    """The recipe checked against this backend (call it before building a pipeline: a bad
    recipe is then a ConfigError, not a DALI graph error)."""
    return spec.compile_views(views, BACKEND, DALI_OPS)


def _apply(images: DataNode, step: spec.Step, op: Callable[[DataNode, Any], DataNode]) -> DataNode:
    if step.p == 1.0:
        return op(images, step.params)
    if fn.random.coin_flip(probability=step.p, dtype=types.BOOL):  # a DALI conditional: per sample
        images = op(images, step.params)
    return images


def augment_views(images: DataNode, views: list[ViewSpec], mean: list[float], std: list[float]) -> list[DataNode]:
    """Decoded HWC uint8 images -> one CHW float32 normalised batch per output view (call inside
    a ``pipeline_def(enable_conditionals=True)``)."""
    outputs = []
    for steps in compile_views(views):
        view = images
        for step, op in steps:
            view = _apply(view, step, op)
        outputs.append(fn.crop_mirror_normalize(view, dtype=types.FLOAT, output_layout="CHW",
                                                mean=[255.0 * m for m in mean], std=[255.0 * s for s in std]))
    return outputs

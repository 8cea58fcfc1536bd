"""The augmentation spec: what each op name means, its arguments and their defaults. A backend
(``torch_backend``, ``dali_backend``) maps each op to its own implementation and nothing else, so
an op's meaning is written once, here.

A recipe (``data.views`` in the config) lists views; a view is ``count`` outputs made by one op
chain; an op is ``{op, p, args}``: applied to a sample with probability ``p``. ``parse_views``
turns that into :class:`Step` lists (one per output view, ``count`` expanded) with validated,
normalised parameters; ``compile_views`` checks a backend has every op and hands each step its
implementation. Every view then ends with ``to float + normalize(mean, std)``, which the backends
add themselves (it is not part of a recipe).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

from ssl_foundry.pipeline.config_error import ConfigError

Impl = TypeVar("Impl")


@dataclass
class AugmentOp:
    """One augmentation step: an op name from the augmentation registry, its
    parameters, and the probability it is applied to a sample (1.0 = always)."""

    op: str = ""
    p: float = 1.0
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class ViewSpec:
    """``count`` views built by the same op chain (e.g. SimCLR: 2 identical-recipe views)."""

    count: int = 1
    ops: list[AugmentOp] = field(default_factory=list)


def _size(value: Any) -> tuple[int, int]:
    """``224`` or ``[h, w]`` -> ``(h, w)``: an int is a square (both backends resize to exactly it)."""
    h, w = (value, value) if isinstance(value, int) else tuple(value)
    if h < 1 or w < 1:
        raise ValueError(f"size must be positive, got {value}")
    return int(h), int(w)


def _range(value: Any, low: float = 0.0) -> tuple[float, float]:
    a, b = (float(v) for v in value)
    if not low <= a <= b:
        raise ValueError(f"range {value} must be [min, max] with {low} <= min <= max")
    return a, b


@dataclass(frozen=True)
class RandomResizedCrop:
    """Crop a random region of area ``scale`` x the image's, aspect ratio (w / h) drawn
    log-uniformly from ``ratio``; resize it to ``size`` (bilinear, antialiased)."""

    size: tuple[int, int]
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __post_init__(self):
        _set(self, size=_size(self.size), scale=_range(self.scale), ratio=_range(self.ratio, low=1e-6))


@dataclass(frozen=True)
class Resize:
    """Resize to exactly ``size`` (an int: a square), bilinear, antialiased."""

    size: tuple[int, int]

    def __post_init__(self):
        _set(self, size=_size(self.size))


@dataclass(frozen=True)
class CenterCrop:
    """The central ``size`` region (zero padding where the image is smaller)."""

    size: tuple[int, int]

    def __post_init__(self):
        _set(self, size=_size(self.size))


@dataclass(frozen=True)
class HorizontalFlip:
    """Mirror left-right (use ``p`` for a random flip)."""


@dataclass(frozen=True)
class ColorJitter:
    """Brightness, contrast and saturation factors drawn uniformly from ``[max(0, 1 - x), 1 + x]``,
    a hue shift from ``[-hue, hue]`` turns of the colour circle (0 leaves that part out).
    Contrast blends with the mean grey level of the image, saturation with its grey version."""

    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0

    def __post_init__(self):
        if min(self.brightness, self.contrast, self.saturation) < 0 or not 0 <= self.hue <= 0.5:
            raise ValueError("brightness, contrast, saturation must be >= 0 and hue in [0, 0.5]")

    def factor_range(self, name: str) -> tuple[float, float]:
        """Range of the brightness / contrast / saturation factor."""
        x = getattr(self, name)
        return max(0.0, 1.0 - x), 1.0 + x


@dataclass(frozen=True)
class Grayscale:
    """ITU-R 601 luma (0.299 R + 0.587 G + 0.114 B) in all three channels."""


@dataclass(frozen=True)
class GaussianBlur:
    """Gaussian blur with a ``kernel_size`` window (odd) and sigma drawn uniformly from ``sigma``;
    borders reflect (without repeating the edge pixel)."""

    kernel_size: int
    sigma: tuple[float, float] = (0.1, 2.0)

    def __post_init__(self):
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive, got {self.kernel_size}")
        _set(self, sigma=_range(self.sigma, low=1e-6))


@dataclass(frozen=True)
class Solarize:
    """Invert (255 - x) every channel value >= ``threshold`` (uint8 scale)."""

    threshold: int = 128


SPEC_OPS: dict[str, type] = {
    "random_resized_crop": RandomResizedCrop,
    "resize": Resize,
    "center_crop": CenterCrop,
    "horizontal_flip": HorizontalFlip,
    "color_jitter": ColorJitter,
    "grayscale": Grayscale,
    "gaussian_blur": GaussianBlur,
    "solarize": Solarize,
}


def _set(params: Any, **values: Any) -> None:
    """Normalise fields of a frozen params dataclass in ``__post_init__``."""
    for name, value in values.items():
        object.__setattr__(params, name, value)


@dataclass(frozen=True)
class Step:
    """One op of a view: its name, validated parameters and probability."""

    op: str
    params: Any
    p: float


def parse_op(op: AugmentOp) -> Step:
    """Validates an op of the recipe: a known name, arguments its parameters accept, p in [0, 1]."""
    if op.op not in SPEC_OPS:
        raise ConfigError(f"unknown augmentation op '{op.op}'. Ops: {', '.join(SPEC_OPS)}")
    if not 0.0 <= op.p <= 1.0:
        raise ConfigError(f"augmentation op '{op.op}': p={op.p} is not a probability")
    cls = SPEC_OPS[op.op]
    try:
        params = cls(**op.args)
    except (TypeError, ValueError) as err:
        names = ", ".join(f.name for f in dataclasses.fields(cls)) or "none"
        raise ConfigError(f"augmentation op '{op.op}': bad args {op.args} ({err}). Its args: {names}") from None
    return Step(op.op, params, op.p)


def parse_views(views: list[ViewSpec]) -> list[list[Step]]:
    """One step list per output view, in spec order (a view with ``count: 2`` gives two);
    steps with ``p = 0`` are dropped (they never apply)."""
    parsed = [[s for s in map(parse_op, view.ops) if s.p > 0] for view in views]
    return [steps for view, steps in zip(views, parsed) for _ in range(view.count)]


def view_sizes(views: list[ViewSpec]) -> list[tuple[int, int] | None]:
    """The (h, w) of every output view (``count`` expanded): the size its last resizing op
    (random_resized_crop, resize, center_crop) makes; ``None`` for a view that keeps the image's."""
    return [next((s.params.size for s in reversed(steps) if hasattr(s.params, "size")), None)
            for steps in parse_views(views)]


def compile_views(views: list[ViewSpec], backend: str,
                  ops: dict[str, Callable[..., Impl]]) -> list[list[tuple[Step, Callable[..., Impl]]]]:
    """``parse_views`` with each step's implementation from a backend's op table; an op the
    backend lacks is an error naming the op and the backend."""
    compiled = []
    for steps in parse_views(views):
        for step in steps:
            if step.op not in ops:
                raise ConfigError(f"augmentation op '{step.op}' is not available on the {backend} backend "
                                  f"(it has: {', '.join(sorted(ops))})")
        compiled.append([(step, ops[step.op]) for step in steps])
    return compiled

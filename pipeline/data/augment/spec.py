"""The augmentation spec: what each op name means, its arguments and their defaults. A backend
(``torch_backend``, ``dali_backend``) maps each op to its own implementation and nothing else, so
an op's meaning is written once, here.

A recipe (``data.views`` in the config) lists views; a view is ``count`` outputs made by one op
chain; an op is ``{op, p, args}``: applied to a sample with probability ``p``. The recipe is
parsed once, when the config is built: each :class:`AugmentOp` validates its name, ``p`` and
``args`` on construction and holds them as typed, normalised ``params`` (one of the parameter
classes below). The backends only compile those objects: ``compile_views`` checks a backend has
every op and pairs each op of every output view (``count`` expanded) with its implementation.
Every view then ends with ``to float + normalize(mean, std)``, which the backends add themselves
(it is not part of a recipe).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

from ssl_foundry.pipeline.config_error import ConfigError

Impl = TypeVar("Impl")


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
class AugmentOp:
    """One augmentation step as the recipe writes it: an op name of ``SPEC_OPS``, its ``args``, and
    the probability ``p`` it is applied to a sample (1.0 = always). Checked on construction, which
    sets ``params``: the op's parameter object (validated, normalised). ``args`` stays as written
    (it is what the config saves)."""

    op: str = ""
    p: float = 1.0
    args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.op not in SPEC_OPS:
            raise ConfigError(f"unknown augmentation op '{self.op}'. Ops: {', '.join(SPEC_OPS)}")
        if not 0.0 <= self.p <= 1.0:
            raise ConfigError(f"augmentation op '{self.op}': p={self.p} is not a probability")
        cls = SPEC_OPS[self.op]
        try:
            params = cls(**self.args)
        except (TypeError, ValueError) as err:
            names = ", ".join(f.name for f in dataclasses.fields(cls)) or "none"
            raise ConfigError(f"augmentation op '{self.op}': bad args {self.args} ({err}). Its args: {names}") from None
        object.__setattr__(self, "params", params)


@dataclass
class ViewSpec:
    """``count`` views built by the same op chain (e.g. SimCLR: 2 identical-recipe views)."""

    count: int = 1
    ops: list[AugmentOp] = field(default_factory=list)

    def __post_init__(self):
        if self.count < 1:
            raise ConfigError(f"count={self.count}: a view makes at least 1 output (drop the view instead)")


def output_views(views: list[ViewSpec]) -> list[list[AugmentOp]]:
    """The op chain of every output view, in spec order (a view with ``count: 2`` gives two);
    ops with ``p = 0`` are left out (they never apply)."""
    return [[op for op in view.ops if op.p > 0] for view in views for _ in range(view.count)]


def eval_views(image_size: int) -> list[ViewSpec]:
    """Deterministic single view for feature extraction: resize (both backends)."""
    return [ViewSpec(count=1, ops=[AugmentOp(op="resize", args={"size": image_size})])]


def view_sizes(views: list[ViewSpec]) -> list[tuple[int, int] | None]:
    """The (h, w) of every output view: the size its last resizing op (random_resized_crop, resize,
    center_crop) makes; ``None`` for a view that keeps the image's size."""
    return [next((op.params.size for op in reversed(ops) if hasattr(op.params, "size")), None)
            for ops in output_views(views)]


def compile_views(views: list[ViewSpec], backend: str,
                  ops: dict[str, Callable[..., Impl]]) -> list[list[tuple[AugmentOp, Callable[..., Impl]]]]:
    """Every output view's ops, each paired with its implementation from a backend's op table
    (``ops``); an op the backend lacks is an error naming the op and the backend."""
    compiled = []
    for chain in output_views(views):
        for op in chain:
            if op.op not in ops:
                raise ConfigError(f"augmentation op '{op.op}' is not available on the {backend} backend "
                                  f"(it has: {', '.join(sorted(ops))})")
        compiled.append([(op, ops[op.op]) for op in chain])
    return compiled

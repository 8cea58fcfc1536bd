"""The batched torch backend of the augmentation spec (``pipeline.data.augment.spec``): a whole
micro-batch of decoded images is augmented at once by tensor ops, every random parameter drawn
per sample, instead of one image at a time through torchvision.

On a CPU this is what leaves the cores to the model: torchvision's per-image transforms cost
~1.5 ms of CPU per 32-px view (Python and dispatch overhead on tiny images), these ops a few
microseconds per view. The same spec, the same op semantics as the torchvision backend:

- random_resized_crop: torchvision's sampling (area fraction and log-uniform aspect ratio, up to
  10 tries, then the central crop of the clamped ratio), vectorised; the integer crop boxes are
  resampled by ``torchvision.ops.roi_align`` (bilinear; when shrinking it averages
  ceil(crop / size) samples per output pixel, the antialiasing of a box filter where torchvision's
  is a triangle); resize: the whole image as the box; center_crop: slicing, zero padding.
- horizontal_flip: a per-sample mask.
- color_jitter: brightness (scale), contrast (blend with each image's mean grey level),
  saturation (blend with its grey image), hue (a rotation of the HSV hue, the hexagonal model
  torchvision uses), in a random order per sample as torchvision does.
- grayscale (ITU-R 601 luma), gaussian_blur (per-sample sigma, separable, reflected borders),
  solarize: elementwise.

Images are float32 on the 0..255 scale between ops (torchvision rounds to uint8 after each op on
uint8 input: within a grey level per op). Images of different sizes are augmented in groups of
equal size up to the first op that sets the size (a crop or resize), then as one batch.
"""
from __future__ import annotations

import itertools
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from ssl_foundry.pipeline.config_error import ConfigError
from ssl_foundry.pipeline.data.augment import spec
from ssl_foundry.pipeline.data.augment.spec import ViewSpec

BACKEND = "batched"
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as torchvision's rgb_to_grayscale
SIZE_OPS = ("random_resized_crop", "resize", "center_crop")  # ops whose output size is fixed by the spec


def _uniform(n: int, low: float, high: float) -> torch.Tensor:
    return torch.empty(n).uniform_(low, high)


def _resample(images: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Each image's box (x1, y1, x2, y2 in pixels) resampled to ``size`` (bilinear)."""
    indexed = torch.cat([torch.arange(len(boxes), dtype=boxes.dtype)[:, None], boxes], dim=1)
    return roi_align(images, indexed, size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def crop_boxes(height: torch.Tensor, width: torch.Tensor, a: spec.RandomResizedCrop, tries: int = 10) -> torch.Tensor:
    """torchvision's ``RandomResizedCrop.get_params`` for a batch (per-sample ``height``, ``width``):
    ``tries`` candidate (area, log-ratio) draws each, the first that fits, else the whole image
    cropped centrally to the ratio range. Integer (x1, y1, x2, y2) boxes, float."""
    n = len(height)
    area = (height * width).float()[:, None] * _uniform(n * tries, *a.scale).view(n, tries)
    log_ratio = _uniform(n * tries, math.log(a.ratio[0]), math.log(a.ratio[1])).view(n, tries)
    w = torch.round(torch.sqrt(area * torch.exp(log_ratio)))
    h = torch.round(torch.sqrt(area / torch.exp(log_ratio)))
    fits = (w > 0) & (h > 0) & (w <= width[:, None]) & (h <= height[:, None])
    first = fits.float().argmax(dim=1)  # the first candidate that fits (0 if none does)
    w, h = w.gather(1, first[:, None])[:, 0], h.gather(1, first[:, None])[:, 0]
    found = fits.any(dim=1)
    # Fallback: the central crop whose ratio is the image's, clamped to the range.
    ratio = width.float() / height.float()
    fall_w = torch.where(ratio < a.ratio[0], width.float(), torch.where(
        ratio > a.ratio[1], torch.round(height * a.ratio[1]), width.float()))
    fall_h = torch.where(ratio < a.ratio[0], torch.round(width / a.ratio[0]), height.float())
    w, h = torch.where(found, w, fall_w), torch.where(found, h, fall_h)
    # Offsets uniform over the integer positions (torch.randint(0, H - h + 1)); the fallback is central.
    y = torch.where(found, torch.floor(torch.rand(n) * (height - h + 1)), torch.floor((height - h) / 2))
    x = torch.where(found, torch.floor(torch.rand(n) * (width - w + 1)), torch.floor((width - w) / 2))
    return torch.stack([x, y, x + w, y + h], dim=1)


def _random_resized_crop(images: torch.Tensor, a: spec.RandomResizedCrop, sizes: torch.Tensor) -> torch.Tensor:
    return _resample(images, crop_boxes(sizes[:, 0], sizes[:, 1], a), a.size)


def _resize(images: torch.Tensor, a: spec.Resize, sizes: torch.Tensor) -> torch.Tensor:
    zero = torch.zeros(len(sizes))
    return _resample(images, torch.stack([zero, zero, sizes[:, 1].float(), sizes[:, 0].float()], dim=1), a.size)


def _center_crop(images: torch.Tensor, a: spec.CenterCrop, sizes: torch.Tensor) -> torch.Tensor:
    """torchvision's center_crop: offsets ``int(round((H - h) / 2))``, zero padding (the same on
    both sides, the odd pixel at the end) where the image is smaller."""
    (out_h, out_w), (height, width) = a.size, sizes[0].tolist()  # one size per group
    pad_h, pad_w = max(0, out_h - height), max(0, out_w - width)
    images = F.pad(images, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
    top, left = int(round((images.shape[-2] - out_h) / 2)), int(round((images.shape[-1] - out_w) / 2))
    return images[..., top:top + out_h, left:left + out_w]


def _horizontal_flip(images: torch.Tensor, a: spec.HorizontalFlip) -> torch.Tensor:
    return images.flip(-1)


def grey(images: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) luma of (B, 3, H, W) RGB."""
    r, g, b = images.unbind(1)
    return (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b)[:, None]


def _per_sample(factor: torch.Tensor) -> torch.Tensor:
    return factor[:, None, None, None]


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (images * _per_sample(factor)).clamp_(0, 255)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    centre = grey(images).mean(dim=(1, 2, 3), keepdim=True)
    return (centre + _per_sample(factor) * (images - centre)).clamp_(0, 255)


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    luma = grey(images)
    return (luma + _per_sample(factor) * (images - luma)).clamp_(0, 255)


def adjust_hue(images: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """RGB -> HSV, hue + ``turns`` (per sample), -> RGB, in the hexagonal HSV model of torchvision's
    adjust_hue: hue ``h6`` in sixths of a turn, then ``v - v s clamp(min(k, 4 - k), 0, 1)`` with
    ``k = (n + h6) mod 6``, n = 5, 3, 1 for R, G, B."""
    r, g, b = images.unbind(1)
    value, _ = images.max(dim=1)
    chroma = value - images.min(dim=1).values  # v s
    divisor = torch.where(chroma == 0, torch.ones_like(chroma), chroma)  # grey pixels: no hue
    red_max = value == r
    green_max = (value == g) & ~red_max
    h6 = torch.where(red_max, (g - b) / divisor, torch.where(green_max, 2 + (b - r) / divisor, 4 + (r - g) / divisor))
    h6 = h6 + 6 * turns[:, None, None]
    channels = []
    for n in (5, 3, 1):
        k = torch.remainder(n + h6, 6)
        channels.append(value - chroma * torch.minimum(k, 4 - k).clamp(0, 1))
    return torch.stack(channels, dim=1)


def _color_jitter(images: torch.Tensor, a: spec.ColorJitter) -> torch.Tensor:
    """The parts the spec turns on, each with its factor drawn per sample, in a random order per
    sample: at each slot, the samples whose permutation puts a part there get that part."""
    n, images = len(images), images.clone()
    parts: list[tuple[Callable, torch.Tensor]] = []
    for name, adjust in (("brightness", adjust_brightness), ("contrast", adjust_contrast),
                         ("saturation", adjust_saturation)):
        if getattr(a, name):
            parts.append((adjust, _uniform(n, *a.factor_range(name))))
    if a.hue:
        parts.append((adjust_hue, _uniform(n, -a.hue, a.hue)))
    orders = torch.tensor(list(itertools.permutations(range(len(parts)))))
    order = orders[torch.randint(len(orders), (n,))]  # (n, parts)
    for slot in range(len(parts)):
        for index, (adjust, factor) in enumerate(parts):
            chosen = (order[:, slot] == index).nonzero()[:, 0]
            if len(chosen):
                images[chosen] = adjust(images[chosen], factor[chosen])
    return images


def _grayscale(images: torch.Tensor, a: spec.Grayscale) -> torch.Tensor:
    return grey(images).expand(-1, 3, -1, -1).contiguous()


def gaussian_kernels(kernel_size: int, sigma: torch.Tensor) -> torch.Tensor:
    """(B, kernel_size) normalised 1-D Gaussians, one per sigma (torchvision's taps)."""
    x = torch.linspace(-(kernel_size - 1) / 2, (kernel_size - 1) / 2, kernel_size)
    weights = torch.exp(-0.5 * (x[None] / sigma[:, None]) ** 2)
    return weights / weights.sum(dim=1, keepdim=True)


def _gaussian_blur(images: torch.Tensor, a: spec.GaussianBlur) -> torch.Tensor:
    """Separable blur, each sample with its own sigma: one grouped convolution per axis."""
    n, c, h, w = images.shape
    kernels = gaussian_kernels(a.kernel_size, _uniform(n, *a.sigma)).repeat_interleave(c, dim=0)  # (n c, k)
    half = a.kernel_size // 2
    flat = F.pad(images.reshape(1, n * c, h, w), [half, half, half, half], mode="reflect")
    flat = F.conv2d(flat, kernels[:, None, :, None], groups=n * c)
    flat = F.conv2d(flat, kernels[:, None, None, :], groups=n * c)
    return flat.view(n, c, h, w)


def _solarize(images: torch.Tensor, a: spec.Solarize) -> torch.Tensor:
    return torch.where(images >= a.threshold, 255 - images, images)


# op name -> (images, params[, sizes]) -> images: the op always applied (p is handled by _apply).
BATCHED_OPS: dict[str, Callable[..., torch.Tensor]] = {
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
    compiled = spec.compile_views(views, BACKEND, BATCHED_OPS)
    for steps in compiled:
        for step, _ in steps:
            if step.op in SIZE_OPS and step.p < 1:
                raise ConfigError(f"augmentation op '{step.op}' with p={step.p}: views of one batch would have "
                                  f"different sizes; on the {BACKEND} backend a crop or resize has p=1")
    return compiled


def _apply(images: torch.Tensor, step: spec.Step, op: Callable, sizes: torch.Tensor) -> torch.Tensor:
    if step.op in SIZE_OPS:
        return op(images, step.params, sizes)
    if step.p == 1.0:
        return op(images, step.params)
    chosen = (torch.rand(len(images)) < step.p).nonzero()[:, 0]
    if len(chosen):
        images = images.clone()
        images[chosen] = op(images[chosen], step.params)
    return images


class BatchedMultiViewTransform:
    """Every view of the spec for a batch of images (uint8 (3, H, W) each, or one (B, 3, H, W)
    tensor): a list of (B, 3, h, w) float views, normalised, in spec order."""

    batched = True  # the loader calls it with the decoded micro-batch, not per sample

    def __init__(self, views: list[ViewSpec], mean: list[float], std: list[float]):
        self.views = compile_views(views)
        self.mean = 255 * torch.tensor(mean).view(1, 3, 1, 1)
        self.std = 255 * torch.tensor(std).view(1, 3, 1, 1)

    def __call__(self, images: list[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
        return [(self._view(steps, images) - self.mean) / self.std for steps in self.views]

    def _view(self, steps: list[tuple[spec.Step, Callable]], images: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        first_size = next((i for i, (step, _) in enumerate(steps) if step.op in SIZE_OPS), len(steps))
        if isinstance(images, torch.Tensor) or len({tuple(i.shape) for i in images}) == 1:
            batch = images if isinstance(images, torch.Tensor) else torch.stack(images)
            return self._run(steps, batch.to(torch.float32, copy=True))
        if first_size == len(steps):
            raise ValueError("images of different sizes need a crop or resize in every view to be batched")
        # Equal-size groups through the ops up to the first that sets the size, then one batch.
        out: list[torch.Tensor | None] = [None] * len(images)
        by_size: dict[tuple[int, ...], list[int]] = {}
        for index, image in enumerate(images):
            by_size.setdefault(tuple(image.shape), []).append(index)
        for members in by_size.values():
            group = self._run(steps[:first_size + 1], torch.stack([images[i] for i in members]).float())
            for i, view in zip(members, group):
                out[i] = view
        return self._run(steps[first_size + 1:], torch.stack(out))

    @staticmethod
    def _run(steps: list[tuple[spec.Step, Callable]], images: torch.Tensor) -> torch.Tensor:
        sizes = torch.tensor(images.shape[-2:]).expand(len(images), 2)
        for step, op in steps:
            images = _apply(images, step, op, sizes)
            sizes = torch.tensor(images.shape[-2:]).expand(len(images), 2)
        return images

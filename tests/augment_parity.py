"""What the augmentation backends' parity tests share (test_dali, test_batched_augment): recipes
written as config dicts, the torch loader over a shard folder, views as pixels for the statistics
that compare two backends (``pipeline.data.augment.parity``), and a coordinate probe image whose
views give away their crop window."""
import itertools

import numpy as np
import torch
from PIL import Image

from ssl_foundry.pipeline.config import DataConfig, build
from ssl_foundry.pipeline.data.augment import parity
from ssl_foundry.pipeline.data.augment.torch_backend import MultiViewTransform
from ssl_foundry.pipeline.data.loader import ShardStream, make_loader

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
SEED = 11


def views(*groups: tuple[int, list[dict]]):
    """``(count, ops)`` groups -> the config's ViewSpec list (through the real config builder)."""
    return build(DataConfig, {"views": [{"count": c, "ops": ops} for c, ops in groups]}).views


def rrc(size, scale=(0.08, 1.0)) -> dict:
    return {"op": "random_resized_crop", "args": {"size": size, "scale": list(scale)}}


FLIP = {"op": "horizontal_flip", "p": 0.5}
# DINO-style multi-crop: 2 global views and 6 local views at another size.
MULTI_CROP = views(
    (2, [rrc(96, (0.4, 1.0)), FLIP, {"op": "color_jitter", "p": 0.8, "args": {"brightness": 0.4, "contrast": 0.4}},
         {"op": "grayscale", "p": 0.2}, {"op": "gaussian_blur", "args": {"kernel_size": 9}}]),
    (6, [rrc(48, (0.05, 0.4)), FLIP, {"op": "gaussian_blur", "p": 0.5, "args": {"kernel_size": 5}}]),
)


PARITY_SIZE = 48
PARITY_RECIPE = views((2, [
    rrc(PARITY_SIZE), FLIP,
    {"op": "color_jitter", "p": 0.8, "args": {"brightness": 0.4, "contrast": 0.4, "saturation": 0.2, "hue": 0.1}},
    {"op": "grayscale", "p": 0.2},
    {"op": "gaussian_blur", "p": 0.5, "args": {"kernel_size": 5}},
    {"op": "solarize", "p": 0.2},
]))


def torch_stream(folder, view_specs, batch_size, mean=MEAN, std=STD, transform=MultiViewTransform,
                 **kwargs) -> ShardStream:
    """The torch loader over ``folder`` with ``transform`` (the torchvision backend by default)."""
    return ShardStream(str(folder), transform(view_specs, mean, std), batch_size, num_workers=0, seed=SEED,
                       shuffle_buffer=16, **kwargs)


def take(stream, n: int) -> list[dict]:
    return list(itertools.islice(iter(make_loader(stream) if isinstance(stream, ShardStream) else stream), n))


def to_pixels(view: torch.Tensor, mean=MEAN, std=STD) -> torch.Tensor:
    return parity.to_pixels(view, mean, std)


def epochs_of_views(stream, batches: int) -> tuple[list[str], torch.Tensor]:
    """Keys and views of ``batches`` batches: (N, 3, h, w) 0..255 floats, a key per view."""
    batches = take(stream, batches)
    keys = [k for b in batches for _ in b["views"] for k in b["key"]]
    return keys, torch.cat([to_pixels(v) for b in batches for v in b["views"]])


def within(a: torch.Tensor, b: torch.Tensor, allowance: float = 0.0) -> bool:
    """Means of two samples agree within 4 standard errors of their difference (+ allowance)."""
    se = (a.var() / len(a) + b.var() / len(b)).sqrt()
    return bool((a.mean() - b.mean()).abs() <= 4 * se + allowance)


def coordinate_probe(folder, copies: int) -> None:
    """A lossless 256 x 192 image whose red value is its x and green value its y: a view's
    pixels say which window of it was cropped and whether it was mirrored."""
    x, y = np.meshgrid(np.arange(256), np.arange(192))
    probe = np.stack([x, y, np.full_like(x, 128)], axis=-1).astype(np.uint8)
    folder.mkdir(parents=True)
    for i in range(copies):
        Image.fromarray(probe).save(folder / f"probe{i:03d}.png")


def crop_geometry(views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(area fraction, aspect ratio w / h, mirrored) of each probe view's crop window, from the
    slopes of red along x and green along y away from the borders (resampling there clamps)."""
    out_h, out_w = views.shape[-2:]
    red, green = views[:, 0, :, 4:-4], views[:, 1, 4:-4, :]
    slope_x = (red[..., -1] - red[..., 0]).mean(1) / (out_w - 9)
    slope_y = (green[..., -1, :] - green[..., 0, :]).mean(1) / (out_h - 9)
    width, height = slope_x.abs() * out_w, slope_y.abs() * out_h
    return width * height / (256 * 192), width / height, slope_x < 0

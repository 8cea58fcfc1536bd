"""The figures logged as artifacts decode as PNGs of the expected layout (pipeline/registry/plots.py,
embedding_map.py); that the commands log them is tested with the commands (test_downstream.py,
test_finetune.py)."""
from __future__ import annotations

import io

import torch
from PIL import Image

from conftest import tiny_recipe
from ssl_foundry.pipeline.config import build, DataConfig
from ssl_foundry.pipeline.registry.embedding_map import embedding_map
from ssl_foundry.pipeline.registry.plots import augmentation_grid, metric_curves


def decode(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    return image


def test_augmentation_grid_shows_each_image_beside_its_views(fmnist, tmp_path):
    data = build(DataConfig, tiny_recipe(fmnist, tmp_path)["data"])  # SimCLR: 2 views
    one = decode(augmentation_grid(str(fmnist / "train"), data.views, data.mean, data.std, num_images=6))
    assert one.width < one.height  # 6 rows of 3 columns: the image, view 1, view 2
    same = augmentation_grid(str(fmnist / "train"), data.views, data.mean, data.std, num_images=6)
    other = augmentation_grid(str(fmnist / "train"), data.views, data.mean, data.std, num_images=6, seed=1)
    assert same == augmentation_grid(str(fmnist / "train"), data.views, data.mean, data.std, num_images=6)
    assert other != same  # the views are random draws, seeded


def test_metric_curves_and_embedding_map():
    curves = decode(metric_curves({"loss": [(1, 2.0), (2, 1.5)], "lr": [(1, 0.1), (2, 0.05)], "knn": []}))
    assert curves.height > curves.width / 2  # two panels stacked (the empty metric left out)
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat_interleave(40)
    features = torch.randn(120, 16, generator=g) + 10 * torch.nn.functional.one_hot(labels, 16).float()
    assert decode(embedding_map(features, labels, ["a", "b", "c"], max_points=100)).width > 0

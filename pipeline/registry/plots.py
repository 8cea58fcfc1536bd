"""Figures logged as MLflow artifacts (matplotlib, headless ``Agg`` backend), each returned as PNG bytes
(``log_figures`` puts them in a run's ``plots/``):

- ``augmentation_grid``: real training images and the views the recipe makes of them (what the
  method actually sees, de-normalised), one row per image;
- ``metric_curves``: loss, lr and any other per-step metric (the online kNN monitor's
  ``knn_monitor_top1``) against the step;
- the evaluations' t-SNE map of test features: pipeline/registry/embedding_map.py.
"""
from __future__ import annotations

import io
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ssl_foundry.data_prep.shard_format import find_manifest  # noqa: E402
from ssl_foundry.pipeline.data.augment.spec import AugmentOp, ViewSpec  # noqa: E402
from ssl_foundry.pipeline.data.augment.torch_backend import MultiViewTransform  # noqa: E402
from ssl_foundry.pipeline.data.loader import ShardStream, is_clip_manifest, make_loader  # noqa: E402
from ssl_foundry.pipeline.data.video import ClipTransform  # noqa: E402


def figure_png(figure) -> bytes:
    """``figure`` as PNG bytes (the figure is closed)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def log_figures(client, run_id: str, figures: dict[str, bytes]) -> None:
    """PNG files (``{name: bytes}``) into the run's ``plots/`` artifact folder, with ``client`` (an MlflowClient)."""
    with tempfile.TemporaryDirectory() as tmp:
        for name, png in figures.items():
            (Path(tmp) / name).write_bytes(png)
        client.log_artifacts(run_id, tmp, "plots")


class _OriginalAndViews:
    """The image itself (resized and centre-cropped to ``size`` px, [0, 1]) followed by the recipe's
    views of it (images of any size then stack into one column)."""

    def __init__(self, views: list[ViewSpec], mean: list[float], std: list[float], size: int):
        fit = [AugmentOp(op="resize", args={"size": size}), AugmentOp(op="center_crop", args={"size": size})]
        self.original = MultiViewTransform([ViewSpec(count=1, ops=fit)], [0.0] * 3, [1.0] * 3)
        self.views = MultiViewTransform(views, mean, std)

    def __call__(self, image: torch.Tensor) -> list[torch.Tensor]:
        return [*self.original(image), *self.views(image)]


def augmentation_grid(folder: str, views: list[ViewSpec], mean: list[float], std: list[float],
                      num_images: int = 6, size: int = 64, seed: int = 0) -> bytes:
    """The first ``num_images`` images of the shards in ``folder`` and every view of them (clip
    shards: a random frame of each clip)."""
    transform = _OriginalAndViews(views, mean, std, size)
    if is_clip_manifest(find_manifest(folder) or {}):
        transform = ClipTransform(transform, clip_frames=0, frame_stride=1, as_clip=False)
    stream = ShardStream(folder, transform, num_images, finite=True, seed=seed)  # it seeds the random draws
    columns = next(iter(make_loader(stream)))["views"]
    mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    shown = [columns[0]] + [(v * std_t + mean_t).clamp(0, 1) for v in columns[1:]]
    rows = len(shown[0])
    figure, axes = plt.subplots(rows, len(shown), figsize=(1.6 * len(shown), 1.6 * rows), squeeze=False)
    for col, images in enumerate(shown):
        for row in range(rows):
            axis = axes[row][col]
            axis.imshow(images[row].permute(1, 2, 0).numpy())
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title("image" if col == 0 else f"view {col}", fontsize=9)
    return figure_png(figure)


def metric_curves(history: dict[str, list[tuple[int, float]]], title: str = "") -> bytes:
    """One panel per metric: ``{name: [(step, value), ...]}`` (metrics without points are left out)."""
    curves = {name: points for name, points in history.items() if points}
    figure, axes = plt.subplots(len(curves), 1, figsize=(6, 2.2 * len(curves)), sharex=True, squeeze=False)
    for axis, (name, points) in zip(axes[:, 0], curves.items()):
        steps, values = zip(*sorted(points))
        axis.plot(steps, values, marker="." if len(steps) < 50 else None)
        axis.set_ylabel(name)
        axis.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    if title:
        axes[0, 0].set_title(title)
    return figure_png(figure)


"""Temporal-order probe: can a linear classifier on a frozen image backbone's frame features tell a
clip played forward from the same clip reversed, on videos it was not trained on? (The "arrow of
time" task of Pickup et al. 2014 and Wei et al. 2018, used as a probe of what video pretraining such
as TCN or shuffle-and-learn puts into the features; a random-init backbone is the reference.)

For every clip of a clip-shard folder, ``frames`` frames evenly spaced over the clip are resized to
``image_size`` and encoded one at a time; the clip is ``concat(f_1, ..., f_n)`` (label 1) and its
reverse ``concat(f_n, ..., f_1)`` (label 0). Evaluation is leave-one-video-out: for each video with
clips, the linear probe of ``pipeline.evaluate.linear_probe`` (lr swept on a held-out part of the training
clips) is trained on every other video's clips and tested on that video's; the reported accuracy
is over all held-out clips. Both orders of a clip are always on the same side of a split, and the
lr sweep holds out whole training videos too, so the lr is chosen under the test's condition.
"""
from __future__ import annotations

from collections import Counter

import torch
import torch.nn as nn

from ssl_foundry.data_prep.shard_format import read_manifest
from ssl_foundry.pipeline.config import LinearProbeConfig
from ssl_foundry.pipeline.data.augment.torch_backend import eval_transform
from ssl_foundry.pipeline.data.loader import ShardStream, is_clip_manifest, make_loader
from ssl_foundry.pipeline.data.video import ClipTransform
from ssl_foundry.pipeline.evaluate.linear_probe import linear_probe


def clip_videos(manifest: dict) -> list[str]:
    """The source video of every clip, by sample number: `foundry prep video` numbers the clips of
    the videos in manifest order, each video's clips consecutively."""
    return [video["path"] for video in manifest["videos"] for _ in range(video["clips"])]


@torch.no_grad()
def clip_frame_features(backbone: nn.Module, folder: str, frames: int, image_size: int, mean: list[float],
                        std: list[float], batch_size: int = 32) -> tuple[torch.Tensor, list[str]]:
    """(N, frames, D) features of ``frames`` evenly spaced frames of every clip, and each clip's video."""
    manifest = read_manifest(folder)
    if not is_clip_manifest(manifest):
        raise ValueError(f"{folder} holds images, not video clips: make clip shards with `foundry prep video`")
    clip_length = manifest["settings"]["clip_frames"]
    if not 2 <= frames <= clip_length:
        raise ValueError(f"the temporal-order probe needs 2 <= frames <= the clips' {clip_length} frames, got {frames}")
    picks = torch.linspace(0, clip_length - 1, frames).round().long()
    stream = ShardStream(folder, ClipTransform(eval_transform(image_size, mean, std), 0, 1, as_clip=True),
                         batch_size, finite=True)
    videos = clip_videos(manifest)
    backbone.eval()
    features, owners = [], []
    for batch in make_loader(stream):
        clips = batch["views"][0][:, picks]  # (B, frames, 3, s, s)
        features.append(backbone(clips.flatten(0, 1)).unflatten(0, clips.shape[:2]))
        owners += [videos[int(key)] for key in batch["key"]]
    return torch.cat(features), owners


def temporal_order_accuracy(features: torch.Tensor, videos: list[str], probe: LinearProbeConfig) -> dict:
    """Leave-one-video-out forward-vs-reversed accuracy of a linear probe on (N, frames, D) clip features."""
    forward = features.flatten(1)
    backward = features.flip(1).flatten(1)
    counts = Counter(videos)
    if len(counts) < 2:
        raise ValueError("the temporal-order probe holds out one video at a time: it needs clips of 2 videos or more")
    names = sorted(counts)
    video_index = torch.tensor([names.index(v) for v in videos])
    per_video, correct = {}, 0.0
    for held_out in names:
        test = video_index == names.index(held_out)

        def both_orders(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x = torch.cat([forward[rows], backward[rows]])
            n = int(rows.sum())
            y = torch.cat([torch.ones(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)])
            return x, y

        train_videos = video_index[~test].repeat(2)  # the lr sweep holds out whole videos, as the test does
        result = linear_probe(*both_orders(~test), *both_orders(test), probe, train_groups=train_videos)
        per_video[held_out] = result.test_top1
        correct += result.test_top1 * counts[held_out]
    return {"temporal_order_top1": correct / len(videos), "per_video": per_video, "clips": len(videos)}

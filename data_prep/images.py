"""`foundry prep images SRC OUT`: an image folder -> WebDataset shards (see data_prep.shards).

Layout: when SRC holds subfolders and no images at its top level it is ImageNet style: every
subfolder is a class, numbered in sorted name order, and the images anywhere below it are that
class's. Otherwise SRC is unlabelled and all images below it, at any depth, are used.

Every file under SRC ends up either in a shard, byte for byte as stored, or in the manifest's
``skipped`` list with a reason: ``unsupported`` (not an image type that both PIL and NVIDIA DALI
decode, or not a regular file), ``unreadable`` (OSError), ``zero-byte``, or ``corrupt`` (PIL
cannot decode it). Images are checked by decoding them, in worker processes, before shards are
planned, so which image lands in which shard depends only on SRC's contents.
"""
from __future__ import annotations

import json
import os
import stat
import time
from collections import Counter
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from typing import Any, Callable, NamedTuple

from ssl_foundry.data_prep.console import Progress
from ssl_foundry.data_prep.shard_format import FORMAT_KEYS, PrepError, is_remote, probe_image
from ssl_foundry.data_prep.shards import ShardPlan, default_workers, group_into_shards, parallel_imap, write_shards

ACCEPTED_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
# Files per validation task: large enough to amortise the inter-process round trip.
CHECK_BATCH = 64


class ValidImage(NamedTuple):
    """A decodable image under SRC; ``key`` is its WebDataset key (``jpg``, ``png``, ...)."""

    path: str
    key: str
    size: int
    width: int
    height: int
    label: int | None


def find_classes(src: Path, extensions: frozenset[str] = ACCEPTED_EXTENSIONS) -> list[str]:
    """Class folder names (sorted) when ``src`` is ImageNet style (no file with one of
    ``extensions`` at its top level), else []."""
    entries = list(os.scandir(src))
    top_level_inputs = any(not e.is_dir() and Path(e.name).suffix.lower() in extensions for e in entries)
    return [] if top_level_inputs else sorted(e.name for e in entries if e.is_dir())


def list_files(src: Path, follow_symlinks: bool = False) -> tuple[list[str], list[dict]]:
    """Sorted paths (relative to ``src``) of every file below it, following folder symlinks but
    walking each real folder once; plus skip entries: ``unreadable`` for folders it cannot list and,
    unless ``follow_symlinks``, ``outside-src`` for symlinks (files or folders) whose target is not
    under ``src``."""
    files: list[str] = []
    skipped: list[dict] = []
    walked: set[str] = set()
    root = os.path.realpath(src)

    def on_error(err: OSError) -> None:
        skipped.append(skipped_entry(os.path.relpath(err.filename, src), "unreadable", str(err)))

    def leaves_src(path: str) -> bool:
        target = os.path.realpath(path)
        return os.path.exists(target) and os.path.commonpath([root, target]) != root

    for folder, subfolders, names in os.walk(src, onerror=on_error, followlinks=True):
        subfolders.sort()  # walk order decides which path a twice-linked folder is listed under
        real = os.path.realpath(folder)
        if real in walked:
            subfolders.clear()
            continue
        walked.add(real)
        paths = [os.path.join(folder, name) for name in names]
        if not follow_symlinks:
            outside = [p for p in [os.path.join(folder, d) for d in subfolders] + paths
                       if os.path.islink(p) and leaves_src(p)]
            skipped += [skipped_entry(os.path.relpath(p, src), "outside-src", f"symbolic link to "
                                      f"{os.path.realpath(p)}, outside SRC (--follow-symlinks takes it)")
                        for p in outside]
            subfolders[:] = [d for d in subfolders if os.path.join(folder, d) not in outside]
            paths = [p for p in paths if p not in outside]
        files.extend(os.path.relpath(p, src) for p in paths)
    return sorted(files), skipped


def file_problem(src: Path, path: str, extensions: frozenset[str]) -> dict | None:
    """The ``skipped`` entry of ``path`` (relative to ``src``) when it cannot be a source file at
    all -- an extension not in ``extensions``, not a regular file, unreadable, empty -- else None."""
    full = src / path
    if full.suffix.lower() not in extensions:
        return skipped_entry(path, "unsupported", f"extension '{full.suffix}' is not one of "
                                                  f"{' '.join(sorted(extensions))}")
    try:
        status = full.stat()
    except OSError as err:
        return skipped_entry(path, "unreadable", str(err))
    if not stat.S_ISREG(status.st_mode):
        return skipped_entry(path, "unsupported", "not a regular file")
    if status.st_size == 0:
        return skipped_entry(path, "zero-byte", "the file is empty")
    return None


def check_image(src: Path, path: str, label: int | None) -> ValidImage | dict:
    """``path`` (relative to ``src``) as a :class:`ValidImage`, or its ``skipped`` entry."""
    problem = file_problem(src, path, ACCEPTED_EXTENSIONS)
    if problem is not None:
        return problem
    try:
        data = (src / path).read_bytes()
    except OSError as err:
        return skipped_entry(path, "unreadable", str(err))
    try:
        width, height, image_format = probe_image(data)
    except Exception as err:  # PIL reports bad data with many exception types
        return skipped_entry(path, "corrupt", f"{type(err).__name__}: {err}")
    if image_format not in FORMAT_KEYS:
        return skipped_entry(path, "unsupported", f"decodes as {image_format}, not one of "
                                             f"{' '.join(sorted(FORMAT_KEYS))}")
    return ValidImage(path, FORMAT_KEYS[image_format], len(data), width, height, label)


def _check_files(task: tuple[Callable[[Path, str, int | None], Any], Path, list[tuple[str, int | None]]]) -> list:
    check, src, files = task
    return [check(src, path, label) for path, label in files]


def check_sources(src: str | os.PathLike, out: str | os.PathLike, extensions: frozenset[str],
                  check: Callable[[Path, str, int | None], Any], workers: int, batch: int,
                  what: str, follow_symlinks: bool = False) -> tuple[Path, Path | str, list[str], list, list[dict]]:
    """The shared first half of a prep: SRC and OUT checked, class folders found (ImageNet style
    when SRC holds no input at its top level), every file below SRC run through ``check(src, path,
    label)`` in worker processes, ``batch`` files per task (symlinks leaving SRC are skipped unless
    ``follow_symlinks``). ``check`` (picklable) returns a valid input or its ``skipped`` entry (a
    dict). Returns ``(src, out, classes, valid, skipped)`` (OUT resolved, or the URL of an object store),
    both lists sorted by path; raises PrepError when nothing is valid."""
    src_dir, out_dir = Path(src).resolve(), str(out) if is_remote(out) else Path(out).resolve()
    if not src_dir.is_dir():
        raise PrepError(f"SRC '{src}' is not a folder")
    if isinstance(out_dir, Path) and (out_dir == src_dir or src_dir in out_dir.parents):
        raise PrepError(f"OUT '{out}' is inside SRC '{src}': the shards would become inputs")
    classes = find_classes(src_dir, extensions)
    class_index = {name: i for i, name in enumerate(classes)}
    files, skipped = list_files(src_dir, follow_symlinks)
    files_with_labels = [(path, class_index.get(path.split(os.sep, 1)[0]) if os.sep in path else None)
                         for path in files]
    tasks = [(check, src_dir, files_with_labels[i:i + batch]) for i in range(0, len(files), batch)]
    valid = []
    with Progress(total=len(files), desc=f"check {what}", unit="file") as bar:
        for results in parallel_imap(_check_files, tasks, workers):
            for result in results:
                (skipped if isinstance(result, dict) else valid).append(result)
            bar.update(len(results))
    valid.sort(key=attrgetter("path"))
    skipped.sort(key=lambda s: s["path"])
    if not valid:
        raise PrepError(f"no usable {what} under '{src}' ({len(skipped)} files skipped: "
                        f"{count_reasons(skipped) or 'the folder is empty'})")
    return src_dir, out_dir, classes, valid, skipped


def skipped_entry(path: str, reason: str, detail: str) -> dict:
    return {"path": path, "reason": reason, "detail": detail}


def count_reasons(skipped: list[dict]) -> dict[str, int]:
    return dict(sorted(Counter(s["reason"] for s in skipped).items()))


@dataclass(frozen=True)
class ImageSample:
    """Turns a :class:`ValidImage` into its shard sample: the bytes exactly as stored in SRC,
    ``cls`` when labelled, and ``json`` metadata. Runs in the shard-writing workers."""

    src: Path
    classes: list[str]

    def __call__(self, image: ValidImage) -> dict[str, bytes]:
        data = (self.src / image.path).read_bytes()
        if len(data) != image.size:
            raise PrepError(f"{self.src / image.path} changed while being sharded "
                            f"({image.size} bytes when checked, {len(data)} now): rerun the prep")
        meta = {"source": image.path, "width": image.width, "height": image.height}
        sample = {image.key: data}
        if image.label is not None:
            meta["label"] = self.classes[image.label]
            sample["cls"] = str(image.label).encode()
        sample["json"] = json.dumps(meta).encode()
        return sample


def prep_images(src: str | os.PathLike, out: str | os.PathLike, shard_size: int = 1000,
                max_shard_bytes: int | None = None, workers: int | None = None,
                overwrite: bool = False, follow_symlinks: bool = False) -> dict:
    """Shards every valid image under ``src`` into ``out`` (resuming an interrupted run) and
    returns :func:`data_prep.shards.write_shards`'s summary plus ``skipped_reasons`` and timings:
    ``check_seconds`` (listing and decoding the inputs), ``write_seconds`` and total ``seconds``."""
    start = time.perf_counter()
    workers = workers or default_workers()
    src_dir, out_dir, classes, valid, skipped = check_sources(src, out, ACCEPTED_EXTENSIONS, check_image, workers,
                                                              CHECK_BATCH, "images", follow_symlinks)
    check_seconds = time.perf_counter() - start
    plan = ShardPlan(
        source=str(src_dir),
        shards=group_into_shards(valid, shard_size, max_shard_bytes, size_of=attrgetter("size")),
        build_sample=ImageSample(src_dir, classes),
        labelled=bool(classes),
        classes=classes,
        shard_size=shard_size,
        max_shard_bytes=max_shard_bytes,
        skipped=skipped,
    )
    summary = write_shards(out_dir, plan, workers, overwrite)
    return {**summary, "skipped_reasons": count_reasons(skipped), "check_seconds": check_seconds,
            "write_seconds": summary["seconds"], "seconds": time.perf_counter() - start}

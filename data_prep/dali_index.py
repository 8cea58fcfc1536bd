"""DALI index files for WebDataset shards: ``shard-000000.idx`` beside ``shard-000000.tar``.

``fn.readers.webdataset`` (NVIDIA DALI) seeks to samples through an index instead of scanning
every tar at start-up. The format is the one DALI's ``wds2idx`` writes (version ``v1.2``)::

    v1.2 <number of samples>
    <ext> <data offset> <size> <member name> [<ext> <data offset> <size> <member name> ...]

one line per sample, its components (``jpg``, ``cls``, ``json``) grouped by key as webdataset
groups them (the name up to the first dot of its last path part). It is written here with
``tarfile`` instead of calling ``wds2idx`` (which shells out to GNU tar twice per shard) so that
``verify`` can leave samples out: a sample whose image does not decode is not indexed, so DALI
never reads it, and it is recorded in the manifest as skipped (``index_skipped``) and counted
by the DALI loader. ``foundry prep`` indexes every shard it writes; ``foundry prep index DIR``
(re)indexes a folder, verifying every image.
"""
from __future__ import annotations

import os
from pathlib import Path

from ssl_foundry.data_prep.shard_format import IMAGE_EXTENSIONS, INDEX_VERSION, index_path, probe_image, read_samples


def image_problem(ext: str, data: bytes) -> str | None:
    """Why a sample's image member (key ``ext``) does not decode; None when it does."""
    try:
        probe_image(data)
    except Exception as err:  # PIL reports bad data with many exception types
        return f"{ext}: {type(err).__name__}: {err}"
    return None


def _image_problem(f, components: list[tuple[str, int, int, str]]) -> str | None:
    """Why the sample's image does not decode (None when it does, or when it has no image)."""
    for ext, offset, size, _ in components:
        if ext in IMAGE_EXTENSIONS:
            f.seek(offset)
            if problem := image_problem(ext, f.read(size)):
                return problem
    return None


def index_text(samples: list[tuple[str, list[tuple[str, int, int, str]]]]) -> str:
    """The index of these samples (key, [(ext, data offset, size, member name), ...]) in DALI's format."""
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    lines += [" ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in components)
              for _, components in samples]
    return "\n".join(lines) + "\n"


def write_index(shard: str | os.PathLike, verify: bool = False) -> dict:
    """Writes the shard's index (atomically) and returns the manifest fields that record it:
    ``index`` (file name), ``indexed_samples`` and, with ``verify``, ``index_skipped`` (samples
    left out because their image does not decode: key and reason)."""
    shard = Path(shard)
    samples = read_samples(shard)
    skipped = []
    if verify:
        with open(shard, "rb") as f:
            problems = [(key, _image_problem(f, components)) for key, components in samples]
        skipped = [{"key": key, "reason": "corrupt", "detail": problem} for key, problem in problems if problem]
        bad = {s["key"] for s in skipped}
        samples = [s for s in samples if s[0] not in bad]
    final = index_path(shard)
    tmp = final.with_name(final.name + ".tmp")
    tmp.write_text(index_text(samples))
    os.replace(tmp, final)
    record = {"index": final.name, "indexed_samples": len(samples)}
    if verify:
        record["index_skipped"] = skipped
    return record

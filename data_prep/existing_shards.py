"""`foundry prep manifest LOCATION`: the manifest and DALI index files of WebDataset shards made
elsewhere (webdataset's ShardWriter, img2dataset, ...), so that both loaders read them as they read
`foundry prep`'s own.

Every shard is read once, front to back (local, s3:// or http(s)://: a folder's ``*.tar``, or a
shard list): its sha256 and size, its samples (members grouped by key, webdataset's rule), the
offset and size of every member (the DALI index), whether the sample's image decodes (one that does
not, or a sample without an image, is left out of the index and listed under its shard's
``index_skipped``: the torch loader then meets it as a bad sample, see data.on_bad_sample) and its
``cls``. When every sample has a ``cls`` holding a class index, the shards are labelled, their classes
named by index ("0", "1", ...). The index files and then manifest.json are written beside the shards,
or with ``out`` into a local folder (a read-only store, an HTTP server): the manifest then names where
the shards are (``shard_root``).
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
import tarfile
from datetime import datetime, timezone
from pathlib import Path

from ssl_foundry.data_prep.console import Progress
from ssl_foundry.data_prep.dali_index import image_problem, index_text
from ssl_foundry.data_prep.shard_format import (IMAGE_EXTENSIONS, MANIFEST_FORMAT, MANIFEST_NAME, PrepError,
                                                RetryPolicy, StoreError, absolute_location, index_name, join_location,
                                                list_location, location_scheme, manifest_folder, open_location,
                                                put_location, redact, retrying, sample_members, shard_list)
from ssl_foundry.data_prep.shards import default_workers, parallel_imap


class _HashingReader:
    """A file read through this one is hashed as it is read."""

    def __init__(self, f):
        self.f, self.sha256, self.bytes = f, hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.sha256.update(data)
        self.bytes += len(data)
        return data


def _read_shard(url: str) -> dict:
    """One pass over a shard: its manifest entry (without name and index) and its index text."""
    samples: list[tuple[str, list[tuple[str, int, int, str]]]] = []
    images, problems, labels = set(), {}, {}
    with open_location(url) as f:
        reader = _HashingReader(f)
        with tarfile.open(fileobj=reader, mode="r|") as tar:  # a stream: every member in order, once
            for key, ext, member in sample_members(tar):
                if not samples or samples[-1][0] != key:
                    samples.append((key, []))
                samples[-1][1].append((ext, member.offset_data, member.size, member.name))
                data = tar.extractfile(member).read()
                if ext in IMAGE_EXTENSIONS:
                    images.add(key)
                    if key not in problems and (problem := image_problem(ext, data)):
                        problems[key] = problem
                elif ext == "cls":
                    labels[key] = data.decode(errors="replace").strip()
        while reader.read(1 << 20):  # the tar's end blocks: the sha256 covers every byte
            pass
    for key, _ in samples:
        if key not in images:
            problems[key] = "no image member (jpg, png, ...)"
    skipped = [{"key": key, "reason": "corrupt", "detail": problems[key]} for key, _ in samples if key in problems]
    indexed = [sample for sample in samples if sample[0] not in problems]
    return {"num_samples": len(samples), "sha256": reader.sha256.hexdigest(), "bytes": reader.bytes,
            "indexed_samples": len(indexed), "index_skipped": skipped, "index_text": index_text(indexed),
            "labels": [(key, labels.get(key)) for key, _ in samples]}


def _describe(task: tuple[int, str, RetryPolicy]) -> tuple[int, dict]:
    number, url, policy = task
    return number, retrying(url, policy, lambda: _read_shard(url), "reading")


def _shard_urls(location: str, policy: RetryPolicy) -> list[str]:
    listed = shard_list(location)
    if listed is not None:
        return listed
    if location_scheme(location) in ("http", "https"):
        raise PrepError(f"an HTTP folder cannot be listed: give the shards as a brace list, e.g. "
                        f"'{redact(join_location(location, 'shard-{000000..000099}.tar'))}'")
    names = sorted(name for name in list_location(location, policy) if name.endswith(".tar"))
    if not names:
        raise PrepError(f"no *.tar under '{redact(location)}'")
    return [join_location(location, name) for name in names]


def _class_names(labels: list[tuple[str, str, str | None]]) -> list[str]:
    """Class names by index when every sample (shard URL, key, cls) has an integer ``cls``; [] (unlabelled)
    when none has a cls. PrepError naming a sample whose cls is missing or no class index otherwise."""
    if all(label is None for _, _, label in labels):
        return []
    for url, key, label in labels:
        if label is None or not label.isdigit():
            raise PrepError(f"sample {key} of {redact(url)} has {'no cls' if label is None else f'cls {label!r}'}, "
                            f"others have one: the loaders read cls as the class index of every sample; give every "
                            f"sample a cls of 0, 1, ... (or none)")
    return [str(i) for i in range(max(int(label) for _, _, label in labels) + 1)]


def describe_shards(location: str, out: str | os.PathLike | None = None, workers: int | None = None,
                    policy: RetryPolicy = RetryPolicy()) -> dict:
    """Writes the manifest (and DALI index files) of the WebDataset shards at ``location``, beside them
    or into the local folder ``out``; returns ``out, samples, shards, indexed, skipped, labelled, bytes``."""
    location = absolute_location(location)
    urls = _shard_urls(location, policy)
    folder = manifest_folder(location)
    if folder is None:
        raise PrepError("the shards are in several folders, which share no manifest: describe each folder on its own")
    target = str(Path(out).resolve()) if out else folder
    if location_scheme(target) in ("http", "https"):
        raise PrepError(f"an HTTP server is read-only: pass --out DIR to write the manifest of {redact(location)} "
                        f"and its index files into a local folder")
    shards: list[dict] = [{}] * len(urls)
    with Progress(total=len(urls), desc="read shards", unit="shard") as bar:
        for number, record in parallel_imap(_describe, [(i, url, policy) for i, url in enumerate(urls)],
                                            workers or default_workers()):
            shards[number] = record
            bar.update()
    classes = _class_names([(url, key, label) for url, s in zip(urls, shards) for key, label in s.pop("labels")])
    manifest = {
        "format": MANIFEST_FORMAT,
        "source": f"WebDataset shards at {redact(location)} (foundry prep manifest)",
        "shard_size": None, "max_shard_bytes": None, "plan_sha256": None,
        "created": datetime.now(timezone.utc).isoformat(),
        "complete": True,
        "labelled": bool(classes),
        "classes": classes,
        "num_samples": sum(s["num_samples"] for s in shards),
        "shards": [{"name": posixpath.basename(url), "complete": True, "index": index_name(posixpath.basename(url)),
                    **{k: v for k, v in s.items() if k != "index_text"}} for url, s in zip(urls, shards)],
        "skipped": [],
        **({"shard_root": folder} if target != folder else {}),
    }
    try:
        if not location_scheme(target):
            Path(target).mkdir(parents=True, exist_ok=True)
        for record, shard in zip(manifest["shards"], shards):
            put_location(join_location(target, record["index"]), shard["index_text"].encode(), policy)
        put_location(join_location(target, MANIFEST_NAME), json.dumps(manifest, indent=1).encode(), policy)  # last
    except (StoreError, OSError) as err:
        raise PrepError(f"cannot write beside the shards at {redact(target)} ({redact(err)}): if the store is "
                        f"read-only, pass --out DIR to write the manifest and index files into a local "
                        f"folder") from None
    return {"out": redact(target), "samples": manifest["num_samples"], "shards": len(urls),
            "indexed": sum(s["indexed_samples"] for s in shards),
            "skipped": sum(len(s["index_skipped"]) for s in shards), "labelled": manifest["labelled"],
            "bytes": sum(s["bytes"] for s in shards)}

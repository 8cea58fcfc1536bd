"""Resumable WebDataset shard writer, and the manifest that describes a shard folder.

A shard folder holds ``shard-000000.tar, shard-000001.tar, ...`` and ``manifest.json``.
Every dataset (an image folder, Fashion-MNIST) is first turned into a :class:`ShardPlan`: the
samples of every shard, fixed before anything is written, so the output never depends on
worker timing. :func:`write_shards` then writes the shards in worker processes.

Crash safety: the manifest is written (atomically) before the first shard, listing every planned
shard as incomplete. A shard is written to ``<name>.tmp``, fsynced and renamed to its final name,
and only then marked complete in the manifest (again written atomically). So a final name never
holds a half-written tar, and a rerun of the same command keeps the complete shards whose
sha256 still matches, deletes temp files and rewrites the rest. A rerun whose plan differs (other
source, shard size or source files) is refused unless ``overwrite`` is set.

OUT in an object store (``s3://bucket/prefix``): each shard is written to a local staging folder,
uploaded with its index and deleted there, so the local disk holds at most one shard per worker. An
object appears whole or not at all, so the progress record (``OUT/.foundry-prep-progress.json``, the
manifest as it grows) is rewritten after each upload and ``manifest.json`` is written last, once
every shard is there: loaders never see a half-written dataset, and a rerun keeps the shards the
progress record lists whose objects have the recorded size. There is no lock on a store: run one
prep per OUT.

Every shard gets a DALI index beside it (``shard-000000.idx``, see data_prep.dali_index),
written with the shard and recorded in its manifest entry (``index``, ``indexed_samples``);
:func:`reindex` rewrites them for a finished folder, leaving out samples whose image does not
decode. Readers (the training loaders, tests) use ``read_manifest`` and ``shard_paths`` of
data_prep.shard_format (the format's one definition), which refuse a folder whose prep has not finished.
"""
from __future__ import annotations

import ctypes
import fcntl
import hashlib
import json
import logging
import os
import signal
import socket
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

from webdataset.writer import TarWriter

from ssl_foundry.data_prep.console import Progress
from ssl_foundry.data_prep.dali_index import write_index
from ssl_foundry.data_prep.shard_format import (MANIFEST_FORMAT, MANIFEST_NAME, PrepError, file_sha256, find_manifest,
                                                is_remote, join_location, list_location, put_location, read_location,
                                                read_manifest, redact, remove_location, sample_key, shard_name)

logger = logging.getLogger(__name__)

TMP_SUFFIX = ".tmp"
LOCK_NAME = ".foundry-prep.lock"
PROGRESS_NAME = ".foundry-prep-progress.json"  # an object store's manifest until every shard is there
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# Fixed member mtime: rewriting a shard from the same inputs gives identical bytes (same sha256).
TAR_MTIME = 0
# The manifest fields of ShardPlan.identity(), as error messages name them.
IDENTITY_NAMES = {"source": "source", "shard_size": "shard size", "max_shard_bytes": "shard byte limit",
                  "plan_sha256": "set of inputs"}
Item = TypeVar("Item")
Result = TypeVar("Result")


def default_workers() -> int:
    """CPUs this process may run on (respects taskset / cgroup pinning, unlike os.cpu_count)."""
    return len(os.sched_getaffinity(0))


# ---------------------------------------------------------------------------- planning


def group_into_shards(items: Sequence[Item], shard_size: int, max_shard_bytes: int | None = None,
                      size_of: Callable[[Item], int] | None = None) -> list[list[Item]]:
    """Consecutive groups of at most ``shard_size`` items and (when given) at most
    ``max_shard_bytes`` by ``size_of``; an item larger than the limit gets a shard of its own."""
    shards: list[list[Item]] = []
    current: list[Item] = []
    current_bytes = 0
    for item in items:
        item_bytes = size_of(item) if max_shard_bytes else 0
        full = len(current) >= shard_size or (max_shard_bytes and current_bytes + item_bytes > max_shard_bytes)
        if current and full:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(item)
        current_bytes += item_bytes
    if current:
        shards.append(current)
    return shards


@dataclass
class ShardPlan:
    """Everything a prep run writes, fixed before writing starts.

    ``shards[i]`` lists the JSON-serialisable descriptors of shard ``i``'s samples;
    ``build_sample(descriptor)`` (picklable: it runs in worker processes) returns the sample's
    WebDataset fields as bytes, without ``__key__``, which the writer numbers over the dataset.
    """

    source: str
    shards: list[list[Any]]
    build_sample: Callable[[Any], dict[str, bytes]]
    labelled: bool
    classes: list[str]
    shard_size: int
    max_shard_bytes: int | None = None
    skipped: list[dict] = field(default_factory=list)
    # How samples are made from the inputs (video clips: frames, fps, codec...): part of the plan's
    # identity and recorded in the manifest, where loaders read it.
    settings: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # more manifest fields (a report, e.g. clips per video)

    @property
    def num_samples(self) -> int:
        return sum(len(s) for s in self.shards)

    @cached_property
    def plan_sha256(self) -> str:
        """Hash of everything that decides the shards' contents."""
        parts = [self.source, self.labelled, self.classes, self.shards] + ([self.settings] if self.settings else [])
        text = json.dumps(parts)
        return hashlib.sha256(text.encode()).hexdigest()

    def identity(self) -> dict:
        """Manifest fields that must match for a rerun to resume into an existing folder."""
        return {"source": self.source, "shard_size": self.shard_size,
                "max_shard_bytes": self.max_shard_bytes, "plan_sha256": self.plan_sha256}


# ---------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class _ShardTask:
    """One shard for a worker process: its index, first sample number and sample descriptors."""

    out_dir: Path
    index: int
    first_sample: int
    items: list[Any]
    build_sample: Callable[[Any], dict[str, bytes]]
    upload_to: str | None = None  # an object store's OUT: the shard and its index go there, then leave out_dir


def _die_with_parent(parent: int) -> None:
    """Pool worker initializer: the kernel kills this worker when the prep process dies (kill -9
    included), so no orphan goes on writing into OUT after its prep is gone."""
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def parallel_imap(func: Callable[[Item], Result], tasks: Sequence[Item], workers: int) -> Iterator[Result]:
    """``func(task)`` for every task, yielded as each finishes (in any order), in up to
    ``workers`` processes; in this process when one worker (or one task) is enough. A worker that
    dies (killed, out of memory) raises BrokenProcessPool here instead of hanging; the workers die
    with this process."""
    if workers <= 1 or len(tasks) <= 1:
        yield from map(func, tasks)
        return
    with ProcessPoolExecutor(max_workers=min(workers, len(tasks)), initializer=_die_with_parent,
                             initargs=(os.getpid(),)) as pool:
        try:
            for future in as_completed([pool.submit(func, task) for task in tasks]):
                yield future.result()
        finally:
            pool.shutdown(cancel_futures=True)


def write_shards(out_dir: str | os.PathLike, plan: ShardPlan, workers: int | None = None,
                 overwrite: bool = False, progress: str = "write shards") -> dict:
    """Writes (or finishes writing) ``plan`` into ``out_dir`` and returns a summary for logs and
    benchmarks: ``out, samples, shards, shards_written, shards_reused, skipped, bytes, seconds``."""
    start = time.perf_counter()
    workers = workers or default_workers()
    with _shard_output(out_dir) as out:
        manifest = _start_manifest(out, plan, workers, overwrite)
        todo = [i for i, record in enumerate(manifest["shards"]) if not record["complete"]]
        first_sample = [0]
        for shard in plan.shards:
            first_sample.append(first_sample[-1] + len(shard))
        tasks = [_ShardTask(out.shard_dir, i, first_sample[i], plan.shards[i], plan.build_sample, out.upload_to)
                 for i in todo]
        with Progress(total=sum(len(plan.shards[i]) for i in todo), desc=progress, unit="sample") as bar:
            for index, record in parallel_imap(_write_shard, tasks, workers):
                manifest["shards"][index] = record
                out.save(manifest)
                bar.update(record["num_samples"])
        manifest["complete"] = True
        out.save(manifest)
    return {
        "out": out.name,
        "samples": plan.num_samples,
        "shards": len(plan.shards),
        "shards_written": len(todo),
        "shards_reused": len(plan.shards) - len(todo),
        "skipped": len(plan.skipped),
        "bytes": sum(s["bytes"] for s in manifest["shards"]),
        "seconds": time.perf_counter() - start,
    }


def reindex(folder: str | os.PathLike, verify: bool = True, workers: int | None = None) -> dict:
    """(Re)writes the DALI index of every shard of a finished folder and records it in the
    manifest; with ``verify``, samples whose image does not decode are left out of the index and
    listed in their shard's ``index_skipped``. Returns ``shards``, ``indexed``, ``skipped``."""
    out = Path(folder).resolve()
    with _exclusive_lock(out):
        manifest = read_manifest(out)
        paths = [out / s["name"] for s in manifest["shards"]]
        tasks = [(p, verify) for p in paths]
        records = dict(Progress(parallel_imap(_index_task, tasks, workers or default_workers()), total=len(tasks),
                                desc=f"index {out}", unit="shard"))
        for shard in manifest["shards"]:
            shard.pop("index_skipped", None)
            shard.update(records[shard["name"]])
        _write_json_atomic(out / MANIFEST_NAME, manifest)
    return {"out": str(out), "shards": len(paths),
            "indexed": sum(r["indexed_samples"] for r in records.values()),
            "skipped": sum(len(r.get("index_skipped", [])) for r in records.values())}


def _index_task(task: tuple[Path, bool]) -> tuple[str, dict]:
    path, verify = task
    return path.name, write_index(path, verify)


@contextmanager
def _exclusive_lock(folder: Path) -> Iterator[None]:
    """One prep at a time per folder: two would corrupt each other's shards. The lock is a POSIX
    record lock on ``folder/.foundry-prep.lock``, which the kernel releases when its process dies
    (kill -9 included) and which forked workers do not hold. The file names the holder (host, PID,
    start time): a second prep is refused naming it, and a prep that finds the record of one that
    died without releasing the lock says that it takes it over."""
    with open(folder / LOCK_NAME, "a+") as f:  # appends: every write lands after truncate(0)
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):
            f.seek(0)
            raise PrepError(f"another foundry prep is writing into {folder} ({f.read() or 'holder unknown'}): "
                            f"wait for it to finish or stop it") from None
        f.seek(0)
        if holder := f.read():
            logger.warning("%s: taking over the lock of a foundry prep that is no longer running (%s)", folder, holder)
        f.truncate(0)
        f.write(f"host {socket.gethostname()}, pid {os.getpid()}, started "
                f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}")
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)  # released: nothing to take over


def _start_manifest(out: "_ShardFolder | _ShardStore", plan: ShardPlan, workers: int, overwrite: bool) -> dict:
    """The manifest to resume from: complete shards of an earlier run of the same plan that are still
    intact are kept; every other shard in ``out`` is deleted."""
    previous = _previous_run(out, plan, overwrite)
    records = [s for s in previous["shards"] if s["complete"] and s.get("index")] if previous else []
    kept = {s["name"]: s for s in out.intact(records, workers)}
    manifest = {
        "format": MANIFEST_FORMAT,
        **plan.identity(),
        "created": previous["created"] if previous else datetime.now(timezone.utc).isoformat(),
        "complete": False,
        "labelled": plan.labelled,
        "classes": plan.classes,
        "num_samples": plan.num_samples,
        "shards": [kept.get(shard_name(i)) or {"name": shard_name(i), "num_samples": len(items),
                                                "sha256": None, "bytes": None, "complete": False}
                   for i, items in enumerate(plan.shards)],
        "skipped": plan.skipped,
        **({"settings": plan.settings} if plan.settings else {}),
        **plan.extra,
    }
    out.save(manifest)
    out.remove_stale(set(kept) | {s["index"] for s in kept.values()})
    return manifest


def _previous_run(out: "_ShardFolder | _ShardStore", plan: ShardPlan, overwrite: bool) -> dict | None:
    """The manifest of an earlier run into ``out`` that this run may resume, or None. Raises
    :class:`PrepError` when ``out`` holds shards this run must not mix with its own."""
    if overwrite:
        return None
    previous = out.previous()
    if previous is None:
        if out.holds_shards():
            raise PrepError(f"{out.name} holds shard-*.tar files but no {MANIFEST_NAME}: they were not "
                            f"written by this prep. Choose another OUT or pass --overwrite.")
        return None
    for key, wanted in plan.identity().items():
        if previous.get(key) != wanted:
            raise PrepError(f"{out.name} was written from a different {IDENTITY_NAMES[key]} ({key}: "
                            f"{previous.get(key)!r}, now {wanted!r}). Choose another OUT or pass "
                            f"--overwrite to replace it.")
    return previous


@contextmanager
def _shard_output(out: str | os.PathLike) -> Iterator["_ShardFolder | _ShardStore"]:
    """Where a prep writes: a local folder (locked, see _exclusive_lock) or an object store (through
    a local staging folder)."""
    if is_remote(out):
        with tempfile.TemporaryDirectory(prefix="foundry-prep-") as staging:
            yield _ShardStore(str(out).rstrip("/"), Path(staging))
        return
    folder = Path(out).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(folder):
        yield _ShardFolder(folder)


@dataclass
class _ShardFolder:
    """OUT on a local disk: shards written in place, manifest.json (atomically) first and after each shard."""

    shard_dir: Path
    upload_to = None

    @property
    def name(self) -> str:
        return str(self.shard_dir)

    def previous(self) -> dict | None:
        return find_manifest(self.shard_dir, allow_incomplete=True)

    def holds_shards(self) -> bool:
        return any(self.shard_dir.glob("shard-*.tar"))

    def intact(self, records: list[dict], workers: int) -> list[dict]:
        """The records whose shard and index exist and whose shard's bytes still have the recorded sha256."""
        present = [s for s in records
                   if (self.shard_dir / s["name"]).is_file() and (self.shard_dir / s["index"]).is_file()]
        actual = dict(parallel_imap(_checksum, [self.shard_dir / s["name"] for s in present], workers))
        return [s for s in present if actual[s["name"]] == s["sha256"]]

    def remove_stale(self, keep: set[str]) -> None:
        for path in [*self.shard_dir.glob("shard-*.tar*"), *self.shard_dir.glob("shard-*.idx*")]:
            if path.name not in keep:
                path.unlink()

    def save(self, manifest: dict) -> None:
        _write_json_atomic(self.shard_dir / MANIFEST_NAME, manifest)


@dataclass
class _ShardStore:
    """OUT in an object store: shards made in ``shard_dir`` (a local staging folder) and uploaded by the
    workers; the progress record after each shard, manifest.json last."""

    upload_to: str
    shard_dir: Path
    finished_manifest_removed: bool = False

    @property
    def name(self) -> str:
        return redact(self.upload_to)

    def previous(self) -> dict | None:
        progress = read_location(join_location(self.upload_to, PROGRESS_NAME))
        return json.loads(progress) if progress else find_manifest(self.upload_to)

    def holds_shards(self) -> bool:
        return any(name.startswith("shard-") and name.endswith(".tar") for name in list_location(self.upload_to))

    def intact(self, records: list[dict], workers: int) -> list[dict]:
        """The records whose shard object has the recorded size and whose index is there (an upload is atomic)."""
        sizes = list_location(self.upload_to)
        return [s for s in records if sizes.get(s["name"]) == s["bytes"] and s["index"] in sizes]

    def remove_stale(self, keep: set[str]) -> None:
        for name in list_location(self.upload_to):
            if name.startswith("shard-") and name not in keep:
                remove_location(join_location(self.upload_to, name))

    def save(self, manifest: dict) -> None:
        if manifest["complete"]:
            put_location(join_location(self.upload_to, MANIFEST_NAME), json.dumps(manifest, indent=1).encode())
            remove_location(join_location(self.upload_to, PROGRESS_NAME))
            return
        if not self.finished_manifest_removed:  # a rerun rewriting a finished OUT: it is not finished now
            remove_location(join_location(self.upload_to, MANIFEST_NAME))
            self.finished_manifest_removed = True
        put_location(join_location(self.upload_to, PROGRESS_NAME), json.dumps(manifest, indent=1).encode())


def _checksum(path: Path) -> tuple[str, str]:
    return path.name, file_sha256(path)


def _write_shard(task: _ShardTask) -> tuple[int, dict]:
    """Writes one shard to a temp name, fsyncs it and renames it into place, then its DALI index
    (in a worker). Its images were checked before planning: the index is not verified again."""
    final = task.out_dir / shard_name(task.index)
    tmp = final.with_name(final.name + TMP_SUFFIX)
    with open(tmp, "wb") as f:
        with TarWriter(f, encoder=False, mtime=TAR_MTIME) as tar:
            for offset, item in enumerate(task.items):
                tar.write({"__key__": sample_key(task.first_sample + offset), **task.build_sample(item)})
        f.flush()
        os.fsync(f.fileno())
    record = {"name": final.name, "num_samples": len(task.items), "sha256": file_sha256(tmp),
              "bytes": tmp.stat().st_size, "complete": True}
    os.replace(tmp, final)
    record.update(write_index(final))
    _fsync_dir(task.out_dir)
    if task.upload_to:
        for path in (final, task.out_dir / record["index"]):
            put_location(join_location(task.upload_to, path.name), path)
            path.unlink()
    return task.index, record


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Makes a rename inside ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

"""The shard format, in one place: what `foundry prep` writes and the loaders (torch and DALI) read.

A shard folder holds WebDataset tars ``shard-000000.tar, shard-000001.tar, ...``, a DALI index beside
each (``shard-000000.idx``) and ``manifest.json`` (format ``ssl-foundry-shards/1``): the prep settings,
the classes, and per shard its name, sample count, sha256, size, completeness and index. A sample is
the tar members that share a key (``00000012``, no dots): the image under the key of its decoded
format (``jpg``, ``png``, ...) or a clip under its codec's key (``avi``, ``webm``, ``mp4``), ``cls``
(the label, when the source has labels) and ``json`` (metadata).

Where shards live: a location is a folder holding ``manifest.json`` (a local path, ``s3://bucket/prefix``
or ``http(s)://host/path``) or a shard list, a brace pattern or a single URL of tars
(``s3://bucket/train/shard-{000000..000099}.tar``) whose manifest, when there is one, is the one in their
folder. A manifest written apart from its shards (`foundry prep manifest LOCATION --out DIR`) names
where they are (``shard_root``). Every location is opened through fsspec (s3fs, aiohttp), so credentials
come from each store's own configuration (the ``AWS_*`` variables and ``~/.aws`` for S3, ``~/.netrc`` for
HTTP), and any that a URL carries are cut out of every message (:func:`redact`). Shards stream: one is
read front to back in requests of ``READ_BLOCK_BYTES``, never copied whole, and a remote read that fails
(an HTTP error, a reset connection, a server that stops sending) is retried (:class:`RetryPolicy`) from
the first member of the sample it broke off in.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import re
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import aiohttp
import fsspec
from botocore.exceptions import BotoCoreError
from braceexpand import braceexpand
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


class StoreError(ShardError):
    """A remote location that did not answer within data.retries retries; the message names the URL."""


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def index_name(shard: str) -> str:
    """``shard-000000.tar`` -> ``shard-000000.idx``: the DALI index's name beside its shard."""
    return posixpath.splitext(shard)[0] + INDEX_SUFFIX


def sample_key(index: int) -> str:
    """WebDataset ``__key__`` of the ``index``-th sample of a dataset (no dots: wds splits on them)."""
    return f"{index:08d}"


# ---------------------------------------------------------------------------- where shards live

REMOTE_SCHEMES = ("s3", "http", "https")
# Bytes per request to a store (and per read-ahead): with the sample being read, what a shard reader holds.
READ_BLOCK_BYTES = 4 * 2**20
_URL = re.compile(r"(?P<scheme>[A-Za-z][\w+.-]*://)(?P<userinfo>[^/@\s'\"]*@)?(?P<rest>[^\s?#'\"]*)"
                  r"(?P<query>\?[^\s#'\"]*)?")
Result = TypeVar("Result")


def location_scheme(location: str | os.PathLike) -> str:
    """``s3``, ``http`` or ``https``; ``""`` for a local path. Raises ManifestError for any other scheme."""
    scheme, sep, _ = str(location).partition("://")
    if not sep:
        return ""
    if scheme not in REMOTE_SCHEMES:
        raise ManifestError(f"'{redact(location)}': shards are read from a local folder, s3:// or http(s)://, "
                            f"not {scheme}://")
    return scheme


def is_remote(location: str | os.PathLike) -> bool:
    return bool(location_scheme(location))


def join_location(folder: str | os.PathLike, name: str) -> str:
    return f"{str(folder).rstrip('/')}/{name}"


def redact(text: object) -> str:
    """``text`` with the credentials of every URL in it replaced by ``***``: a ``user:password@`` part
    and the value of every query parameter (tokens, signatures)."""
    def clean(url: re.Match) -> str:
        query = url["query"] and "?" + "&".join(f"{p.partition('=')[0]}=***" for p in url["query"][1:].split("&"))
        return f"{url['scheme']}{'***@' if url['userinfo'] else ''}{url['rest']}{query or ''}"

    return _URL.sub(clean, str(text))


def shard_list(location: str | os.PathLike) -> list[str] | None:
    """The tars a shard list names (a brace pattern, or one ``.tar``), in order; None for a folder."""
    names = list(braceexpand(str(location)))
    return names if all(name.endswith(".tar") for name in names) else None


def manifest_folder(location: str | os.PathLike) -> str | None:
    """Where a location's manifest is: the folder itself, or the one folder of a shard list (None
    when its tars are in several folders: such a list has no manifest)."""
    names = shard_list(location)
    if names is None:
        return str(location)
    folders = {posixpath.dirname(name) for name in names}
    return folders.pop() if len(folders) == 1 else None


@dataclass(frozen=True)
class RetryPolicy:
    """How reads from a store survive faults (local files are read once: their errors are final).
    A request waits at most ``request_timeout_s`` for data; a failed attempt (an error status, a reset
    connection, that timeout) is made again up to ``retries`` times, after pauses doubling from 0.5 s
    (at most one request timeout). The timeout is ``timeout_s / (3 (retries + 1))``: an attempt to open
    a file may take two requests (fsspec asks for its size with HEAD, then GET), so every attempt and
    pause of a read ends within ``timeout_s`` (data.timeout_s, the longest a rank waits for a batch) and
    the error that ends the run names the URL rather than a stalled loader."""

    retries: int = 3
    timeout_s: float = 300.0

    @property
    def request_timeout_s(self) -> float:
        return self.timeout_s / (3 * (self.retries + 1))

    def pause_s(self, retry: int) -> float:
        return min(0.5 * 2 ** (retry - 1), self.request_timeout_s)


def _store(url: str, policy: RetryPolicy) -> tuple:
    """(fsspec file system, path in it, the errors worth retrying) for ``url``. One attempt per request
    (the retries are the policy's), each waiting at most the policy's request timeout; credentials
    come from the store's own configuration (botocore's chain for S3; ~/.netrc and proxies for HTTP)."""
    scheme, timeout = location_scheme(url), policy.request_timeout_s
    if not scheme:
        return (*fsspec.core.url_to_fs(url), ())
    if scheme == "s3":
        fs, path = fsspec.core.url_to_fs(url, config_kwargs={
            "connect_timeout": timeout, "read_timeout": timeout, "retries": {"total_max_attempts": 1}})
        fs.retries = 1  # s3fs's own retry loop (a class attribute, not an argument): one attempt
        return fs, path, (OSError, aiohttp.ClientError, BotoCoreError)
    fs, path = fsspec.core.url_to_fs(url, client_kwargs={
        "trust_env": True, "timeout": aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)})
    return fs, path, (OSError, aiohttp.ClientError)


def open_location(url: str, policy: RetryPolicy = RetryPolicy()):
    """A file object over ``url``, read in requests of READ_BLOCK_BYTES with read-ahead (seekable)."""
    fs, path, _ = _store(url, policy)
    return fs.open(path, "rb", block_size=READ_BLOCK_BYTES, cache_type="readahead")


def retrying(url: str, policy: RetryPolicy, action: Callable[[], Result], what: str = "") -> Result:
    """``action()``; once more after each failure that may pass (remote locations only), up to
    ``policy.retries`` times. Then StoreError naming ``url`` (credentials cut out) and the last error."""
    transient = _store(url, policy)[2]
    start, retry = time.monotonic(), 0
    while True:
        try:
            return action()
        except transient as err:
            retry += 1
            if retry > policy.retries:
                raise StoreError(store_failure(url, err, policy.retries, time.monotonic() - start, what)) from None
            time.sleep(policy.pause_s(retry))


def store_failure(url: str, err: BaseException, retries: int, seconds: float, what: str = "") -> str:
    causes = []
    while err is not None:  # fsspec reports e.g. a 403 or a timeout as FileNotFoundError, caused by it
        causes.append(f"{type(err).__name__}: {redact(err) or 'no detail'}")
        err = err.__cause__
    return (f"{what or 'reading'} {redact(url)} failed: {', caused by '.join(causes)} ({retries} retries over "
            f"{seconds:.1f} s: data.retries, data.timeout_s). Check the URL, the store's credentials (AWS_* or "
            f"~/.aws for s3://, ~/.netrc for http(s)://) and that it is reachable")


def read_location(url: str, policy: RetryPolicy = RetryPolicy()) -> bytes | None:
    """The bytes of a (small) file, None when it does not exist (not retried: a missing manifest is an answer)."""
    fs, path, _ = _store(url, policy)

    def read() -> bytes | None:
        try:
            return fs.cat_file(path)
        except FileNotFoundError:
            return None

    return retrying(url, policy, read)


def location_size(url: str, policy: RetryPolicy = RetryPolicy()) -> int:
    fs, path, _ = _store(url, policy)
    return retrying(url, policy, lambda: fs.size(path), "finding the size of")


def list_location(folder: str, policy: RetryPolicy = RetryPolicy()) -> dict[str, int]:
    """Name -> size of the files in a folder (local or s3://; an HTTP server has no listing)."""
    fs, path, _ = _store(folder, policy)

    def listing() -> dict[str, int]:
        try:
            entries = fs.ls(path, detail=True, refresh=True) if is_remote(folder) else fs.ls(path, detail=True)
        except FileNotFoundError:
            return {}
        return {posixpath.basename(e["name"]): e["size"] for e in entries if e["type"] == "file"}

    return retrying(folder, policy, listing, "listing")


def put_location(url: str, data: bytes | os.PathLike, policy: RetryPolicy = RetryPolicy()) -> None:
    """Writes ``data`` (bytes, or a local file to upload) to ``url``; in an object store the object
    appears whole or not at all."""
    fs, path, _ = _store(url, policy)
    put = (lambda: fs.pipe_file(path, data)) if isinstance(data, bytes) else (lambda: fs.put_file(str(data), path))
    retrying(url, policy, put, "writing")


def remove_location(url: str, policy: RetryPolicy = RetryPolicy()) -> None:
    """Deletes ``url`` if it exists."""
    fs, path, _ = _store(url, policy)

    def remove() -> None:
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass

    retrying(url, policy, remove, "deleting")


# ---------------------------------------------------------------------------- manifest


def find_manifest(location: str | os.PathLike, allow_incomplete: bool = False,
                  policy: RetryPolicy = RetryPolicy()) -> dict | None:
    """The manifest of a location, or None when it has none. Raises :class:`ManifestError` naming it
    when the manifest does not read, or (unless ``allow_incomplete``) when its prep has not finished."""
    folder = manifest_folder(location)
    if folder is None:
        return None
    path = join_location(folder, MANIFEST_NAME)
    try:
        data = read_location(path, policy)
        manifest = None if data is None else json.loads(data)
    except (OSError, ValueError) as err:
        raise ManifestError(f"cannot read the shard manifest {redact(path)} ({redact(err)}). "
                            f"Remake the shards with {HOW_TO_MAKE_SHARDS} and --overwrite.") from None
    if manifest is None:
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ManifestError(f"{redact(path)} is not an {MANIFEST_FORMAT} manifest. "
                            f"Remake the shards with {HOW_TO_MAKE_SHARDS} and --overwrite.")
    if not allow_incomplete and not manifest["complete"]:
        done = sum(s["complete"] for s in manifest["shards"])
        raise ManifestError(f"the prep into '{redact(folder)}' did not finish ({done} of "
                            f"{len(manifest['shards'])} shards written): rerun the same "
                            f"`foundry prep` command to resume it.")
    return manifest


def read_manifest(location: str | os.PathLike, allow_incomplete: bool = False,
                  policy: RetryPolicy = RetryPolicy()) -> dict:
    """:func:`find_manifest`, which must find one: ManifestError naming the location and how to make one."""
    manifest = find_manifest(location, allow_incomplete, policy)
    if manifest is None:
        raise _no_manifest(location)
    return manifest


def _no_manifest(location: str | os.PathLike) -> ManifestError:
    folder = manifest_folder(location)
    where = (f"{redact(join_location(folder, MANIFEST_NAME))} does not exist" if folder else
             "its tars are in several folders, which share no manifest")
    return ManifestError(f"no shards at '{redact(location)}': {where}. Make them with {HOW_TO_MAKE_SHARDS}, "
                         f"or describe WebDataset shards made elsewhere with `foundry prep manifest LOCATION`.")


def manifest_sha256(location: str | os.PathLike) -> str | None:
    """The sha256 of a location's manifest.json (None without one): what identifies its shards' contents."""
    folder = manifest_folder(location)
    data = folder and read_location(join_location(folder, MANIFEST_NAME))
    return hashlib.sha256(data).hexdigest() if data else None


def manifest_shards(location: str | os.PathLike, manifest: dict) -> list[tuple[str, dict]]:
    """(URL, manifest entry) of the location's shards in order: every complete shard of a folder, or the
    tars a shard list names. Raises ManifestError for a listed tar the manifest does not hold."""
    folder = manifest_folder(location)
    root = manifest.get("shard_root") or folder
    records = [s for s in manifest["shards"] if s["complete"]]
    listed = shard_list(location)
    if listed is None:
        return [(join_location(root, s["name"]), s) for s in records]
    by_name = {s["name"]: s for s in records}
    missing = [name for name in listed if posixpath.basename(name) not in by_name]
    if missing:
        raise ManifestError(f"{redact(missing[0])} is not a complete shard of "
                            f"{redact(join_location(folder, MANIFEST_NAME))} ({len(missing)} of the {len(listed)} "
                            f"listed are not): list the shards it holds")
    return [(join_location(root, posixpath.basename(name)), by_name[posixpath.basename(name)]) for name in listed]


def locate_shards(location: str | os.PathLike,
                  policy: RetryPolicy = RetryPolicy()) -> tuple[dict | None, list[tuple[str, int | None]]]:
    """(manifest or None, [(shard URL, sample count or None)]) of a location. A folder needs a manifest;
    a shard list without one has no counts (the loaders' resampled mode)."""
    manifest = find_manifest(location, policy=policy)
    if manifest is not None:
        return manifest, [(url, int(s["num_samples"])) for url, s in manifest_shards(location, manifest)]
    listed = shard_list(location)
    if listed is None:
        raise _no_manifest(location)
    return None, [(url, None) for url in listed]


def absolute_location(location: str | os.PathLike) -> str:
    """A local location made absolute (symlinks resolved); a URL as it is."""
    return str(location) if is_remote(location) else str(Path(location).resolve())


def shard_paths(location: str | os.PathLike, allow_incomplete: bool = False) -> list[str]:
    """Paths (URLs) of the location's complete shards, in shard order; local ones absolute."""
    location = absolute_location(location)
    manifest = read_manifest(location, allow_incomplete)
    return [url for url, _ in manifest_shards(location, manifest)]


def remake_hint(folder: str | os.PathLike) -> str:
    return (f"restore it, or rerun the `foundry prep` command that wrote {redact(folder)} (it keeps the shards that "
            f"match the manifest and rewrites the others)")


def verify_shards(location: str | os.PathLike, mode: str = "size", part: tuple[int, int] = (0, 1),
                  policy: RetryPolicy = RetryPolicy()) -> None:
    """Checks a finished location's shards against its manifest before they are read: each exists and has
    the recorded size (``size``), and the recorded sha256 (``sha256``: reads every byte, so caller
    ``part=(i, n)`` of n hashes every n-th shard from the i-th). Raises ShardError naming the first that
    differs and the fix. A shard list without a manifest has nothing to be checked against."""
    if mode == "none":
        return
    manifest = find_manifest(location, policy=policy)
    if manifest is None:
        if shard_list(location) is None:
            raise _no_manifest(location)
        return
    shards = manifest_shards(location, manifest)
    folder = manifest_folder(location)
    for url, record in shards:
        try:
            size = location_size(url, policy)
        except FileNotFoundError:
            raise ShardError(f"shard {redact(url)} is missing ({MANIFEST_NAME} lists it): "
                             f"{remake_hint(folder)}") from None
        if size != record["bytes"]:
            raise ShardError(f"shard {redact(url)} is {size} bytes, {MANIFEST_NAME} records {record['bytes']}: it was "
                             f"cut short or replaced after prep; {remake_hint(folder)}")
    if mode == "sha256":
        index, count = part
        for url, record in shards[index::count]:
            if file_sha256(url, policy) != record["sha256"]:
                raise ShardError(f"shard {redact(url)} does not have the sha256 {MANIFEST_NAME} records: its bytes "
                                 f"changed after prep; {remake_hint(folder)}")


def file_sha256(location: str | os.PathLike, policy: RetryPolicy = RetryPolicy()) -> str:
    """The sha256 of a file, local or remote (a remote read that fails resumes where it stopped)."""
    digest, done = hashlib.sha256(), 0

    def read_rest() -> None:
        nonlocal done
        with open_location(str(location), policy) as f:
            f.seek(done)
            while chunk := f.read(1 << 20):
                digest.update(chunk)
                done += len(chunk)

    retrying(str(location), policy, read_rest, "hashing")
    return digest.hexdigest()


# ---------------------------------------------------------------------------- reading


def sample_members(tar: tarfile.TarFile) -> Iterator[tuple[str, str, tarfile.TarInfo]]:
    """(key, ext, member) of every member that belongs to a sample, in tar order (webdataset's and DALI's
    rule: regular files; hidden files skipped)."""
    for member in tar:
        if not member.isreg():
            continue
        key, ext = split_member_name(member.name)
        if not key or key.endswith("/") or key.rsplit("/", 1)[-1].startswith("."):
            continue
        yield key, ext, member


def read_samples(shard: str | os.PathLike) -> list[tuple[str, list[tuple[str, int, int, str]]]]:
    """Every sample of a tar in order, from its headers: (key, [(ext, data offset, size, member name), ...])."""
    samples: list[tuple[str, list[tuple[str, int, int, str]]]] = []
    with open_location(str(shard)) as f, tarfile.open(fileobj=f, mode="r:") as tar:  # shards are plain tars
        for key, ext, member in sample_members(tar):
            if not samples or samples[-1][0] != key:
                samples.append((key, []))
            samples[-1][1].append((ext, member.offset_data, member.size, member.name))
    return samples


def _samples_from(f, url: str, max_sample_bytes: int) -> Iterator[tuple[dict, int]]:
    """(sample, offset of the header after it) for every sample of the tar in ``f`` from its position on;
    each member is read right after its header, so the file is read front to back."""
    with tarfile.open(fileobj=f, mode="r:") as tar:
        sample = None
        for key, ext, member in sample_members(tar):
            if sample is not None and sample["__key__"] != key:
                yield sample, member.offset
                sample = None
            if sample is None:
                sample = {"__key__": key, "__url__": url}
            if member.size > max_sample_bytes:
                sample["__error__"] = (f"member {member.name} is {member.size} bytes, over data.max_sample_bytes="
                                       f"{max_sample_bytes} (not read)")
            else:
                sample[ext.lower()] = tar.extractfile(member).read()
        if sample is not None:
            yield sample, tar.offset


def shard_samples(url: str, num_samples: int | None, max_sample_bytes: int,
                  policy: RetryPolicy = RetryPolicy()) -> Iterator[dict]:
    """The samples of one shard in tar order, grouped by key as webdataset does: ``{"__key__", "__url__":
    the URL with its credentials cut out, ext: bytes, ...}``, streamed front to back. A member over
    ``max_sample_bytes`` is not read: the sample gets ``"__error__"`` instead. A remote read that fails is
    retried (``policy``) from the first header of the sample it was in, so no sample is yielded twice or
    skipped; StoreError once a failure outlasts the retries. ShardError when the shard does not read as a
    tar (cut inside a member or header) or holds other than ``num_samples`` samples (None: unknown)."""
    shown, folder = redact(url), posixpath.dirname(url)
    transient = _store(url, policy)[2]
    start, count, retry, began = 0, 0, 0, time.monotonic()
    while True:
        try:
            with open_location(url, policy) as f:
                f.seek(start)
                for sample, after in _samples_from(f, shown, max_sample_bytes):
                    yield sample
                    start, count, retry = after, count + 1, 0
            break
        except transient as err:
            retry += 1
            if retry > policy.retries:
                raise StoreError(store_failure(url, err, policy.retries, time.monotonic() - began,
                                               f"reading sample {count} of shard")) from None
            time.sleep(policy.pause_s(retry))
        except (OSError, tarfile.TarError) as err:
            raise ShardError(f"shard {shown} does not read as a tar ({redact(err)}): it was cut short or damaged "
                             f"after prep; {remake_hint(folder)}") from None
    if num_samples is not None and count != num_samples:
        raise ShardError(f"shard {shown} holds {count} samples, its manifest {num_samples}: it was cut short or "
                         f"replaced after prep (data.verify=size finds this before training); {remake_hint(folder)}")


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

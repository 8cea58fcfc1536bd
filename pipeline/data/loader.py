"""Streaming WebDataset loader: shards -> decoded images -> augmented views, split over
ranks x workers, deterministic so that a resumed run sees exactly the batches it would have.

Training: the global batch of every step is the same whatever the number of ranks and loader
workers. ``readers`` (V) virtual readers each stream their own shards and give every global
batch a micro-batch of ``global batch / V`` samples, in reader order. Rank ``r`` of ``W`` owns
the readers ``[r V/W, (r+1) V/W)``, and each of its DataLoader workers an equal contiguous block
of those; a worker yields its readers' micro-batches of one step, and ``make_loader`` joins the
workers' parts of a step (the DataLoader serves workers round-robin) into the local batch. So
4 ranks see exactly the samples and augmentations that 1 rank sees in its whole batch, and a
model without batch statistics (LayerNorm) computes the same loss at any world size.

Epoch ``e``: the shard list is permuted with ``(seed, e)`` (identical on every rank) and dealt
round-robin to the V readers; each reader streams its shards through its own shuffle buffer
seeded by ``(seed, e, reader)``. Every reader yields the same number of micro-batches per epoch
(the minimum over readers, from the manifest's sample counts, which every rank knows), so ranks
step in lock-step. Augmentation randomness is re-seeded per micro-batch from ``(seed, e,
reader, index)``, so starting at step ``k`` (resume) skips ``k`` micro-batches per reader
without decoding them and reproduces the stream.

``resampled=True`` draws each reader's shards with replacement instead of a permutation (for
very long runs on few shards); a shard list without a manifest (no sample counts, so no epochs)
trains only so: each reader draws shards with replacement forever, all in epoch 0. ``finite=True``
(evaluation) visits every sample exactly once, in shard order, one reader per rank x worker, in
batches of ``batch_size`` (the last short).

Shards may be local or remote (data_prep.shard_format: s3://, http(s)://, brace lists): each is
streamed front to back, and a read that fails is retried from the sample it broke off in, so the
stream, and with it exactly-once epochs and exact resume, is the same as from a local copy.

Faults (docs/faults-data.md): a shard that does not read as a tar, or whose sample count differs
from its manifest entry, is an error naming it; a tar member above ``max_sample_bytes`` is never read;
a sample that does not decode (or has such a member) is an error naming shard and key, or with
``on_bad_sample="skip"`` its slot in the micro-batch goes to another sample of the same micro-batch
(batches keep their size, which the cross-rank gathers need; the order of every other sample is
unchanged, so resume stays exact) and the batch lists it under ``"skipped"``.
"""
from __future__ import annotations

import faulthandler
import io
import itertools
import multiprocessing
import os
import random
import signal
import time
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ssl_foundry.data_prep.shard_format import (RetryPolicy, find_manifest, locate_shards, location_scheme, redact,
                                                remake_hint, shard_samples, verify_shards)
from ssl_foundry.pipeline.config import Config, ConfigError, DataConfig, split_batch, uses_cuda, world_size
from ssl_foundry.pipeline.data.augment.batched_backend import BatchedMultiViewTransform
from ssl_foundry.pipeline.data.augment.torch_backend import MultiViewTransform
from ssl_foundry.pipeline.data.dali_acceptance import auto_backend_on_gpu
from ssl_foundry.pipeline.data.errors import BadSampleError, LoaderStalledError
from ssl_foundry.pipeline.data.position import LoaderPosition
from ssl_foundry.pipeline.data.video import ClipTransform, clip_bytes, clip_decoder, resolve_video_decoder

IMAGE_KEYS = ("jpg", "png", "webp", "bmp", "tif", "tiff")
# A wait that SIGALRM cannot interrupt after data.timeout_s ends the process this much later.
STALL_GRACE_S = 30


def decode_image(sample: dict) -> torch.Tensor:
    """Image bytes -> uint8 (3, H, W); grey and palette images become 3-channel RGB."""
    for key in IMAGE_KEYS:
        if key in sample:
            with Image.open(io.BytesIO(sample[key])) as img:
                rgb = np.asarray(img.convert("RGB"))
            return torch.from_numpy(rgb.copy()).permute(2, 0, 1)
    raise ValueError(f"sample {sample.get('__key__')} has no image (keys: {sorted(sample)})")


def is_clip_manifest(manifest: dict) -> bool:
    """Whether a shard folder holds video clips (`foundry prep video`) rather than images."""
    return manifest.get("settings", {}).get("kind") == "clips"


def check_shard_count(folder: str, shards: int, readers: int) -> None:
    """Every reader (data.readers, or one per rank x loader worker) streams shards of its own."""
    if shards < readers:
        raise ConfigError(f"{folder} has {shards} shards but {readers} readers (ranks x data.num_workers, or "
                          f"data.readers) need at least that many: re-shard with a smaller --shard-size or lower "
                          f"data.readers / data.num_workers")


def _seed(*parts: int) -> int:
    return hash(parts) & 0x7FFF_FFFF_FFFF_FFFF


class ShardStream(IterableDataset):
    """Yields batches ``{"views": [Tensor(B, 3, h, w)] * V, "label": Tensor(B), "key": [str],
    "epoch": e, "batch": i}`` for one rank: in training, a worker's part of local batch ``i``
    (``make_loader`` joins the parts); in evaluation (``finite``), whole batches."""

    def __init__(self, location: str, transform: Callable[[torch.Tensor], list[torch.Tensor]],
                 batch_size: int, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 seed: int = 0, shuffle_buffer: int = 0, finite: bool = False,
                 resampled: bool = False, start: LoaderPosition = LoaderPosition(), readers: int = 0,
                 video_decoder: str = "pyav", on_bad_sample: str = "error",
                 max_sample_bytes: int = DataConfig.max_sample_bytes, retries: int = DataConfig.retries,
                 timeout_s: float = DataConfig.timeout_s):
        self.policy = RetryPolicy(retries, timeout_s)
        manifest, self.shards = locate_shards(location, self.policy)
        # A shard list without a manifest has no sample counts: no epochs, only endless resampling.
        self.endless = manifest is None and not finite
        if self.endless and not resampled:
            raise ConfigError(f"{redact(location)} is a shard list without manifest.json, so its sample counts and "
                              f"epochs are unknown: train on it with data.resampled=true (every reader draws shards "
                              f"with replacement, forever), or write its manifest with `foundry prep manifest`")
        # Clip shards (`foundry prep video`): samples decode to (T, 3, H, W) clips, by ``video_decoder``
        # (pipeline.data.video), built in the worker that uses it (a DALI pipeline does not survive a fork).
        self.clips = is_clip_manifest(manifest or {})
        self.video_decoder = video_decoder
        self._clip_decoder: Callable[[list[bytes]], list[torch.Tensor]] | None = None
        self.transform, self.batch_size = transform, batch_size
        self.rank, self.world_size = rank, world_size
        self.loader_workers, self.num_workers = num_workers, max(1, num_workers)
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.finite, self.resampled, self.start = finite, resampled, start
        self.on_bad_sample, self.max_sample_bytes = on_bad_sample, max_sample_bytes
        # Evaluation reads each sample once: one reader per rank x worker, order is irrelevant.
        self.readers = self.world_size * self.num_workers if finite or readers <= 0 else readers
        if not finite:  # every reader makes an equal part of every batch (the trainer checked train.batch_size)
            split_batch(batch_size * world_size, world_size, readers=max(readers, 0), num_workers=num_workers,
                        batch_key="batch_size x world_size")
        self.rank_readers = self.readers // self.world_size
        self.micro_batch = batch_size if finite else batch_size // self.rank_readers
        if not finite:  # evaluation: a reader may get no shard
            check_shard_count(redact(location), len(self.shards), self.readers)

    @property
    def num_samples(self) -> int | None:
        """Samples over all shards (None: a shard list without manifest has no counts)."""
        counts = [n for _, n in self.shards]
        return None if None in counts else sum(counts)

    # ---------------------------------------------------------------- epoch plan
    def reader_shards(self, epoch: int) -> list[list[tuple[str, int | None]]]:
        """Shards of every reader in ``epoch`` (not for an endless stream: see ``_shards_of``)."""
        if self.finite:
            order = list(self.shards)
        elif self.resampled:
            rng = random.Random(_seed(self.seed, epoch, 1))
            order = [rng.choice(self.shards) for _ in self.shards]
        else:
            order = list(self.shards)
            random.Random(_seed(self.seed, epoch)).shuffle(order)
        return [order[r::self.readers] for r in range(self.readers)]

    def steps_per_epoch(self, epoch: int) -> int | None:
        """Full micro-batches of the reader with the fewest samples: the epoch's global steps (None:
        an endless stream has one epoch without end)."""
        if self.endless:
            return None
        return min(sum(n for _, n in shards) for shards in self.reader_shards(epoch)) // self.micro_batch

    def _shards_of(self, reader: int, epoch: int) -> Iterable[tuple[str, int | None]]:
        if self.endless:
            rng = random.Random(_seed(self.seed, reader, 2))
            return (rng.choice(self.shards) for _ in itertools.count())
        return self.reader_shards(epoch)[reader]

    # ---------------------------------------------------------------- iteration
    def _samples(self, shards: Iterable[tuple[str, int | None]], rng: random.Random) -> Iterator[dict]:
        samples = itertools.chain.from_iterable(shard_samples(url, n, self.max_sample_bytes, self.policy)
                                                for url, n in shards)
        if self.finite or self.shuffle_buffer <= 1:
            yield from samples
            return
        buffer: list[dict] = []
        for sample in samples:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            i = rng.randrange(len(buffer))
            buffer[i], sample = sample, buffer[i]
            yield sample
        rng.shuffle(buffer)
        yield from buffer

    def _micro_batches(self, reader: int, epoch: int) -> Iterator[list[dict]]:
        """One reader's samples in groups of ``micro_batch`` (training: full groups only)."""
        pending: list[dict] = []
        for sample in self._samples(self._shards_of(reader, epoch), random.Random(_seed(self.seed, epoch, reader))):
            pending.append(sample)
            if len(pending) == self.micro_batch:
                yield pending
                pending = []
        if self.finite and pending:
            yield pending

    def _decode(self, samples: list[dict]) -> list[torch.Tensor | Exception]:
        """Images as uint8 (3, H, W), clips as uint8 (T, 3, H, W); the error instead for a sample that
        does not decode."""
        if not self.clips:
            return [_attempt(decode_image, sample) for sample in samples]
        if self._clip_decoder is None:
            self._clip_decoder = clip_decoder(self.video_decoder, self.micro_batch)
        if not any("__error__" in sample for sample in samples):
            try:  # a batch at a time (DALI); one at a time only to find the clip that fails
                return self._clip_decoder([clip_bytes(sample) for sample in samples])
            except Exception:
                pass
        return [_attempt(lambda s: self._clip_decoder([clip_bytes(s)])[0], sample) for sample in samples]

    def _collate(self, samples: list[dict], seed: int) -> dict:
        decoded = self._decode(samples)
        bad = [i for i, item in enumerate(decoded) if isinstance(item, Exception)]
        good = [i for i, item in enumerate(decoded) if not isinstance(item, Exception)]
        skipped = [f"sample {samples[i]['__key__']} of shard {samples[i]['__url__']}: {type(decoded[i]).__name__}: "
                   f"{decoded[i]}" for i in bad]
        if bad and (self.on_bad_sample == "error" or self.finite):
            raise BadSampleError(f"{skipped[0]}. Remove it from the source and re-prep, or set "
                                 f"data.on_bad_sample=skip (skips are counted and logged)")
        if not good:
            raise BadSampleError(f"every sample of a micro-batch is bad, e.g. {skipped[0]}: the shards are damaged; "
                                 f"{remake_hint(os.path.dirname(samples[0]['__url__']))}")
        slots = list(range(len(samples)))
        for i in reversed(bad):  # its slot goes to the next good sample (with fresh augmentations)
            slots[i] = slots[i + 1] if i + 1 < len(slots) else good[0]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if getattr(self.transform, "batched", False):  # the batched backend takes the whole part
                views = self.transform([decoded[i] for i in slots])
            else:
                views = [torch.stack(v) for v in zip(*(self.transform(decoded[i]) for i in slots))]
        labels = [int(samples[i]["cls"]) if "cls" in samples[i] else -1 for i in slots]
        return {
            "views": views,
            "label": torch.tensor(labels, dtype=torch.long),
            "key": [samples[i]["__key__"] for i in slots],
            "skipped": skipped,
        }

    def _worker(self) -> int:
        info = get_worker_info()
        if info is None:
            return 0
        if info.num_workers != self.num_workers:
            raise RuntimeError(f"ShardStream built for {self.num_workers} workers, DataLoader has {info.num_workers}")
        return info.id

    def __iter__(self) -> Iterator[dict]:
        worker = self._worker()
        if self.finite:
            reader = self.rank * self.num_workers + worker
            for index, samples in enumerate(self._micro_batches(reader, 0)):
                yield {**self._collate(samples, _seed(self.seed, 0, reader, index)), "epoch": 0, "batch": index}
            return
        per_worker = self.rank_readers // self.num_workers
        first = self.rank * self.rank_readers + worker * per_worker
        mine = range(first, first + per_worker)
        epoch, skip = self.start.epoch, self.start.batch
        while True:
            steps = self.steps_per_epoch(epoch)
            if steps == 0:  # no reader could fill a micro-batch: it would loop over epochs forever
                fewest = min(sum(n for _, n in s) for s in self.reader_shards(epoch))
                raise ValueError(
                    f"epoch {epoch}: a reader (one of {self.readers} sharing {len(self.shards)} shards) gets only "
                    f"{fewest} samples, less than its part of a batch ({self.micro_batch}): lower "
                    f"train.batch_size or data.readers / data.num_workers, or use more data")
            streams = [self._micro_batches(reader, epoch) for reader in mine]
            for index in range(steps) if steps is not None else itertools.count():
                groups = [next(stream) for stream in streams]  # skipped steps are read, never decoded
                if index < skip:
                    continue
                parts = [self._collate(g, _seed(self.seed, epoch, r, index)) for r, g in zip(mine, groups)]
                yield {**join_parts(parts), "epoch": epoch, "batch": index}
            epoch, skip = epoch + 1, 0


def _attempt(decode: Callable[[dict], torch.Tensor], sample: dict) -> torch.Tensor | Exception:
    """``decode(sample)``, or the reason it has no value: an oversized member or the decoder's error."""
    if "__error__" in sample:
        return BadSampleError(sample["__error__"])
    try:
        return decode(sample)
    except Exception as err:  # PIL and the video decoders report bad data with many exception types
        return err


def join_parts(parts: list[dict]) -> dict:
    """Concatenate batch parts (same step) in order: views, labels, keys and skipped samples."""
    if len(parts) == 1:
        return parts[0]
    joined = {"views": [torch.cat(v) for v in zip(*(p["views"] for p in parts))],
              "label": torch.cat([p["label"] for p in parts]),
              "key": [k for p in parts for k in p["key"]],
              "skipped": [s for p in parts for s in p["skipped"]]}
    for name in ("epoch", "batch"):
        if name in parts[0]:
            values = {p[name] for p in parts}
            if len(values) != 1:
                raise RuntimeError(f"loader workers out of step: parts of one batch have {name} {sorted(values)}")
            joined[name] = values.pop()
    return joined


class JoinedLoader:
    """Iterates a training ``ShardStream``'s DataLoader, joining each step's parts from its
    ``parts`` workers (served round-robin) into the rank's local batch (pinned for a GPU)."""

    def __init__(self, loader: DataLoader, parts: int, pin_memory: bool = False):
        self.loader, self.parts, self.pin_memory = loader, parts, pin_memory

    def __iter__(self) -> Iterator[dict]:
        items = iter(self.loader)
        while True:
            group = list(itertools.islice(items, self.parts))
            if not group:
                return
            batch = join_parts(group)
            if self.pin_memory:
                batch["views"] = [v.pin_memory() for v in batch["views"]]
            yield batch


def make_loader(stream: ShardStream, pin_memory: bool = False, prefetch_batches: int = 2):
    """Batches are made inside the stream's workers (``num_workers=0``: in this process); in
    training, each step's parts from the workers are joined into the local batch. A worker that dies
    is reported by torch (its PID and signal) within seconds."""
    joined = not stream.finite and stream.loader_workers > 1
    loader = DataLoader(
        stream,
        batch_size=None,
        num_workers=stream.loader_workers,
        prefetch_factor=prefetch_batches if stream.loader_workers else None,
        pin_memory=pin_memory and not joined,  # parts are joined first, then pinned once
        # The workers' base seed from a generator of its own: drawn from the global one, it would shift
        # the model's random draws (MAE's and iBOT's masks) on resume, when the iterator is made anew.
        # Augmentations do not use it: they are seeded per micro-batch (see ShardStream).
        generator=torch.Generator(),
    )
    return JoinedLoader(loader, stream.loader_workers, pin_memory) if joined else loader


class StallGuard:
    """Iterates ``batches`` and bounds every wait for one to ``timeout_s``: a hung read or a stalled
    loader worker would otherwise block this rank, and the other ranks in a collective until the
    process group's timeout. SIGALRM interrupts the wait with LoaderStalledError naming ``what``
    and kills the loader's worker processes (torch's DataLoader ``timeout`` is not enough: it bounds
    the queue, not the unpickling that then fetches the tensors from the worker). A wait that cannot
    be interrupted (stuck in native code) ends the process ``STALL_GRACE_S`` later, faulthandler
    printing every thread's stack."""

    def __init__(self, batches: Iterator[dict], timeout_s: float, what: str):
        self.batches, self.timeout_s, self.what = batches, timeout_s, what

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        handler = signal.signal(signal.SIGALRM, self._stalled)
        delay, interval = signal.setitimer(signal.ITIMER_REAL, self.timeout_s)  # another alarm's, resumed below
        faulthandler.dump_traceback_later(self.timeout_s + STALL_GRACE_S, exit=True)
        start = time.monotonic()
        try:
            return next(self.batches)
        finally:
            faulthandler.cancel_dump_traceback_later()
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, handler)
            if delay:
                signal.setitimer(signal.ITIMER_REAL, max(delay - (time.monotonic() - start), 1e-3), interval)

    def _stalled(self, signum, frame) -> None:
        # SIGKILL: a stopped worker would not take the DataLoader's SIGTERM, and this process's exit
        # would wait for it forever. torch's report of a killed worker (on SIGCHLD) would repeat ours.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for worker in multiprocessing.active_children():
            worker.kill()
        raise LoaderStalledError(f"{self.what}: no batch in data.timeout_s={self.timeout_s:g} s: a loader worker, the "
                                 f"file system or the store is stalled (raise data.timeout_s if the storage is this "
                                 f"slow)")


def train_backend(backend: str, device: torch.device, location: str = "") -> tuple[str, str]:
    """``data.backend`` resolved, and why: auto is batched on a CPU (the torch loader with the batched
    augmentation, pipeline.data.augment.batched_backend), and on a GPU dali once DALI has passed
    `foundry check gpu` there (pipeline.data.dali_acceptance), torch until then. Some shards always
    take the torch loader, and data.backend=dali with them is a ConfigError: clip shards (the dali and
    batched augmentations are written for images; clips are decoded by DALI there anyway where it can,
    see data.video_decoder), shards behind http(s):// (DALI's readers open local files and s3:// only)
    and a shard list without a manifest (DALI reads through the index files `foundry prep manifest` writes)."""
    manifest = find_manifest(location) if location else {}
    if is_clip_manifest(manifest or {}) and backend in ("dali", "batched"):
        raise ConfigError(f"data.backend={backend} augments images only and {redact(location)} holds video clips: use "
                          f"data.backend=auto or torch (clips are still decoded by DALI where it can: "
                          f"data.video_decoder)")
    shards_at = (manifest or {}).get("shard_root") or location
    torch_only = ("clip shards" if is_clip_manifest(manifest or {}) else
                  "http(s) shards" if location_scheme(shards_at) in ("http", "https") else
                  "no manifest" if manifest is None else "")
    if torch_only and backend == "dali":
        raise ConfigError(f"data.backend=dali cannot read {redact(location)} ({torch_only}: DALI's readers open local "
                          f"files and s3:// through the DALI index files of a manifest): use data.backend=torch, "
                          f"or for shards made elsewhere write their manifest and index with `foundry prep manifest`")
    if backend != "auto":
        return backend, f"data.backend={backend}"
    if torch_only:
        return "torch", f"auto: {torch_only}"
    if device.type != "cuda":
        return "batched", f"auto: on {device.type}"
    return auto_backend_on_gpu(torch.cuda.get_device_name(device))


def validate_batch(cfg: Config, launcher: str = "local", check_paths: bool = True) -> None:
    """train.batch_size over the run's ranks (``pipeline.config.world_size``), the accumulation steps
    and, for the torch loader, its readers; and enough shards in data.train for those readers. The
    launchers call it before any rank starts, after ``load_config``."""
    d, t, launch = cfg.data, cfg.train, cfg.launch
    folder = d.train if check_paths else ""
    ranks = world_size(cfg, launcher)
    # data.backend=auto picks the loader by the ranks' device: this machine's for a local launch; a Slurm
    # job's GPU decides on its node, so there only the rule every loader has is checked here.
    job_gpus = launcher == "slurm" and (launch.device == "cuda" or launch.device == "auto" and launch.gpus_per_node > 0)
    if job_gpus and d.backend == "auto":
        torch_loader = False
    else:
        device = torch.device("cuda" if launcher == "local" and uses_cuda(launch) else "cpu")
        torch_loader = train_backend(d.backend, device, folder)[0] in ("torch", "batched")
    split_batch(t.batch_size, ranks, t.grad_accum_steps, d.readers if torch_loader else None, d.num_workers)
    if torch_loader and folder:
        check_shard_count(redact(folder), len(locate_shards(folder)[1]), d.readers or ranks * max(1, d.num_workers))


def train_transform(d: DataConfig, input_kind: str, batched: bool = False
                    ) -> tuple[Callable[[torch.Tensor], list[torch.Tensor]], str]:
    """The torch loader's transform for ``data.train`` and the clip decoder it needs: image views for
    image shards (``batched``: made a batch at a time, pipeline.data.augment.batched_backend); for
    clip shards, clips (a method whose ``input_kind`` is "clip") or one frame of each clip (image
    methods), see pipeline.data.video.ClipTransform."""
    views = MultiViewTransform(d.views, d.mean, d.std)
    settings = (find_manifest(d.train, policy=RetryPolicy(d.retries, d.timeout_s)) or {}).get("settings", {})
    if settings.get("kind") != "clips":
        if input_kind == "clip":
            raise ConfigError(f"the method trains on video clips but data.train={redact(d.train)} holds images: "
                              f"make clip shards with `foundry prep video SRC OUT`")
        return (BatchedMultiViewTransform(d.views, d.mean, d.std) if batched else views), "pyav"
    span = (max(d.clip_frames, 1) - 1) * d.frame_stride + 1
    if span > settings["clip_frames"]:
        raise ConfigError(f"data.clip_frames={d.clip_frames} x data.frame_stride={d.frame_stride} spans {span} "
                          f"frames but the clips in {redact(d.train)} have {settings['clip_frames']}: lower them or "
                          f"re-prep with `foundry prep video --clip-frames {span}`")
    # The torch loader decodes in its CPU worker processes, whatever the training device.
    decoder = resolve_video_decoder(d.video_decoder, settings["codec"])
    return ClipTransform(views, d.clip_frames, d.frame_stride, as_clip=input_kind == "clip"), decoder


def build_train_loader(d: DataConfig, batch_size: int, input_kind: str, seed: int, rank: int, world_size: int,
                       position: LoaderPosition, device: torch.device) -> Iterator[dict]:
    """The one place the training loader's backend is chosen (``data.backend``): an iterator of
    batch dicts (see ShardStream) for this rank, ``batch_size`` samples each, starting at
    ``position``; ``input_kind`` is the method's ("image" or "clip"). DALI's views arrive on
    ``device``; the torch loader's on the CPU (pinned for a GPU). The shards are first checked
    against their manifest (``data.verify``; the ranks share the hashing); every wait for a batch is
    bounded by ``data.timeout_s``."""
    verify_shards(d.train, d.verify, part=(rank, world_size), policy=RetryPolicy(d.retries, d.timeout_s))
    backend = train_backend(d.backend, device, d.train)[0]
    if backend == "dali":
        from ssl_foundry.pipeline.data.dali_loader import DaliStream  # DALI is imported only when it is used

        batches = iter(DaliStream(d.train, d.views, d.mean, d.std, batch_size, rank=rank, world_size=world_size,
                                  num_threads=d.num_workers, seed=seed, shuffle_buffer=d.shuffle_buffer,
                                  start=position, device=device, prefetch_batches=d.prefetch_batches,
                                  max_sample_bytes=d.max_sample_bytes))
    else:
        transform, video_decoder = train_transform(d, input_kind, batched=backend == "batched")
        stream = ShardStream(d.train, transform, batch_size, rank=rank, world_size=world_size,
                             num_workers=d.num_workers, seed=seed, shuffle_buffer=d.shuffle_buffer,
                             resampled=d.resampled, start=position, readers=d.readers, video_decoder=video_decoder,
                             on_bad_sample=d.on_bad_sample, max_sample_bytes=d.max_sample_bytes, retries=d.retries,
                             timeout_s=d.timeout_s)
        batches = iter(make_loader(stream, pin_memory=device.type == "cuda", prefetch_batches=d.prefetch_batches))
    readers = f"data.num_workers={d.num_workers}" if backend != "dali" and d.num_workers else f"pid {os.getpid()}"
    return StallGuard(batches, d.timeout_s, f"rank {rank}: the training loader ({backend}, {readers})")

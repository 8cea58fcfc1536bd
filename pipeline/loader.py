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
very long runs on few shards); ``finite=True`` (evaluation) visits every sample exactly once,
in shard order, one reader per rank x worker, in batches of ``batch_size`` (the last short).
"""
from __future__ import annotations

import io
import itertools
import random
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import tarfile_samples

from data_prep.shards import read_manifest
from launch.config import ConfigError
from pipeline.augment import MultiViewTransform
from pipeline.augment.batched_backend import BatchedMultiViewTransform

IMAGE_KEYS = ("jpg", "png", "webp", "bmp", "tif", "tiff")


@dataclass(frozen=True)
class LoaderPosition:
    """Where a rank's stream stands: the next batch to read is ``batch`` of ``epoch``
    (counted over the rank's batches in DataLoader order)."""

    epoch: int = 0
    batch: int = 0


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


def _seed(*parts: int) -> int:
    return hash(parts) & 0x7FFF_FFFF_FFFF_FFFF


class ShardStream(IterableDataset):
    """Yields batches ``{"views": [Tensor(B, 3, h, w)] * V, "label": Tensor(B), "key": [str],
    "epoch": e, "batch": i}`` for one rank: in training, a worker's part of local batch ``i``
    (``make_loader`` joins the parts); in evaluation (``finite``), whole batches."""

    def __init__(self, folder: str, transform: Callable[[torch.Tensor], list[torch.Tensor]],
                 batch_size: int, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 seed: int = 0, shuffle_buffer: int = 0, finite: bool = False,
                 resampled: bool = False, start: LoaderPosition = LoaderPosition(), readers: int = 0,
                 video_decoder: str = "pyav"):
        manifest = read_manifest(folder)
        # Clip shards (`foundry prep video`): samples decode to (T, 3, H, W) clips, by ``video_decoder``
        # (pipeline.video), built in the worker that uses it (a DALI pipeline does not survive a fork).
        self.clips = is_clip_manifest(manifest)
        self.video_decoder = video_decoder
        self._clip_decoder: Callable[[list[bytes]], list[torch.Tensor]] | None = None
        self.shards = [(f"{folder}/{s['name']}", int(s["num_samples"])) for s in manifest["shards"]]
        self.num_samples = int(manifest["num_samples"])
        self.transform, self.batch_size = transform, batch_size
        self.rank, self.world_size = rank, world_size
        self.loader_workers, self.num_workers = num_workers, max(1, num_workers)
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.finite, self.resampled, self.start = finite, resampled, start
        workers = self.world_size * self.num_workers
        # Evaluation reads each sample once: one reader per rank x worker, order is irrelevant.
        self.readers = workers if finite or readers <= 0 else readers
        if self.readers % workers:
            raise ValueError(f"data.readers={self.readers} is not a multiple of {self.world_size} ranks x "
                             f"{self.num_workers} loader workers: set data.readers to a multiple of {workers}")
        self.rank_readers = self.readers // self.world_size
        if not finite and batch_size % self.rank_readers:
            raise ValueError(f"the local batch of {batch_size} does not split over this rank's {self.rank_readers} "
                             f"readers (data.readers={self.readers} over {self.world_size} ranks): make the "
                             f"global batch a multiple of data.readers")
        self.micro_batch = batch_size if finite else batch_size // self.rank_readers
        if len(self.shards) < self.readers:
            raise ValueError(
                f"{folder} has {len(self.shards)} shards but {self.readers} readers ({self.world_size} ranks x "
                f"{self.num_workers} workers, or data.readers) need at least that many: re-shard with a "
                f"smaller --shard-size or lower data.readers / data.num_workers"
            )

    # ---------------------------------------------------------------- epoch plan
    def reader_shards(self, epoch: int) -> list[list[tuple[str, int]]]:
        """Shards of every reader in ``epoch``."""
        if self.finite:
            order = list(self.shards)
        elif self.resampled:
            rng = random.Random(_seed(self.seed, epoch, 1))
            order = [rng.choice(self.shards) for _ in self.shards]
        else:
            order = list(self.shards)
            random.Random(_seed(self.seed, epoch)).shuffle(order)
        return [order[r::self.readers] for r in range(self.readers)]

    def steps_per_epoch(self, epoch: int) -> int:
        """Full micro-batches of the reader with the fewest samples: the epoch's global steps."""
        return min(sum(n for _, n in shards) for shards in self.reader_shards(epoch)) // self.micro_batch

    # ---------------------------------------------------------------- iteration
    def _samples(self, shards: list[tuple[str, int]], rng: random.Random) -> Iterator[dict]:
        samples = tarfile_samples([{"url": path} for path, _ in shards])
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
        shards = self.reader_shards(epoch)[reader]
        pending: list[dict] = []
        for sample in self._samples(shards, random.Random(_seed(self.seed, epoch, reader))):
            pending.append(sample)
            if len(pending) == self.micro_batch:
                yield pending
                pending = []
        if self.finite and pending:
            yield pending

    def _decode(self, samples: list[dict]) -> list[torch.Tensor]:
        """Images as uint8 (3, H, W), clips as uint8 (T, 3, H, W)."""
        if not self.clips:
            return [decode_image(sample) for sample in samples]
        if self._clip_decoder is None:
            from pipeline.video import clip_decoder

            self._clip_decoder = clip_decoder(self.video_decoder, self.micro_batch)
        from pipeline.video import clip_bytes

        return self._clip_decoder([clip_bytes(sample) for sample in samples])

    def _collate(self, samples: list[dict], seed: int) -> dict:
        decoded = self._decode(samples)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if getattr(self.transform, "batched", False):  # the batched backend takes the whole part
                views = self.transform(decoded)
            else:
                views = [torch.stack(v) for v in zip(*(self.transform(item) for item in decoded))]
        labels = [int(s["cls"]) if "cls" in s else -1 for s in samples]
        return {
            "views": views,
            "label": torch.tensor(labels, dtype=torch.long),
            "key": [s["__key__"] for s in samples],
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
            for index in range(steps):
                groups = [next(stream) for stream in streams]  # skipped steps are read, never decoded
                if index < skip:
                    continue
                parts = [self._collate(g, _seed(self.seed, epoch, r, index)) for r, g in zip(mine, groups)]
                yield {**join_parts(parts), "epoch": epoch, "batch": index}
            epoch, skip = epoch + 1, 0


def join_parts(parts: list[dict]) -> dict:
    """Concatenate batch parts (same step) in order: views, labels and keys."""
    if len(parts) == 1:
        return parts[0]
    joined = {"views": [torch.cat(v) for v in zip(*(p["views"] for p in parts))],
              "label": torch.cat([p["label"] for p in parts]),
              "key": [k for p in parts for k in p["key"]]}
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
    training, each step's parts from the workers are joined into the local batch."""
    joined = not stream.finite and stream.loader_workers > 1
    loader = DataLoader(
        stream,
        batch_size=None,
        num_workers=stream.loader_workers,
        prefetch_factor=prefetch_batches if stream.loader_workers else None,
        pin_memory=pin_memory and not joined,  # parts are joined first, then pinned once
    )
    return JoinedLoader(loader, stream.loader_workers, pin_memory) if joined else loader


def train_backend(backend: str, device: torch.device, folder: str = "") -> str:
    """``data.backend`` resolved: auto is dali on a GPU, batched on a CPU (the torch loader with the
    batched augmentation, ``pipeline.augment.batched_backend``). Clip shards always take the torch
    loader with per-sample transforms (the dali and batched augmentations are written for images;
    clips are decoded by DALI there anyway where it can, see data.video_decoder); data.backend=dali
    or batched with them is a ConfigError."""
    clips = bool(folder) and is_clip_manifest(read_manifest(folder))
    if clips and backend in ("dali", "batched"):
        raise ConfigError(f"data.backend={backend} augments images only and {folder} holds video clips: use "
                          f"data.backend=auto or torch (clips are still decoded by DALI where it can: "
                          f"data.video_decoder)")
    if backend == "auto":
        return "torch" if clips else "dali" if device.type == "cuda" else "batched"
    return backend


def method_input_kind(method: str) -> str:
    """"clip" for the video methods (views of shape (B, T, 3, H, W)), else "image"."""
    from models.registry import method_class

    return getattr(method_class(method), "input_kind", "image")


def train_transform(cfg, device: torch.device) -> tuple[Callable[[torch.Tensor], list[torch.Tensor]], str]:
    """The torch loader's per-sample transform for ``data.train`` and the clip decoder it needs:
    image views for image shards; for clip shards, clips (video methods) or one frame of each clip
    (image methods), see pipeline.video.ClipTransform."""
    d = cfg.data
    kind = method_input_kind(cfg.model.method)
    settings = read_manifest(d.train).get("settings", {})
    if settings.get("kind") != "clips":
        if kind == "clip":
            raise ConfigError(f"model.method={cfg.model.method} trains on video clips but data.train={d.train} "
                              f"holds images: make clip shards with `foundry prep video SRC OUT`")
        if train_backend(d.backend, device, d.train) == "batched":
            return BatchedMultiViewTransform(d.views, d.mean, d.std), "pyav"
        return MultiViewTransform(d.views, d.mean, d.std), "pyav"
    views = MultiViewTransform(d.views, d.mean, d.std)
    from pipeline.video import ClipTransform, resolve_video_decoder

    span = (max(d.clip_frames, 1) - 1) * d.frame_stride + 1
    if span > settings["clip_frames"]:
        raise ConfigError(f"data.clip_frames={d.clip_frames} x data.frame_stride={d.frame_stride} spans {span} "
                          f"frames but the clips in {d.train} have {settings['clip_frames']}: lower them or "
                          f"re-prep with `foundry prep video --clip-frames {span}`")
    # The torch loader decodes in its CPU worker processes, whatever the training device.
    decoder = resolve_video_decoder(d.video_decoder, settings["codec"])
    return ClipTransform(views, d.clip_frames, d.frame_stride, as_clip=kind == "clip"), decoder


def build_train_loader(cfg, batch_size: int, rank: int, world_size: int, position: LoaderPosition,
                       device: torch.device) -> Iterator[dict]:
    """The one place the training loader's backend is chosen (``data.backend``): an iterator of
    batch dicts (see ShardStream) for this rank, starting at ``position``. DALI's views arrive on
    ``device``; the torch loader's on the CPU (pinned for a GPU)."""
    d = cfg.data
    transform, video_decoder = train_transform(cfg, device)
    if train_backend(d.backend, device, d.train) == "dali":
        from pipeline.dali_loader import DaliStream  # DALI is imported only when it is used

        return iter(DaliStream(d.train, d.views, d.mean, d.std, batch_size, rank=rank, world_size=world_size,
                               num_threads=d.num_workers, seed=cfg.train.seed, shuffle_buffer=d.shuffle_buffer,
                               start=position, device=device, prefetch_batches=d.prefetch_batches))
    stream = ShardStream(d.train, transform, batch_size, rank=rank,
                         world_size=world_size, num_workers=d.num_workers, seed=cfg.train.seed,
                         shuffle_buffer=d.shuffle_buffer, resampled=d.resampled, start=position, readers=d.readers,
                         video_decoder=video_decoder)
    return iter(make_loader(stream, pin_memory=device.type == "cuda", prefetch_batches=d.prefetch_batches))

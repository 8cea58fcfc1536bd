"""Streaming WebDataset loader: shards -> decoded images -> augmented views, split over
ranks x workers, deterministic so that a resumed run sees exactly the batches it would have.

Epoch ``e``: the shard list is permuted with ``(seed, e)`` (identical on every rank) and dealt
round-robin to the ``world_size * num_workers`` readers; each reader streams its shards through
a shuffle buffer seeded by ``(seed, e, reader)``. Every reader yields the *same* number of full
local batches per epoch (the minimum over readers, computed from the manifest's sample counts,
which every reader knows), so DDP ranks step in lock-step and the DataLoader's round-robin over
workers is exact. Augmentation randomness is re-seeded per batch from ``(seed, e, reader,
batch)``, so skipping ``k`` batches on resume (without decoding them) reproduces the stream.

``resampled=True`` draws each reader's shards with replacement instead of a permutation (for
very long runs on few shards); ``finite=True`` (evaluation) visits every sample exactly once,
in order, with a possibly short last batch.
"""
from __future__ import annotations

import io
import random
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import tarfile_samples

from data_prep.shards import read_manifest

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


def _seed(*parts: int) -> int:
    return hash(parts) & 0x7FFF_FFFF_FFFF_FFFF


class ShardStream(IterableDataset):
    """Yields local batches ``{"views": [Tensor(B, 3, h, w)] * V, "label": Tensor(B),
    "epoch": e, "batch": i}`` for one rank; the DataLoader's workers split it further."""

    def __init__(self, folder: str, transform: Callable[[torch.Tensor], list[torch.Tensor]],
                 batch_size: int, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 seed: int = 0, shuffle_buffer: int = 0, finite: bool = False,
                 resampled: bool = False, start: LoaderPosition = LoaderPosition()):
        manifest = read_manifest(folder)
        self.shards = [(f"{folder}/{s['name']}", int(s["num_samples"])) for s in manifest["shards"]]
        self.num_samples = int(manifest["num_samples"])
        self.transform, self.batch_size = transform, batch_size
        self.rank, self.world_size = rank, world_size
        self.loader_workers, self.num_workers = num_workers, max(1, num_workers)
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.finite, self.resampled, self.start = finite, resampled, start
        readers = self.world_size * self.num_workers
        if len(self.shards) < readers:
            raise ValueError(
                f"{folder} has {len(self.shards)} shards but {self.world_size} ranks x "
                f"{self.num_workers} workers need at least {readers}: re-shard with a smaller "
                f"--shard-size or lower data.num_workers"
            )

    # ---------------------------------------------------------------- epoch plan
    def reader_shards(self, epoch: int) -> list[list[tuple[str, int]]]:
        """Shards of every reader (index ``rank * num_workers + worker``) in ``epoch``."""
        readers = self.world_size * self.num_workers
        if self.finite:
            order = list(self.shards)
        elif self.resampled:
            rng = random.Random(_seed(self.seed, epoch, 1))
            order = [rng.choice(self.shards) for _ in self.shards]
        else:
            order = list(self.shards)
            random.Random(_seed(self.seed, epoch)).shuffle(order)
        return [order[r::readers] for r in range(readers)]

    def batches_per_reader(self, epoch: int) -> int:
        return min(sum(n for _, n in shards) for shards in self.reader_shards(epoch)) // self.batch_size

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

    def _collate(self, samples: list[dict], seed: int) -> dict:
        views_per_sample = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for sample in samples:
                views_per_sample.append(self.transform(decode_image(sample)))
        labels = [int(s["cls"]) if "cls" in s else -1 for s in samples]
        return {
            "views": [torch.stack(v) for v in zip(*views_per_sample)],
            "label": torch.tensor(labels, dtype=torch.long),
            "key": [s["__key__"] for s in samples],
        }

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        workers = info.num_workers if info is not None else 1
        # The DataLoader takes batches round-robin from its workers starting at worker 0, and
        # rank-level batch j is worker j % W's: rotate so that worker 0 serves start.batch.
        worker = (info.id + self.start.batch) % workers if info is not None else 0
        if workers != self.num_workers:
            raise RuntimeError(f"ShardStream built for {self.num_workers} workers, DataLoader has {workers}")
        reader = self.rank * self.num_workers + worker
        epoch = self.start.epoch
        # Rank-level batch j of an epoch comes from worker j % W: skip this worker's share.
        skip = max(0, (self.start.batch - worker + self.num_workers - 1) // self.num_workers)
        while True:
            shards = self.reader_shards(epoch)[reader]
            rng = random.Random(_seed(self.seed, epoch, reader))
            limit = None if self.finite else self.batches_per_reader(epoch)
            if limit == 0:  # no reader could fill a batch: it would loop over epochs forever
                fewest = min(sum(n for _, n in s) for s in self.reader_shards(epoch))
                raise ValueError(
                    f"epoch {epoch}: a reader ({self.world_size} ranks x {self.num_workers} workers share "
                    f"{len(self.shards)} shards) gets only {fewest} samples, less than one local batch of "
                    f"{self.batch_size}: lower train.batch_size or data.num_workers, or use more data")
            pending: list[dict] = []
            index = 0
            for sample in self._samples(shards, rng):
                pending.append(sample)
                if len(pending) < self.batch_size:
                    continue
                if index >= skip:
                    batch = self._collate(pending, _seed(self.seed, epoch, reader, index))
                    yield {**batch, "epoch": epoch, "batch": index * self.num_workers + worker}
                pending, index = [], index + 1
                if limit is not None and index >= limit:
                    break
            if self.finite:
                if pending:
                    yield {**self._collate(pending, _seed(self.seed, epoch, reader, index)),
                           "epoch": epoch, "batch": index * self.num_workers + worker}
                return
            epoch, skip = epoch + 1, 0


def make_loader(stream: ShardStream, pin_memory: bool = False, prefetch_batches: int = 2) -> DataLoader:
    """Batches are made inside the stream's workers (``num_workers=0``: in this process)."""
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=stream.loader_workers,
        prefetch_factor=prefetch_batches if stream.loader_workers else None,
        pin_memory=pin_memory,
    )

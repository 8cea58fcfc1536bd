"""The DALI training loader (``data.backend=dali``): WebDataset shards -> decoded, augmented
views, as the same batch dicts the torch loader (``pipeline.data.loader``) yields, so the trainer
cannot tell them apart: ``{"views": [Tensor(B, 3, h, w)] * V, "label": Tensor(B), "key": [str],
"epoch": e, "batch": i}``.

One DALI pipeline per rank and epoch: ``fn.readers.webdataset`` over the epoch's shard list
(the folder's shards permuted with ``(seed, epoch)``, the same on every rank), split across ranks
by DALI (``num_shards`` = world size, ``shard_id`` = rank: contiguous ranges of samples), shuffled
through a buffer of ``shuffle_buffer`` samples; then ``fn.decoders.image`` and the recipe's
views (``pipeline.data.augment.dali_backend``). On a GPU the decoder is ``device="mixed"`` (nvJPEG)
and every augmentation runs on the GPU; ``DALIGenericIterator`` hands over CUDA tensors on the
training device (no host copy). Without a GPU the same graph runs on DALI's CPU backend
(``device_id=None``) and the tensors are CPU tensors.

Epochs: every rank yields ``floor(N / world) // batch`` batches per epoch (N = indexed samples),
so ranks step in lock-step; within an epoch no sample repeats (DALI's reader does not cross the
end of its shard while the buffer drains), and when ``batch x world`` divides N every sample is
seen exactly once. The next epoch builds a new pipeline, seeded by ``(seed, epoch, rank)``.

Resume: DALI's reader cannot seek, so starting at ``LoaderPosition(epoch, k)`` builds epoch
``epoch``'s pipeline and runs (decodes, augments, discards) its first ``k`` batches. Because
each epoch's pipeline is seeded, on DALI's CPU backend this reproduces the uninterrupted stream
exactly (same keys, bitwise the same views); on a GPU the sample order is the same and the
augmentations are drawn from the same seeds.

Evaluation (``dali_eval_batches``): the same reader over the folder's shards in order, split over
the ranks by DALI, each sample once (the last batch padded by the reader, then cut), decoded and
resized by the evaluation spec (``augment.spec.eval_views``), as the torch loader does on CPUs.

Samples whose image does not decode are not in the shard's index (``foundry prep index``
leaves them out and lists them in the manifest), so DALI never reads them; ``skipped`` counts
them. A shard without an index is refused, naming the shard and the command that makes it, and so
is one whose index lists a member over ``max_sample_bytes`` (DALI would read it whole).

Shards in S3 (``s3://``) are read by DALI itself: its readers have taken s3:// URLs since
NVIDIA/DALI#5415 (2024), on the CPU backend too (DALI 2.4 here: tests/test_remote_shards.py), through
the AWS SDK's own configuration (``AWS_*``, ``AWS_ENDPOINT_URL``, ``~/.aws``) and retries; the index
files are read from wherever the manifest put them. DALI has no HTTP reader (pipeline.data.loader's
``train_backend`` sends http(s):// shards to the torch loader).
"""
from __future__ import annotations

import logging
import posixpath
import random
from typing import Iterator

import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from ssl_foundry.data_prep.shard_format import (IMAGE_EXTENSIONS, ManifestError, absolute_location, index_name,
                                                join_location, manifest_folder, manifest_shards, read_location,
                                                read_manifest, redact, split_member_name)
from ssl_foundry.pipeline.config import DataConfig
from ssl_foundry.pipeline.data.augment import dali_backend
from ssl_foundry.pipeline.data.augment.spec import ViewSpec, eval_views
from ssl_foundry.pipeline.data.errors import BadSampleError
from ssl_foundry.pipeline.data.position import LoaderPosition

logger = logging.getLogger(__name__)


def _seed(*parts: int) -> int:
    return hash(parts) & 0x7FFF_FFFF


def refuse_oversized_members(tar: str, index_text: str, max_sample_bytes: int) -> None:
    """Raises BadSampleError naming the first member (shard, key, size) that a shard's index lists
    as larger than ``max_sample_bytes``: the index lines are ``<ext> <offset> <size> <name>`` groups."""
    for line in index_text.splitlines()[1:]:
        fields = line.split()
        for ext, _, size, name in zip(*[iter(fields)] * 4):
            if int(size) > max_sample_bytes:
                raise BadSampleError(f"sample {split_member_name(name)[0]} of shard {redact(tar)}: member {name} is "
                                     f"{size} bytes, over data.max_sample_bytes={max_sample_bytes}; remove it from the "
                                     f"source and re-prep, or raise data.max_sample_bytes")


def indexed_shards(location: str, max_sample_bytes: int) -> tuple[list[tuple[str, str]], int, int]:
    """(tar, index) paths or URLs of every shard, the number of indexed samples and of samples left out
    of the indexes. Raises ManifestError naming a shard without an index and how to make it, and
    BadSampleError for an indexed member over ``max_sample_bytes``."""
    location = absolute_location(location)
    manifest = read_manifest(location)
    folder = manifest_folder(location)
    shards, indexed = [], 0
    for tar, record in manifest_shards(location, manifest):
        index = join_location(folder, record.get("index") or index_name(posixpath.basename(tar)))
        text = read_location(index) if record.get("index") else None
        if text is None:
            raise ManifestError(f"shard {redact(tar)} has no DALI index ({redact(index)} is missing): make the "
                                f"indexes with `foundry prep index {redact(location)}` (or DALI's `wds2idx` for one "
                                f"shard; `foundry prep manifest` for shards made elsewhere)")
        refuse_oversized_members(tar, text.decode(), max_sample_bytes)
        shards.append((tar, index))
        indexed += int(record["indexed_samples"])
    return shards, indexed, int(manifest["num_samples"]) - indexed


@pipeline_def(enable_conditionals=True)
def _train_pipeline(shards: list[tuple[str, str]], views: dali_backend.CompiledViews, mean: list[float],
                    std: list[float], shard_id: int, num_shards: int, shuffle_buffer: int, reader_seed: int,
                    decode_device: str):
    """Outputs: one batch per view, then the ``cls`` bytes and the source info (both padded with
    NULs to the longest in the batch: the iterator needs dense tensors)."""
    encoded, cls = fn.readers.webdataset(
        paths=[tar for tar, _ in shards], index_paths=[index for _, index in shards],
        ext=[";".join(IMAGE_EXTENSIONS), "cls"], missing_component_behavior="empty",
        shard_id=shard_id, num_shards=num_shards, random_shuffle=shuffle_buffer > 1,
        initial_fill=max(1, shuffle_buffer), seed=reader_seed, name="reader")
    source = fn.get_property(encoded, key="source_info")  # "<tar>:<offset>:<member name>"
    images = fn.decoders.image(encoded, device=decode_device, output_type=types.RGB)
    return (*dali_backend.augment_views(images, views, mean, std), fn.pad(cls), fn.pad(source))


@pipeline_def(enable_conditionals=True)
def _eval_pipeline(shards: list[tuple[str, str]], views: dali_backend.CompiledViews, mean: list[float],
                   std: list[float], shard_id: int, num_shards: int, decode_device: str):
    encoded, cls = fn.readers.webdataset(
        paths=[tar for tar, _ in shards], index_paths=[index for _, index in shards],
        ext=[";".join(IMAGE_EXTENSIONS), "cls"], missing_component_behavior="empty",
        shard_id=shard_id, num_shards=num_shards, pad_last_batch=True, name="reader")
    images = fn.decoders.image(encoded, device=decode_device, output_type=types.RGB)
    return (*dali_backend.augment_views(images, views, mean, std), fn.pad(cls))


def dali_eval_batches(folder: str, image_size: int, mean: list[float], std: list[float], batch_size: int,
                      rank: int = 0, world_size: int = 1, num_threads: int = 2,
                      device: torch.device = torch.device("cpu")) -> Iterator[dict]:
    """This rank's share of ``folder``, each sample once: ``{"views": [Tensor(B, 3, s, s)], "label":
    Tensor(B)}`` on ``device`` (nvJPEG and the GPU on a GPU, DALI's CPU backend otherwise)."""
    shards, _, _ = indexed_shards(folder, DataConfig.max_sample_bytes)  # the default cap, as the torch eval reader
    gpu = device.type == "cuda"
    views = dali_backend.compile_views(eval_views(image_size))
    pipe = _eval_pipeline(shards, views, mean, std, rank, world_size, "mixed" if gpu else "cpu", batch_size=batch_size,
                          num_threads=max(1, num_threads), device_id=(device.index or 0) if gpu else None)
    for out in DALIGenericIterator([pipe], ["image", "cls"], reader_name="reader",
                                   last_batch_policy=LastBatchPolicy.PARTIAL):
        labels = [int(c) if c else -1 for c in _strings(out[0]["cls"])]
        yield {"views": [out[0]["image"]], "label": torch.tensor(labels, dtype=torch.long)}


def _strings(rows: torch.Tensor) -> list[str]:
    """NUL-padded uint8 rows -> strings."""
    return [bytes(row).rstrip(b"\0").decode() for row in rows.cpu().numpy()]


class DaliStream:
    """Iterable over one rank's training batches, forever (epoch after epoch)."""

    def __init__(self, folder: str, views: list[ViewSpec], mean: list[float], std: list[float], batch_size: int,
                 rank: int = 0, world_size: int = 1, num_threads: int = 2, seed: int = 0,
                 shuffle_buffer: int = 0, start: LoaderPosition = LoaderPosition(),
                 device: torch.device = torch.device("cpu"), prefetch_batches: int = 2,
                 max_sample_bytes: int = DataConfig.max_sample_bytes):
        self.folder = folder
        self.views = dali_backend.compile_views(views)  # an op DALI lacks fails here, not in the DALI graph
        self.mean, self.std = mean, std
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.num_threads, self.seed, self.shuffle_buffer = max(1, num_threads), seed, shuffle_buffer
        self.start, self.device, self.prefetch_batches = start, device, max(1, prefetch_batches)
        self.shards, self.num_samples, self.skipped = indexed_shards(folder, max_sample_bytes)
        if self.skipped and rank == 0:
            logger.warning("%s: %d samples are not in the DALI indexes (images that do not decode; see "
                           "index_skipped in its manifest.json) and are skipped", redact(folder), self.skipped)
        if self.steps_per_epoch() == 0:
            raise ValueError(f"{redact(folder)}: {self.num_samples} samples over {world_size} ranks give each fewer "
                             f"than a batch of {batch_size}: lower train.batch_size or use more data")

    def steps_per_epoch(self) -> int:
        """Batches every rank yields per epoch: DALI's smallest shard holds floor(N / world)."""
        return self.num_samples // self.world_size // self.batch_size

    def epoch_shards(self, epoch: int) -> list[tuple[str, str]]:
        order = list(self.shards)
        random.Random(_seed(self.seed, epoch)).shuffle(order)
        return order

    def pipeline(self, epoch: int):
        """Epoch ``epoch``'s pipeline: on the GPU of ``device`` (nvJPEG decode), or on DALI's CPU backend."""
        gpu = self.device.type == "cuda"
        return _train_pipeline(
            self.epoch_shards(epoch), self.views, self.mean, self.std, self.rank, self.world_size,
            self.shuffle_buffer, _seed(self.seed, epoch), "mixed" if gpu else "cpu",
            batch_size=self.batch_size, num_threads=self.num_threads,
            device_id=(self.device.index or 0) if gpu else None,
            seed=_seed(self.seed, epoch, self.rank), prefetch_queue_depth=self.prefetch_batches)

    def _epoch(self, epoch: int, skip: int) -> Iterator[dict]:
        outputs = [f"view{i}" for i in range(len(self.views))] + ["cls", "source"]
        batches = DALIGenericIterator([self.pipeline(epoch)], outputs)
        for index in range(self.steps_per_epoch()):
            out = next(batches)[0]
            if index < skip:
                continue
            yield {"views": [out[name] for name in outputs[:-2]],
                   "label": torch.tensor([int(c) if c else -1 for c in _strings(out["cls"])], dtype=torch.long),
                   "key": [split_member_name(s.rsplit(":", 1)[1])[0] for s in _strings(out["source"])],
                   "epoch": epoch, "batch": index}

    def __iter__(self) -> Iterator[dict]:
        epoch, skip = self.start.epoch, self.start.batch
        while True:
            yield from self._epoch(epoch, skip)
            epoch, skip = epoch + 1, 0

"""kNN evaluation of frozen backbone features (Wu et al. 2018, "Unsupervised Feature Learning
via Non-Parametric Instance Discrimination"; the protocol of solo-learn and lightly).

Each test feature votes with its ``k`` nearest train features by cosine similarity, a
neighbour with similarity ``s`` adding ``exp(s / T)`` to its class; the top class wins.
``eval.knn_whiten`` first ZCA-whitens both sets with the bank's mean and covariance (no labels).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ssl_foundry.data_prep.console import Progress
from ssl_foundry.data_prep.shard_format import locate_shards, manifest_sha256, redact, shard_list
from ssl_foundry.pipeline.config import Config
from ssl_foundry.pipeline.data.augment.torch_backend import eval_transform
from ssl_foundry.pipeline.data.loader import ShardStream, make_loader, train_backend
from ssl_foundry.pipeline.train.runtime import Runtime, autocast, cpu_has_fast_bf16


def iter_features(backbone: torch.nn.Module, folder: str, image_size: int, mean: list[float], std: list[float],
                  batch_size: int = 512, num_workers: int = 2, device: torch.device = torch.device("cpu"),
                  rank: int = 0, world_size: int = 1, backend: str = "torch"
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's share of ``folder`` (all of it with one rank), each sample once, a batch at a
    time: (features (B, D) fp32 on the CPU, labels (B,)). Read by the training's loader ``backend``:
    the torch loader (ranks x loader workers read disjoint shards, in shard order) or DALI (the
    reader splits the samples over the ranks). The backbone is put in eval mode."""
    if backend == "dali":
        from ssl_foundry.pipeline.data.dali_loader import dali_eval_batches  # DALI is imported only when it is used

        batches = dali_eval_batches(folder, image_size, mean, std, batch_size, rank, world_size, num_workers, device)
    else:
        batches = make_loader(ShardStream(folder, eval_transform(image_size, mean, std), batch_size, rank=rank,
                                          world_size=world_size, num_workers=num_workers, finite=True))
    amp = torch.bfloat16 if device.type == "cuda" or cpu_has_fast_bf16() else None
    backbone.eval()
    for batch in batches:
        with torch.no_grad(), autocast(device, amp):
            out = backbone(batch["views"][0].to(device, memory_format=torch.channels_last))
        yield out.float().cpu(), batch["label"]


def extract_features(backbone: torch.nn.Module, folder: str, image_size: int, mean: list[float],
                     std: list[float], batch_size: int = 512, num_workers: int = 2,
                     device: torch.device = torch.device("cpu"), rank: int = 0,
                     world_size: int = 1, backend: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`iter_features` whole: (features (N, D), labels (N,)) of this rank's share, with a
    progress bar (rank 0's; its total known with one rank)."""
    counts = [n for _, n in locate_shards(folder)[1]] if world_size == 1 else [None]
    pairs = []
    with Progress(total=None if None in counts else sum(counts), desc=f"features of {redact(folder)}",
                  unit="img") as progress:
        for features, labels in iter_features(backbone, folder, image_size, mean, std, batch_size, num_workers,
                                              device, rank, world_size, backend):
            pairs.append((features, labels))
            progress.update(len(labels))
    if not pairs:  # more ranks x workers than shards: this rank has none
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    feats, labels = zip(*pairs)
    return torch.cat(feats), torch.cat(labels)


# Similarities computed at once in kNN: (query chunk x bank chunk) fp32, 256 MiB.
SIMILARITY_BLOCK = 2**26


def nearest(queries: torch.Tensor, bank: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest similarities of each query to the bank rows (both L2-normalised), and
    their bank indices: the bank is streamed in blocks, so memory stays within SIMILARITY_BLOCK
    similarities plus the running top k, whatever the bank's size."""
    block = max(1, SIMILARITY_BLOCK // max(1, queries.shape[0]))
    best_sim = queries.new_empty(queries.shape[0], 0)
    best_idx = torch.empty(queries.shape[0], 0, dtype=torch.long, device=queries.device)
    for start in range(0, bank.shape[0], block):
        similarities = queries @ bank[start:start + block].T
        top_sim, top_idx = similarities.topk(min(k, similarities.shape[1]), dim=1)
        merged = torch.cat([best_sim, top_sim], dim=1)
        best_sim, order = merged.topk(min(k, merged.shape[1]), dim=1)
        best_idx = torch.cat([best_idx, top_idx + start], dim=1).gather(1, order)
    return best_sim, best_idx


def vote(similarities: torch.Tensor, labels: torch.Tensor, num_classes: int, temperature: float) -> torch.Tensor:
    """Each query's class: its neighbours vote ``exp(s / T)`` for their labels (Wu et al. 2018)."""
    votes = torch.zeros(similarities.shape[0], num_classes, device=similarities.device)
    votes.scatter_add_(1, labels, (similarities / temperature).exp())
    return votes.argmax(dim=1)


@torch.no_grad()
def whitening(bank: torch.Tensor, eps: float = 1e-5, sharded: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """ZCA whitening fitted on the bank, without labels (image retrieval's practice: Jegou & Chum,
    "Negative evidences and co-occurrences in image retrieval: the benefit of PCA and whitening",
    ECCV 2012): the mean mu and W = V (Lambda + eps lambda_max)^(-1/2) V^T of the bank's covariance
    Sigma = V Lambda V^T, so that W (x - mu) has the identity covariance over the bank (up to
    ``eps``, relative to the largest eigenvalue, which keeps near-empty directions from blowing
    up). Pooled ReLU features share a large mean and a few dominant directions (a trained
    backbone's test features have a mean cosine near 0.9), which otherwise decide the cosine.

    ``sharded``: the bank is split over the ranks of the process group; every rank gets the
    statistics of the whole bank."""
    stats = torch.cat([bank.double().sum(0), bank.new_tensor([len(bank)], dtype=torch.float64)])
    if sharded:
        dist.all_reduce(stats)
    mean = (stats[:-1] / stats[-1]).float()
    centred = bank - mean  # centred first: E[x x^T] - mu mu^T would cancel catastrophically in fp32
    covariance = centred.T @ centred
    if sharded:
        dist.all_reduce(covariance)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance.double() / stats[-1])
    eigenvalues = eigenvalues.clamp_min(0)
    matrix = eigenvectors @ torch.diag((eigenvalues + eps * eigenvalues.max()).rsqrt()) @ eigenvectors.T
    return mean, matrix.float()


def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                num_classes: int, k: int = 200, temperature: float = 0.1, chunk: int = 1024,
                sharded: bool = False) -> torch.Tensor:
    """Predicted class of each test feature by similarity-weighted kNN voting.

    ``sharded``: the bank (train features, labels) is split over the ranks of the process group,
    each passing its part and the same test features. For each chunk of queries every rank finds
    the k nearest in its part, the ranks exchange these candidates, and the k nearest of them all,
    which are the k nearest of the whole bank, vote on every rank alike."""
    bank = F.normalize(train_features, dim=1)
    bank_size = torch.tensor(len(bank), device=bank.device)
    if sharded:
        dist.all_reduce(bank_size)
    k = min(k, int(bank_size))
    predictions = []
    for queries in F.normalize(test_features, dim=1).split(chunk):
        similarities, index = nearest(queries, bank, k)
        labels = train_labels[index]
        if sharded:  # every rank's candidates, (q, W k); a part with fewer than k pads with -inf
            missing = k - similarities.shape[1]
            similarities = torch.cat(_all_gather(F.pad(similarities, (0, missing), value=-torch.inf)), dim=1)
            labels = torch.cat(_all_gather(F.pad(labels, (0, missing))), dim=1)
            similarities, order = similarities.topk(k, dim=1)
            labels = labels.gather(1, order)
        predictions.append(vote(similarities, labels, num_classes, temperature))
    return torch.cat(predictions)


def knn_accuracy(train_features, train_labels, test_features, test_labels, k=200, temperature=0.1,
                 whiten: bool = False) -> float:
    _check_labelled(train_labels, test_labels)
    if whiten:
        mean, matrix = whitening(train_features)
        train_features, test_features = (train_features - mean) @ matrix, (test_features - mean) @ matrix
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    predicted = knn_predict(train_features, train_labels, test_features, num_classes, k, temperature)
    return float((predicted == test_labels).float().mean())


UNLABELLED = "kNN needs labelled shards (a `cls` per sample) for data.eval_train and data.eval_test"


def _check_labelled(*labels: torch.Tensor) -> None:
    if any((lab < 0).any() for lab in labels):
        raise ValueError(UNLABELLED)


def cached_features(backbone: torch.nn.Module, folder: str, cache_dir: Path, backbone_digest: str,
                    **extract_args) -> tuple[torch.Tensor, torch.Tensor]:
    """``extract_features``, computed once per (backbone weights, shards, preprocessing) and kept in
    ``cache_dir``: the linear probe's lr sweep, kNN and the embedding map then share one pass.

    The key hashes ``backbone_digest`` (the export's content, ``pipeline.registry.export.export_digest``),
    the shards' manifest (its sha256s of every shard) and the preprocessing arguments, so a
    retrained backbone, re-prepped shards or another image size never reuse stale features.
    """
    preprocessing = {k: extract_args[k] for k in ("image_size", "mean", "std")}
    listed = [Path(shard).name for shard in shard_list(folder) or []]  # a shard list: some of the manifest's
    key_text = json.dumps({"backbone": backbone_digest, "manifest": manifest_sha256(folder), "shards": listed,
                           **preprocessing}, sort_keys=True)
    path = Path(cache_dir) / f"{Path(folder).name}-{hashlib.sha256(key_text.encode()).hexdigest()[:20]}.pt"
    if path.is_file():
        cached = torch.load(path)
        return cached["features"], cached["labels"]
    features, labels = extract_features(backbone, folder, **extract_args)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    try:
        torch.save({"features": features, "labels": labels, "key": key_text}, tmp)
        os.replace(tmp, path)  # a reader never sees half a file
    finally:
        tmp.unlink(missing_ok=True)  # a failed write (disk full) leaves nothing behind
    return features, labels


def eval_features(backbone: torch.nn.Module, cfg: Config, device: torch.device,
                  backbone_digest: str | None = None) -> tuple[torch.Tensor, ...]:
    """(train features, train labels, test features, test labels) of data.eval_train / data.eval_test;
    cached under ``<output_dir>/feature_cache`` when the backbone is identified by ``backbone_digest``
    (an in-memory backbone that is still training is not)."""
    d = cfg.data
    common = dict(image_size=d.eval_image_size, mean=d.mean, std=d.std, batch_size=cfg.eval.batch_size,
                  num_workers=d.num_workers, device=device)
    if backbone_digest is None:
        return (*extract_features(backbone, d.eval_train, **common), *extract_features(backbone, d.eval_test, **common))
    cache = Path(cfg.output_dir) / "feature_cache"
    return (*cached_features(backbone, d.eval_train, cache, backbone_digest, **common),
            *cached_features(backbone, d.eval_test, cache, backbone_digest, **common))


def knn_evaluate(backbone: torch.nn.Module, cfg: Config, device: torch.device,
                 backbone_digest: str | None = None) -> float:
    """Top-1 kNN accuracy of ``backbone`` with data.eval_train as memory bank, data.eval_test as queries."""
    features = eval_features(backbone, cfg, device, backbone_digest)
    return knn_accuracy(*features, cfg.eval.knn_k, cfg.eval.knn_temperature, cfg.eval.knn_whiten)


def knn_protocol(e) -> str:
    """How kNN is computed (``cfg.eval``), as printed beside its top-1."""
    return f"k={e.knn_k}, T={e.knn_temperature}" + (", whitened" if e.knn_whiten else "")


@dataclass
class KnnResult:
    top1: float
    bank_per_rank: list[int]  # data.eval_train samples each rank extracted
    queries_per_rank: list[int]  # data.eval_test samples each rank extracted
    seconds: float  # extraction and kNN, on this rank


def _gather_rows(rows: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``rows``, whose first dimension differs from rank to rank, in rank order
    (trailing dimensions padded to the largest: a rank without samples sends (0, 0) features)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [rows]
    shape = torch.tensor(rows.shape, device=rows.device)
    shapes = [torch.empty_like(shape) for _ in range(dist.get_world_size())]
    dist.all_gather(shapes, shape)
    padded = rows.new_zeros(torch.stack(shapes).amax(0).tolist())
    padded[tuple(slice(0, n) for n in rows.shape)] = rows
    return [part[:int(s[0])] for part, s in zip(_all_gather(padded), shapes)]


def _all_gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor)
    return parts


def _all_ranks_max(value: int, device: torch.device) -> int:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    tensor = torch.tensor([value], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


@torch.no_grad()
def distributed_knn(backbone: torch.nn.Module, cfg: Config, rt: Runtime) -> KnnResult:
    """kNN top-1 of ``backbone`` (data.eval_train the bank, data.eval_test the queries) with every
    rank's share of the work, so that none waits in a collective while another works alone: each
    rank extracts its share of both sets with the training's loader (data.backend: DALI on GPUs),
    the queries are gathered to every rank, the bank stays split (``knn_predict(sharded=True)``).
    With one rank, the plain kNN."""
    d, e, device = cfg.data, cfg.eval, rt.device
    tic = time.perf_counter()
    common = dict(image_size=d.eval_image_size, mean=d.mean, std=d.std, batch_size=e.batch_size,
                  num_workers=d.num_workers, device=device, rank=rt.rank, world_size=rt.world_size,
                  backend=train_backend(d.backend, device, d.eval_train))
    bank, bank_labels = (t.to(device) for t in extract_features(backbone, d.eval_train, **common))
    local_queries, local_query_labels = (t.to(device) for t in extract_features(backbone, d.eval_test, **common))
    query_parts = _gather_rows(local_queries)
    queries, query_labels = torch.cat(query_parts), torch.cat(_gather_rows(local_query_labels))
    bank_per_rank = [int(n) for n in torch.cat(_gather_rows(torch.tensor([len(bank_labels)], device=device)))]
    local_labels = torch.cat([bank_labels, local_query_labels])
    if _all_ranks_max(int((local_labels < 0).any()), device):
        raise ValueError(UNLABELLED)
    num_classes = _all_ranks_max(int(local_labels.max()) if len(local_labels) else 0, device) + 1
    bank = bank.reshape(-1, queries.shape[1])
    if e.knn_whiten:
        mean, matrix = whitening(bank, sharded=rt.world_size > 1)
        bank, queries = (bank - mean) @ matrix, (queries - mean) @ matrix
    predicted = knn_predict(bank, bank_labels, queries, num_classes, e.knn_k, e.knn_temperature,
                            sharded=rt.world_size > 1)
    top1 = float((predicted == query_labels).float().mean())
    return KnnResult(top1, bank_per_rank, [len(part) for part in query_parts], time.perf_counter() - tic)


def attach_knn_monitor(trainer) -> None:
    """Online kNN monitor (``eval.knn_every`` > 0): after every N-th pretraining step, the kNN top-1
    of the backbone as it is, or of its moving average (train.ema_decay) (``knn_monitor_top1``, the
    accuracy-over-training curve of solo-learn and lightly), every rank extracting its share
    (``distributed_knn``). The time counts in the step (and in a time budget's estimate if it falls
    in the probed steps)."""
    every, cfg = trainer.cfg.eval.knn_every, trainer.cfg

    def monitor(step: int) -> None:
        if step % every:
            return
        backbone = trainer.trained_backbone()
        modes = {module: module.training for module in backbone.modules()}  # extraction sets eval mode
        result = distributed_knn(backbone, cfg, trainer.rt)
        for module, training in modes.items():
            module.train(training)
        if trainer.tracker is not None:
            trainer.tracker.log_metrics({"knn_monitor_top1": result.top1}, step=step)

    trainer.step_callbacks.append(monitor)

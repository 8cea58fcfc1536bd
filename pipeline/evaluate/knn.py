"""kNN evaluation of frozen backbone features (Wu et al. 2018, "Unsupervised Feature Learning
via Non-Parametric Instance Discrimination"; the protocol of solo-learn and lightly).

Each test feature votes with its ``k`` nearest train features by cosine similarity, a
neighbour with similarity ``s`` adding ``exp(s / T)`` to its class; the top class wins.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from ssl_foundry.data_prep.console import Progress
from ssl_foundry.data_prep.shard_format import manifest_sha256, redact, shard_list
from ssl_foundry.models.registry import exported_backbone_name
from ssl_foundry.pipeline.config import Config
from ssl_foundry.pipeline.data.augment.torch_backend import eval_transform
from ssl_foundry.pipeline.data.loader import ShardStream, make_loader
from ssl_foundry.pipeline.train.runtime import autocast, cpu_has_fast_bf16


@torch.no_grad()
def extract_features(backbone: torch.nn.Module, folder: str, image_size: int, mean: list[float],
                     std: list[float], batch_size: int = 512, num_workers: int = 2,
                     device: torch.device = torch.device("cpu")) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sample of ``folder`` once, in shard order: (features (N, D) fp32, labels (N,))."""
    stream = ShardStream(folder, eval_transform(image_size, mean, std), batch_size,
                         num_workers=num_workers, finite=True)
    amp = torch.bfloat16 if device.type == "cuda" or cpu_has_fast_bf16() else None
    feats, labels = [], []
    backbone.eval()
    with Progress(total=stream.num_samples, desc=f"features of {redact(folder)}", unit="img") as progress:
        for batch in make_loader(stream):
            with autocast(device, amp):
                out = backbone(batch["views"][0].to(device, memory_format=torch.channels_last))
            feats.append(out.float().cpu())
            labels.append(batch["label"])
            progress.update(len(batch["label"]))
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                num_classes: int, k: int = 200, temperature: float = 0.1, chunk: int = 1024) -> torch.Tensor:
    """Predicted class of each test feature by similarity-weighted kNN voting."""
    train_features = F.normalize(train_features, dim=1)
    test_features = F.normalize(test_features, dim=1)
    k = min(k, train_features.shape[0])
    predictions = []
    for queries in test_features.split(chunk):
        similarity = queries @ train_features.T  # (q, N) cosine similarities
        top_sim, top_idx = similarity.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(queries.shape[0], num_classes, device=queries.device)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)


def knn_accuracy(train_features, train_labels, test_features, test_labels, k=200, temperature=0.1) -> float:
    if (train_labels < 0).any() or (test_labels < 0).any():
        raise ValueError("kNN needs labelled shards (a `cls` per sample) for data.eval_train and data.eval_test")
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    predicted = knn_predict(train_features, train_labels, test_features, num_classes, k, temperature)
    return float((predicted == test_labels).float().mean())


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
    return knn_accuracy(*features, cfg.eval.knn_k, cfg.eval.knn_temperature)


def attach_knn_monitor(trainer) -> None:
    """Online kNN monitor (``eval.knn_every`` > 0): after every N-th pretraining step, rank 0 logs
    the kNN top-1 of the backbone as it is (``knn_monitor_top1``), the accuracy-over-training curve
    of solo-learn and lightly. The other ranks wait for it at their next collective, and the time
    counts in the step (and in a time budget's estimate if it falls in the probed steps)."""
    every, cfg = trainer.cfg.eval.knn_every, trainer.cfg

    def monitor(step: int) -> None:
        if step % every or not trainer.rt.is_main:
            return
        backbone = trainer.model.get_submodule(exported_backbone_name(trainer.model))
        modes = {module: module.training for module in backbone.modules()}  # extraction sets eval mode
        top1 = knn_evaluate(backbone, cfg, trainer.rt.device)
        for module, training in modes.items():
            module.train(training)
        trainer.tracker.log_metrics({"knn_monitor_top1": top1}, step=step)

    trainer.step_callbacks.append(monitor)

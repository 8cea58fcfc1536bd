"""kNN evaluation of frozen backbone features (Wu et al. 2018, "Unsupervised Feature Learning
via Non-Parametric Instance Discrimination"; the protocol of solo-learn and lightly).

Each test feature votes with its ``k`` nearest train features by cosine similarity, a
neighbour with similarity ``s`` adding ``exp(s / T)`` to its class; the top class wins.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from launch.config import Config
from pipeline.augment import eval_transform
from pipeline.loader import ShardStream, make_loader
from pipeline.runtime import autocast, cpu_has_fast_bf16


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
    for batch in make_loader(stream):
        with autocast(device, amp):
            out = backbone(batch["views"][0].to(device, memory_format=torch.channels_last))
        feats.append(out.float().cpu())
        labels.append(batch["label"])
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
        votes = torch.zeros(queries.shape[0], num_classes)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)


def knn_accuracy(train_features, train_labels, test_features, test_labels, k=200, temperature=0.1) -> float:
    if (train_labels < 0).any() or (test_labels < 0).any():
        raise ValueError("kNN needs labelled shards (a `cls` per sample) for data.eval_train and data.eval_test")
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    predicted = knn_predict(train_features, train_labels, test_features, num_classes, k, temperature)
    return float((predicted == test_labels).float().mean())


def knn_evaluate(backbone: torch.nn.Module, cfg: Config, device: torch.device) -> float:
    """Top-1 kNN accuracy of ``backbone`` with data.eval_train as memory bank, data.eval_test as queries."""
    d, e = cfg.data, cfg.eval
    common = dict(image_size=d.eval_image_size, mean=d.mean, std=d.std, batch_size=e.batch_size,
                  num_workers=d.num_workers, device=device)
    train_f, train_y = extract_features(backbone, d.eval_train, **common)
    test_f, test_y = extract_features(backbone, d.eval_test, **common)
    return knn_accuracy(train_f, train_y, test_f, test_y, e.knn_k, e.knn_temperature)

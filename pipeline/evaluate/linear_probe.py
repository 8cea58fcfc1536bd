"""Linear evaluation of frozen features: the protocol of SimCLR (Chen et al. 2020, sec. 4 and
appendix B.5), MoCo (He et al. 2020, sec. 4.1) and their successors.

The backbone is frozen in eval mode and its features are extracted once (no augmentation; cached
by ``pipeline.evaluate.knn.cached_features``). A single linear layer, with no BatchNorm in front of it,
is trained on them with cross-entropy, SGD (or LARS) with momentum and a cosine schedule. The
learning rate is picked from a small sweep on a held-out part of the train set; the head is then
retrained with that lr on the whole train set and reported on the test set, which never takes
part in a choice.

Features are standardised with the train set's per-dimension mean and standard deviation before
training (conditioning only: the same lr then suits any backbone's feature scale). That affine map
is folded into the trained layer, so the returned head is one ``nn.Linear`` on raw features.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler

from ssl_foundry.data_prep.console import Progress
from ssl_foundry.pipeline.config import LinearProbeConfig

logger = logging.getLogger(__name__)


@dataclass
class LinearProbeResult:
    test_top1: float
    best_lr: float
    val_top1: dict[float, float]  # held-out accuracy of each swept lr
    head: torch.nn.Linear  # trained on the whole train set with best_lr; takes raw features


def accuracy(head: torch.nn.Module, features: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((head(features).argmax(dim=1) == labels).float().mean())


def train_linear_head(features: torch.Tensor, labels: torch.Tensor, num_classes: int, lr: float,
                      cfg: LinearProbeConfig, progress: Progress | None = None) -> torch.nn.Linear:
    """One linear layer trained on ``features`` (N, D) with labels in [0, num_classes); ``progress``
    advances by one per epoch."""
    mean = features.mean(dim=0)
    std = features.std(dim=0).clamp_min(1e-6)  # constant dimensions (dead units, blank pixels) stay 0
    x = (features - mean) / std
    generator = torch.Generator().manual_seed(cfg.seed)
    head = torch.nn.Linear(x.shape[1], num_classes)
    torch.nn.init.zeros_(head.weight)  # the problem is convex: a fixed start makes runs reproducible
    torch.nn.init.zeros_(head.bias)
    optimizer = create_optimizer_v2(head, opt=cfg.optimizer, lr=lr, weight_decay=cfg.weight_decay,
                                    momentum=cfg.momentum)
    steps_per_epoch = math.ceil(len(x) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    scheduler = CosineLRScheduler(optimizer, t_initial=total, lr_min=0.0, t_in_epochs=False)
    step = 0
    for _ in range(cfg.epochs):
        for index in torch.randperm(len(x), generator=generator).split(cfg.batch_size):
            loss = F.cross_entropy(head(x[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            scheduler.step_update(step)
        if progress is not None:
            progress.update()
    folded = torch.nn.Linear(x.shape[1], num_classes)
    with torch.no_grad():  # W (x - m) / s + b  ==  (W / s) x + (b - (W / s) m)
        folded.weight.copy_(head.weight / std)
        folded.bias.copy_(head.bias - folded.weight @ mean)
    return folded.eval()


def sweep_split(num_rows: int, cfg: LinearProbeConfig, groups: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(val, fit) row indices: a seeded ``cfg.val_fraction`` of the rows held out for the lr sweep.
    With ``groups`` (N,) the split is by group -- rows of a group are never on both sides, as when
    the test set holds unseen groups (videos) and a row has near-copies (a clip and its reverse)."""
    generator = torch.Generator().manual_seed(cfg.seed)
    if groups is None:
        order = torch.randperm(num_rows, generator=generator)
        num_val = max(1, round(cfg.val_fraction * num_rows))
        return order[:num_val], order[num_val:]
    names = groups.unique()
    if len(names) < 2:
        raise ValueError("a grouped lr sweep holds out whole groups: it needs rows of 2 groups or more")
    shuffled = names[torch.randperm(len(names), generator=generator)]
    held_out = shuffled[:min(len(names) - 1, max(1, round(cfg.val_fraction * len(names))))]
    is_val = torch.isin(groups, held_out)
    return is_val.nonzero().flatten(), (~is_val).nonzero().flatten()


def linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, cfg: LinearProbeConfig,
                 train_groups: torch.Tensor | None = None) -> LinearProbeResult:
    """The sweep on a seeded held-out split of the train set (by ``train_groups`` where given, see
    ``sweep_split``), then the chosen lr on all of it."""
    if (train_labels < 0).any() or (test_labels < 0).any():
        raise ValueError("the linear probe needs labelled shards (a `cls` per sample) for data.eval_train "
                         "and data.eval_test")
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    val, fit = sweep_split(len(train_features), cfg, train_groups)
    val_top1 = {}
    with Progress(total=(len(cfg.lrs) + 1) * cfg.epochs, desc="linear probe", unit="epoch") as progress:
        for lr in cfg.lrs:
            progress.set_postfix(lr=lr, refresh=False)
            head = train_linear_head(train_features[fit], train_labels[fit], num_classes, lr, cfg, progress)
            val_top1[lr] = accuracy(head, train_features[val], train_labels[val])
        best_lr = max(cfg.lrs, key=lambda lr: val_top1[lr])  # the first of equals: the smallest listed first
        logger.info("linear probe: held-out top-1 %s; training on all of the train set with lr %g",
                    ", ".join(f"{100 * top1:.1f}% at lr {lr:g}" for lr, top1 in val_top1.items()), best_lr)
        progress.set_postfix(lr=best_lr, refresh=False)
        head = train_linear_head(train_features, train_labels, num_classes, best_lr, cfg, progress)
    return LinearProbeResult(test_top1=accuracy(head, test_features, test_labels), best_lr=best_lr,
                             val_top1=val_top1, head=head)

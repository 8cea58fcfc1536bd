"""MoCo v2: He, Fan, Wu, Xie, Girshick, "Momentum Contrast for Unsupervised Visual Representation
Learning", CVPR 2020 (https://arxiv.org/abs/1911.05722), with the improvements of Chen, Fan,
Girshick, He, "Improved Baselines with Momentum Contrastive Learning", 2020
(https://arxiv.org/abs/2003.04297): MLP projection head, stronger augmentation (blur), cosine lr.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssl_foundry.models.distributed import batch_shuffle, batch_unshuffle, gather_no_grad, is_distributed
from ssl_foundry.models.heads import MLPHead
from ssl_foundry.models.losses import info_nce_loss
from ssl_foundry.models.momentum import MomentumEncoder
from ssl_foundry.models.queues import KeyQueue
from ssl_foundry.models.registry import register_method


@register_method("moco_v2")
class MoCoV2(nn.Module):
    """Query encoder f_q = projector(backbone), key encoder f_k = its momentum copy, a queue of K
    negative keys and InfoNCE (eq. 1), as in Algorithm 1 of the MoCo paper:

        q = normalize(f_q(x_q));  k = normalize(f_k(x_k))          (no gradient to k)
        loss = InfoNCE(q, k, queue, t);  enqueue(gather(k))
        after the optimizer step: theta_k <- m theta_k + (1 - m) theta_q     (eq. 2, m = 0.999)

    Shuffling BN (sec. 3.3): the keys' BatchNorm statistics must not come from the same images
    as their queries'. Under DDP the global batch is shuffled over ranks before the key encoder
    and unshuffled after (:func:`models.distributed.batch_shuffle`). ``shuffle_bn_splits`` also
    cuts each rank's shuffled key batch into that many BatchNorm groups; ``None`` (default) means
    1 under DDP (the paper: one group per GPU) and 8 on a single process, where shuffling alone
    changes nothing (BN over the whole batch is permutation invariant): that is the
    SplitBatchNorm emulation of 8 GPUs used by MoCo's own single-GPU demo.

    The loss is the paper's asymmetric one (queries from the first view, keys from the second).
    """

    num_views = 2

    def __init__(self, backbone: nn.Module, proj_hidden_dim: int = 2048, proj_out_dim: int = 128,
                 queue_size: int = 65536, temperature: float = 0.2, momentum: float = 0.999,
                 shuffle_bn_splits: int | None = None):
        super().__init__()
        self.backbone = backbone
        # MoCo v2's head: fc(2048) -> ReLU -> fc(128), no BatchNorm
        self.projector = MLPHead(backbone.num_features, proj_hidden_dim, proj_out_dim, num_layers=2,
                                 batch_norm=False)
        self.key_encoder = MomentumEncoder(self._query_encoder())
        self.queue = KeyQueue(queue_size, proj_out_dim)
        self.temperature = temperature
        self.momentum = momentum
        if shuffle_bn_splits is not None and shuffle_bn_splits < 1:
            raise ValueError(f"moco_v2: shuffle_bn_splits must be >= 1 or null, got {shuffle_bn_splits}")
        self.shuffle_bn_splits = shuffle_bn_splits

    def _query_encoder(self) -> nn.Module:
        return nn.Sequential(self.backbone, self.projector)

    @torch.no_grad()
    def encode_keys(self, x_k: torch.Tensor) -> torch.Tensor:
        """k = normalize(f_k(x_k)) with shuffling BN, returned in the original sample order."""
        splits = self.shuffle_bn_splits or (1 if is_distributed() else 8)
        splits = max(1, min(splits, x_k.shape[0] // 2))  # BatchNorm needs >= 2 samples per group
        shuffled, unshuffle = batch_shuffle(x_k)
        k = torch.cat([self.key_encoder(part) for part in shuffled.tensor_split(splits)])
        return batch_unshuffle(F.normalize(k.float(), dim=1), unshuffle)

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        if len(views) != 2:
            raise ValueError(f"MoCo v2 takes 2 views, got {len(views)}: check data.views in the recipe")
        x_q, x_k = views
        q = self.projector(self.backbone(x_q))
        k = self.encode_keys(x_k)
        # the queue is read before this batch's keys are enqueued (clone: enqueue is in-place)
        loss = info_nce_loss(q, k, self.queue.keys.clone(), self.temperature)
        self.queue.enqueue(gather_no_grad(k))
        return {"loss": loss}

    def on_step_end(self, step: int, total_steps: int) -> None:
        self.key_encoder.update(self._query_encoder(), self.momentum)

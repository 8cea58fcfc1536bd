"""SimSiam: Chen, He, "Exploring Simple Siamese Representation Learning", CVPR 2021.
https://arxiv.org/abs/2011.10566"""
from __future__ import annotations

import torch
import torch.nn as nn

from ssl_foundry.models.heads import MLPHead
from ssl_foundry.models.losses import negative_cosine_loss
from ssl_foundry.models.registry import register_method


@register_method("simsiam")
class SimSiam(nn.Module):
    """Encoder f (backbone + projector), predictor h, no negatives, no momentum encoder (Algorithm 1):

        z1, z2 = f(x1), f(x2);   p1, p2 = h(z1), h(z2)
        L = D(p1, stopgrad(z2)) / 2 + D(p2, stopgrad(z1)) / 2,   D(p, z) = -cos(p, z)   (eq. 4)

    Projector: 3 layers of 2048 with BN on each, the output BN without affine (sec. 3 "Baseline
    settings", the official ``builder.py``); predictor: 2048 -> 512 (BN, ReLU) -> 2048, a
    bottleneck. Each view goes through the encoder in its own call, as in the reference code.

    ``fix_predictor_lr`` (the official ``--fix-pred-lr``, which its README's recipe uses; sec. 4.2:
    a predictor at a constant lr, without decay, works well): the predictor's parameters keep the
    base lr while the rest follows the schedule. The trainer's optimizer reads
    ``fixed_lr_modules`` for this.
    """

    num_views = 2

    def __init__(self, backbone: nn.Module, proj_hidden_dim: int = 2048, proj_out_dim: int = 2048,
                 proj_layers: int = 3, pred_hidden_dim: int = 512, fix_predictor_lr: bool = True):
        super().__init__()
        self.backbone = backbone
        self.projector = MLPHead(backbone.num_features, proj_hidden_dim, proj_out_dim, proj_layers,
                                 last_batch_norm=True)
        self.predictor = MLPHead(proj_out_dim, pred_hidden_dim, proj_out_dim, num_layers=2)
        self.fixed_lr_modules = ("predictor",) if fix_predictor_lr else ()

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        if len(views) != 2:
            raise ValueError(f"SimSiam takes 2 views, got {len(views)}: check data.views in the recipe")
        z1, z2 = (self.projector(self.backbone(view)) for view in views)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        return {"loss": (negative_cosine_loss(p1, z2) + negative_cosine_loss(p2, z1)) / 2}

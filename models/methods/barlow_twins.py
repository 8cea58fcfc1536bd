"""Barlow Twins: Zbontar, Jing, Misra, LeCun, Deny, "Barlow Twins: Self-Supervised Learning via
Redundancy Reduction", ICML 2021. https://arxiv.org/abs/2103.03230"""
from __future__ import annotations

import torch
import torch.nn as nn

from ssl_foundry.models.heads import MLPHead
from ssl_foundry.models.losses import barlow_twins_loss
from ssl_foundry.models.method import Method
from ssl_foundry.models.registry import register_method


@register_method("barlow_twins")
class BarlowTwins(Method):
    """Two distorted views -> backbone -> projector (3 layers of 8192, BN + ReLU between) ->
    embeddings zA, zB; the loss drives their cross-correlation matrix over the *global* batch to
    the identity (eq. 1, 2):

        L = sum_i (1 - C_ii)^2 + lambda sum_i sum_{j != i} C_ij^2,   lambda = 5.1e-3

    Each view goes through the network in its own call, as in the reference code.
    """

    num_views = 2

    def __init__(self, backbone: nn.Module, proj_hidden_dim: int = 8192, proj_out_dim: int = 8192,
                 proj_layers: int = 3, lambd: float = 0.0051):
        super().__init__()
        self.backbone = backbone
        self.projector = MLPHead(backbone.num_features, proj_hidden_dim, proj_out_dim, proj_layers)
        self.lambd = lambd

    def compute_loss(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        z1 = self.projector(self.backbone(views[0]))
        z2 = self.projector(self.backbone(views[1]))
        return {"loss": barlow_twins_loss(z1, z2, self.lambd)}

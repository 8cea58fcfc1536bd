"""Barlow Twins: Zbontar, Jing, Misra, LeCun, Deny, "Barlow Twins: Self-Supervised Learning via
Redundancy Reduction", ICML 2021. https://arxiv.org/abs/2103.03230"""
from __future__ import annotations

import torch
import torch.nn as nn

from ssl_foundry.models.heads import MLPHead
from ssl_foundry.models.losses import barlow_twins_loss
from ssl_foundry.models.registry import register_method


@register_method("barlow_twins")
class BarlowTwins(nn.Module):
    """Two distorted views -> backbone -> projector (3 layers of 8192, BN + ReLU between) ->
    embeddings zA, zB; the loss drives their cross-correlation matrix over the *global* batch to
    the identity (eq. 1, 2):

        L = sum_i (1 - C_ii)^2 + lambda sum_i sum_{j != i} C_ij^2,   lambda = 5.1e-3

    Each view goes through the network in its own call, as in the reference code.

    ``loss_scale`` multiplies the loss (solo-learn's ``scale_loss``). The reference code's
    cross-rank sum of C carries no gradient, which scales every gradient by 1 / (number of GPUs):
    its ImageNet run trained with 1/32 of the gradient of this (exact) loss. LARS normalises the
    weights' steps, so the scale matters for the weight decay's share of them and for the biases
    and BN parameters, which LARS does not adapt; the ImageNet recipe sets 1/32.
    """

    num_views = 2

    def __init__(self, backbone: nn.Module, proj_hidden_dim: int = 8192, proj_out_dim: int = 8192,
                 proj_layers: int = 3, lambd: float = 0.0051, loss_scale: float = 1.0):
        super().__init__()
        self.backbone = backbone
        self.projector = MLPHead(backbone.num_features, proj_hidden_dim, proj_out_dim, proj_layers)
        self.lambd, self.loss_scale = lambd, loss_scale

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        if len(views) != 2:
            raise ValueError(f"Barlow Twins takes 2 views, got {len(views)}: check data.views in the recipe")
        z1 = self.projector(self.backbone(views[0]))
        z2 = self.projector(self.backbone(views[1]))
        return {"loss": self.loss_scale * barlow_twins_loss(z1, z2, self.lambd)}

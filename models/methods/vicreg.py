"""VICReg: Bardes, Ponce, LeCun, "VICReg: Variance-Invariance-Covariance Regularization for
Self-Supervised Learning", ICLR 2022. https://arxiv.org/abs/2105.04906"""
from __future__ import annotations

import torch
import torch.nn as nn

from ssl_foundry.models.heads import MLPHead
from ssl_foundry.models.losses import vicreg_loss
from ssl_foundry.models.registry import register_method


@register_method("vicreg")
class VICReg(nn.Module):
    """Two views -> backbone -> expander (3 layers of 8192, BN + ReLU after the first two) ->
    embeddings Z, Z'; the loss (sec. 3, :func:`models.losses.vicreg_loss`)

        L = lambda s(Z, Z') + mu [v(Z) + v(Z')] / 2 + nu [c(Z) + c(Z')],   lambda = mu = 25, nu = 1

    keeps the two embeddings close (invariance s), every embedding dimension's standard deviation
    above 1 over the batch (variance v) and the dimensions decorrelated (covariance c), v and c
    over the *global* batch. Each view goes through the network in its own call, as in the
    reference code.
    """

    num_views = 2

    def __init__(self, backbone: nn.Module, proj_hidden_dim: int = 8192, proj_out_dim: int = 8192,
                 proj_layers: int = 3, sim_coeff: float = 25.0, std_coeff: float = 25.0, cov_coeff: float = 1.0):
        super().__init__()
        self.backbone = backbone
        self.projector = MLPHead(backbone.num_features, proj_hidden_dim, proj_out_dim, proj_layers)
        self.sim_coeff, self.std_coeff, self.cov_coeff = sim_coeff, std_coeff, cov_coeff

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        if len(views) != 2:
            raise ValueError(f"VICReg takes 2 views, got {len(views)}: check data.views in the recipe")
        z1, z2 = (self.projector(self.backbone(view)) for view in views)
        return {"loss": vicreg_loss(z1, z2, self.sim_coeff, self.std_coeff, self.cov_coeff)}

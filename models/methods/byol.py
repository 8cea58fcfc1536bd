"""BYOL: Grill, Strub, Altché, Tallec, Richemond et al., "Bootstrap Your Own Latent: A New Approach
to Self-Supervised Learning", NeurIPS 2020. https://arxiv.org/abs/2006.07733"""
from __future__ import annotations

import torch
import torch.nn as nn

from ssl_foundry.models.heads import MLPHead
from ssl_foundry.models.losses import byol_loss
from ssl_foundry.models.momentum import MomentumEncoder, cosine_momentum
from ssl_foundry.models.registry import register_method


@register_method("byol")
class BYOL(nn.Module):
    """Online network (backbone f_theta, projector g_theta, predictor q_theta) and a target network
    (f_xi, g_xi) that is an EMA of the online one (sec. 3.1):

        v, v' = t(x), t'(x)                                   (asymmetric augmentations)
        L = || q(z_theta(v)) ~ z_xi(v') ||^2 + || q(z_theta(v')) ~ z_xi(v) ||^2   (eq. 2, symmetrised)
        after each step: xi <- tau xi + (1 - tau) theta,
                         tau = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2      (tau_base = 0.996)

    ``~`` is the normalised MSE of :func:`models.losses.byol_loss`, averaged over the batch.
    Projector and predictor are MLPs 4096 (BN, ReLU) -> 256 (sec. 3.3). Both views go through
    each network in one call.
    """

    num_views = 2

    def __init__(self, backbone: nn.Module, proj_hidden_dim: int = 4096, proj_out_dim: int = 256,
                 pred_hidden_dim: int = 4096, momentum: float = 0.996):
        super().__init__()
        self.backbone = backbone
        self.projector = MLPHead(backbone.num_features, proj_hidden_dim, proj_out_dim, num_layers=2)
        self.predictor = MLPHead(proj_out_dim, pred_hidden_dim, proj_out_dim, num_layers=2)
        self.target = MomentumEncoder(self._online_encoder())
        self.base_momentum = momentum

    def _online_encoder(self) -> nn.Module:
        return nn.Sequential(self.backbone, self.projector)

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        if len(views) != 2:
            raise ValueError(f"BYOL takes 2 views, got {len(views)}: check data.views in the recipe")
        p1, p2 = self.predictor(self.projector(self.backbone(torch.cat(views)))).chunk(2)
        z1, z2 = self.target(torch.cat(views)).chunk(2)  # no gradient: the paper's sg(z')
        return {"loss": byol_loss(p1, z2) + byol_loss(p2, z1)}

    def on_step_end(self, step: int, total_steps: int) -> None:
        """``step`` optimizer steps are done; the update after step k (0-based) uses tau(k)."""
        tau = cosine_momentum(step - 1, total_steps, self.base_momentum)
        self.target.update(self._online_encoder(), tau)

"""SimCLR: Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive Learning of
Visual Representations", ICML 2020. https://arxiv.org/abs/2002.05709"""
from __future__ import annotations

import torch
import torch.nn as nn

from ssl_foundry.models.heads import MLPHead
from ssl_foundry.models.losses import nt_xent_loss
from ssl_foundry.models.method import Method
from ssl_foundry.models.registry import register_method


@register_method("simclr")
class SimCLR(Method):
    """Two augmented views -> backbone f -> projector g -> NT-Xent over the global batch.

    Both views go through the backbone in one call, as in the paper's implementation, so
    BatchNorm statistics are shared by the two views of each image.
    """

    num_views = 2

    def __init__(self, backbone: nn.Module, proj_hidden_dim: int = 2048, proj_out_dim: int = 128,
                 proj_layers: int = 2, temperature: float = 0.5):
        super().__init__()
        self.backbone = backbone
        # proj_layers=0: the loss on the backbone's own features, the paper's "no projection" (Fig. 8).
        self.projector = (MLPHead(backbone.num_features, proj_hidden_dim, proj_out_dim, proj_layers)
                          if proj_layers else nn.Identity())
        self.temperature = temperature

    def compute_loss(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        z = self.projector(self.backbone(torch.cat(views)))
        z1, z2 = z.chunk(2)
        return {"loss": nt_xent_loss(z1, z2, self.temperature)}

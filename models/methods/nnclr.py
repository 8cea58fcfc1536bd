"""NNCLR: Dwibedi, Aytar, Tompson, Sermanet, Zisserman, "With a Little Help from My Friends:
Nearest-Neighbor Contrastive Learning of Visual Representations", ICCV 2021.
https://arxiv.org/abs/2104.14548"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssl_foundry.models.distributed import gather_no_grad
from ssl_foundry.models.heads import MLPHead
from ssl_foundry.models.losses import nnclr_loss
from ssl_foundry.models.queues import KeyQueue
from ssl_foundry.models.registry import register_method


@register_method("nnclr")
class NNCLR(nn.Module):
    """Contrastive learning whose positive is the nearest neighbour of an embedding in a support
    set Q of past embeddings, not the embedding itself:

        z1, z2 = normalize(g(f(x1))), normalize(g(f(x2)));   p1, p2 = h(z1), h(z2)
        NN(z, Q) = argmin_{q in Q} ||z - q||                  (no gradient)
        L = [L(NN(z1, Q), p2) + L(NN(z2, Q), p1)] / 2         (eq. 2, symmetrised; t = 0.1)
        then Q <- FIFO(Q, z1 of the global batch)

    Projector g: 3 layers [2048, 2048, d], BN after each (ReLU after all but the last); predictor
    h: [4096, d], BN + ReLU after the hidden layer; d = 256; support set of 98,304 (sec. 4,
    "Implementation details"). The support set holds the first view's embeddings of every rank
    (gathered: the same queue on every rank), read before this batch is added.
    """

    num_views = 2

    def __init__(self, backbone: nn.Module, proj_hidden_dim: int = 2048, proj_out_dim: int = 256,
                 pred_hidden_dim: int = 4096, queue_size: int = 98304, temperature: float = 0.1):
        super().__init__()
        self.backbone = backbone
        self.projector = MLPHead(backbone.num_features, proj_hidden_dim, proj_out_dim, num_layers=3,
                                 last_batch_norm=True, last_affine=True)
        self.predictor = MLPHead(proj_out_dim, pred_hidden_dim, proj_out_dim, num_layers=2)
        self.support_set = KeyQueue(queue_size, proj_out_dim)
        self.temperature = temperature

    @torch.no_grad()
    def nearest_neighbour(self, z: torch.Tensor) -> torch.Tensor:
        """The support-set embedding of largest cosine similarity to each (unit) row of ``z``."""
        support = self.support_set.keys
        return support[(z.float() @ support.T).argmax(dim=1)]

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        if len(views) != 2:
            raise ValueError(f"NNCLR takes 2 views, got {len(views)}: check data.views in the recipe")
        z1, z2 = (self.projector(self.backbone(view)) for view in views)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        z1, z2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
        loss = (nnclr_loss(self.nearest_neighbour(z1), p2, self.temperature)
                + nnclr_loss(self.nearest_neighbour(z2), p1, self.temperature)) / 2
        self.support_set.enqueue(gather_no_grad(z1.detach()))
        return {"loss": loss}

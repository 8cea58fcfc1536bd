"""RotNet: Gidaris, Singh, Komodakis, "Unsupervised Representation Learning by Predicting Image
Rotations", ICLR 2018. https://arxiv.org/abs/1803.07728"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssl_foundry.models.heads import MLPHead
from ssl_foundry.models.pretext import NUM_ROTATIONS, encode_rotations
from ssl_foundry.models.registry import register_method


@register_method("rotnet")
class RotNet(nn.Module):
    """Every image of the batch is fed in all four rotations g(x, y), y in {0, 90, 180, 270}
    degrees (the paper finds this better than one random rotation per image), and a
    classifier F on the backbone's features predicts y:

        loss = (1/4B) sum_i sum_y -log F^y(g(x_i, y))

    ``head_layers``: 1 is a linear classifier on the pooled features; more adds BN-ReLU hidden
    layers of ``head_hidden_dim`` (the paper's classifier is the network's last block).
    """

    num_views = 1

    def __init__(self, backbone: nn.Module, head_layers: int = 1, head_hidden_dim: int = 512):
        super().__init__()
        self.backbone = backbone
        self.rotation_head = MLPHead(backbone.num_features, head_hidden_dim, NUM_ROTATIONS, head_layers)

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        features, rotation = encode_rotations(self.backbone, views, "RotNet")
        logits = self.rotation_head(features)
        accuracy = (logits.argmax(dim=1) == rotation).float().mean()
        return {"loss": F.cross_entropy(logits.float(), rotation), "rotation_accuracy": accuracy.detach()}

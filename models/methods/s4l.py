"""S4L: Zhai, Oliver, Kolesnikov, Beyer, "S4L: Self-Supervised Semi-Supervised Learning",
ICCV 2019. https://arxiv.org/abs/1905.03670 (S4L-Rotation)"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssl_foundry.models.losses import labelled_cross_entropy
from ssl_foundry.models.pretext import NUM_ROTATIONS, encode_rotations
from ssl_foundry.models.registry import register_method


@register_method("s4l")
class S4L(nn.Module):
    """S4L-Rotation: one network, two linear heads on its features,

        L = L_l(D_l) + w * L_u(D_u u D_l)

    L_u the RotNet loss over all four rotations of every image of the batch, labelled or not;
    L_l the supervised cross entropy of the upright images whose label is known. Which images
    are labelled is the data's business: ``data.labelled_fraction`` (e.g. 0.01 or 0.1) selects
    an exact, seed-deterministic subset of the training shards' keys, and the trainer passes the
    others' labels as -1 (``pipeline/data/labelled_subset.py``).
    """

    num_views = 1
    uses_labels = True

    def __init__(self, backbone: nn.Module, num_classes: int = 10, rotation_weight: float = 1.0):
        super().__init__()
        self.backbone = backbone
        self.rotation_head = nn.Linear(backbone.num_features, NUM_ROTATIONS)
        self.class_head = nn.Linear(backbone.num_features, num_classes)
        self.rotation_weight = rotation_weight

    def forward(self, views: list[torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        features, rotation = encode_rotations(self.backbone, views, "S4L")
        batch = len(features) // NUM_ROTATIONS
        rotation_loss = F.cross_entropy(self.rotation_head(features).float(), rotation)
        supervised_loss = labelled_cross_entropy(self.class_head(features[:batch]), labels)  # block 0: upright
        return {"loss": supervised_loss + self.rotation_weight * rotation_loss,
                "rotation_loss": rotation_loss.detach(), "supervised_loss": supervised_loss.detach(),
                "labelled_in_batch": (labels >= 0).float().sum()}

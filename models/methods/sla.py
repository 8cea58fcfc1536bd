"""Self-supervised label augmentation (SLA): Lee, Hwang, Shin, "Self-supervised Label Augmentation
via Input Transformations", ICML 2020 (arXiv v1: "Rethinking Data Augmentation: Self-Supervision
and Self-Distillation"). https://arxiv.org/abs/1910.05872"""
from __future__ import annotations

import torch
import torch.nn as nn

from ssl_foundry.models.losses import (aggregated_class_logits, joint_rotation_labels, labelled_cross_entropy,
                                       self_distillation_loss)
from ssl_foundry.models.pretext import NUM_ROTATIONS, encode_rotations
from ssl_foundry.models.registry import register_method


@register_method("sla")
class SLA(nn.Module):
    """SLA+SD with rotations, for labelled data: one classifier over the N * M
    joint labels (class i, rotation j), M = 4, trained on all four rotations of every image,

        L_SLA = (1/M) sum_j CE(z(x~_j), (i, j))

    plus aggregated self-distillation into a plain N-way classifier u on the upright image,

        L = L_SLA + KL(P_aggregated(.|x) || softmax(u f(x))) + beta * CE(u f(x), y)

    with P_aggregated the softmax of the joint logits averaged over rotations ("aggregated
    inference"), a fixed teacher (detached, as in the authors' code, hankook/SLA trainers.py,
    which also sets beta = 1). Unlabelled images (label -1) are left out of every term.
    """

    num_views = 1
    uses_labels = True

    def __init__(self, backbone: nn.Module, num_classes: int = 10, distillation_ce_weight: float = 1.0):
        super().__init__()
        self.backbone = backbone
        self.joint_head = nn.Linear(backbone.num_features, num_classes * NUM_ROTATIONS)
        self.class_head = nn.Linear(backbone.num_features, num_classes)
        self.distillation_ce_weight = distillation_ce_weight

    def forward(self, views: list[torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        features, rotation = encode_rotations(self.backbone, views, "SLA")
        batch = len(features) // NUM_ROTATIONS
        joint_logits = self.joint_head(features)
        sla_loss = labelled_cross_entropy(joint_logits, joint_rotation_labels(labels.repeat(NUM_ROTATIONS), rotation))
        known = labels >= 0
        class_logits = self.class_head(features[:batch])  # u on the upright images (block 0)
        aggregated = aggregated_class_logits(joint_logits)
        distillation = (self_distillation_loss(class_logits[known], aggregated[known]) if known.any()
                        else class_logits.sum() * 0.0)
        classifier_loss = labelled_cross_entropy(class_logits, labels)
        return {"loss": sla_loss + distillation + self.distillation_ce_weight * classifier_loss,
                "sla_loss": sla_loss.detach(), "distillation_loss": distillation.detach()}

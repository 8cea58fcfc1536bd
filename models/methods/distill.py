"""Feature distillation of a frozen, pretrained teacher into a student backbone of any architecture.

- ``smooth_l1``: Wei et al., "Contrastive Learning Rivals Masked Image Modeling in Fine-tuning via
  Feature Distillation", 2022 (https://arxiv.org/abs/2205.14141).
- ``cosine``: Navaneet et al., "SimReg: Regression as a Simple Yet Effective Tool for
  Self-supervised Knowledge Distillation", BMVC 2021.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ssl_foundry.models.losses import cosine_distillation_loss, smooth_l1_distillation_loss
from ssl_foundry.models.pretext import single_view
from ssl_foundry.models.registry import register_method

LOSSES = ("cosine", "smooth_l1")


@register_method("distill")
class Distill(nn.Module):
    """The student backbone s (trained, exported) regresses the pooled feature of a frozen teacher t
    on the same view:

        cosine:     L = mean_b 1 - cos(W s(x_b), t(x_b))
        smooth_l1:  L = mean_{b, j} SmoothL1_beta(W s(x_b) - LN(t(x_b)))_j,   beta = 2,
                    LN: layer norm without affine parameters (the teacher's features whitened)

    W is a linear projection from the student's width to the teacher's when they differ (the
    identity otherwise), trained with the student and dropped at export. ``teacher`` is any
    module returning pooled (B, D_t) features with ``num_features`` (a timm backbone): the pipeline
    resolves ``model.teacher`` (a registry reference, a run id or an export folder) into it. It is
    frozen: no gradient, always in eval mode (BatchNorm running statistics, no dropout), and a
    part of the checkpoint, so a resumed run distils the very weights it started from.
    """

    num_views = 1

    def __init__(self, backbone: nn.Module, teacher: nn.Module, loss: str = "cosine", smooth_l1_beta: float = 2.0):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"distill: loss '{loss}' is not one of {', '.join(LOSSES)}")
        self.backbone = backbone
        self.teacher = teacher.requires_grad_(False).eval()
        self.projector = (nn.Linear(backbone.num_features, teacher.num_features)
                          if backbone.num_features != teacher.num_features else nn.Identity())
        self.loss, self.smooth_l1_beta = loss, smooth_l1_beta

    def train(self, mode: bool = True) -> "Distill":
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        images = single_view(views, "distill")
        with torch.no_grad():
            target = self.teacher(images)
        prediction = self.projector(self.backbone(images))
        if self.loss == "cosine":
            return {"loss": cosine_distillation_loss(prediction, target)}
        return {"loss": smooth_l1_distillation_loss(prediction, target, self.smooth_l1_beta)}

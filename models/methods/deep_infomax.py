"""Deep InfoMax: Hjelm, Fedorov, Lavoie-Marchildon, Grewal, Bachman, Trischler, Bengio, "Learning
Deep Representations by Mutual Information Estimation and Maximization", ICLR 2019.
https://arxiv.org/abs/1808.06670"""
from __future__ import annotations

import torch
import torch.nn as nn

from ssl_foundry.models.heads import MLPHead
from ssl_foundry.models.losses import dim_infonce_loss, dim_jsd_loss
from ssl_foundry.models.pretext import single_view
from ssl_foundry.models.registry import register_method

ESTIMATORS = {"jsd": dim_jsd_loss, "infonce": dim_infonce_loss}


@register_method("deep_infomax")
class DeepInfoMax(nn.Module):
    """Local DIM: maximise the mutual information between the global feature
    E(x) (the backbone's pooled features) and every local feature C(x)_l (the backbone's feature
    map at ``local_stage``, a timm ``forward_intermediates`` index, e.g. -3: ResNet's layer2),
    with the JSD (default) or InfoNCE estimator over the batch. The critic is the
    paper's "encoder-and-dot" architecture: a 1x1-convolution MLP on local
    features and an MLP on the global feature, both to ``critic_dim``, scored by their dot
    product. The global-only term and the prior matching are left out (the paper's alpha = 0,
    gamma = 0 setting, beta = 1).
    """

    num_views = 1

    def __init__(self, backbone: nn.Module, estimator: str = "jsd", local_stage: int = -3,
                 critic_dim: int = 256):
        super().__init__()
        if estimator not in ESTIMATORS:
            raise ValueError(f"deep_infomax: model.method_args.estimator must be one of {', '.join(ESTIMATORS)}, "
                             f"got '{estimator}'")
        if not hasattr(backbone, "forward_intermediates"):
            raise ValueError(f"deep_infomax: {type(backbone).__name__} has no forward_intermediates (timm); "
                             f"choose another model.backbone")
        self.backbone = backbone
        self.estimator, self.local_stage = estimator, local_stage
        local_dim = backbone.feature_info[local_stage]["num_chs"]
        self.local_critic = nn.Sequential(nn.Conv2d(local_dim, critic_dim, 1), nn.ReLU(inplace=True),
                                          nn.Conv2d(critic_dim, critic_dim, 1))
        self.global_critic = MLPHead(backbone.num_features, critic_dim, critic_dim, 2)

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        images = single_view(views, "deep_infomax")
        final, (local_map,) = self.backbone.forward_intermediates(images, indices=[self.local_stage])
        global_features = self.global_critic(self.backbone.forward_head(final))
        local_features = self.local_critic(local_map).flatten(2).transpose(1, 2)  # (N, h*w, D)
        return {"loss": ESTIMATORS[self.estimator](global_features, local_features)}

"""Colorization: Zhang, Isola, Efros, "Colorful Image Colorization", ECCV 2016.
https://arxiv.org/abs/1603.08511"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssl_foundry.models.backbones import feature_map_reduction
from ssl_foundry.models.distributed import all_reduce_sum
from ssl_foundry.models.heads import UpsamplingDecoder
from ssl_foundry.models.lab import ab_bin_centres, lab_to_rgb, rebalancing_weights, rgb_to_lab, soft_encode_ab
from ssl_foundry.models.losses import rebalanced_soft_cross_entropy
from ssl_foundry.models.pretext import single_view
from ssl_foundry.models.registry import register_method

OUTPUT_REDUCTION = 4  # the paper predicts ab at a quarter of the input resolution (56 of 224)


@register_method("colorization")
class Colorization(nn.Module):
    """Predict the ab channels of an image from its lightness L. The view is converted to
    CIE Lab; its L, as the sRGB grey image of that lightness (a = b = 0) normalised like the data
    (a grey view passes unchanged, so the exported backbone sees what it is evaluated on), goes
    through the backbone's feature map and an up-convolutional decoder to a quarter of the input
    resolution, where:

    - classification (default): a distribution over the Q in-gamut ab bins of side 10
      (``models.lab.ab_bin_centres``), trained with the class-rebalanced multinomial cross entropy
      (eq. 2) against soft-encoded targets (5 nearest bins, sigma 5). The rebalancing weights
      (eq. 3-4, ``rebalance_mix`` = lambda = 0.5) come from the ab distribution of every pixel
      seen so far in training by every rank (the paper: of the ImageNet training set), kept in
      ``bin_counts``: float64, as float32 stops adding a batch's counts to totals past ~2^24 times
      larger, and summed over the ranks at every step, so that all ranks hold the same counts.
    - ``regression``: the ab values themselves with the L2 loss (eq. 1), the paper's baseline.

    ``pixel_mean``/``pixel_std`` are the normalisation of the views (``data.mean``/``data.std``),
    needed to recover RGB in [0, 1]; the config loader checks that they match.
    """

    num_views = 1

    def __init__(self, backbone: nn.Module, regression: bool = False, rebalance_mix: float = 0.5,
                 pixel_mean: tuple[float, ...] = (0.5, 0.5, 0.5), pixel_std: tuple[float, ...] = (0.5, 0.5, 0.5),
                 decoder_min_dim: int = 64):
        super().__init__()
        reduction = feature_map_reduction(backbone, "colorization")
        if reduction % OUTPUT_REDUCTION or not math.log2(reduction // OUTPUT_REDUCTION).is_integer():
            raise ValueError(f"colorization: the backbone's feature map is 1/{reduction} of the input; it must be "
                             f"a power-of-two multiple of {OUTPUT_REDUCTION} (e.g. a ResNet's 32)")
        self.backbone = backbone
        self.regression, self.rebalance_mix = regression, rebalance_mix
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32)[:, None, None])
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32)[:, None, None])
        self.register_buffer("ab_centres", ab_bin_centres())
        self.register_buffer("bin_counts", torch.zeros(len(self.ab_centres), dtype=torch.float64))
        outputs = 2 if regression else len(self.ab_centres)
        self.decoder = UpsamplingDecoder(backbone.num_features, outputs,
                                         int(math.log2(reduction // OUTPUT_REDUCTION)), decoder_min_dim)

    def lightness_and_ab(self, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised RGB views -> (the backbone's grey input (B, 3, H, W), ab (B, 2, H, W))."""
        lab = rgb_to_lab((views.float() * self.pixel_std + self.pixel_mean).clamp(0, 1))
        grey_rgb = lab_to_rgb(torch.cat([lab[:, :1], torch.zeros_like(lab[:, 1:])], dim=1)).clamp(0, 1)
        return (grey_rgb - self.pixel_mean) / self.pixel_std, lab[:, 1:]

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        images = single_view(views, "colorization")
        grey, ab = self.lightness_and_ab(images)
        prediction = self.decoder(self.backbone.forward_features(grey))
        ab = F.adaptive_avg_pool2d(ab, prediction.shape[-2:])
        if self.regression:
            return {"loss": 0.5 * ((prediction.float() - ab) ** 2).sum(dim=1).mean()}
        soft_targets = soft_encode_ab(ab, self.ab_centres)
        if self.training:
            self.bin_counts += all_reduce_sum(soft_targets.sum(dim=(0, 2, 3)).double())
        distribution = (self.bin_counts / self.bin_counts.sum()).float()
        weights = rebalancing_weights(distribution, self.ab_centres, self.rebalance_mix)
        pixel_weights = weights[soft_targets.argmax(dim=1)]
        return {"loss": rebalanced_soft_cross_entropy(prediction, soft_targets, pixel_weights)}

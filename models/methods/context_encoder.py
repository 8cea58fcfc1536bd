"""Context encoder: Pathak, Krähenbühl, Donahue, Darrell, Efros, "Context Encoders: Feature Learning
by Inpainting", CVPR 2016. https://arxiv.org/abs/1604.07379"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from ssl_foundry.models.backbones import feature_map_reduction
from ssl_foundry.models.heads import UpsamplingDecoder
from ssl_foundry.models.pretext import central_mask, random_block_mask, single_view
from ssl_foundry.models.registry import register_method

RGB = 3  # the loaders' views are RGB: the decoder reconstructs 3 channels


class ChannelwiseFC(nn.Module):
    """The paper's channel-wise fully connected layer: each channel's h*w positions are
    fully connected to themselves, no mixing across channels (then a 1x1 convolution mixes them)."""

    def __init__(self, channels: int, positions: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels, positions, positions) / math.sqrt(positions))
        self.bias = nn.Parameter(torch.zeros(channels, positions))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        y = torch.einsum("ncp,cqp->ncq", x.flatten(2), self.weight) + self.bias
        return y.reshape(n, c, h, w)


def patch_discriminator(in_chans: int, width: int = 64) -> nn.Sequential:
    """A small DCGAN-style critic for the optional adversarial loss."""
    return nn.Sequential(
        nn.Conv2d(in_chans, width, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(width, 2 * width, 4, 2, 1), nn.BatchNorm2d(2 * width), nn.LeakyReLU(0.2, inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 1),
    )


@register_method("context_encoder")
class ContextEncoder(nn.Module):
    """Inpainting: a region M of the image is removed (set to 0, the dataset mean in
    normalised pixels), the encoder (the backbone's feature map) and a channel-wise FC + up-
    convolutional decoder F reconstruct the image, and the loss is the L2 error on the removed
    region only (eq. 1, averaged over the removed pixels):

        L_rec = || M (x - F((1 - M) x)) ||^2

    ``mask``: "central" (the centre square, a quarter of the area) or "random_block" (4 possibly
    overlapping squares of side H/4). ``adversarial``: adds lambda_adv * L_adv (eq. 2, the
    paper's lambda_rec = 0.999, lambda_adv = 0.001) with a discriminator D that sees the real
    image or the image completed by F; D is trained on its own loss in the same backward pass,
    while the generator's term reaches F through D with D's weights held fixed. ``image_size``
    must be the views' crop size (the decoder's depth and the channel-wise FC depend on it).
    """

    num_views = 1

    def __init__(self, backbone: nn.Module, image_size: int = 32, mask: str = "central",
                 adversarial: bool = False, adversarial_weight: float = 0.001, decoder_min_dim: int = 32):
        super().__init__()
        if mask not in ("central", "random_block"):
            raise ValueError(f"context_encoder: model.method_args.mask must be central or random_block, got '{mask}'")
        reduction = feature_map_reduction(backbone, "context_encoder")
        if image_size % reduction or (image_size // reduction) & (image_size // reduction - 1):
            raise ValueError(f"context_encoder: model.method_args.image_size={image_size} must be a power-of-two "
                             f"multiple of the backbone's reduction ({reduction}), e.g. {reduction * 2}")
        self.backbone = backbone
        self.image_size, self.mask, self.adversarial = image_size, mask, adversarial
        self.adversarial_weight = adversarial_weight
        side = image_size // reduction
        self.bottleneck = ChannelwiseFC(backbone.num_features, side * side)
        self.mix_channels = nn.Conv2d(backbone.num_features, backbone.num_features, 1)
        self.decoder = UpsamplingDecoder(backbone.num_features, RGB, int(math.log2(reduction)), decoder_min_dim)
        self.discriminator = patch_discriminator(RGB) if adversarial else None

    def make_mask(self, images: torch.Tensor) -> torch.Tensor:
        if self.mask == "central":
            return central_mask(images.shape[0], self.image_size, device=images.device)
        return random_block_mask(images.shape[0], self.image_size, device=images.device)

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        images = single_view(views, "context_encoder")
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            raise ValueError(f"context_encoder: views are {tuple(images.shape[-2:])} px but "
                             f"model.method_args.image_size={self.image_size}; make them equal")
        mask = self.make_mask(images)
        features = self.backbone.forward_features(images * (1 - mask))
        reconstruction = self.decoder(F.relu(self.mix_channels(self.bottleneck(features))))
        squared_error = ((reconstruction.float() - images.float()) ** 2 * mask).sum()
        rec_loss = squared_error / (mask.sum() * images.shape[1]).clamp(min=1)
        out = {"rec_loss": rec_loss.detach()}
        if self.discriminator is None:
            return {"loss": rec_loss, **out}
        completed = images * (1 - mask) + reconstruction * mask
        frozen_d = {name: p.detach() for name, p in self.discriminator.named_parameters()}
        real = torch.ones(images.shape[0], 1, device=images.device)
        fake = torch.zeros_like(real)
        generator_loss = F.binary_cross_entropy_with_logits(
            functional_call(self.discriminator, frozen_d, (completed,), strict=False).float(), real)
        critic_loss = (F.binary_cross_entropy_with_logits(self.discriminator(images).float(), real)
                       + F.binary_cross_entropy_with_logits(self.discriminator(completed.detach()).float(), fake))
        loss = (1 - self.adversarial_weight) * rec_loss + self.adversarial_weight * generator_loss + critic_loss
        return {"loss": loss, "adversarial_loss": generator_loss.detach(), "critic_loss": critic_loss.detach(), **out}

"""Relative patch location: Doersch, Gupta, Efros, "Unsupervised Visual Representation Learning by
Context Prediction", ICCV 2015. https://arxiv.org/abs/1505.05192"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssl_foundry.models.heads import MLPHead
from ssl_foundry.models.pretext import (crop_tiles, drop_colour, grid_tile_offsets, grid_tile_size, project_colour,
                                        single_view)
from ssl_foundry.models.registry import register_method

GRID = 3
CENTRE = 4  # row-major index of the middle cell of the 3x3 grid
NEIGHBOURS = [k for k in range(GRID * GRID) if k != CENTRE]  # label l <-> cell NEIGHBOURS[l]


@register_method("relative_patch")
class RelativePatchLocation(nn.Module):
    """Context prediction: the image is split into a 3x3 grid of cells; the centre cell's
    patch and one of its 8 neighbours' (uniform) are cropped with a gap between them (patch side
    ``patch_ratio`` of the cell side: the paper's 96 px patches with 48 px gaps give 2/3) and a
    random jitter of up to ``max_jitter`` px (the paper: 7 px of 96). Both patches go through the
    shared encoder (the backbone, one call), their features are concatenated (centre first) and an
    MLP (fc6-fc8 of the paper's pair network, ``hidden_dim``) predicts which of the 8 positions
    the second patch came from.

    Against chromatic aberration, a shortcut to the patch's position in the image:
    ``colour``: "drop" keeps one random channel of each patch and replaces the other two with
    Gaussian noise; "project" removes the green-magenta component; "none" does neither.
    """

    num_views = 1

    def __init__(self, backbone: nn.Module, patch_ratio: float = 2 / 3, max_jitter: int = 1,
                 hidden_dim: int = 1024, colour: str = "drop"):
        super().__init__()
        if colour not in ("drop", "project", "none"):
            raise ValueError(f"relative_patch: model.method_args.colour must be drop, project or none, got '{colour}'")
        if not 0 < patch_ratio <= 1:
            raise ValueError(f"relative_patch: model.method_args.patch_ratio must be in (0, 1], got {patch_ratio}")
        self.backbone = backbone
        self.patch_ratio, self.max_jitter, self.colour = patch_ratio, max_jitter, colour
        self.classifier = MLPHead(2 * backbone.num_features, hidden_dim, len(NEIGHBOURS), 2)

    def sample_pairs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(centre patches, neighbour patches, labels 0..7) for a batch of images."""
        batch, image_size = images.shape[0], images.shape[-1]
        size = grid_tile_size(image_size, GRID, self.patch_ratio, "relative_patch", "patch_ratio")
        offsets = grid_tile_offsets(batch, image_size, GRID, size, self.max_jitter, device=images.device)
        label = torch.randint(len(NEIGHBOURS), (batch,), device=images.device)
        cell = torch.tensor(NEIGHBOURS, device=images.device)[label]
        rows = torch.arange(batch, device=images.device)
        pair_offsets = torch.stack([offsets[:, CENTRE], offsets[rows, cell]], dim=1)  # (B, 2, 2)
        pairs = crop_tiles(images, pair_offsets, size)
        return pairs[:, 0], pairs[:, 1], label

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        images = single_view(views, "relative_patch")
        centre, neighbour, label = self.sample_pairs(images)
        patches = torch.cat([centre, neighbour])
        if self.colour == "drop":
            patches = drop_colour(patches)
        elif self.colour == "project":
            patches = project_colour(patches)
        features = self.backbone(patches)
        logits = self.classifier(torch.cat(features.chunk(2), dim=1))
        accuracy = (logits.argmax(dim=1) == label).float().mean()
        return {"loss": F.cross_entropy(logits.float(), label), "position_accuracy": accuracy.detach()}

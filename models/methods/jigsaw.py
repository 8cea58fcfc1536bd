"""Jigsaw puzzles: Noroozi, Favaro, "Unsupervised Learning of Visual Representations by Solving
Jigsaw Puzzles", ECCV 2016. https://arxiv.org/abs/1603.09246"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssl_foundry.models.heads import MLPHead
from ssl_foundry.models.pretext import (crop_tiles, grid_tile_offsets, grid_tile_size, hamming_permutation_set,
                                        normalize_tiles, single_view)
from ssl_foundry.models.registry import register_method

GRID = 3


@register_method("jigsaw")
class Jigsaw(nn.Module):
    """The context-free network: the image is split into a 3x3 grid of cells and one tile
    of ``tile_ratio`` of the cell side (the paper: 64 of 75 px) is cropped at a random position in
    each cell, which leaves random gaps between tiles (no shortcut across tile edges);
    every tile is normalised on its own. The tiles are shuffled by a permutation drawn from a
    fixed set of ``num_permutations`` of maximal Hamming distance (Algorithm 1, ``permutation_seed``),
    each shuffled tile goes through the shared encoder (the backbone) and a shared fc6
    (``tile_dim``), the nine embeddings are concatenated in shuffled order, and an MLP (fc7,
    ``hidden_dim``; fc8) predicts the permutation's index: cross entropy over the set.
    """

    num_views = 1

    def __init__(self, backbone: nn.Module, num_permutations: int = 100, tile_ratio: float = 64 / 75,
                 tile_dim: int = 512, hidden_dim: int = 1024, permutation_seed: int = 0):
        super().__init__()
        if not 0 < tile_ratio <= 1:
            raise ValueError(f"jigsaw: model.method_args.tile_ratio must be in (0, 1], got {tile_ratio}")
        self.backbone = backbone
        self.tile_ratio = tile_ratio
        self.register_buffer("permutations", hamming_permutation_set(num_permutations, GRID * GRID, permutation_seed))
        self.tile_embed = nn.Sequential(nn.Linear(backbone.num_features, tile_dim), nn.ReLU(inplace=True))  # fc6
        self.classifier = MLPHead(GRID * GRID * tile_dim, hidden_dim, num_permutations, 2)  # fc7, fc8

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        images = single_view(views, "Jigsaw")
        batch, image_size = images.shape[0], images.shape[-1]
        size = grid_tile_size(image_size, GRID, self.tile_ratio, "jigsaw", "tile_ratio")
        offsets = grid_tile_offsets(batch, image_size, GRID, size, max_jitter=None, device=images.device)
        tiles = normalize_tiles(crop_tiles(images, offsets, size))  # (B, 9, C, t, t)
        target = torch.randint(len(self.permutations), (batch,), device=images.device)
        order = self.permutations[target]  # position k shows tile order[k]
        shuffled = tiles[torch.arange(batch, device=images.device)[:, None], order]
        embeddings = self.tile_embed(self.backbone(shuffled.flatten(0, 1)))  # one shared encoder call
        logits = self.classifier(embeddings.reshape(batch, -1))
        accuracy = (logits.argmax(dim=1) == target).float().mean()
        return {"loss": F.cross_entropy(logits.float(), target), "permutation_accuracy": accuracy.detach()}

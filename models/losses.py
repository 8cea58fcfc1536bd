"""Losses as plain functions of tensors, each written like its paper's equation."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from models.distributed import gather_with_grad, rank


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent, the normalised temperature-scaled cross entropy of SimCLR (Chen et al. 2020, eq. 1):

        l(i, j) = -log exp(sim(z_i, z_j)/t) / sum_{k != i} exp(sim(z_i, z_k)/t)

    averaged over all 2N anchors, where sim is cosine similarity and the 2N-2 negatives of an
    anchor are every other view in the *global* batch. ``z1[b]`` and ``z2[b]`` are the two views
    of local sample ``b``; under DDP they are gathered with gradients from every rank and the
    positive of local sample ``b`` on rank ``r`` sits at global index ``r * B + b``.
    """
    z1 = F.normalize(z1.float(), dim=1)
    z2 = F.normalize(z2.float(), dim=1)
    all_z1, all_z2 = gather_with_grad(z1), gather_with_grad(z2)
    local, total = z1.shape[0], all_z1.shape[0]
    anchors = torch.cat([z1, z2])  # (2B, D): this rank's anchors
    candidates = torch.cat([all_z1, all_z2])  # (2N, D): every view in the global batch
    logits = anchors @ candidates.T / temperature

    own = torch.arange(local, device=z1.device) + rank() * local
    self_index = torch.cat([own, own + total])  # an anchor is not its own negative
    positive_index = torch.cat([own + total, own])  # view 1 <-> view 2 of the same image
    self_mask = F.one_hot(self_index, 2 * total).bool()
    logits = logits.masked_fill(self_mask, float("-inf"))
    return F.cross_entropy(logits, positive_index)

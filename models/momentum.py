"""Momentum (EMA) target networks and their schedule, shared by MoCo v2, MoCo v3 and BYOL.

The target network xi follows the online network theta by an exponential moving average,

    xi <- m * xi + (1 - m) * theta                                  (MoCo eq. 2, BYOL sec. 3.1)

and is never trained by gradient: its parameters have ``requires_grad=False`` (so the trainer's
optimizer, built by timm's ``create_optimizer_v2`` from parameters that require gradients, never
sees them) and its forward runs under ``torch.no_grad()``. They are still parameters of the
method, so they are in its ``state_dict`` and in every checkpoint.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn


def cosine_momentum(step: int, total_steps: int, base: float) -> float:
    """BYOL's schedule (Grill et al. 2020, sec. 3.2), also MoCo v3's (Chen et al. 2021, sec. 4):

        m(k) = 1 - (1 - m_0) * (cos(pi * k / K) + 1) / 2

    ``m_0`` at step 0, ``(1 + m_0) / 2`` half way, 1 at the last step ``K``.
    """
    k = min(max(step, 0), total_steps)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * k / max(total_steps, 1)) + 1.0) / 2.0


class MomentumEncoder(nn.Module):
    """A frozen copy of ``online`` updated only by :meth:`update` (EMA of the online weights).

    Only parameters are averaged, as in the MoCo and BYOL reference code; buffers (BatchNorm
    running statistics) are the target's own: it runs in train mode, normalising with batch
    statistics like the online network.
    """

    def __init__(self, online: nn.Module):
        super().__init__()
        self.module = copy.deepcopy(online)
        self.module.requires_grad_(False)

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.module(*args, **kwargs)

    @torch.no_grad()
    def update(self, online: nn.Module, momentum: float) -> None:
        """xi <- m * xi + (1 - m) * theta, for every parameter pair (same module structure)."""
        target = list(self.module.parameters())
        source = [p.detach() for p in online.parameters()]
        if len(target) != len(source):
            raise ValueError(f"MomentumEncoder.update: online network has {len(source)} parameters, "
                             f"target has {len(target)}")
        # xi + (1 - m) * (theta - xi) == m * xi + (1 - m) * theta
        torch._foreach_lerp_(target, source, 1.0 - momentum)

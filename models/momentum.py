"""Momentum (EMA) target networks and their schedule, shared by MoCo v2, MoCo v3 and BYOL.

The target network xi follows the online network theta by an exponential moving average,

    xi <- m * xi + (1 - m) * theta                                  (MoCo eq. 2, BYOL sec. 3.1)

and is never trained by gradient: its parameters have ``requires_grad=False`` (so the trainer's
optimizer, built by timm's ``create_optimizer_v2`` from parameters that require gradients, never
sees them) and its forward runs under ``torch.no_grad()``. They are still parameters of the
method, so they are in its ``state_dict`` and in every checkpoint.

Under DeepSpeed ZeRO-3 both networks are partitioned over the ranks like any other parameters;
the update gathers each (target, online) pair whole, averages it on rank 0 and re-partitions it
(one pair at a time, as DeepSpeed-Chat's EMA does, so no rank ever holds a second full model).
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
from timm.layers import DropPath

from ssl_foundry.models.distributed import is_zero3_partitioned, zero3_gathered


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
        source = list(online.parameters())  # the parameters themselves: ZeRO-3 gathers by identity
        if len(target) != len(source):
            raise ValueError(f"MomentumEncoder.update: online network has {len(source)} parameters, "
                             f"target has {len(target)}")
        if any(is_zero3_partitioned(p) for p in target):
            for xi, theta in zip(target, source):
                with zero3_gathered([theta]), zero3_gathered([xi], modifier_rank=0):
                    xi.lerp_(theta, 1.0 - momentum)
            return
        # xi + (1 - m) * (theta - xi) == m * xi + (1 - m) * theta
        torch._foreach_lerp_(target, source, 1.0 - momentum)


def without_stochastic_depth(module: nn.Module) -> nn.Module:
    """``module`` with drop path (timm's DropPath) and dropout turned off, in place: DINO, iBOT and
    DINOv2 build their teacher without them while the student trains with them. The parameters
    are untouched, so an EMA teacher still pairs them one to one with the student's."""
    for m in module.modules():
        if isinstance(m, DropPath):
            m.drop_prob = 0.0
        elif isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = 0.0
    return module

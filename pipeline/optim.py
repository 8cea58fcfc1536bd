"""The optimizer of a run, from ``train.*``: LARS, AdamW or SGD through timm, or DeepSpeed's CPU
Adam when ZeRO-Offload steps the optimizer in CPU memory."""
from __future__ import annotations

import math
from typing import Any

import torch
from timm.optim import create_optimizer_v2

from launch.config import Config


def base_lr(cfg: Config) -> float:
    """Linear lr scaling: train.lr x batch / train.lr_batch_ref."""
    return cfg.train.lr * cfg.train.batch_size / cfg.train.lr_batch_ref


def build_optimizer(cfg: Config, model: torch.nn.Module, cpu_offload: bool = False) -> torch.optim.Optimizer:
    """No weight decay nor LARS adaptation on biases and norm parameters (timm's
    ``filter_bias_and_bn``), as in SimCLR/BYOL.

    ``cpu_offload``: DeepSpeed's vectorised CPU Adam in AdamW mode over the same parameter
    groups (ZeRO-Offload requires it: a torch optimizer would step the CPU copy element by element).
    """
    t = cfg.train
    kwargs: dict[str, Any] = ({"momentum": t.momentum} if t.optimizer in ("lars", "sgd")
                              else {"betas": tuple(t.adam_betas)})
    optimizer = create_optimizer_v2(model, opt=t.optimizer, lr=base_lr(cfg), weight_decay=t.weight_decay, **kwargs)
    if not cpu_offload:
        return optimizer
    if t.optimizer != "adamw":
        raise ValueError(f"optimizer offload runs DeepSpeed's CPU Adam: set train.optimizer=adamw (got {t.optimizer})")
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]
    return DeepSpeedCPUAdam(groups, lr=base_lr(cfg), betas=tuple(t.adam_betas), weight_decay=t.weight_decay,
                            adamw_mode=True)


def cosine_weight_decay(step: int, total_steps: int, start: float, end: float) -> float:
    """DINO's weight-decay schedule (``utils.cosine_scheduler``, no warmup): ``start`` at step 0,
    cosine to ``end`` at step ``total_steps``,

        wd(k) = end + (start - end) (1 + cos(pi k / K)) / 2
    """
    k = min(max(step, 0), total_steps)
    return end + (start - end) * (1 + math.cos(math.pi * k / max(total_steps, 1))) / 2


class WeightDecaySchedule:
    """``train.weight_decay`` -> ``train.weight_decay_end`` by :func:`cosine_weight_decay`, on every
    param group as a factor of its initial weight decay (groups without decay, timm's biases and
    norms, stay at 0). A pure function of the step, like the lr: resuming changes nothing."""

    def __init__(self, optimizer: torch.optim.Optimizer, start: float, end: float, total_steps: int):
        self.optimizer, self.start, self.end, self.total_steps = optimizer, start, end, total_steps
        for group in optimizer.param_groups:
            group.setdefault("initial_weight_decay", group["weight_decay"])

    def step_update(self, step: int) -> None:
        factor = cosine_weight_decay(step, self.total_steps, self.start, self.end) / self.start
        for group in self.optimizer.param_groups:
            group["weight_decay"] = group["initial_weight_decay"] * factor

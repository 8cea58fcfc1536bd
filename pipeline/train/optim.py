"""The optimizer of a run, from ``train.*``: LARS, AdamW or SGD through timm, or DeepSpeed's CPU
Adam when ZeRO-Offload steps the optimizer in CPU memory."""
from __future__ import annotations

from typing import Any

import torch
from timm.optim import create_optimizer_v2

from ssl_foundry.pipeline.config import Config


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
    from deepspeed.ops.adam import DeepSpeedCPUAdam  # optional: ZeRO-Offload only

    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]
    return DeepSpeedCPUAdam(groups, lr=base_lr(cfg), betas=tuple(t.adam_betas), weight_decay=t.weight_decay,
                            adamw_mode=True)

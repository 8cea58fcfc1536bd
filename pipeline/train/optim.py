"""The optimizer of a run, from ``train.*``: LARS, AdamW or SGD through timm, or DeepSpeed's CPU
Adam when ZeRO-Offload steps the optimizer in CPU memory."""
from __future__ import annotations

import math
from typing import Any

import torch
from timm.optim import create_optimizer_v2

from ssl_foundry.models.method import Method
from ssl_foundry.pipeline.config import Config


def base_lr(cfg: Config) -> float:
    """Linear lr scaling: train.lr x batch / train.lr_batch_ref."""
    return cfg.train.lr * cfg.train.batch_size / cfg.train.lr_batch_ref


def is_bias_or_norm(name: str, param: torch.Tensor) -> bool:
    """timm's ``filter_bias_and_bn`` rule (biases and norm layers' parameters are the 1-d ones)."""
    return param.ndim <= 1 or name.endswith(".bias")


def param_groups(cfg: Config, model: Method) -> list[dict[str, Any]]:
    """The trained parameters in groups: biases and norm parameters first, then the weights (timm's
    order, which checkpoints of earlier runs rely on), then the same for the parameters of the
    method's ``fixed_lr_modules`` (SimSiam's predictor), whose group is marked ``fixed_lr``.

    Biases and norm parameters get no weight decay (so no LARS adaptation either, as in SimCLR/BYOL)
    unless ``train.decay_bias_and_norm``, and the lr multiplier ``train.bias_and_norm_lr_scale`` as
    ``lr_scale``, which timm's schedulers apply (Barlow Twins' separate lr for them).
    """
    t = cfg.train
    fixed = tuple(f"{module}." for module in model.fixed_lr_modules)
    groups: dict[tuple[bool, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        fixed_lr, bias_or_norm = name.startswith(fixed), is_bias_or_norm(name, param)
        key = (fixed_lr, not bias_or_norm)  # sorted: biases and norms, then weights; fixed-lr ones last
        if key not in groups:
            decays = t.decay_bias_and_norm or not bias_or_norm
            groups[key] = {"params": [], "weight_decay": t.weight_decay if decays else 0.0}
            if bias_or_norm and t.bias_and_norm_lr_scale != 1.0:
                groups[key]["lr_scale"] = t.bias_and_norm_lr_scale
            if fixed_lr:
                groups[key]["fixed_lr"] = True
        groups[key]["params"].append(param)
    return [groups[key] for key in sorted(groups)]


def build_optimizer(cfg: Config, model: Method, cpu_offload: bool = False) -> torch.optim.Optimizer:
    """timm's optimizer ``train.optimizer`` over :func:`param_groups`; SGD with ``train.momentum``
    and ``train.nesterov`` (timm's ``sgd`` alone would be Nesterov), LARS with plain momentum.

    ``cpu_offload``: DeepSpeed's vectorised CPU Adam in AdamW mode over the same parameter
    groups (ZeRO-Offload requires it: a torch optimizer would step the CPU copy element by element).
    """
    t = cfg.train
    groups = param_groups(cfg, model)
    if cpu_offload:
        if t.optimizer != "adamw":
            raise ValueError(f"optimizer offload runs DeepSpeed's CPU Adam: set train.optimizer=adamw "
                             f"(got {t.optimizer})")
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # optional: offload runs under train.strategy=deepspeed only

        return DeepSpeedCPUAdam(groups, lr=base_lr(cfg), betas=tuple(t.adam_betas), weight_decay=t.weight_decay,
                                adamw_mode=True)
    kwargs: dict[str, Any] = {"adamw": {"betas": tuple(t.adam_betas)}, "lars": {"momentum": t.momentum},
                              "sgd": {"momentum": t.momentum, "nesterov": t.nesterov}}[t.optimizer]
    return create_optimizer_v2(groups, opt=t.optimizer, lr=base_lr(cfg), weight_decay=t.weight_decay, **kwargs)


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

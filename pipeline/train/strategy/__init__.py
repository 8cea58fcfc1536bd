"""Training strategies: how the ranks share the model, its gradients and its optimizer state,
and how that state is checkpointed.

- ``ddp`` (pipeline/train/strategy/ddp.py): every rank holds the whole model and optimizer; gradients
  are all-reduced (torch DDP). One checkpoint file.
- ``deepspeed`` (pipeline/train/strategy/deepspeed.py): DeepSpeed ZeRO stage 1/2/3 partitions optimizer
  states, gradients and parameters over the ranks, optionally offloaded to CPU memory. One
  checkpoint directory of per-rank shards.

The trainer drives either through the same five calls (``forward_backward``, ``step``, ``save``,
``load``, ``consolidated_backbone``); the method modules do not know which one runs them.
"""
from __future__ import annotations

import torch

from ssl_foundry.pipeline.config import Config
from ssl_foundry.pipeline.train.runtime import Runtime
from ssl_foundry.pipeline.train.strategy.ddp import DDPStrategy
from ssl_foundry.pipeline.train.strategy.deepspeed import DeepSpeedStrategy


def create_strategy(cfg: Config, model: torch.nn.Module, rt: Runtime) -> DDPStrategy | DeepSpeedStrategy:
    """The strategy named by ``train.strategy`` around ``model`` (already on ``rt.device``). It
    builds the optimizer: ``strategy.optimizer``, whose param groups carry the lr the trainer's
    schedule sets."""
    if cfg.train.strategy == "deepspeed":
        return DeepSpeedStrategy(cfg, model, rt)
    return DDPStrategy(cfg, model, rt)

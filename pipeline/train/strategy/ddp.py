"""Data parallelism with torch DDP: each rank holds the whole model and optimizer state,
gradients are all-reduced (averaged) in buckets during backward.

Gradient accumulation skips the all-reduce on all but the last micro-batch (``no_sync``); bf16
autocast where ``train.precision`` asks for it, fp32 weights, gradients and optimizer state.
"""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from ssl_foundry.models.registry import exported_backbone_name
from ssl_foundry.pipeline.config import Config
from ssl_foundry.pipeline.train.checkpoint import load_checkpoint, save_checkpoint, world_size_mismatch
from ssl_foundry.pipeline.train.optim import build_optimizer
from ssl_foundry.pipeline.train.runtime import Runtime, autocast, autocast_dtype


class DDPStrategy:
    name = "ddp"

    def __init__(self, cfg: Config, model: torch.nn.Module, rt: Runtime):
        self.cfg, self.model, self.rt = cfg, model, rt
        self.optimizer = build_optimizer(cfg, model)
        self.amp_dtype = autocast_dtype(cfg.train, rt.device)
        self.ddp = (DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
                    if rt.world_size > 1 else None)

    def forward_backward(self, views: list[torch.Tensor], sync: bool, labels: torch.Tensor | None = None
                         ) -> torch.Tensor:
        """One micro-batch: the method's loss (returned detached), its gradient accumulated into
        ``.grad`` scaled by 1 / grad_accum_steps; ranks all-reduce only when ``sync``. ``labels``
        go to methods that take them (``uses_labels``)."""
        module = self.ddp or self.model
        no_sync = module.no_sync() if self.ddp is not None and not sync else nullcontext()
        with no_sync:
            with autocast(self.rt.device, self.amp_dtype):
                loss = (module(views) if labels is None else module(views, labels))["loss"]
            (loss / self.cfg.train.grad_accum_steps).backward()
        return loss.detach()

    def step(self) -> float:
        """Clip (``train.grad_clip``; 0: off), optimizer step, zero grads. Returns the gradient
        norm before clipping."""
        clip = self.cfg.train.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    def save(self, folder: Path, step: int, trainer_state: dict[str, Any]) -> Path | None:
        """Rank 0 writes one file with the model, the optimizer and ``trainer_state``."""
        if not self.rt.is_main:
            return None
        state = {**trainer_state, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
        return save_checkpoint(state, folder, step, keep=self.cfg.train.keep_checkpoints)

    def load(self, path: Path) -> dict[str, Any]:
        """Restore model and optimizer from ``path``; returns the whole saved state."""
        state = load_checkpoint(path)
        if state["world_size"] != self.rt.world_size:
            raise world_size_mismatch(path, state["world_size"], self.rt.world_size)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        return state

    def consolidated_backbone(self, checkpoint: Path | None) -> torch.nn.Module:
        """The trained backbone (the method's ``exported_backbone``), whole, on this rank (every rank
        holds it under DDP)."""
        return self.model.get_submodule(exported_backbone_name(self.model))

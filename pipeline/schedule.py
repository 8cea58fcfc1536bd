"""The learning-rate schedule: linear warmup, then a cosine to ``train.min_lr`` at the run's last
step, as a pure function of the step and a ``CosinePlan``.

A time budget (``pipeline.budget``) changes the run's length while it trains. ``refit`` moves the
end of the plan without a jump in the lr: the cosine keeps the progress it has reached and spreads
the rest of the way (to ``min_lr``) over the new remaining steps. Without re-fits the schedule is
the usual one: progress ``(step - warmup) / (total - warmup)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CosinePlan:
    """Where the schedule ends (``total_steps``: the run's length), and the point its cosine was
    last re-fitted at: at ``anchor_step`` it had reached ``anchor_progress`` (0: base lr, 1: min_lr)."""

    total_steps: int
    anchor_step: int
    anchor_progress: float = 0.0


def initial_plan(total_steps: int, warmup_steps: int) -> CosinePlan:
    """The plain schedule: the cosine runs from the end of warmup to ``total_steps``."""
    return CosinePlan(total_steps, warmup_steps, 0.0)


def cosine_progress(plan: CosinePlan, step: int) -> float:
    """The cosine's progress at ``step``: linear from the anchor to 1 at ``total_steps``."""
    if step <= plan.anchor_step:
        return plan.anchor_progress
    span = max(1, plan.total_steps - plan.anchor_step)
    return min(1.0, plan.anchor_progress + (1.0 - plan.anchor_progress) * (step - plan.anchor_step) / span)


def refit(plan: CosinePlan, step: int, total_steps: int) -> CosinePlan:
    """The plan ending at ``total_steps`` instead, with the same lr at ``step``: during warmup only
    the end moves; after it, the cosine is re-anchored at ``step`` with the progress it has there."""
    if step <= plan.anchor_step:
        return CosinePlan(total_steps, plan.anchor_step, plan.anchor_progress)
    return CosinePlan(total_steps, step, cosine_progress(plan, step))


def lr_at(step: int, plan: CosinePlan, base_lr: float, min_lr: float, warmup_steps: int,
          warmup_start_factor: float = 1e-3) -> float:
    """The lr of ``step`` (0-based): linear warmup from ``base_lr * warmup_start_factor`` over
    ``warmup_steps``, then ``min_lr + (base_lr - min_lr) (1 + cos(pi p)) / 2`` at progress p."""
    if step < warmup_steps:
        start = base_lr * warmup_start_factor
        return start + step * (base_lr - start) / warmup_steps
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * cosine_progress(plan, step)))


class WarmupCosine:
    """Sets every parameter group's lr from ``lr_at`` (its base lr: the group's ``initial_lr``)."""

    def __init__(self, optimizer: torch.optim.Optimizer, plan: CosinePlan, min_lr: float, warmup_steps: int):
        self.optimizer, self.plan, self.min_lr, self.warmup_steps = optimizer, plan, min_lr, warmup_steps

    def step_update(self, step: int) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step, self.plan, group["initial_lr"], self.min_lr, self.warmup_steps)

    def refit(self, step: int, total_steps: int) -> None:
        self.plan = refit(self.plan, step, total_steps)

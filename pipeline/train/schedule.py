"""Where each step of a run whose length changes while it trains falls on its step schedules.

The schedules (timm's warmup + cosine for the lr, DINO's cosine for the weight decay) are built
once, for the run's planned length. A time budget (``pipeline.train.budget``) re-fits that length
as the run trains; a ``CosinePlan`` maps each step to its position on the built schedule, and
``refit`` moves the end without a jump: the cosine keeps the progress it has reached and spreads
the rest of the way (to its end value) over the new remaining steps. Without re-fits a step's
position is the step itself: progress ``(step - warmup) / (total - warmup)``.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CosinePlan:
    """Where the schedule ends (``total_steps``: the run's length), and the point its cosine was
    last re-fitted at: at ``anchor_step`` it had reached ``anchor_progress`` (0: its start value,
    1: its end value)."""

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
    """The plan ending at ``total_steps`` instead, with the same value at ``step``: during warmup
    only the end moves; after it, the cosine is re-anchored at ``step`` with the progress it has there."""
    if step <= plan.anchor_step:
        return CosinePlan(total_steps, plan.anchor_step, plan.anchor_progress)
    return CosinePlan(total_steps, step, cosine_progress(plan, step))


def schedule_position(plan: CosinePlan, step: int, warmup_steps: int, cosine_steps: int) -> float:
    """Where ``step`` falls on a schedule built as ``warmup_steps`` of warmup, then a cosine over
    ``cosine_steps``: the step itself during warmup, then the end of warmup plus the plan's
    progress of the cosine (fractional: timm's schedulers and ``cosine_weight_decay`` take it)."""
    if step < warmup_steps:
        return step
    return warmup_steps + cosine_progress(plan, step) * cosine_steps

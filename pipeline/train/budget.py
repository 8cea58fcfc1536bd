"""Time budgets (``train.budget_minutes``): a run that keeps measuring how fast it goes and re-fits
the rest of its schedule to the time left, so that it ends on time when the load on the machine
changes under it.

Three pieces:

- the schedule (``pipeline.train.schedule``): re-fitting it to a new length keeps the lr
  continuous and still ends the cosine at ``min_lr`` at the new last step.
- ``steps_within_budget``: how many steps fit into the time that is left.
- ``BudgetClock``: what rank 0 measures to feed it: the budget time used (carried over a resume),
  recent step times (median: robust to one slow step), the cost of a checkpoint (amortised over
  the steps between two), and, when the budget covers the whole run (``train.budget_covers=run``),
  the end-of-run work: final checkpoint, export and registration, and the kNN feature extraction
  over ``data.eval_train`` + ``data.eval_test`` from a feature-extraction rate measured before
  training, scaled by how much slower the steps have become since (the load on the machine).
"""
from __future__ import annotations

import statistics
import time
from collections import deque
from typing import Callable

import psutil

# Steps left out of the step-time estimate after a (re)start: loader workers still catching up and
# the allocator warming up (in the demo these ran ~30% slower than the steady state) ...
SKIP_STEPS = 5
# ... then steps measured before the first fit, and the window of recent steps whose median is
# the step time of every later re-fit (short enough to follow a change of load within seconds).
PROBE_STEPS, WINDOW_STEPS = 10, 20
# End-of-run work besides the feature extraction, in writes of a checkpoint's size (the final
# checkpoint, its copy into MLflow's artifact store, the exported weights: a third of it, but
# safetensors and its hash) plus a fixed part (MLflow registration round trips, the kNN vote).
END_OF_RUN_CHECKPOINTS, END_OF_RUN_FIXED_S = 3, 0.5


def steps_within_budget(available_s: float, step: int, step_s: float, max_steps: int) -> int:
    """Total steps of a run that has done ``step`` steps and has ``available_s`` seconds left for
    more at ``step_s`` each (rounded to the nearest step: the run ends within half a step of its
    budget), at most ``max_steps``; ``step`` when no time is left."""
    remaining = round(max(0.0, available_s) / max(step_s, 1e-9))
    return max(step, min(max_steps, step + remaining))


def extraction_estimate_s(loaders: int, startup_s: float, images: int, image_s: float) -> float:
    """Feature-extraction time of ``images`` images read by ``loaders`` loaders (each starts its
    workers once), from a probe's start-up time and steady seconds per image."""
    return loaders * startup_s + images * image_s


def end_of_run_s(extraction_s: float, load_factor: float, checkpoint_s: float) -> float:
    """Estimated end-of-run work: the feature extraction (measured before training) scaled by the
    load factor (step time now / step time then), the writes (in checkpoints) and the fixed rest."""
    return extraction_s * load_factor + END_OF_RUN_CHECKPOINTS * checkpoint_s + END_OF_RUN_FIXED_S


class BudgetClock:
    """Rank 0's measurements for a time budget of ``budget_s`` seconds.

    ``covers="training"``: the clock runs from the start of the training loop. ``"run"``: from the
    start of this process, and the end-of-run work (``end_of_run_s``; ``extraction_s``: the kNN's
    feature extraction, measured before training) is reserved out of the budget.
    ``used_before_s``: what earlier processes of this run used (restored from a checkpoint).
    ``clock``: seconds; every time here is read from it (the process's start too, as its age),
    so a test can drive the budget with a clock of its own."""

    def __init__(self, budget_s: float, covers: str, used_before_s: float = 0.0,
                 clock: Callable[[], float] = time.monotonic):
        self.budget_s, self.covers, self.used_before_s, self.clock = budget_s, covers, used_before_s, clock
        process_age_s = time.time() - psutil.Process().create_time()
        self.origin = clock() - (process_age_s if covers == "run" else 0.0)
        self.lap_start = self.origin  # where the step being timed started
        self.steps: deque[float] = deque(maxlen=WINDOW_STEPS)
        self.seen = 0  # steps recorded by this process
        self.checkpoint_s, self.checkpoint_every = 0.0, 0  # the last checkpoint's cost, and how often
        self.extraction_s = 0.0
        self.reference_step_s: float | None = None  # step time at the first fit: the load factor's 1

    def start_training(self) -> None:
        """The training loop starts now (the origin of a ``training`` budget; its first step)."""
        self.lap_start = self.clock()
        if self.covers == "training":
            self.origin = self.lap_start

    def used_s(self) -> float:
        return self.used_before_s + self.clock() - self.origin

    def record_step(self) -> None:
        """A step ended now. Its time runs from the end of the one before: logging and checkpoints
        included (a checkpoint makes one step slow, which the median ignores; its cost is amortised
        over checkpoint_every steps instead, see ``record_checkpoint``)."""
        now = self.clock()
        self.seen += 1
        if self.seen > SKIP_STEPS:
            self.steps.append(now - self.lap_start)
        self.lap_start = now

    def record_checkpoint(self, seconds: float, every: int) -> None:
        self.checkpoint_s, self.checkpoint_every = seconds, every

    def ready(self) -> bool:
        """Enough steady steps measured (after a start or a resume) to fit the schedule; the same
        on every rank (each records every step)."""
        return self.seen >= SKIP_STEPS + PROBE_STEPS

    def step_s(self) -> float:
        """Seconds per step from now on: the median recent step, plus checkpoints amortised."""
        amortised = self.checkpoint_s / self.checkpoint_every if self.checkpoint_every else 0.0
        return statistics.median(self.steps) + amortised

    def end_s(self) -> float:
        """Time to reserve after the last step (0 for a ``training`` budget)."""
        if self.covers != "run":
            return 0.0
        load = statistics.median(self.steps) / self.reference_step_s if self.reference_step_s else 1.0
        return end_of_run_s(self.extraction_s, load, self.checkpoint_s)

    def total_steps(self, step: int, max_steps: int) -> int:
        """The run's length that ends it on time, as measured now (``step`` steps done)."""
        if self.reference_step_s is None:
            self.reference_step_s = statistics.median(self.steps)
        available = self.budget_s - self.used_s() - self.end_s()
        return steps_within_budget(available, step, self.step_s(), max_steps)

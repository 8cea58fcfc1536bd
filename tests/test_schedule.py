"""The lr schedule (linear warmup, cosine to min_lr at the last step) and time budgets that re-fit it."""
import math

import pytest
import torch

from ssl_foundry.pipeline.config import ConfigError, load_config
from ssl_foundry.pipeline.train.budget import (END_OF_RUN_CHECKPOINTS, END_OF_RUN_FIXED_S, PROBE_STEPS, SKIP_STEPS,
                                               BudgetClock, end_of_run_s, extraction_estimate_s, steps_within_budget)
from ssl_foundry.pipeline.train.schedule import CosinePlan, cosine_progress, initial_plan, refit
from ssl_foundry.pipeline.train.trainer import build_scheduler, scheduled_lr

RECIPE = "configs/simclr_resnet18_fmnist.yaml"


def scheduler_for(total: int, recipe: str = RECIPE, **train):
    """The trainer's scheduler of a ``total``-step run of ``recipe`` (with ``train.*`` overrides),
    over one parameter, and its optimizer."""
    cfg = load_config(recipe, [f"train.{k}={v}" for k, v in train.items()], check_paths=False)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0, weight_decay=cfg.train.weight_decay)
    return build_scheduler(cfg, optimizer, total), optimizer


def lrs(total: int, count: int | None = None, refits: dict[int, int] | None = None, **train) -> list[float]:
    """The lr of the first ``count`` (default: all) steps of a ``total``-step schedule, re-fitted
    at step k to end at ``refits[k]`` instead."""
    scheduler, optimizer = scheduler_for(total, **train)
    out = []
    for step in range(total if count is None else count):
        if step in (refits or {}):
            scheduler.refit(step, refits[step])
        scheduler.step_update(step)
        out.append(optimizer.param_groups[0]["lr"])
    return out


def test_warmup_then_cosine_reaches_min_lr_at_the_last_step():
    total, warmup, lr, min_lr = 50, 10, 0.3, 0.01
    got = lrs(total, warmup_steps=warmup, lr=lr, min_lr=min_lr, batch_size=256)
    # warmup: linear from lr/1000 towards lr
    assert got[0] == pytest.approx(lr * 1e-3)
    assert all(a < b for a, b in zip(got[:warmup], got[1:warmup]))
    # cosine over the remaining total - warmup steps: lr at its first step, min_lr one step past the last
    for step in range(warmup, total):
        progress = (step - warmup) / (total - warmup)
        expected = min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
        assert got[step] == pytest.approx(expected, rel=1e-6), step
    assert got[-1] == pytest.approx(min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * (total - warmup - 1) / (total - warmup))))


def test_lr_scales_linearly_with_the_global_batch():
    assert lrs(20, warmup_steps=0, lr=0.3, batch_size=512)[0] == pytest.approx(0.6)
    assert lrs(20, warmup_steps=0, lr=0.3, batch_size=128)[0] == pytest.approx(0.15)


def test_a_shorter_horizon_only_changes_the_cosine():
    long, short = lrs(100, warmup_steps=10), lrs(40, warmup_steps=10)
    assert long[:11] == pytest.approx(short[:11])  # warmup identical
    assert short[39] < long[39]  # the short run decays sooner


def test_refit_keeps_the_lr_continuous_and_ends_the_cosine_at_the_new_last_step():
    """Hand-worked: lr 1, min_lr 0, warmup 10, 110 steps, so progress 0.5 at step 60 (lr 0.5);
    re-fitted there to 70 steps, the remaining half of the cosine runs over 10 steps instead of 50."""
    scheduler, optimizer = scheduler_for(110, warmup_steps=10, lr=1.0, batch_size=256, lr_batch_ref=256, min_lr=0.0)

    def lr_at(step: int) -> float:
        scheduler.step_update(step)
        return optimizer.param_groups[0]["lr"]

    assert lr_at(60) == pytest.approx(0.5)
    scheduler.refit(60, 70)
    assert scheduler.lr_plan == CosinePlan(total_steps=70, anchor_step=60, anchor_progress=0.5)
    assert lr_at(60) == pytest.approx(0.5)  # no jump at the re-fit
    assert lr_at(65) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.75)))
    assert lr_at(70) == pytest.approx(0.0, abs=1e-12)  # min_lr at the new end
    # Re-fitting twice is re-fitting from wherever the lr has got to: longer again, still continuous.
    before = lr_at(65)
    scheduler.refit(65, 165)
    assert lr_at(65) == pytest.approx(before)
    assert cosine_progress(scheduler.lr_plan, 115) == pytest.approx(0.75 + 0.25 * 50 / 100)
    assert lr_at(115) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.875)))
    assert lr_at(165) == pytest.approx(0.0, abs=1e-12)


def test_refit_during_warmup_only_moves_the_end():
    assert refit(initial_plan(1000, 50), 20, 300) == initial_plan(300, 50)
    assert lrs(300, warmup_steps=50) == pytest.approx(lrs(1000, count=300, refits={20: 300}, warmup_steps=50))


def test_refit_moves_the_weight_decay_and_keeps_each_groups_lr_rule():
    """The re-fitted horizon is every schedule's: DINO's weight-decay cosine (hand-worked: 0.04 ->
    0.4 over 100 steps is 0.22 at step 50; re-fitted there to end at 60, it is at 3/4 of its way at
    55 and 0.4 at 60), and Barlow Twins' biases keep their lr multiple."""
    scheduler, optimizer = scheduler_for(100, "configs/dino_vit_tiny_fmnist.yaml", warmup_steps=10,
                                         weight_decay=0.04, weight_decay_end=0.4)
    group = optimizer.param_groups[0]

    def decay_at(step: int) -> float:
        scheduler.step_update(step)
        return group["weight_decay"]

    assert decay_at(50) == pytest.approx(0.22)
    scheduler.refit(50, 60)
    assert decay_at(50) == pytest.approx(0.22)  # no jump
    assert decay_at(55) == pytest.approx(0.4 + (0.04 - 0.4) * (1 + math.cos(math.pi * 0.75)) / 2)
    assert decay_at(60) == pytest.approx(0.4)

    from ssl_foundry.pipeline.train.optim import build_optimizer

    from ssl_foundry.pipeline.train.trainer import build_model

    cfg = load_config("configs/barlow_twins_resnet50_imagenet.yaml", ["model.backbone=resnet18"], check_paths=False)
    optimizer = build_optimizer(cfg, build_model(cfg))
    scheduler = build_scheduler(cfg, optimizer, cfg.train.max_steps)
    biases, weights = optimizer.param_groups
    assert cfg.train.warmup_steps < 7000 < cfg.train.max_steps
    scheduler.refit(7000, 8000)
    for step in (7000, 7500, 7999):
        scheduler.step_update(step)
        assert biases["lr"] == pytest.approx(biases["lr_scale"] * weights["lr"], rel=1e-12)
        assert scheduled_lr(optimizer) == weights["lr"]


@pytest.mark.parametrize("available,step,step_s,max_steps,expected", [
    (540, 7, 2.0, 10_000, 7 + 270),  # 540 s left at 2 s/step
    (541.2, 7, 2.0, 10_000, 7 + 271),  # rounded to the nearest step: within half a step of the budget
    (540, 7, 2.0, 100, 100),  # capped by max_steps
    (-100, 7, 2.0, 10_000, 7),  # over budget already: stop now
    (60, 0, 0.0, 50, 50),  # a zero step time cannot divide by zero
])
def test_steps_within_budget(available, step, step_s, max_steps, expected):
    assert steps_within_budget(available, step, step_s, max_steps) == expected


def test_end_of_run_estimate():
    # Two loaders (memory bank, queries) start once each; 70,000 images at 1 ms: 2 x 1.5 + 70 s.
    assert extraction_estimate_s(2, 1.5, 70_000, 1e-3) == pytest.approx(73.0)
    # Steps now 1.5x slower than when the extraction was probed: it will be too.
    assert end_of_run_s(73.0, 1.5, checkpoint_s=2.0) == pytest.approx(
        73.0 * 1.5 + END_OF_RUN_CHECKPOINTS * 2.0 + END_OF_RUN_FIXED_S)


class SteppedClock:
    """A clock that moves only when told to: the step times of a budgeted run, chosen by the test
    (the budget's decisions then depend on them, not on the load on the machine running the test)."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_budget_clock_fits_the_time_left_from_the_median_recent_step():
    clock = SteppedClock()
    budget = BudgetClock(budget_s=180.0, covers="training", used_before_s=40.5, clock=clock)  # resumed: 40.5 s used
    budget.start_training()
    for seconds in [9.0] * SKIP_STEPS + [0.5] * (PROBE_STEPS - 1):  # start-up steps are left out
        clock.now += seconds
        budget.record_step()
    assert not budget.ready()
    clock.now += 30.0
    budget.record_step()  # one stalled step does not move the median
    assert budget.ready() and budget.step_s() == 0.5
    budget.record_checkpoint(5.0, every=10)  # amortised: 0.5 s per step
    assert budget.step_s() == 1.0
    assert budget.used_s() == 40.5 + 9 * SKIP_STEPS + 0.5 * (PROBE_STEPS - 1) + 30 == 120
    assert budget.total_steps(15, 10_000) == 15 + 60  # 60 s left at 1 s/step
    assert budget.end_s() == 0.0  # a training budget keeps nothing for after the loop


def test_negative_budget_is_a_config_error():
    with pytest.raises(ConfigError, match="train.budget_minutes must be >= 0"):
        load_config(RECIPE, ["train.budget_minutes=-1"], check_paths=False)
    with pytest.raises(ConfigError, match="train.budget_covers: 'all' is not one of training, run"):
        load_config(RECIPE, ["train.budget_covers=all"], check_paths=False)


def stepped(step_s):
    """A Trainer setup: the budget reads a ``SteppedClock`` that each step moves by
    ``step_s(used_s)`` seconds (used_s: the budget time used when the step ends)."""
    def setup(trainer):
        clock = SteppedClock()
        trainer.budget.clock = clock

        def step_ends(step: int) -> None:
            clock.now += step_s(trainer.budget.used_s())

        trainer.step_callbacks.append(step_ends)
    return setup


def test_time_budget_refits_the_schedule_and_resume_continues_it(tiny_config, tmp_path, monkeypatch):
    """A budgeted run fits its length after SKIP + PROBE steps and re-fits it after every step; a
    run resumed after a crash restores the plan and the budget time used, and goes on with the
    lr the checkpointed plan gives (no jump), ending on its budget counted over both processes.
    Every step costs 1 s of the budget's clock: 40 s buy 40 steps."""
    from mlflow import MlflowClient

    from ssl_foundry.pipeline.train.checkpoint import checkpoint_path, load_checkpoint
    from ssl_foundry.pipeline.train.trainer import train
    from test_resume import SimulatedCrash, crash_after_checkpoint

    crash_step = SKIP_STEPS + PROBE_STEPS + 5  # after the first fit and a few re-fits
    budget_s, one_second = 40.0, stepped(lambda used: 1.0)
    cfg = tiny_config(tmp_path / "run", f"train.budget_minutes={budget_s / 60}", "train.max_steps=100000",
                      "train.warmup_steps=2", "train.log_every=1", f"train.checkpoint_every={crash_step}",
                      "data.num_workers=0", "train.threads=1")
    with monkeypatch.context() as patch:
        crash_after_checkpoint(patch, crash_step)
        with pytest.raises(SimulatedCrash):
            train(cfg, one_second)
    saved = load_checkpoint(checkpoint_path(tmp_path / "run" / "checkpoints", crash_step))["budget"]
    assert saved["used_s"] == crash_step
    assert saved["schedule"]["lr"]["total_steps"] == budget_s  # decided by the budget, not by max_steps

    result = train(cfg, one_second)  # train.resume=auto: continues from crash_step with the checkpoint's plan
    assert result.steps == budget_s and result.timing["budget_used_s"] == budget_s
    client = MlflowClient(tracking_uri=result.tracking_uri)
    logged = {m.step: m.value for m in client.get_metric_history(result.run_id, "lr")}
    assert sorted(logged) == list(range(1, result.steps + 1))
    # The first step after the resume trains with the checkpointed plan's lr.
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = build_scheduler(cfg, optimizer, cfg.train.max_steps)
    scheduler.load_state_dict(saved["schedule"])
    scheduler.step_update(crash_step)
    assert logged[crash_step + 1] == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-6)
    # The re-fits never make the lr jump: after warmup it only decreases, to min_lr at the end.
    after_warmup = [logged[s] for s in range(3, result.steps + 1)]
    assert all(b <= a * (1 + 1e-9) for a, b in zip(after_warmup, after_warmup[1:]))
    totals = {m.step: m.value for m in client.get_metric_history(result.run_id, "budget_total_steps")}
    assert totals[result.steps] == result.steps


def test_a_run_slowed_down_after_a_third_of_its_budget_ends_within_3_percent_of_it(tiny_config, tmp_path):
    """Injected load: steps cost 0.5 s of the budget's clock, then 1 s from a third of the budget
    on. The length fitted from the first steps (15 at 0.5 s: 45 more) would overrun by two thirds;
    re-fitted after every step, the run ends within 3 % of its budget (here: on it, to the step)."""
    from mlflow import MlflowClient

    from ssl_foundry.pipeline.train.trainer import train

    budget_s = 30.0
    cfg = tiny_config(tmp_path / "run", f"train.budget_minutes={budget_s / 60}", "train.max_steps=100000",
                      "train.log_every=1", "train.checkpoint_every=100", "data.num_workers=0", "train.threads=1")
    result = train(cfg, stepped(lambda used: 0.5 if used < budget_s / 3 else 1.0))
    assert abs(result.timing["budget_used_s"] - budget_s) <= 0.03 * budget_s
    history = MlflowClient(tracking_uri=result.tracking_uri).get_metric_history(result.run_id, "budget_total_steps")
    totals = {m.step: m.value for m in history}
    assert totals[SKIP_STEPS + PROBE_STEPS - 1] == 100000  # not fitted yet: train.max_steps
    assert totals[SKIP_STEPS + PROBE_STEPS] == 60  # the first fit: 7.5 s used, 22.5 s left at 0.5 s/step
    assert result.steps == 20 + 20  # 10 s at 0.5 s/step, then 20 s at 1 s/step


def test_a_budget_that_covers_the_run_keeps_time_for_export_and_knn(tiny_config, tmp_path):
    """``train.budget_covers=run``: the clock starts with the process (here: pytest's) and the
    end-of-run work, estimated from a feature-extraction probe before training, is reserved out of
    the budget: the training loop stops that long before it (to the step; 1 s per step here)."""
    from ssl_foundry.pipeline.train.trainer import Trainer

    cfg = tiny_config(tmp_path / "run", "train.budget_minutes=1000", "train.budget_covers=run",
                      "train.max_steps=100000", "train.log_every=50", "train.checkpoint_every=20",
                      "data.num_workers=0", "train.threads=1", "eval.after_pretrain=true")
    trainer = Trainer(cfg)
    clock = SteppedClock()
    trainer.budget = BudgetClock(0.0, "run", clock=clock)
    trainer.budget.budget_s = trainer.budget.used_s() + 60.0  # what pytest has used so far, and 60 s
    trainer.step_callbacks.append(lambda step: setattr(clock, "now", clock.now + 1.0))
    result = trainer.train()
    assert result.knn_top1 is not None
    reserved = trainer.budget.end_s()
    assert trainer.budget.extraction_s > 0 and reserved > END_OF_RUN_FIXED_S
    assert abs(trainer.budget.budget_s - reserved - trainer.budget.used_s()) <= 0.5  # within half a step
    assert result.steps == round(60.0 - reserved)


def test_adamw_takes_the_recipes_betas():
    from ssl_foundry.pipeline.train.optim import build_optimizer
    from ssl_foundry.pipeline.train.trainer import build_model

    cfg = load_config("configs/mae_vit_tiny_fmnist.yaml", [], check_paths=False)
    assert build_optimizer(cfg, build_model(cfg)).param_groups[0]["betas"] == (0.9, 0.95)
    cfg = load_config(RECIPE, ["train.optimizer=adamw", "model.backbone=resnet10t"], check_paths=False)
    assert build_optimizer(cfg, build_model(cfg)).param_groups[0]["betas"] == (0.9, 0.999)

"""The lr schedule (linear warmup, cosine to min_lr at the last step) and time budgets that re-fit it."""
import math
import time

import pytest
import torch

from launch.config import ConfigError, load_config
from pipeline.budget import (END_OF_RUN_CHECKPOINTS, END_OF_RUN_FIXED_S, PROBE_STEPS, SKIP_STEPS, BudgetClock,
                             end_of_run_s, extraction_estimate_s, steps_within_budget)
from pipeline.schedule import CosinePlan, cosine_progress, initial_plan, lr_at, refit
from pipeline.trainer import build_scheduler

RECIPE = "configs/simclr_resnet18_fmnist.yaml"


def lrs(total: int, count: int | None = None, **train) -> list[float]:
    """The lr of the first ``count`` (default: all) steps of a ``total``-step schedule."""
    overrides = [f"train.{k}={v}" for k, v in train.items()]
    cfg = load_config(RECIPE, overrides, check_paths=False)
    base = cfg.train.lr * cfg.train.batch_size / cfg.train.lr_batch_ref
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
    scheduler = build_scheduler(cfg, optimizer, total)
    out = []
    for step in range(total if count is None else count):
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
    """Hand-worked: warmup 10, 110 steps, so progress 0.5 at step 60 (lr halfway, 0.5); re-fitted
    there to 70 steps, the remaining half of the cosine runs over 10 steps instead of 50."""
    base, warmup = 1.0, 10
    plan = initial_plan(110, warmup)
    assert lr_at(60, plan, base, 0.0, warmup) == pytest.approx(0.5)
    shorter = refit(plan, 60, 70)
    assert shorter == CosinePlan(total_steps=70, anchor_step=60, anchor_progress=0.5)
    assert lr_at(60, shorter, base, 0.0, warmup) == pytest.approx(0.5)  # no jump at the re-fit
    assert lr_at(65, shorter, base, 0.0, warmup) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.75)))
    assert lr_at(70, shorter, base, 0.0, warmup) == pytest.approx(0.0)  # min_lr at the last step
    # Re-fitting twice is re-fitting from wherever the lr has got to: longer again, still continuous.
    longer = refit(shorter, 65, 165)
    assert lr_at(65, longer, base, 0.0, warmup) == pytest.approx(lr_at(65, shorter, base, 0.0, warmup))
    assert cosine_progress(longer, 115) == pytest.approx(0.75 + 0.25 * 50 / 100)
    assert lr_at(165, longer, base, 0.1, warmup) == pytest.approx(0.1)


def test_refit_during_warmup_only_moves_the_end():
    plan = refit(initial_plan(1000, 50), 20, 300)
    assert plan == initial_plan(300, 50)
    assert lrs(300, warmup_steps=50)[:60] == pytest.approx(
        [lr_at(s, plan, 0.3, 0.0, 50) for s in range(60)])


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


def test_budget_clock_fits_the_time_left_from_the_median_recent_step():
    clock = BudgetClock(budget_s=100.0, covers="training", used_before_s=40.0)  # resumed: 40 s used
    clock.start_training()
    for seconds in [9.0] * SKIP_STEPS + [0.5] * (PROBE_STEPS - 1):  # start-up steps are left out
        clock.record_step(seconds)
    assert not clock.ready()
    clock.record_step(30.0)  # one stalled step does not move the median
    assert clock.ready() and clock.step_s() == 0.5
    clock.record_checkpoint(5.0, every=10)  # amortised: 0.5 s per step
    assert clock.step_s() == 1.0
    assert 15 + 59 <= clock.total_steps(15, 10_000) <= 15 + 60  # ~60 s left at 1 s/step
    assert clock.end_s() == 0.0  # a training budget keeps nothing for after the loop


def test_negative_budget_is_a_config_error():
    with pytest.raises(ConfigError, match="train.budget_minutes must be >= 0"):
        load_config(RECIPE, ["train.budget_minutes=-1"], check_paths=False)
    with pytest.raises(ConfigError, match="train.budget_covers: 'all' is not one of training, run"):
        load_config(RECIPE, ["train.budget_covers=all"], check_paths=False)


def test_time_budget_refits_the_schedule_and_resume_continues_it(tiny_config, tmp_path, monkeypatch):
    """A budgeted run fits its length after SKIP + PROBE steps and re-fits it after every step; a
    run resumed after a crash restores the plan and the budget time used, and goes on with the
    lr the checkpointed plan gives (no jump), ending within the budget counted over both processes."""
    from mlflow import MlflowClient

    from pipeline.checkpoint import checkpoint_path, load_checkpoint
    from pipeline.tracking import resolve_tracking_uri
    from pipeline.trainer import train
    from test_resume import SimulatedCrash, crash_after_checkpoint

    crash_step = SKIP_STEPS + PROBE_STEPS + 5  # after the first fit and a few re-fits
    budget_s = 30.0
    overrides = [f"train.budget_minutes={budget_s / 60}", "train.max_steps=100000", "train.warmup_steps=2",
                 "train.log_every=1", f"train.checkpoint_every={crash_step}", "data.num_workers=0",
                 "train.threads=1"]  # one thread: tiny models gain nothing from two, and a loaded machine costs less
    cfg = tiny_config(tmp_path / "run", *overrides)
    with monkeypatch.context() as patch:
        crash_after_checkpoint(patch, crash_step)
        with pytest.raises(SimulatedCrash):
            train(cfg)
    saved = load_checkpoint(checkpoint_path(tmp_path / "run" / "checkpoints", crash_step))["budget"]
    plan = CosinePlan(**saved["plan"])
    assert crash_step < plan.total_steps < 100000  # decided by the budget, not by max_steps
    assert 0 < saved["used_s"] < budget_s

    result = train(cfg)  # train.resume=auto: continues from crash_step with the checkpoint's plan
    assert result.timing["budget_used_s"] >= saved["used_s"]
    client = MlflowClient(tracking_uri=resolve_tracking_uri("", str(tmp_path / "run")))
    logged = {m.step: m.value for m in client.get_metric_history(result.run_id, "lr")}
    assert sorted(logged) == list(range(1, result.steps + 1))
    # The first step after the resume trains with the checkpointed plan's lr.
    base = cfg.train.lr * cfg.train.batch_size / cfg.train.lr_batch_ref
    assert logged[crash_step + 1] == pytest.approx(lr_at(crash_step, plan, base, cfg.train.min_lr, 2), rel=1e-6)
    # The re-fits never make the lr jump: after warmup it only decreases, to min_lr at the end.
    after_warmup = [logged[s] for s in range(3, result.steps + 1)]
    assert all(b <= a * (1 + 1e-9) for a, b in zip(after_warmup, after_warmup[1:]))
    totals = {m.step: m.value for m in client.get_metric_history(result.run_id, "budget_total_steps")}
    assert totals[result.steps] == result.steps


def test_a_run_slowed_down_halfway_still_ends_within_3_percent_of_its_budget(tiny_config, tmp_path):
    """Injected load: from a third of the budget on, every step sleeps as long again as it took
    (a real step hook), so a length fitted once from the first steps would overrun by a third;
    re-fitted after every step, the training loop ends within 3 % of its budget (or within its
    slowest step, should the machine be so loaded that one step is longer than that)."""
    from pipeline.trainer import Trainer

    budget_s = 20.0
    cfg = tiny_config(tmp_path / "run", f"train.budget_minutes={budget_s / 60}", "train.max_steps=100000",
                      "train.log_every=50", "train.checkpoint_every=100", "data.num_workers=0", "train.threads=1")
    trainer = Trainer(cfg)
    last, slowest = [time.perf_counter()], [0.0]

    def slow_down(step: int) -> None:
        took = time.perf_counter() - last[0]
        if trainer.budget.used_s() > budget_s / 3:
            time.sleep(took)  # this step again: the machine got twice as slow
        slowest[0] = max(slowest[0], time.perf_counter() - last[0])
        last[0] = time.perf_counter()

    trainer.step_callbacks.append(slow_down)
    result = trainer.train()
    tolerance = max(0.03 * budget_s, slowest[0])
    assert abs(result.timing["train_s"] - budget_s) <= tolerance
    assert abs(result.timing["budget_used_s"] - budget_s) <= tolerance


def test_a_budget_that_covers_the_run_keeps_time_for_export_and_knn(tiny_config, tmp_path):
    """``train.budget_covers=run``: the clock starts with the process (here: pytest's, so the
    budget is what it has used so far plus 20 s) and runs to the end of the kNN evaluation; the
    end-of-run work, estimated from a feature-extraction probe, is reserved out of the budget, so
    the run, kNN included, ends within 3 % of it."""
    import psutil

    from pipeline.trainer import train

    budget_s = time.time() - psutil.Process().create_time() + 20.0
    cfg = tiny_config(tmp_path / "run", f"train.budget_minutes={budget_s / 60}", "train.budget_covers=run",
                      "train.max_steps=100000", "train.log_every=50", "train.checkpoint_every=20",
                      "data.num_workers=0", "train.threads=1", "eval.after_pretrain=true")
    result = train(cfg)
    assert result.knn_top1 is not None
    assert abs(result.timing["budget_used_s"] - budget_s) <= 0.03 * budget_s
    assert result.timing["train_s"] < 20.0  # the end-of-run work was kept out of the training


def test_adamw_takes_the_recipes_betas():
    from pipeline.optim import build_optimizer

    model = torch.nn.Linear(4, 2)
    cfg = load_config("configs/mae_vit_tiny_fmnist.yaml", [], check_paths=False)
    assert build_optimizer(cfg, model).param_groups[0]["betas"] == (0.9, 0.95)
    cfg = load_config(RECIPE, ["train.optimizer=adamw"], check_paths=False)
    assert build_optimizer(cfg, model).param_groups[0]["betas"] == (0.9, 0.999)

"""The lr schedule (linear warmup, cosine to min_lr at the last step) and time budgets."""
import math

import pytest
import torch

from ssl_foundry.pipeline.config import ConfigError, load_config
from ssl_foundry.pipeline.train.trainer import build_scheduler, steps_within_budget

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


@pytest.mark.parametrize("budget,elapsed,step,step_time,max_steps,expected", [
    (600, 60, 7, 2.0, 10_000, 7 + 270),  # 540 s left at 2 s/step
    (600, 60, 7, 2.0, 100, 100),  # capped by max_steps
    (600, 700, 7, 2.0, 10_000, 8),  # over budget already: one more step, never zero
    (60, 0, 0, 0.0, 50, 50),  # a zero step time cannot divide by zero
])
def test_steps_within_budget(budget, elapsed, step, step_time, max_steps, expected):
    assert steps_within_budget(budget, elapsed, step, step_time, max_steps) == expected


def test_negative_budget_is_a_config_error():
    with pytest.raises(ConfigError, match="train.budget_minutes must be >= 0"):
        load_config(RECIPE, ["train.budget_minutes=-1"], check_paths=False)


def test_time_budget_fits_the_schedule_and_resume_keeps_its_horizon(tiny_config, tmp_path, monkeypatch):
    """A budgeted run decides its length once (after BUDGET_SKIP + BUDGET_PROBE steps), trains the
    cosine fitted to it, and a run resumed after a crash ends at the same, checkpointed step."""
    from mlflow import MlflowClient

    from ssl_foundry.pipeline.train.checkpoint import checkpoint_path, load_checkpoint
    from ssl_foundry.pipeline.train.trainer import BUDGET_PROBE_STEPS, BUDGET_SKIP_STEPS, train
    from test_resume import SimulatedCrash, crash_after_checkpoint

    crash_step = BUDGET_SKIP_STEPS + BUDGET_PROBE_STEPS + 1  # the first checkpoint after the decision
    overrides = ["train.budget_minutes=0.25", "train.max_steps=100000", "train.warmup_steps=2",
                 "train.log_every=1", f"train.checkpoint_every={crash_step}", "data.num_workers=0"]
    cfg = tiny_config(tmp_path / "run", *overrides)
    with monkeypatch.context() as patch:
        crash_after_checkpoint(patch, crash_step)
        with pytest.raises(SimulatedCrash):
            train(cfg)
    horizon = load_checkpoint(checkpoint_path(tmp_path / "run" / "checkpoints", crash_step))["budget_total_steps"]
    assert crash_step < horizon < 100000  # decided by the budget, not by max_steps

    result = train(cfg)  # train.resume=auto: continues from crash_step, measures nothing again
    assert result.steps == horizon
    client = MlflowClient(tracking_uri=result.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.data.params["train.budget_total_steps"] == str(horizon)
    # The probe steps ran on the provisional max_steps horizon; every later step, before and after
    # the crash, on the cosine of the decided one.
    logged = {m.step: m.value for m in client.get_metric_history(result.run_id, "lr")}
    schedule = dict(warmup_steps=2, lr=cfg.train.lr, batch_size=cfg.train.batch_size,
                    lr_batch_ref=cfg.train.lr_batch_ref, min_lr=cfg.train.min_lr)
    provisional, fitted = lrs(100000, count=crash_step, **schedule), lrs(horizon, **schedule)
    assert sorted(logged) == list(range(1, horizon + 1))
    for step, value in logged.items():
        expected = provisional[step - 1] if step < crash_step else fitted[step - 1]
        assert value == pytest.approx(expected, rel=1e-6), step


def test_adamw_takes_the_recipes_betas():
    from ssl_foundry.pipeline.train.optim import build_optimizer

    model = torch.nn.Linear(4, 2)
    cfg = load_config("configs/mae_vit_tiny_fmnist.yaml", [], check_paths=False)
    assert build_optimizer(cfg, model).param_groups[0]["betas"] == (0.9, 0.95)
    cfg = load_config(RECIPE, ["train.optimizer=adamw"], check_paths=False)
    assert build_optimizer(cfg, model).param_groups[0]["betas"] == (0.9, 0.999)

"""Resume exactness: N steps straight == k steps, a crash, then ``train.resume=auto`` for the rest.

Bitwise on CPU: every tensor of the model and optimizer state, and the logged loss of every step.
The resumed run keeps logging into the same MLflow run.
"""
import pytest
import torch
from mlflow import MlflowClient

from ssl_foundry.pipeline.train import trainer as trainer_module
from ssl_foundry.pipeline.train.checkpoint import checkpoint_path, list_checkpoints, load_checkpoint
from ssl_foundry.pipeline.train.trainer import train

MAX_STEPS = 6


class SimulatedCrash(Exception):
    """Stands in for a preempted node / killed job right after a checkpoint was written."""


def crash_after_checkpoint(monkeypatch, step: int) -> None:
    """The real ``Trainer.save`` runs, then the process 'dies' once ``step`` is on disk."""
    real_save = trainer_module.Trainer.save

    def save_then_crash(self):
        path = real_save(self)
        if self.step == step:
            raise SimulatedCrash(f"crash after step {step}")
        return path

    monkeypatch.setattr(trainer_module.Trainer, "save", save_then_crash)


def assert_state_equal(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for name in a:
        assert torch.equal(a[name], b[name]), f"{what}: {name} differs"


def loss_history(tracking_uri: str, run_id: str) -> list[tuple[int, float]]:
    client = MlflowClient(tracking_uri=tracking_uri)
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))


@pytest.mark.parametrize("num_workers,crash_step,extra", [
    (0, 3, ["train.precision=auto"]),  # bf16 autocast where the CPU is fast at it (AMX here), else fp32
    (2, 3, []),  # an odd position with 2 loader workers: the resumed stream must not reorder them
    (1, 2, ["model.backbone=test_resnet", "model.backbone_args={}"]),  # BatchNorm running stats in the backbone
    (0, 3, ["model.backbone=test_resnet", "model.backbone_args={}", "train.ema_decay=0.9"]),  # and their average
], ids=["workers0-auto-precision", "workers2-odd-step", "workers1-resnet", "workers0-ema"])
def test_resume_is_bitwise_identical_to_straight_run(tiny_config, tmp_path, monkeypatch, num_workers, crash_step,
                                                     extra):
    overrides = [f"train.max_steps={MAX_STEPS}", f"data.num_workers={num_workers}", "train.checkpoint_every=1",
                 "train.keep_checkpoints=2", *extra]

    straight = train(tiny_config(tmp_path / "straight", *overrides))
    assert straight.steps == MAX_STEPS

    resumed_dir = tmp_path / "resumed"
    cfg = tiny_config(resumed_dir, *overrides)  # train.resume=auto is the default
    assert cfg.train.resume == "auto"
    with monkeypatch.context() as patch:
        crash_after_checkpoint(patch, crash_step)
        with pytest.raises(SimulatedCrash):
            train(cfg)
    assert [p.name for p in list_checkpoints(resumed_dir / "checkpoints")][-1] == checkpoint_path(
        "", crash_step).name
    first = load_checkpoint(checkpoint_path(resumed_dir / "checkpoints", crash_step))
    client = MlflowClient(tracking_uri=straight.tracking_uri)  # the test's store, the crashed run's too
    assert client.get_run(first["mlflow_run_id"]).info.status == "FAILED"

    resumed = train(tiny_config(resumed_dir, *overrides))
    assert resumed.steps == MAX_STEPS

    # Same MLflow run, FINISHED again, and its loss history is the straight run's, step for step.
    assert resumed.run_id == first["mlflow_run_id"]
    resumed_client = MlflowClient(tracking_uri=resumed.tracking_uri)
    assert resumed_client.get_run(resumed.run_id).info.status == "FINISHED"
    history = loss_history(resumed.tracking_uri, resumed.run_id)
    assert [step for step, _ in history] == list(range(1, MAX_STEPS + 1))
    assert history == loss_history(straight.tracking_uri, straight.run_id)

    a = load_checkpoint(checkpoint_path(tmp_path / "straight" / "checkpoints", MAX_STEPS))
    b = load_checkpoint(checkpoint_path(resumed_dir / "checkpoints", MAX_STEPS))
    assert a["step"] == b["step"] == MAX_STEPS and a["position"] == b["position"]
    assert_state_equal(a["model"], b["model"], "model")
    assert a.keys() == b.keys()
    if "ema" in a:
        assert_state_equal(a["ema"], b["ema"], "the backbone's moving average")
        assert not all(torch.equal(a["ema"][k], first["ema"][k]) for k in a["ema"])
    for (ka, va), (kb, vb) in zip(a["optimizer"]["state"].items(), b["optimizer"]["state"].items(), strict=True):
        assert ka == kb
        assert_state_equal(va, vb, f"optimizer state {ka}")
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    # Training moved the weights: the comparison above is not between two untouched models.
    assert not all(torch.equal(first["model"][k], b["model"][k]) for k in b["model"])


def test_resuming_a_finished_run_changes_nothing(tiny_config, tmp_path):
    """`train.resume=auto` on a run that already finished: no step, no new model version, same result."""
    overrides = ["train.max_steps=2", "train.checkpoint_every=1", "mlflow.registered_model=tiny-finished"]
    first = train(tiny_config(tmp_path / "run", *overrides))
    again = train(tiny_config(tmp_path / "run", *overrides))
    assert again == first and again.model_version == "1"
    client = MlflowClient(tracking_uri=first.tracking_uri)
    assert [str(v.version) for v in client.search_model_versions("name='tiny-finished'")] == ["1"]
    assert client.get_run(first.run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(first.run_id, "loss")] == [1, 2]

    longer = train(tiny_config(tmp_path / "run", *overrides[1:], "train.max_steps=3"))  # trains on
    assert longer.steps == 3 and longer.run_id == first.run_id and longer.model_version == "2"

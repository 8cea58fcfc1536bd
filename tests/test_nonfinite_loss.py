"""A loss that goes non-finite stops training with a message naming the step and the last good
checkpoint; that checkpoint is intact and resumable, and the MLflow run is FAILED with the reason.

The NaN is real: LARS with lr=1e6 (x batch/256) grows the weights ~30x per step until the
forward pass overflows a few steps in.
"""
import math
import re
from pathlib import Path

import torch
from mlflow import MlflowClient

from ssl_foundry.pipeline.train.checkpoint import checkpoint_path, latest_checkpoint, load_checkpoint
from ssl_foundry.pipeline.train.trainer import NonFiniteLossError, build_model, train


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_config, tmp_path, mlflow_store):
    out = tmp_path / "run"
    exploding = ["train.lr=1e6", "train.warmup_steps=0", "train.max_steps=12", "train.checkpoint_every=1",
                 "train.keep_checkpoints=2"]
    cfg = tiny_config(out, *exploding)
    try:
        train(cfg)
    except NonFiniteLossError as err:
        message = str(err)
    else:
        raise AssertionError("training with lr=1e6 finished without a non-finite loss")

    client = MlflowClient(tracking_uri=mlflow_store)
    (run,) = client.search_runs([client.get_experiment_by_name(cfg.mlflow.experiment).experiment_id])
    logged = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)]
    assert all(math.isfinite(v) for v in logged)
    failed_step = len(logged) + 1  # log_every=1: every finite step was logged
    assert failed_step >= 3, "the loss must go non-finite after a few good steps for this test to mean anything"

    # The checkpoint of step failed_step-1 holds the weights that gave the bad loss: it is set
    # aside; the one before it is the last good one, and what train.resume=auto now picks.
    folder = out / "checkpoints"
    good, bad = checkpoint_path(folder, failed_step - 2), checkpoint_path(folder, failed_step - 1)
    assert re.search(rf"loss is (nan|inf|-inf) at step {failed_step}\b", message), message
    assert f"last good checkpoint is {good};" in message or f"last good checkpoint is {good} (" in message
    assert not bad.exists() and bad.with_name(bad.name + ".nonfinite").is_file()
    assert latest_checkpoint(folder) == good

    state = load_checkpoint(good)
    assert state["step"] == failed_step - 2 and state["mlflow_run_id"] == run.info.run_id
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    model = build_model(cfg)
    model.load_state_dict(state["model"])  # strict: every tensor present, shapes right

    run = client.get_run(run.info.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["failure"] == message
    # The run's log, ending with why it stopped, is in the run too.
    log = Path(client.download_artifacts(run.info.run_id, "train.log", str(tmp_path))).read_text()
    assert log == (out / "train.log").read_text()
    assert log.splitlines()[-1].endswith(f" ERROR stopped after step {failed_step - 1}: NonFiniteLossError: {message}")

    # The message's way on: a lower lr from the good checkpoint (train.resume=auto refuses a changed
    # lr), in the same run, replaying step failed_step-1 exactly (the set-aside checkpoint would
    # replay the non-finite step instead).
    assert f"continue from it with train.resume={good}" in message
    result = train(tiny_config(out, *exploding, "train.lr=0.3", f"train.max_steps={failed_step - 1}",
                               f"train.resume={good}"))
    assert result.run_id == run.info.run_id and result.steps == failed_step - 1
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))
    assert [step for step, _ in history] == list(range(1, failed_step))
    assert history[-1] == (failed_step - 1, result.final_loss)

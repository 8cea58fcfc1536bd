"""Resume at another world size (DDP). With a fixed data.readers every global batch is the same at any
world size, and with global BatchNorm so is the loss: a run whose 4 ranks are killed continues on
2 (a job that lost a node), those are killed in turn, and it finishes on 4 again, with the losses of
one uninterrupted process, in one MLflow run. Without the checkpoint's data.readers the resume is
refused, naming the fix."""
import json
import re
import subprocess
import sys

import psutil
import pytest
from mlflow import MlflowClient

from conftest import run_cli, subprocess_env

pytestmark = pytest.mark.slow

STEPS = 12
COMMON = ["train.global_batchnorm=true", "data.readers=4", f"train.max_steps={STEPS}", "train.checkpoint_every=4",
          "train.threads=1"]
REORDERED_SUMS = dict(rel=2e-5, abs=1e-6)  # fp32 all-reduces over 1, 2 or 4 ranks: another summation order


def pretrain_until(recipe, ranks: int, step: int, tmp_path) -> str:
    """`foundry pretrain` on ``ranks`` ranks, every process of it SIGKILLed once rank 0 logged ``step``."""
    proc = subprocess.Popen([sys.executable, "-m", "ssl_foundry.launch", "pretrain", str(recipe), *COMMON,
                             f"launch.nproc_per_node={ranks}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=subprocess_env(tmp_path))
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if re.match(rf"step {step}/{STEPS} ", line):
            break
    for process in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
        process.kill()  # the agent and its ranks, each in its own session
    proc.wait(timeout=60)
    output = "".join(lines)
    assert re.search(rf"^step {step}/", output, re.M), output[-3000:]
    return output


def loss_history(out) -> tuple[dict[int, float], MlflowClient, str]:
    result = json.loads((out / "result.json").read_text())
    client = MlflowClient(tracking_uri=result["tracking_uri"])
    history = sorted(client.get_metric_history(result["run_id"], "loss"), key=lambda m: m.timestamp)
    return {m.step: m.value for m in history}, client, result["run_id"]  # steps run again: the last value


def test_four_ranks_to_two_and_back_continue_the_same_batches(tiny_config, tmp_path):
    tiny_config(tmp_path / "one")
    done = run_cli(["pretrain", str(tmp_path / "one.yaml"), *COMMON], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = loss_history(tmp_path / "one")[0]

    tiny_config(tmp_path / "run")
    recipe = tmp_path / "run.yaml"
    pretrain_until(recipe, ranks=4, step=6, tmp_path=tmp_path)  # checkpoint of step 4 written by 4 ranks

    refused = run_cli(["pretrain", str(recipe), *COMMON, "data.readers=2"], tmp_path)
    assert refused.returncode != 0
    # another data.readers is another run: refused before the checkpoint is read (plan_run)
    assert "holds a run started with another config (data.readers: 4 -> 2;" in refused.stderr, refused.stderr

    output = pretrain_until(recipe, ranks=2, step=10, tmp_path=tmp_path)
    assert "at step 4 (written by 4 ranks, now 2)" in output
    done = run_cli(["pretrain", str(recipe), *COMMON, "launch.nproc_per_node=4"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "at step 8 (written by 2 ranks, now 4)" in done.stdout

    history, client, run_id = loss_history(tmp_path / "run")
    assert sorted(history) == list(range(1, STEPS + 1))
    for step in history:
        assert history[step] == pytest.approx(expected[step], **REORDERED_SUMS), step
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["restarts"] == "2"
    experiment = client.get_experiment_by_name("ssl-foundry-tests").experiment_id
    assert [r.info.run_id for r in client.search_runs([experiment])] == [run_id]
    world_sizes = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "world_size"))
    assert world_sizes == [(0, 4), (4, 2), (8, 4)]

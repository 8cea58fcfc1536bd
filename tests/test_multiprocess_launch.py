"""Two real ranks (gloo) started the two supported ways, end to end:

1. ``foundry pretrain RECIPE launch.nproc_per_node=2``: foundry starts the ranks itself through
   torch's elastic launcher;
2. ``python -m torch.distributed.run --standalone --nproc-per-node 2 -m ssl_foundry.launch pretrain ...``
   (torchrun), which here resumes the first run's 2-rank checkpoint into the same MLflow run.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from conftest import subprocess_env
from ssl_foundry.pipeline.registry.export import load_timm_backbone
from ssl_foundry.pipeline.train.checkpoint import checkpoint_path, list_checkpoints, load_checkpoint

pytestmark = pytest.mark.slow

SUMMARY = "=== ssl-foundry pretraining finished ==="
FIRST_STEPS, TOTAL_STEPS = 2, 4


def run(command: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env=subprocess_env(tmp_path),
                          timeout=900)  # a hang guard only: normally well under a minute
    assert done.returncode == 0, f"{command}\nstdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-5000:]}"
    return done


@pytest.fixture(scope="module")
def two_rank_run(tiny_config, tmp_path_factory):
    """``foundry pretrain`` with launch.nproc_per_node=2 (and a DataLoader worker per rank)."""
    root = tmp_path_factory.mktemp("two_ranks")
    out = root / "run"
    tiny_config(out)  # writes the recipe to run.yaml
    foundry = Path(sys.executable).parent / "foundry"
    assert foundry.is_file(), f"no foundry console script beside {sys.executable}: run make setup"
    done = run([str(foundry), "pretrain", str(root / "run.yaml"), "launch.nproc_per_node=2",
                f"train.max_steps={FIRST_STEPS}", "train.checkpoint_every=1", "data.num_workers=1"], root)
    return out, done


def assert_backbone_matches_checkpoint(out: Path, state: dict) -> None:
    backbone = load_timm_backbone(out / "backbone")  # plain timm, from the export folder
    expected = {k.removeprefix("backbone."): v for k, v in state["model"].items() if k.startswith("backbone.")}
    got = backbone.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got)


def test_foundry_pretrain_starts_two_ranks(two_rank_run):
    out, done = two_rank_run
    assert done.stdout.count(SUMMARY) == 1  # only rank 0 reports

    state = load_checkpoint(checkpoint_path(out / "checkpoints", FIRST_STEPS))
    assert state["step"] == FIRST_STEPS and state["world_size"] == 2
    # One RNG state per rank, and they differ (each rank seeds its own stream): two real ranks.
    assert len(state["rng"]) == 2 and not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    assert_backbone_matches_checkpoint(out, state)

    client = MlflowClient(tracking_uri=json.loads((out / "result.json").read_text())["tracking_uri"])
    run = client.get_run(state["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["env.world_size"] == "2"
    assert run.data.params["launch.nproc_per_node"] == "2"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == [1, 2]
    assert {"checkpoints", "config.yaml", "plots"} <= {f.path for f in client.list_artifacts(run.info.run_id)}
    assert [m.name for m in client.search_logged_models([run.info.experiment_id])] == ["backbone"]


def test_torchrun_resumes_the_two_rank_run(two_rank_run):
    out, first = two_rank_run
    first_state = load_checkpoint(checkpoint_path(out / "checkpoints", FIRST_STEPS))
    store = json.loads((out / "result.json").read_text())["tracking_uri"]  # the fixture's: resumed in it
    done = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "ssl_foundry.launch", "pretrain", str(out.parent / "run.yaml"), f"train.max_steps={TOTAL_STEPS}",
                "train.checkpoint_every=1", "data.num_workers=1", f"mlflow.tracking_uri={store}"], out.parent)
    assert f"resumed at step {FIRST_STEPS} from {checkpoint_path(out / 'checkpoints', FIRST_STEPS)}" in done.stderr
    assert done.stdout.count(SUMMARY) == 1

    assert [p.name for p in list_checkpoints(out / "checkpoints")] == [
        checkpoint_path("", step).name for step in (TOTAL_STEPS - 1, TOTAL_STEPS)]
    state = load_checkpoint(checkpoint_path(out / "checkpoints", TOTAL_STEPS))
    assert state["step"] == TOTAL_STEPS and state["world_size"] == 2
    assert state["mlflow_run_id"] == first_state["mlflow_run_id"]
    assert_backbone_matches_checkpoint(out, state)

    client = MlflowClient(tracking_uri=store)
    assert client.get_run(state["mlflow_run_id"]).info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(state["mlflow_run_id"], "loss")) == [1, 2, 3, 4]

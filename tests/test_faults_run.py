"""Run-side faults injected for real, each checked as an operator meets it: the message (one line
naming the thing and the fix), the exit status, and that nothing was lost (the last good checkpoint
loads, a resumed run logs the uninterrupted run's losses, each step once). docs/faults-run.md has
the table; the rows are issue 16's:

5  config rules before any rank starts     8  a full disk while checkpointing
6  an unreachable tracking server          9  two runs on one output_dir
7  a tracking server that dies mid-run     11 a checkpoint that would run code when loaded

Real processes throughout: `foundry pretrain` (``python -m ssl_foundry.launch``), torchrun, a real ``mlflow
server`` killed with SIGKILL and restarted, a real tmpfs filled up, SIGSTOP / SIGKILL of a run.
"""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from conftest import run_cli, subprocess_env, write_recipe
from mlflow_server import MlflowServer, free_port
from ssl_foundry.pipeline.train.checkpoint import CheckpointError, checkpoint_path, list_checkpoints, load_checkpoint
from ssl_foundry.pipeline.train.trainer import train

pytestmark = pytest.mark.slow  # real processes: runs, servers, torchrun

STEPS = 8
RUN = [f"train.max_steps={STEPS}", "train.checkpoint_every=2", "train.keep_checkpoints=2", "train.log_every=1"]


def error_line(stderr: str, *expected: str) -> str:
    """The last line on stderr, with each of ``expected`` in it; before it only the run's time-stamped
    log lines, and no traceback anywhere."""
    *logged, last = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr and all(re.match(r"\d{4}[-/]\d\d[-/]\d\d \d\d:\d\d:\d\d ", line)
                                             for line in logged), stderr
    for text in expected:
        assert text in last, f"{text!r} not in {last!r}"
    return last


def losses(uri: str, run_id: str | None = None) -> list[tuple[int, float]]:
    """The (step, loss) points of ``run_id`` (default: the store's only run), in logged order."""
    client = MlflowClient(tracking_uri=uri)
    if run_id is None:
        (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
        run_id = run.info.run_id
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.timestamp)]


@pytest.fixture(scope="module")
def straight(tiny_config, tmp_path_factory) -> list[tuple[int, float]]:
    """The (step, loss) points of the uninterrupted run every faulted run must end up with."""
    result = train(tiny_config(tmp_path_factory.mktemp("straight") / "run", *RUN))
    history = losses(result.tracking_uri, result.run_id)
    assert [step for step, _ in history] == list(range(1, STEPS + 1))
    return history


@pytest.fixture
def recipe(fmnist, tmp_path, mlflow_db_template) -> Path:
    """The tiny recipe writing to ``tmp_path/run``, its MLflow store created already (quiet stderr)."""
    (tmp_path / "store").mkdir()
    shutil.copyfile(mlflow_db_template, tmp_path / "store" / "mlflow.db")
    return write_recipe(tmp_path / "recipe.yaml", fmnist, tmp_path / "run")


def local_store(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"


def pretrain(tmp_path: Path, recipe: Path, *overrides: str) -> subprocess.CompletedProcess:
    return run_cli(["pretrain", str(recipe), *overrides], tmp_path, cwd=tmp_path)


class Background:
    """`foundry pretrain` in the background, its stdout and stderr collected line by line."""

    def __init__(self, tmp_path: Path, recipe: Path, *overrides: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "ssl_foundry.launch", "pretrain", str(recipe), *overrides],
                                     cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=subprocess_env(tmp_path))
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers = [threading.Thread(target=lambda s=s, d=d: d.extend(s), daemon=True)
                         for s, d in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for reader in self._readers:
            reader.start()

    def wait_for(self, text: str, timeout_s: float = 300) -> None:
        """Until a line of stdout or stderr (where the log lines go) holds ``text``."""
        deadline = time.monotonic() + timeout_s
        while not any(text in line for line in self.out + self.err):
            assert self.proc.poll() is None, f"exited {self.proc.returncode} before {text!r}:\n" + "".join(
                self.out + self.err)
            assert time.monotonic() < deadline, f"no {text!r} after {timeout_s} s:\n" + "".join(self.out + self.err)
            time.sleep(0.02)

    def finish(self, timeout_s: float = 600) -> int:
        code = self.proc.wait(timeout=timeout_s)
        for reader in self._readers:
            reader.join(timeout=10)
        return code


# ----------------------------------------------------------------------------- row 5


@pytest.fixture(scope="module")
def unlabelled_shards(tmp_path_factory) -> Path:
    """Shards of a flat folder of images (no class sub-folders), the way ImageNet's val/ arrives."""
    from ssl_foundry.data_prep.images import prep_images

    root = tmp_path_factory.mktemp("flat")
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / f"{i:02d}.png")
    prep_images(root, root.parent / "flat-shards", shard_size=8, workers=1)
    return root.parent / "flat-shards"


@pytest.mark.parametrize("overrides,expected", [
    (["launch.nproc_per_node=2", "train.batch_size=63"], ["train.batch_size=63", "2 rank(s)", "multiple of 2"]),
    (["launch.nproc_per_node=2", "train.lr=-0.1"], ["train.lr must be > 0", "got -0.1"]),
    (["launch.nproc_per_node=2", "train.checkpoint_every=0"], ["train.checkpoint_every must be >= 1", "got 0"]),
    (["launch.nproc_per_node=2", "data.num_workers=3"],
     ["train.batch_size=8 gives each rank 4 samples", "data.num_workers=3"]),
    (["eval.after_pretrain=true", "data.eval_test={flat}"],
     ["data.eval_test={flat} holds unlabelled shards", "ImageNet's flat val/", "eval.after_pretrain=false"]),
    (["eval.knn_every=2", "data.eval_train="], ["eval.knn_every=2", "data.eval_train and data.eval_test"]),
], ids=["batch-over-ranks", "negative-lr", "zero-interval", "batch-over-workers", "unlabelled-eval-shards",
        "knn-monitor-without-shards"])
def test_config_rules_fail_before_any_rank_starts(recipe, tmp_path, unlabelled_shards, overrides, expected):
    """Row 5: each was rc 1 after the ranks had started (84 lines, 4 tracebacks, the scaled lr, a
    ZeroDivisionError, or an error after training for the unlabelled evaluation shards)."""
    done = pretrain(tmp_path, recipe, *[o.format(flat=unlabelled_shards) for o in overrides])
    assert done.returncode == 2
    line = error_line(done.stderr, "foundry: config error: ", *[e.format(flat=unlabelled_shards) for e in expected])
    assert "training loader" not in done.stderr and not (tmp_path / "run").exists(), line  # no rank started


def test_each_rank_of_a_bare_torchrun_checks_before_the_process_group(recipe, tmp_path):
    """Under torchrun every rank validates its config first: each exits 2 with the one line before
    any collective (what torchrun then reports about its failed ranks is its own)."""
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "ssl_foundry.launch", "pretrain", str(recipe), "train.batch_size=7"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600, env=subprocess_env(tmp_path))
    assert done.returncode != 0
    assert done.stderr.count("foundry: config error: train.batch_size=7 does not split over 2 rank(s)") == 2
    assert "exitcode  : 2" in done.stderr  # torchrun's summary of the ranks
    assert "pipeline/" not in done.stderr and not (tmp_path / "run").exists()  # no rank got to training


# ----------------------------------------------------------------------------- row 6


@pytest.mark.parametrize("ranks", [1, 2])
def test_unreachable_tracking_server_at_start(recipe, tmp_path, ranks):
    """Row 6: was rc 1 and a 34-line traceback after 7 s; now exit 2, one line, before any rank starts."""
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    done = pretrain(tmp_path, recipe, f"mlflow.tracking_uri={uri}", f"launch.nproc_per_node={ranks}")
    assert done.returncode == 2
    error_line(done.stderr, f"MLflow tracking server {uri} is unreachable", "mlflow server",
               "leave mlflow.tracking_uri and MLFLOW_TRACKING_URI unset")
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- row 7


def kept_warnings(stderr: list[str]) -> list[str]:
    """The tracker's warnings among the run's log lines; no traceback, and no other warning or error."""
    assert "Traceback" not in "".join(stderr), "".join(stderr)
    problems = [line.strip() for line in stderr if " WARNING " in line or " ERROR " in line]
    warnings = [line for line in problems if " WARNING MLflow: " in line]
    assert warnings == [line for line in problems if "mlflow.pytorch" not in line], "".join(stderr)
    return warnings


def test_tracking_server_dying_mid_run_costs_no_training(recipe, tmp_path, straight):
    """Row 7: a server killed at step 2 used to crash the run 22 s later (233 lines) before its
    checkpoint. Now training goes on, the end of the run waits for the server, which comes back
    (same port, same store): every step's loss arrives once, the run ends FINISHED, exit 0."""
    server = MlflowServer(tmp_path / "server").start()
    run = Background(tmp_path, recipe, *RUN, f"mlflow.tracking_uri={server.uri}", "mlflow.outage_minutes=5")
    try:
        run.wait_for(f"step 2/{STEPS}")
        server.kill()
        run.wait_for(f"step {STEPS}/{STEPS}")  # trained on while the server was gone
        checkpoint = checkpoint_path(tmp_path / "run" / "checkpoints", STEPS)
        deadline = time.monotonic() + 300
        while not checkpoint.is_file():
            assert time.monotonic() < deadline and run.proc.poll() is None, "".join(run.out + run.err)
            time.sleep(0.05)
        # Back only once a call has failed for good: MLflow's own HTTP retries (~7 s) may outlast a short outage.
        run.wait_for(f"MLflow: {server.uri} unreachable")
        server = MlflowServer(tmp_path / "server", port=server.port).start()
        assert run.finish() == 0, "".join(run.out + run.err)
        assert losses(server.uri) == straight
        client = MlflowClient(tracking_uri=server.uri)
        (finished,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert finished.info.status == "FINISHED"
        assert {a.path for a in client.list_artifacts(finished.info.run_id)} >= {"checkpoints", "train.log"}
        assert client.search_logged_models([finished.info.experiment_id],
                                           filter_string=f"source_run_id = '{finished.info.run_id}'")
    finally:
        run.proc.kill()
        server.stop()
    warnings = kept_warnings(run.err)
    assert any(f"MLflow: {server.uri} unreachable" in line and "kept" in line for line in warnings), "".join(run.err)
    assert any(f"MLflow: {server.uri} answers again" in line for line in warnings), "".join(run.err)
    assert not (tmp_path / "run" / "mlflow-unsent.jsonl").exists()


def test_tracking_server_gone_for_good_keeps_everything_for_the_rerun(recipe, tmp_path, straight):
    """Row 7, the server does not come back within mlflow.outage_minutes: exit 1 with one line naming
    the URI and where the metrics are kept; the run stays RUNNING. The same command, once the server
    is back, sends them and finishes the run: every step once, the uninterrupted run's losses."""
    server = MlflowServer(tmp_path / "server").start()
    overrides = [*RUN, f"mlflow.tracking_uri={server.uri}", "mlflow.outage_minutes=0.1"]
    run = Background(tmp_path, recipe, *overrides)
    try:
        run.wait_for(f"step 2/{STEPS}")
        server.kill()
        assert run.finish() == 1
    finally:
        run.proc.kill()
    spool = tmp_path / "run" / "mlflow-unsent.jsonl"
    *lines, last = [line for line in run.err if line.strip()]
    kept_warnings([line for line in lines if " ERROR stopped after step " not in line])
    error_line(last, f"foundry: error: MLflow tracking server {server.uri} has not answered for 0.1 min",
               str(spool), "stays RUNNING", "Rerun the same command")
    assert spool.is_file() and load_checkpoint(checkpoint_path(tmp_path / "run" / "checkpoints", STEPS))["step"] == STEPS

    with MlflowServer(tmp_path / "server", port=server.port) as server:
        again = pretrain(tmp_path, recipe, *overrides)
        assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
        assert losses(server.uri) == straight
        client = MlflowClient(tracking_uri=server.uri)
        (finished,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert finished.info.status == "FINISHED"
    assert not spool.exists()


# ----------------------------------------------------------------------------- row 8


@pytest.fixture
def small_disk(tmp_path):
    """A real 12 MiB tmpfs (one tiny-recipe checkpoint is 7.2 MiB), unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode:
        pytest.skip(f"mounting a tmpfs needs root (CAP_SYS_ADMIN): {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_disk_full_while_checkpointing(recipe, tmp_path, small_disk, straight):
    """Row 8: was the ENOSPC on line 18 of 299, the run left RUNNING and a 41 MB temp file keeping
    the disk full. Now one line with the path and the free space, no temp file, the run FAILED,
    the previous checkpoint intact; with space freed, the same command resumes to the uninterrupted
    run's losses, removing what a killed writer left behind on the way."""
    out = small_disk / "run"
    overrides = [*RUN, f"output_dir={out}", f"mlflow.tracking_uri={local_store(tmp_path)}"]
    done = pretrain(tmp_path, recipe, *overrides)
    assert done.returncode == 1
    folder = out / "checkpoints"
    error_line(done.stderr, f"foundry: error: checkpoint {checkpoint_path(folder, 4)} not written "
                            f"(no space left on device)", f"MiB free in {folder}", "the checkpoint needs ~7.")
    assert sorted(p.name for p in folder.iterdir()) == [checkpoint_path(folder, 2).name]  # no temp file
    assert load_checkpoint(checkpoint_path(folder, 2))["step"] == 2
    client = MlflowClient(tracking_uri=local_store(tmp_path))
    (failed,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert failed.info.status == "FAILED" and "not written" in failed.data.tags["failure"]

    subprocess.run(["mount", "-o", "remount,size=40m", str(small_disk)], check=True)
    killed_writer = folder / f".{checkpoint_path(folder, 4).name}.tmp-4242"
    killed_writer.write_bytes(b"\0" * 2**20)
    again = pretrain(tmp_path, recipe, *overrides)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert f"removed what killed checkpoint writers left in {folder}: {killed_writer.name}" in again.stderr
    assert f"resumed at step 2 from {checkpoint_path(folder, 2)}" in again.stderr
    assert not killed_writer.exists()
    assert losses(local_store(tmp_path)) == straight


# ----------------------------------------------------------------------------- row 9


def test_second_run_on_one_output_dir_is_refused_and_a_dead_holder_is_taken_over(recipe, tmp_path, straight,
                                                                                 mlflow_store):
    """Row 9: two runs used to share the folder (one resumed the other's checkpoint, both logged into
    one MLflow run). Now the second is refused naming the first; once the first is killed (SIGKILL,
    possibly mid-checkpoint), a third takes the lock over, says whose it was, resumes, and the run's
    history is the uninterrupted run's, every step once."""
    first = Background(tmp_path, recipe, *RUN, "train.checkpoint_every=1")
    try:
        first.wait_for(f"step 2/{STEPS}")
        os.kill(first.proc.pid, signal.SIGSTOP)  # alive, holding the lock, going nowhere
        second = pretrain(tmp_path, recipe, *RUN)
        assert second.returncode == 2
        error_line(second.stderr, f"foundry: error: output_dir {tmp_path / 'run'} is in use by the run of PID "
                                  f"{first.proc.pid} on {socket.gethostname()}", "pretrain", "another output_dir")
        os.kill(first.proc.pid, signal.SIGKILL)
        assert first.finish() == -signal.SIGKILL
    finally:
        first.proc.kill()
    last = list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    assert load_checkpoint(last)["step"] >= 1

    third = pretrain(tmp_path, recipe, *RUN)
    assert third.returncode == 0, third.stdout[-2000:] + third.stderr[-3000:]
    assert f"taking over the lock of the run of PID {first.proc.pid} on {socket.gethostname()}" in third.stderr
    assert re.search(rf"resumed at step \d+ from {re.escape(str(last))}", third.stderr)
    assert losses(mlflow_store) == straight  # one run (in the default store), each step once


# ----------------------------------------------------------------------------- row 11

EXPLOIT = """
import os, sys, torch
class RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {sys.argv[2]}",))
torch.save({"step": 9, "model": {}, "payload": RunsCode()}, sys.argv[1])
"""


def test_checkpoint_that_would_run_code_is_refused(recipe, tmp_path):
    """Row 11: checkpoints were unpickled with weights_only=False. A planted step-00000009.pt whose
    unpickling runs a command is now refused (exit 2, one line naming the file and what it holds)
    before anything is trained or logged, and the command never runs."""
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    planted, marker = checkpoint_path(folder, 9), tmp_path / "code-ran"
    subprocess.run([sys.executable, "-c", EXPLOIT, str(planted), str(marker)], check=True, timeout=120)
    done = pretrain(tmp_path, recipe, *RUN, f"mlflow.tracking_uri={local_store(tmp_path)}")
    assert done.returncode == 2
    error_line(done.stderr, f"foundry: error: checkpoint {planted} holds posix.system besides tensors",
               "refused", "train.resume=never")
    assert not marker.exists()
    client = MlflowClient(tracking_uri=local_store(tmp_path))
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []  # nothing started
    with pytest.raises(CheckpointError, match="posix.system"):
        load_checkpoint(planted)
    assert not marker.exists()


def test_deepspeed_checkpoints_load_weights_only(recipe, tmp_path):
    """DeepSpeed's own engine unpickles with weights_only=False; the strategy's refuses the planted
    file, and a real ZeRO-2 checkpoint (which holds DeepSpeed's fragment addresses) still resumes."""
    from types import SimpleNamespace

    from ssl_foundry.pipeline.config import select_accelerator
    from ssl_foundry.pipeline.train.strategy.deepspeed import load_weights_only

    select_accelerator("cpu")
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    planted, marker = tmp_path / "mp_rank_00_model_states.pt", tmp_path / "code-ran"
    subprocess.run([sys.executable, "-c", EXPLOIT, str(planted), str(marker)], check=True, timeout=120)
    engine = SimpleNamespace(checkpoint_engine=TorchCheckpointEngine(None), _config=None)
    load_weights_only(engine)
    with pytest.raises(CheckpointError, match="posix.system"):
        engine.checkpoint_engine.load(str(planted), map_location=torch.device("cpu"))
    assert not marker.exists()

    zero2 = ["train.strategy=deepspeed", "deepspeed.zero_stage=2", "train.optimizer=adamw", "train.lr=0.05",
             "train.checkpoint_every=1", f"mlflow.tracking_uri={local_store(tmp_path)}"]
    first = pretrain(tmp_path, recipe, *zero2, "train.max_steps=1")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    resumed = pretrain(tmp_path, recipe, *zero2, "train.max_steps=2")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert f"resumed at step 1 from {tmp_path / 'run' / 'checkpoints' / 'step-00000001'}" in resumed.stderr

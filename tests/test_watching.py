"""Watching a run (docs/watching.md): time-stamped log lines with elapsed time and eta, rank 0's
lines in ``<output_dir>/train.log`` (appended on resume) and in the MLflow run, progress from the
evaluations and prep, no carriage returns without a terminal and a live bar with one, ranks other
than 0 silent but for warnings, and `make setup` in one line once it is done."""
from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import REPO, run_cli, subprocess_env, write_recipe

TIME = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
STEP_LINE = re.compile(rf"^{TIME} INFO step (\d+)/(\d+) loss [\d.]+ lr \S+ \d+ img/s data-wait \d+%, "
                       r"elapsed (\d\d:\d\d), eta (\d\d:\d\d)$", re.M)


def seconds(interval: str) -> int:
    minutes, secs = interval.split(":")
    return 60 * int(minutes) + int(secs)


@pytest.fixture(scope="module")
def resumed_run(fmnist, tmp_path_factory):
    """`foundry pretrain` of the tiny recipe for 4 steps, then resumed to 6: (output_dir, first, second)."""
    tmp = tmp_path_factory.mktemp("watching")
    out = tmp / "run"
    recipe = write_recipe(tmp / "run.yaml", fmnist, out)
    first = run_cli(["pretrain", str(recipe), "train.threads=1"], tmp)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_cli(["pretrain", str(recipe), "train.threads=1", "train.max_steps=6"], tmp)
    assert second.returncode == 0, second.stderr[-3000:]
    return out, first, second


def test_training_lines_have_time_elapsed_and_eta_and_no_carriage_returns(resumed_run):
    _, first, second = resumed_run
    steps = [(int(step), int(total), seconds(elapsed), seconds(eta))
             for step, total, elapsed, eta in STEP_LINE.findall(first.stderr)]
    assert [(step, total) for step, total, _, _ in steps] == [(1, 4), (2, 4), (3, 4), (4, 4)], first.stderr
    elapsed = [e for _, _, e, _ in steps]
    assert elapsed == sorted(elapsed) and steps[-1][3] == 0  # time goes on; nothing left at the end
    assert [int(s) for s, *_ in STEP_LINE.findall(second.stderr)] == [5, 6]
    assert re.search(rf"^{TIME} INFO pretrain: 4/4 step in \d\d:\d\d \(", first.stderr, re.M)
    for done in (first, second):
        assert "\r" not in done.stdout + done.stderr  # not a terminal: plain lines only
        # stdout holds the result only: the summary, no log lines
        assert "=== ssl-foundry pretraining finished ===" in done.stdout and " INFO " not in done.stdout


def test_train_log_holds_both_runs_and_is_in_the_mlflow_run(resumed_run):
    out, first, second = resumed_run
    log = (out / "train.log").read_text()
    ours = [line for line in (first.stderr + second.stderr).splitlines() if re.match(TIME, line)]  # not MLflow's
    assert log.splitlines() == ours  # rank 0's lines of both processes, in order, nothing else
    assert "\r" not in log
    resumed = log.index("INFO resumed at step 4 from ")
    assert log.index("INFO step 4/4 ") < resumed < log.index("INFO step 5/6 ")
    result = json.loads((out / "result.json").read_text())
    run_id, client = result["run_id"], MlflowClient(tracking_uri=result["tracking_uri"])
    logged = Path(client.download_artifacts(run_id, "train.log", str(out.parent))).read_text()
    assert logged == log  # uploaded at the very end of the resumed run


def _eval(kind: str, resumed_run, tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`foundry eval KIND` of the pretrained backbone, a plain line for every update of a bar."""
    out, _, _ = resumed_run
    done = run_cli(["eval", kind, str(out.parent / "run.yaml"), "--backbone", str(out / "backbone"), "--no-log",
                    f"output_dir={tmp_path}", *overrides], tmp_path, FOUNDRY_PROGRESS_EVERY_S="0",
                   OMP_NUM_THREADS="1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "\r" not in done.stdout + done.stderr
    json.loads(done.stdout)  # stdout is the result alone
    return done


def test_eval_knn_shows_feature_extraction(resumed_run, fmnist, tmp_path):
    err = _eval("knn", resumed_run, tmp_path).stderr
    for split in ("train", "test"):  # 128 images in batches of 64: a line at 0, 64 and 128, then the total
        what = f"features of {fmnist / split}"
        assert re.search(rf"^{TIME} INFO {what}: 64/128 img \(50%\), elapsed \d\d:\d\d, eta \d\d:\d\d, ", err, re.M)
        assert re.search(rf"^{TIME} INFO {what}: 128/128 img in \d\d:\d\d \(", err, re.M), err


def test_eval_linear_shows_the_probe(resumed_run, tmp_path):
    err = _eval("linear", resumed_run, tmp_path, "eval.linear.epochs=2", "eval.linear.lrs=[0.01,0.1]").stderr
    assert "INFO features of " in err  # a fresh output_dir: nothing cached
    assert re.search(rf"^{TIME} INFO linear probe: 3/6 epoch \(50%\), elapsed \d\d:\d\d, eta \d\d:\d\d, .*lr=",
                     err, re.M)
    assert re.search(rf"^{TIME} INFO linear probe: 6/6 epoch in \d\d:\d\d ", err, re.M), err


def test_eval_finetune_shows_steps_and_the_test_pass(resumed_run, fmnist, tmp_path):
    err = _eval("finetune", resumed_run, tmp_path, "eval.finetune.steps=4", "eval.finetune.batch_size=16",
                "eval.finetune.log_every=2", "eval.finetune.warmup_steps=1").stderr
    assert re.search(rf"^{TIME} INFO fine-tune: 2/4 step \(50%\), elapsed \d\d:\d\d, eta \d\d:\d\d, .*loss=", err, re.M)
    assert re.search(rf"^{TIME} INFO fine-tune: 4/4 step in ", err, re.M), err
    assert re.search(rf"^{TIME} INFO top-1 on {fmnist / 'test'}: 128/128 img in ", err, re.M), err


def test_prep_shows_checking_and_shard_writing(tmp_path):
    from test_data_prep import fashion_mnist_head, save_image

    images, labels = fashion_mnist_head("train", 12)
    for i, pixels in enumerate(images):
        save_image(tmp_path / "src" / f"class{labels[i] % 2}" / f"{i:02d}.png", pixels, "PNG")
    done = run_cli(["prep", "images", str(tmp_path / "src"), str(tmp_path / "shards"), "--shard-size", "6",
                    "--workers", "1"], tmp_path, FOUNDRY_PROGRESS_EVERY_S="0")
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(rf"^{TIME} INFO check images: 12/12 file in \d\d:\d\d \(", done.stderr, re.M), done.stderr
    assert re.search(rf"^{TIME} INFO write shards: 6/12 sample \(50%\), elapsed \d\d:\d\d, eta \d\d:\d\d, ",
                     done.stderr, re.M), done.stderr
    assert re.search(rf"^{TIME} INFO write shards: 12/12 sample in ", done.stderr, re.M), done.stderr
    assert "\r" not in done.stdout + done.stderr
    assert done.stdout.startswith(f"{tmp_path / 'shards'}: 12 samples in 2 shards") and " INFO " not in done.stdout


def _console(script: str, terminal: bool = False, **env: str) -> str:
    """What ``script`` (Python, run here with this checkout) writes to stdout and stderr: through
    pipes, or a terminal of 100 x 24."""
    command = [sys.executable, "-c", script]
    env = {**os.environ, **env}
    if not terminal:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
        return done.stdout + done.stderr
    controller, terminal_fd = pty.openpty()
    fcntl.ioctl(terminal_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen(command, stdin=terminal_fd, stdout=terminal_fd, stderr=terminal_fd, env=env)
    os.close(terminal_fd)
    output = b""
    while chunk := _read(controller):
        output += chunk
    proc.wait(timeout=120)
    os.close(controller)
    return output.decode()


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, 4096)
    except OSError:  # the terminal's other side closed: the script ended
        return b""


BAR_SCRIPT = """
import logging, time
from ssl_foundry.data_prep.console import Progress, setup_logging
setup_logging()
log = logging.getLogger("ssl_foundry.demo")
log.info("an info line")
log.warning("a warning")
for i in Progress(range(8), desc="work", unit="item"):
    time.sleep(0.15)
    if i == 5:
        log.info("a line while the bar is live")
"""


def test_a_terminal_gets_a_live_bar_that_log_lines_scroll_above():
    out = _console(BAR_SCRIPT, terminal=True)
    assert re.search(r"\rwork:\s+\d+%\|.*\| \d/8 \[", out), out  # tqdm's bar, redrawn in place
    assert re.search(rf"(^|\r|\n){TIME} INFO a line while the bar is live\r\n", out), out  # a whole line
    assert re.search(rf"{TIME} INFO work: 8/8 item in 00:0\d \(", out), out


def test_ranks_other_than_0_show_only_warnings_prefixed_by_rank():
    rank1 = _console(BAR_SCRIPT, RANK="1", WORLD_SIZE="2")
    assert re.fullmatch(rf"{TIME} rank 1 WARNING a warning\n", rank1), rank1
    rank0 = _console(BAR_SCRIPT, RANK="0", WORLD_SIZE="2")
    assert re.search(rf"^{TIME} rank 0 INFO an info line$", rank0, re.M)
    assert re.search(rf"^{TIME} rank 0 INFO work: 8/8 item in ", rank0, re.M), rank0
    alone = _console(BAR_SCRIPT, FOUNDRY_PROGRESS_EVERY_S="0.5")
    assert re.search(rf"^{TIME} INFO work: [1-7]/8 item \(\d+%\), elapsed 00:0\d, eta 00:0\d, ", alone, re.M), alone
    assert "\r" not in alone and " rank " not in alone


def test_setup_a_second_time_says_ready_in_one_line(tmp_path):
    """`make setup` on a set-up checkout (the Debian packages are there: `make test` installed them):
    one line. ``VENV`` is a stand-in whose install stamp is newer than the requirements."""
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / ".installed").touch()
    done = subprocess.run(["bash", "scripts/setup.sh"], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=subprocess_env(tmp_path, VENV=str(venv)))
    assert done.returncode == 0, done.stderr
    assert done.stdout == (f"setup: {venv} ready (up to date with requirements.txt; delete {venv}/.installed to "
                           f"reinstall)\n")
    assert done.stderr == ""

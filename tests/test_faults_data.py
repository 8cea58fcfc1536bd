"""Data faults injected into real runs (issue 16; docs/faults-data.md). Per fault: the message, the exit
status, a bound on the time (a generous subprocess or pytest timeout, not a speed limit), and that
nothing was lost (the last checkpoint loads; where it applies, the resumed run gives the
uninterrupted run's losses and weights).

- A rank's loader worker killed (kill -9) or stopped (SIGSTOP) in a 2-rank torchrun run, a read that
  hangs in the rank itself: the run ends, naming the rank and the cause.
- Shards that differ from their manifest (missing, cut short, changed: data.verify) and a shard cut
  cleanly between samples read with data.verify=none.
- A sample that does not decode (data.on_bad_sample) and a tar member of 2 GiB (data.max_sample_bytes).
- `foundry prep` killed: its workers die with it, the rerun takes its lock over; a live holder is named;
  symlinks leaving SRC are skipped unless --follow-symlinks.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import psutil
import pytest
from mlflow import MlflowClient

from conftest import REPO, run_cli, subprocess_env, tiny_recipe
from ssl_foundry.data_prep.images import prep_images
from ssl_foundry.data_prep.shard_format import (PrepError, ShardError, read_manifest, read_samples, shard_samples,
                                                verify_shards)
from ssl_foundry.data_prep.shards import LOCK_NAME
from ssl_foundry.pipeline.config import DataConfig, build
from ssl_foundry.pipeline.data.augment.torch_backend import MultiViewTransform
from ssl_foundry.pipeline.data.errors import LoaderStalledError
from ssl_foundry.pipeline.data.loader import ShardStream, make_loader
from ssl_foundry.pipeline.registry.tracking import resolve_tracking_uri
from ssl_foundry.pipeline.train.checkpoint import checkpoint_path, latest_checkpoint, load_checkpoint
from ssl_foundry.pipeline.train.trainer import train
from test_data_prep import fashion_mnist_head, save_image
from test_resume import SimulatedCrash, assert_state_equal, crash_after_checkpoint, loss_history

EPOCH_STEPS = 16  # the tiny recipe: 128 images, batches of 8
HANG_GUARD_S = 300  # a hung run fails the test after this long (runs take well under a minute)


# ----------------------------------------------------------------------------- shard surgery


def copy_shards(fmnist: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "train"
    shutil.copytree(fmnist / "train", folder)
    return folder


def update_record(folder: Path, name: str, **fields) -> None:
    """Sets fields of one shard's manifest entry (what a prep that wrote the shard so would record)."""
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    next(r for r in manifest["shards"] if r["name"] == name).update(fields)
    path.write_text(json.dumps(manifest))


def cut_between_samples(shard: Path, keep: int) -> None:
    """Truncates a shard right after the data of its ``keep``-th sample (a clean cut: whole members)."""
    _, members = read_samples(shard)[keep - 1]
    _, offset, size, _ = members[-1]
    os.truncate(shard, offset + -(-size // 512) * 512)


def corrupt_image(shard: Path, key: str) -> None:
    """Overwrites the image of sample ``key`` with zeros (same size: data.verify=size passes)."""
    members = dict(read_samples(shard))[key]
    _, offset, size, _ = next(m for m in members if m[0] == "png")
    with open(shard, "r+b") as f:
        f.seek(offset)
        f.write(bytes(size))


def tiny_stream(folder: Path, **kwargs) -> ShardStream:
    """The training stream of the tiny recipe in one process (seed 0, batches of 8, its shuffle buffer)."""
    data = build(DataConfig, tiny_recipe(folder.parent, folder.parent)["data"])
    return ShardStream(str(folder), MultiViewTransform(data.views, data.mean, data.std), 8,
                       shuffle_buffer=data.shuffle_buffer, **kwargs)


def first_batch_sample(folder: Path) -> tuple[str, Path]:
    """Key and shard of a sample in the first batch of the tiny recipe's one-process run: a fault
    there is met at step 1."""
    key = next(iter(make_loader(tiny_stream(folder))))["key"][3]
    return key, next(path for path in sorted(folder.glob("*.tar")) if key in dict(read_samples(path)))


def shards_in_read_order(folder: Path) -> list[Path]:
    """Epoch 0's shards in the order the tiny recipe's one-process run reads them."""
    return [Path(path) for path, _ in tiny_stream(folder).reader_shards(0)[0]]


# ----------------------------------------------------------------------------- 2-rank runs (torchrun)

TWO_RANKS = ["data.num_workers=1", f"train.max_steps={EPOCH_STEPS}", "train.checkpoint_every=1"]


def start_torchrun(recipe: Path, tmp_path: Path, *overrides: str) -> subprocess.Popen:
    """2 ranks of `foundry pretrain` under torchrun (its own session: killed whole on a test failure)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "ssl_foundry.launch", "pretrain", str(recipe), *TWO_RANKS, *overrides]
    return subprocess.Popen(command, cwd=tmp_path, env=subprocess_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(run: subprocess.Popen, head: str = "") -> tuple[int, str]:
    """Exit status and output of a run; whatever is left of its session is killed."""
    try:
        rest, _ = run.communicate(timeout=HANG_GUARD_S)
    finally:
        try:
            os.killpg(run.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return run.returncode, head + rest


def loader_worker(run: subprocess.Popen, rank: int) -> psutil.Process:
    """The DataLoader worker of ``rank``: torchrun puts RANK in the environment of the rank, which its
    workers inherit; torch names them pt_data_worker."""
    for proc in psutil.Process(run.pid).children(recursive=True):
        try:
            if proc.name() == "pt_data_worker" and proc.environ().get("RANK") == str(rank):
                return proc
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no loader worker of rank {rank} under {run.pid}")


def run_until_step(run: subprocess.Popen, step: int) -> str:
    """The run's output up to rank 0's log line of ``step``."""
    head = ""
    for line in run.stdout:
        head += line
        if f" INFO step {step}/" in line:
            return head
    raise AssertionError(f"the run ended before step {step}:\n{head[-5000:]}")


@pytest.fixture(scope="module")
def straight_two_ranks(tiny_config, tmp_path_factory) -> Path:
    """The uninterrupted 2-rank run the faulted ones are compared with."""
    root = tmp_path_factory.mktemp("straight_two_ranks")
    tiny_config(root / "run")
    code, out = finish(start_torchrun(root / "run.yaml", root))
    assert code == 0, out[-5000:]
    return root / "run"


def assert_same_run(resumed: Path, straight: Path) -> None:
    """The resumed run's final weights, and every loss it logged, are the straight run's (bitwise)."""
    a = load_checkpoint(checkpoint_path(straight / "checkpoints", EPOCH_STEPS))
    b = load_checkpoint(checkpoint_path(resumed / "checkpoints", EPOCH_STEPS))
    assert_state_equal(a["model"], b["model"], "model")
    expected = dict(loss_history(json.loads((straight / "result.json").read_text())["tracking_uri"], a["mlflow_run_id"]))
    logged = loss_history(json.loads((resumed / "result.json").read_text())["tracking_uri"], b["mlflow_run_id"])
    # Steps logged between the last checkpoint and the fault are logged again by the resumed run.
    assert {step for step, _ in logged} == set(expected)
    assert all(value == expected[step] for step, value in logged)


@pytest.mark.slow
def test_killed_loader_worker_ends_both_ranks_naming_it(tiny_config, straight_two_ranks, tmp_path):
    """kill -9 of rank 1's loader worker: both ranks end (before: both hung in a collective until the
    10-minute process-group timeout), naming the rank, the worker's PID and its signal; the rerun
    resumes from the last checkpoint to the uninterrupted run's weights and losses."""
    out = tmp_path / "run"
    tiny_config(out)
    run = start_torchrun(tmp_path / "run.yaml", tmp_path)
    head = run_until_step(run, 2)
    victim = loader_worker(run, rank=1)
    victim.kill()
    code, output = finish(run, head)
    assert code == 1, output[-5000:]
    assert f"DataLoader worker (pid {victim.pid}) is killed by signal: Killed" in output
    assert "(rank 1 of 2, pid" in output

    assert load_checkpoint(latest_checkpoint(out / "checkpoints"))["step"] >= 1
    code, output = finish(start_torchrun(tmp_path / "run.yaml", tmp_path))
    assert code == 0 and "INFO resumed at step " in output, output[-5000:]
    assert_same_run(out, straight_two_ranks)


@pytest.mark.slow
def test_stalled_loader_worker_ends_both_ranks_after_data_timeout(tiny_config, tmp_path):
    """SIGSTOP of rank 1's loader worker (a worker stuck forever): rank 1 stops waiting after
    data.timeout_s, naming itself, and the run ends; the checkpoints written before it load."""
    out = tmp_path / "run"
    tiny_config(out)
    run = start_torchrun(tmp_path / "run.yaml", tmp_path, "data.timeout_s=30")
    head = run_until_step(run, 2)
    loader_worker(run, rank=1).suspend()
    code, output = finish(run, head)
    assert code == 1, output[-5000:]
    assert "rank 1: the training loader (batched, data.num_workers=1): no batch in data.timeout_s=30 s" in output
    assert load_checkpoint(latest_checkpoint(out / "checkpoints"))["step"] >= 2


def test_hung_read_in_the_rank_ends_at_data_timeout(tiny_config, fmnist, tmp_path):
    """A shard that never delivers a byte (a FIFO: like a hung network file system) read by the rank
    itself (data.num_workers=0): the wait is interrupted after data.timeout_s, naming the rank, and the
    run is marked FAILED."""
    folder = copy_shards(fmnist, tmp_path)
    fifo = shards_in_read_order(folder)[4]
    fifo.unlink()
    os.mkfifo(fifo)
    cfg = tiny_config(tmp_path / "run", f"data.train={folder}", "data.verify=none", "data.timeout_s=5",
                      f"train.max_steps={EPOCH_STEPS}")
    with pytest.raises(LoaderStalledError, match=r"rank 0: the training loader \(batched, pid \d+\): no batch in "
                                                 r"data.timeout_s=5 s"):
        train(cfg)
    state = load_checkpoint(latest_checkpoint(tmp_path / "run" / "checkpoints"))
    client = MlflowClient(tracking_uri=resolve_tracking_uri(cfg.mlflow.tracking_uri))
    assert client.get_run(state["mlflow_run_id"]).info.status == "FAILED"


# ----------------------------------------------------------------------------- shards vs manifest


def test_short_shard_is_refused_before_training(fmnist, tiny_config, tmp_path):
    """`foundry pretrain` on a shard folder whose shard 3 lost its second half: nothing trains, the
    error names the shard, its size, the manifest's and the fix."""
    folder = copy_shards(fmnist, tmp_path)
    shard = folder / "shard-000003.tar"
    recorded = shard.stat().st_size
    cut_between_samples(shard, 8)
    tiny_config(tmp_path / "run")
    done = run_cli(["pretrain", str(tmp_path / "run.yaml"), f"data.train={folder}"], tmp_path, timeout=HANG_GUARD_S)
    assert done.returncode == 1
    assert (f"shard {shard} is {shard.stat().st_size} bytes, manifest.json records {recorded}: it was cut short "
            f"or replaced after prep; restore it, or rerun the `foundry prep` command that wrote {folder}"
            in done.stderr)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("fault,verify,message", [
    ("missing", "size", r"shard-000003.tar is missing \(manifest.json lists it\): restore it"),
    ("changed", "sha256", r"shard-000003.tar does not have the sha256 manifest.json records: its bytes changed"),
])
def test_missing_or_changed_shard_is_refused_before_training(fmnist, tiny_config, tmp_path, fault, verify, message):
    folder = copy_shards(fmnist, tmp_path)
    shard = folder / "shard-000003.tar"
    if fault == "missing":
        shard.unlink()
    else:
        corrupt_image(shard, read_samples(shard)[5][0])
    with pytest.raises(ShardError, match=message):
        train(tiny_config(tmp_path / "run", f"data.train={folder}", f"data.verify={verify}"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_ranks_share_the_sha256_check(fmnist, tmp_path):
    """data.verify=sha256 on 2 ranks: each hashes every other shard; the one that hashes the changed
    shard refuses it."""
    folder = copy_shards(fmnist, tmp_path)
    corrupt_image(folder / "shard-000003.tar", read_samples(folder / "shard-000003.tar")[0][0])
    verify_shards(folder, "size")
    verify_shards(folder, "sha256", part=(0, 2))  # shards 0, 2, 4, 6
    with pytest.raises(ShardError, match="shard-000003.tar does not have the sha256"):
        verify_shards(folder, "sha256", part=(1, 2))


def test_shard_cut_between_samples_is_named_mid_run_and_resume_is_exact(fmnist, tiny_config, tmp_path):
    """data.verify=none and the 4th shard read cut cleanly after 8 of its 16 samples: the run stops when
    the reader reaches the cut (shards stream front to back: the count is known at its end), after step 3
    (before: `generator raised StopIteration`, no shard named); with the shard restored, the rerun resumes
    to the uninterrupted run's losses and weights."""
    steps = 5
    overrides = [f"train.max_steps={steps}", "train.checkpoint_every=1"]
    straight = train(tiny_config(tmp_path / "straight", *overrides))

    folder = copy_shards(fmnist, tmp_path)
    cut = shards_in_read_order(folder)[3]
    cut_between_samples(cut, 8)
    cfg = tiny_config(tmp_path / "run", f"data.train={folder}", "data.verify=none", *overrides)
    with pytest.raises(ShardError, match=f"shard {cut} holds 8 samples, its manifest 16: it was cut short"):
        train(cfg)
    assert load_checkpoint(latest_checkpoint(tmp_path / "run" / "checkpoints"))["step"] == 3

    shutil.copyfile(fmnist / "train" / cut.name, cut)
    resumed = train(cfg)
    assert resumed.steps == steps
    assert loss_history(resumed.tracking_uri, resumed.run_id) == loss_history(straight.tracking_uri, straight.run_id)
    assert_state_equal(load_checkpoint(checkpoint_path(tmp_path / "straight" / "checkpoints", steps))["model"],
                       load_checkpoint(checkpoint_path(tmp_path / "run" / "checkpoints", steps))["model"], "model")


@pytest.mark.parametrize("cut", ["inside the last member", "inside a header"])
def test_shard_cut_anywhere_is_named(fmnist, tmp_path, cut):
    shard = copy_shards(fmnist, tmp_path) / "shard-000001.tar"
    _, members = read_samples(shard)[-1]
    _, offset, size, _ = members[-1]
    os.truncate(shard, offset + size // 2 if cut == "inside the last member" else 100)
    with pytest.raises(ShardError, match=f"shard {shard} does not read as a tar .*: it was cut short or damaged"):
        list(shard_samples(str(shard), 16, DataConfig.max_sample_bytes))


# ----------------------------------------------------------------------------- bad samples


def test_undecodable_sample_names_shard_and_key(fmnist, tiny_config, tmp_path):
    folder = copy_shards(fmnist, tmp_path)
    key, shard = first_batch_sample(folder)
    corrupt_image(shard, key)
    tiny_config(tmp_path / "run")
    done = run_cli(["pretrain", str(tmp_path / "run.yaml"), f"data.train={folder}"], tmp_path, timeout=HANG_GUARD_S)
    assert done.returncode == 1
    assert (f"BadSampleError: sample {key} of shard {shard}: UnidentifiedImageError: cannot identify image file"
            in done.stderr)
    assert "Remove it from the source and re-prep, or set data.on_bad_sample=skip" in done.stderr


def test_skipped_samples_are_counted_logged_and_resume_stays_exact(fmnist, tiny_config, tmp_path, monkeypatch,
                                                                  capfd):
    """data.on_bad_sample=skip with a bad sample in the first batch: printed with shard and key, counted
    (1) and logged to MLflow at the end of the (here partial) epoch; a crash after step 2 and a resume
    give the uninterrupted run's losses and count."""
    folder = copy_shards(fmnist, tmp_path)
    key, shard = first_batch_sample(folder)
    corrupt_image(shard, key)
    steps = 4
    overrides = [f"data.train={folder}", "data.on_bad_sample=skip", f"train.max_steps={steps}",
                 "train.checkpoint_every=1"]
    straight = train(tiny_config(tmp_path / "straight", *overrides))
    assert f"WARNING skipped sample {key} of shard {shard}: UnidentifiedImageError" in capfd.readouterr().err

    resumed_cfg = tiny_config(tmp_path / "resumed", *overrides)
    with monkeypatch.context() as patch:
        crash_after_checkpoint(patch, 2)
        with pytest.raises(SimulatedCrash):
            train(resumed_cfg)
    resumed = train(resumed_cfg)
    for result in (straight, resumed):
        history = MlflowClient(tracking_uri=result.tracking_uri).get_metric_history(result.run_id, "skipped_samples")
        assert [(m.step, m.value) for m in history] == [(steps, 1.0)]
    assert loss_history(resumed.tracking_uri, resumed.run_id) == loss_history(straight.tracking_uri, straight.run_id)


def test_skip_keeps_every_other_sample_exactly_once(fmnist, tmp_path):
    """One epoch of a skipping stream: the bad sample never appears, every other sample once, and the
    bad sample's slot repeats another sample of its own batch (batches keep their size)."""
    folder = copy_shards(fmnist, tmp_path)
    bad = read_samples(folder / "shard-000006.tar")[9][0]
    corrupt_image(folder / "shard-000006.tar", bad)
    batches = list(itertools.islice(make_loader(tiny_stream(folder, on_bad_sample="skip")), EPOCH_STEPS))
    keys = [k for b in batches for k in b["key"]]
    everything = {key for path in sorted(folder.glob("*.tar")) for key, _ in read_samples(path)}
    assert len(keys) == len(everything) and set(keys) == everything - {bad}
    [hit] = [b for b in batches if b["skipped"]]
    assert hit["skipped"][0].startswith(f"sample {bad} of shard {folder / 'shard-000006.tar'}")
    assert len(hit["key"]) == 8 and len(set(hit["key"])) == 7


# ----------------------------------------------------------------------------- oversized members


def write_tar_with_sparse_member(shard: Path, big_key: str, big_size: int) -> None:
    """Rewrites the shard with ``big_key``'s image replaced by ``big_size`` bytes of zeros, stored as a
    hole (no disk used); the samples keep their order."""
    def read(f, offset: int, size: int) -> bytes:
        f.seek(offset)
        return f.read(size)

    with open(shard, "rb") as f:
        contents = [(key, [(name, read(f, offset, size)) for _, offset, size, name in members])
                    for key, members in read_samples(shard)]
    with open(shard, "wb") as f:
        for key, members in contents:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = big_size if key == big_key and name.endswith(".png") else len(data)
                f.write(info.tobuf(tarfile.GNU_FORMAT))
                if info.size == len(data):
                    f.write(data + bytes(-len(data) % 512))
                else:
                    f.seek(info.size + -info.size % 512, os.SEEK_CUR)
        f.write(bytes(1024))  # end of archive


def test_oversized_member_is_refused_unread(fmnist, tiny_config, tmp_path):
    """A 2 GiB image in a shard (before: read whole, 4.8 GB peak, then an image error without the shard):
    refused by size, naming shard, key and size; the run's peak memory stays below 2 GiB."""
    folder = copy_shards(fmnist, tmp_path)
    key, shard = first_batch_sample(folder)
    write_tar_with_sparse_member(shard, key, 2**31)
    # The run verifies sizes (data.verify=size); hashing the 2 GiB would only cost time.
    update_record(folder, shard.name, bytes=shard.stat().st_size, sha256=None)
    tiny_config(tmp_path / "run")
    # The child's own peak (VmHWM of its address space), printed at exit. Not wait4's ru_maxrss: the kernel
    # carries the forking process's RSS across exec into it, and pytest late in a full run holds over 2 GiB.
    report_peak = ("import atexit, re, runpy, sys; atexit.register(lambda: print('peak_kib', re.search("
                   "r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1], file=sys.stderr)); "
                   "sys.argv[0] = 'foundry'; runpy.run_module('ssl_foundry.launch', run_name='__main__')")
    run = subprocess.run([sys.executable, "-c", report_peak, "pretrain", str(tmp_path / "run.yaml"),
                          f"data.train={folder}"], cwd=REPO, env=subprocess_env(tmp_path),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert run.returncode == 1, run.stderr[-5000:]
    assert (f"sample {key} of shard {shard}: BadSampleError: member {key}.png is {2**31} bytes, over "
            f"data.max_sample_bytes={DataConfig.max_sample_bytes} (not read)") in run.stderr
    peak_kib = int(re.search(r"^peak_kib (\d+)$", run.stderr, re.MULTILINE)[1])
    assert peak_kib < 2**31 // 1024  # the member read would alone hold 2 GiB


# ----------------------------------------------------------------------------- foundry prep


def image_folder(root: Path, count: int) -> Path:
    """``count`` Fashion-MNIST PNGs in 10 class folders."""
    images, labels = fashion_mnist_head("train", count)
    for i, pixels in enumerate(images):
        save_image(root / f"class{labels[i]}" / f"{i:05d}.png", pixels, "PNG")
    return root


def wait_dead(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Those of ``procs`` still alive after ``timeout`` s (zombies count as dead: PID 1 may reap late)."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for p in procs:
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def writing_shards(out: Path, pid: int) -> bool:
    """Whether the prep ``pid`` holds the lock of ``out`` and has written a shard."""
    if not (out / "manifest.json").is_file() or f"pid {pid}," not in (out / LOCK_NAME).read_text():
        return False
    return any(s["complete"] for s in read_manifest(out, allow_incomplete=True)["shards"])


def test_killed_prep_takes_its_workers_along_and_the_rerun_takes_over_its_lock(tmp_path):
    """kill -9 of `foundry prep images` while its 2 workers write shards (before: they survived,
    re-parented to PID 1, and the rerun was refused until they were killed by hand): the workers die
    with it, the rerun says it takes over the dead prep's lock and finishes every shard."""
    src, out = image_folder(tmp_path / "src", 3000), tmp_path / "shards"
    prep = ["prep", "images", str(src), str(out), "--shard-size", "10", "--workers", "2"]
    run = subprocess.Popen([sys.executable, "-m", "ssl_foundry.launch", *prep], cwd=REPO, env=subprocess_env(tmp_path),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + HANG_GUARD_S
        while not writing_shards(out, run.pid):
            assert run.poll() is None and time.monotonic() < deadline, "the prep ended before it could be killed"
            time.sleep(0.05)
        workers = psutil.Process(run.pid).children()
        assert len(workers) >= 2
        run.kill()
        run.wait()
    finally:
        run.kill()
    assert not wait_dead(workers, timeout=30)

    done = run_cli(prep, tmp_path, timeout=HANG_GUARD_S)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (f"taking over the lock of a foundry prep that is no longer running (host {socket.gethostname()}, "
            f"pid {run.pid}, started") in done.stderr
    assert int(re.search(r"(\d+) already complete", done.stdout).group(1)) > 0
    verify_shards(out, "sha256")
    assert read_manifest(out)["num_samples"] == 3000 and (out / LOCK_NAME).read_text() == ""


HOLD_LOCK = """
import sys, time
from pathlib import Path
from ssl_foundry.data_prep.shards import _exclusive_lock
with _exclusive_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_a_running_prep_is_named_by_the_one_it_refuses(tmp_path, capfd):
    src, out = image_folder(tmp_path / "src", 20), tmp_path / "shards"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], cwd=REPO, env=subprocess_env(tmp_path),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(PrepError, match=f"another foundry prep is writing into {out} \\(host "
                                            f"{socket.gethostname()}, pid {holder.pid}, started .*\\): wait"):
            prep_images(src, out, workers=1)
    finally:
        holder.kill()
        holder.wait()
    prep_images(src, out, workers=1)
    assert f"pid {holder.pid}" in capfd.readouterr().err  # its lock, taken over


def test_symlinks_leaving_src_are_skipped_and_listed(tmp_path):
    src, outside = image_folder(tmp_path / "src", 6), image_folder(tmp_path / "elsewhere", 4)
    (src / "class0" / "linked").symlink_to(outside / "class9", target_is_directory=True)
    (src / "class0" / "single.png").symlink_to(outside / "class0" / "00001.png")
    (src / "class0" / "inside.png").symlink_to(src / "class2" / "00005.png")  # stays inside SRC: taken
    summary = prep_images(src, tmp_path / "shards", workers=1)
    skipped = {s["path"]: s for s in read_manifest(tmp_path / "shards")["skipped"]}
    assert set(skipped) == {"class0/linked", "class0/single.png"}
    assert skipped["class0/linked"]["reason"] == "outside-src"
    assert skipped["class0/linked"]["detail"] == (f"symbolic link to {outside / 'class9'}, outside SRC "
                                                  f"(--follow-symlinks takes it)")
    assert summary["samples"] == 7 and summary["skipped_reasons"] == {"outside-src": 2}

    done = run_cli(["prep", "images", str(src), str(tmp_path / "followed"), "--workers", "1", "--follow-symlinks"],
                   tmp_path, timeout=HANG_GUARD_S)
    assert done.returncode == 0, done.stderr
    followed = read_manifest(tmp_path / "followed")
    assert followed["num_samples"] == 7 + 1 + len(list((outside / "class9").iterdir())) and not followed["skipped"]


def test_data_fault_keys_are_validated(tiny_config, tmp_path):
    from ssl_foundry.pipeline.config import ConfigError

    for override, key in [("data.verify=md5", "data.verify"), ("data.on_bad_sample=ignore", "data.on_bad_sample"),
                          ("data.timeout_s=0", "data.timeout_s"), ("data.max_sample_bytes=0", "data.max_sample_bytes"),
                          ("data.retries=-1", "data.retries")]:
        with pytest.raises(ConfigError, match=key):
            tiny_config(tmp_path / "run", override)

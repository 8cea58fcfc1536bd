"""Shards where large datasets live (issue 19; docs/data.md): in S3 (moto's S3 server) and behind HTTP
(a static server with Range support), both real servers on 127.0.0.1, read through fsspec.

- The same stream from every location: the torch loader over http(s):// and s3:// (keys and bitwise
  views), DALI's CPU backend over s3://, a 2-rank `foundry pretrain` from s3:// (after `foundry prep`
  uploaded the shards there) with the local run's losses and weights, also when killed and resumed.
- Faults through a proxy (404, 403, a connection reset mid-shard, a stalled server): retried from the
  sample the read broke off in (no sample twice, none lost), then an error naming the URL.
- `foundry prep manifest` on shards written by webdataset's ShardWriter, in S3 and behind HTTP (into a
  local folder), then trained on; a shard list without a manifest trains resampled.
- A killed `foundry prep` into s3:// resumes; no credential appears in a run's MLflow records or logs.
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from mlflow import MlflowClient

from conftest import FMNIST_LIMIT, FMNIST_SHARD_SIZE, REPO, run_cli, tiny_recipe
from store_servers import AWS_KEY_ID, AWS_SECRET, FaultProxy, http_root, make_bucket, s3_endpoint  # noqa: F401
from ssl_foundry.data_prep import shard_format
from ssl_foundry.data_prep.existing_shards import describe_shards
from ssl_foundry.data_prep.images import prep_images
from ssl_foundry.data_prep.shard_format import (RetryPolicy, StoreError, read_manifest, read_samples, shard_samples,
                                                verify_shards)
from ssl_foundry.pipeline.config import ConfigError, DataConfig, build
from ssl_foundry.pipeline.data.augment.torch_backend import MultiViewTransform
from ssl_foundry.pipeline.data.loader import ShardStream, make_loader, train_backend
from ssl_foundry.pipeline.data.position import LoaderPosition
from ssl_foundry.pipeline.registry.tracking import default_artifact_location
from ssl_foundry.pipeline.train.trainer import train
from test_data_prep import KILLED_PREP, class_folder  # noqa: F401  (fixture)
from test_faults_data import assert_same_run, finish, run_until_step, start_torchrun

FAST = RetryPolicy(retries=2, timeout_s=6.0)  # requests wait 0.67 s, pauses of 0.5 s: a fault ends in < 6 s


def tiny_data(fmnist: Path) -> DataConfig:
    return build(DataConfig, tiny_recipe(fmnist, fmnist)["data"])


def stream(location, fmnist: Path, **kwargs) -> ShardStream:
    """The tiny recipe's training stream (seed 7, batches of 8) over ``location``."""
    data = tiny_data(fmnist)
    return ShardStream(str(location), MultiViewTransform(data.views, data.mean, data.std), 8, seed=7,
                       shuffle_buffer=data.shuffle_buffer, **kwargs)


def take(s: ShardStream, n: int) -> list[dict]:
    return list(itertools.islice(make_loader(s), n))


def assert_same_batches(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g["epoch"], g["batch"], g["key"]) == (w["epoch"], w["batch"], w["key"])
        assert torch.equal(g["label"], w["label"])
        assert all(torch.equal(a, b) for a, b in zip(g["views"], w["views"], strict=True))


def local_samples(shard: Path) -> list[dict]:
    return list(shard_samples(str(shard), None, DataConfig.max_sample_bytes))


def assert_same_samples(got: list[dict], want: list[dict]) -> None:
    """The same samples in the same order, byte for byte (their URLs aside)."""
    strip = [{k: v for k, v in s.items() if k != "__url__"} for s in got]
    assert strip == [{k: v for k, v in s.items() if k != "__url__"} for s in want]


@pytest.fixture(scope="module")
def served(fmnist, http_root):
    """The tiny Fashion-MNIST shards (train and test) behind the HTTP server: its URL."""
    root, url = http_root
    shutil.copytree(fmnist, root / "fmnist")
    return f"{url}/fmnist"


@pytest.fixture(scope="module")
def proxy(http_root):
    """A fault-injecting proxy in front of the HTTP server; shards read through it in requests of 4 KiB
    (the test shards are ~25 KiB: a fault can strike after some samples of a shard were read)."""
    p = FaultProxy(http_root[1].removeprefix("http://"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(shard_format, "READ_BLOCK_BYTES", 4096)
        yield p
    p.close()


# ----------------------------------------------------------------------------- the same stream from every store


def test_http_and_brace_list_streams_are_the_local_stream(fmnist, served):
    """2 loader workers over http://: the folder and a brace list of its shards give the local folder's
    batches (keys, labels, bitwise the same views), across an epoch boundary."""
    want = take(stream(fmnist / "train", fmnist, num_workers=2), 18)
    assert_same_batches(take(stream(f"{served}/train", fmnist, num_workers=2), 18), want)
    listed = f"{served}/train/shard-{{000000..000007}}.tar"
    assert_same_batches(take(stream(listed, fmnist, num_workers=2), 18), want)
    verify_shards(listed, "sha256")


def test_dali_reads_s3_shards_bitwise_as_local_ones_and_refuses_http(fmnist, served, s3_endpoint):
    """DALI's CPU backend reads s3:// itself (DALI 2.4): the same batches as from the local folder.
    data.backend=dali over http(s):// is a config error pointing at data.backend=torch."""
    from ssl_foundry.pipeline.data.dali_loader import DaliStream

    fs = make_bucket("dali")
    fs.put(str(fmnist / "train"), "dali/train", recursive=True)
    data = tiny_data(fmnist)

    def batches(location):
        return list(itertools.islice(iter(DaliStream(location, data.views, data.mean, data.std, 8, num_threads=1,
                                                     seed=3, shuffle_buffer=16)), 6))

    assert_same_batches(batches("s3://dali/train"), batches(str(fmnist / "train")))
    assert train_backend("auto", torch.device("cpu"), f"{served}/train") == ("torch", "auto: http(s) shards")
    with pytest.raises(ConfigError, match=r"data.backend=dali cannot read http://.*http\(s\) shards.*use "
                                          r"data.backend=torch"):
        train_backend("dali", torch.device("cpu"), f"{served}/train")


def test_a_location_of_another_scheme_is_a_config_error(tiny_config, tmp_path):
    with pytest.raises(ConfigError, match=r"data.eval_test: 'gs://bucket/x': shards are read from a local folder, "
                                          r"s3:// or http\(s\)://, not gs://"):
        tiny_config(tmp_path / "run", "data.eval_test=gs://bucket/x")


def test_bench_loader_measures_local_http_and_s3_side_by_side(fmnist, served, s3_endpoint, tmp_path):
    """`foundry bench loader --data LOCAL URL S3`: a row per location and backend that reads it (DALI not
    over HTTP), the URLs as given with their credentials cut out (numbers only: no speed is asserted)."""
    make_bucket("bench").put(str(fmnist / "train"), "bench/train", recursive=True)
    secret_url = served.replace("//", "//foundry:bench-url-secret@") + "/train"
    out = tmp_path / "loader.json"
    done = run_cli(["bench", "loader", str(REPO / "configs" / "simclr_resnet18_fmnist.yaml"), "--data",
                    str(fmnist / "train"), secret_url, "s3://bench/train", "--batch-size", "4", "--batches", "2",
                    "--warmup", "1", "--workers", "1", "--no-breakdown", "--out", str(out)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    shown = served.replace("//", "//***@") + "/train"
    assert report["data"] == [str(fmnist / "train"), shown, "s3://bench/train"]
    assert [(r["data"], r["backend"]) for r in report["runs"]] == [
        (str(fmnist / "train"), "dali-cpu"), (str(fmnist / "train"), "torch"), (str(fmnist / "train"), "batched"),
        (shown, "torch"), (shown, "batched"),
        ("s3://bench/train", "dali-cpu"), ("s3://bench/train", "torch"), ("s3://bench/train", "batched")]
    assert all(r["images"] == 8 and r["images_per_s"] > 0 for r in report["runs"])
    assert "bench-url-secret" not in done.stdout + done.stderr + out.read_text()


def test_a_slurm_job_gets_urls_as_given_and_local_paths_absolute(tiny_config, tmp_path, monkeypatch):
    """`foundry submit` makes local data paths absolute for jobs that start elsewhere; URLs stay as given."""
    from ssl_foundry.launch.slurm import _absolute

    cfg = tiny_config(tmp_path / "run", "data.train=s3://bucket/shards",
                      "data.eval_train=https://host/x/shard-{000000..000003}.tar")
    cfg.data.eval_test = "shards/test"
    monkeypatch.chdir(tmp_path)
    job = _absolute(cfg)
    assert (job.data.train, job.data.eval_train, job.data.eval_test) == (
        "s3://bucket/shards", "https://host/x/shard-{000000..000003}.tar", str(tmp_path / "shards" / "test"))


# ----------------------------------------------------------------------------- faults


def sample_starts(shard: Path) -> set[int]:
    """Byte offsets of the first header of every sample of a local shard (one 512-byte header per member)."""
    return {members[0][1] - 512 for _, members in read_samples(shard)}


def test_a_reset_mid_shard_is_retried_from_the_sample_it_broke_off_in(fmnist, served, proxy):
    """The shard is read in requests of one block (plus what a sample needs), never whole. The 4th request
    is cut after 1000 bytes by a TCP reset, after samples of it were read: the read resumes with a request from the first header of the sample it was in (not from the start),
    and the shard's samples arrive each once, none lost, byte for byte."""
    name = "shard-000001.tar"
    proxy.fail(name, None, None, None, ("reset", 1000))  # HEAD, 2 reads, then the reset
    url = f"{proxy.url}/fmnist/train/{name}"
    first = len(proxy.requests)
    got = list(shard_samples(url, FMNIST_SHARD_SIZE, DataConfig.max_sample_bytes, FAST))
    assert_same_samples(got, local_samples(fmnist / "train" / name))
    spans = [tuple(map(int, r.removeprefix("bytes=").split("-"))) for method, _, r in proxy.requests[first:]
             if method == "GET"]
    assert all(end - start < 2 * 4096 for start, end in spans)  # streamed in blocks, never fetched whole
    ranges = [start for start, _ in spans]
    resumed_at = ranges[3]  # the request after the reset one
    assert 0 < resumed_at <= ranges[2] and resumed_at in sample_starts(fmnist / "train" / name)


def test_loader_epochs_across_resets_are_the_local_epochs(fmnist, served, proxy):
    """Resets mid-shard in the reads of 2 loader workers: the batches across an epoch boundary are the
    local folder's, every sample once per epoch."""
    struck = ("shard-000004.tar", "shard-000006.tar")
    for name in struck:
        proxy.fail(name, None, None, None, ("reset", 1000))
    got = take(stream(f"{proxy.url}/fmnist/train", fmnist, num_workers=2), 18)
    assert all(proxy.plan[name] == [] for name in struck)  # every reset was used
    assert_same_batches(got, take(stream(fmnist / "train", fmnist, num_workers=2), 18))


def test_404_and_403_are_retried_then_end_naming_the_url_without_its_credentials(fmnist, served, proxy):
    name = "shard-000002.tar"
    proxy.fail(name, 404, 403)  # twice: then the file
    got = list(shard_samples(f"{proxy.url}/fmnist/train/{name}", FMNIST_SHARD_SIZE, DataConfig.max_sample_bytes,
                             FAST))
    assert_same_samples(got, local_samples(fmnist / "train" / name))

    secret_url = f"{proxy.url.replace('//', '//foundry:hunter2-url-secret@')}/fmnist/train/{name}"
    shown = f"{proxy.url.replace('//', '//***@')}/fmnist/train/{name}"
    for status in (404, 403):  # fsspec reports either as FileNotFoundError when it opens the file
        proxy.fail(name, *[status] * 10)  # every request of 3 attempts (fsspec asks with HEAD, then GET)
        start = time.monotonic()
        with pytest.raises(StoreError) as raised:
            list(shard_samples(secret_url, FMNIST_SHARD_SIZE, DataConfig.max_sample_bytes, FAST))
        proxy.fail(name)
        message = str(raised.value)
        assert message.startswith(f"reading sample 0 of shard {shown} failed: FileNotFoundError: {shown}, caused by ")
        assert f"{status}" in message and "(2 retries over" in message and "data.retries, data.timeout_s" in message
        assert "hunter2" not in message
        assert time.monotonic() - start < FAST.timeout_s


def test_a_stalled_server_is_retried_then_ends_naming_the_url(fmnist, served, proxy):
    """A response that does not come within the request timeout (data.timeout_s / (3 (retries + 1)))
    is asked for again; one that never comes ends the read inside data.timeout_s, naming the URL."""
    name = "shard-000003.tar"
    proxy.fail(name, None, ("stall", 5))
    got = list(shard_samples(f"{proxy.url}/fmnist/train/{name}", FMNIST_SHARD_SIZE, DataConfig.max_sample_bytes,
                             FAST))
    assert_same_samples(got, local_samples(fmnist / "train" / name))

    proxy.fail(name, *[("stall", 5)] * 10)
    start = time.monotonic()
    with pytest.raises(StoreError, match=f"reading sample 0 of shard {proxy.url}/fmnist/train/{name} failed: "
                                         f".*caused by \\w*Timeout\\w*: "):
        list(shard_samples(f"{proxy.url}/fmnist/train/{name}", FMNIST_SHARD_SIZE, DataConfig.max_sample_bytes, FAST))
    assert time.monotonic() - start < FAST.timeout_s
    proxy.fail(name)


# ----------------------------------------------------------------------------- shards made elsewhere

CORRUPT_KEY = "fm-00040"


@pytest.fixture(scope="module")
def shardwriter_shards(fmnist, tmp_path_factory) -> Path:
    """4 shards of 16 Fashion-MNIST samples written by webdataset's ShardWriter (not by this project),
    ``cls`` as webdataset encodes an int; sample fm-00040 holds bytes that are no image. No manifest."""
    folder = tmp_path_factory.mktemp("shardwriter")
    originals = [s for path in sorted((fmnist / "train").glob("*.tar"))[:4] for s in local_samples(path)]
    with wds.ShardWriter(str(folder / "part-%04d.tar"), maxcount=16, verbose=0) as sink:
        for i, sample in enumerate(originals):
            key = f"fm-{i:05d}"
            sink.write({"__key__": key, "png": b"not an image" if key == CORRUPT_KEY else sample["png"],
                        "cls": int(sample["cls"])})
    return folder


def test_prep_manifest_of_shardwriter_shards_in_s3_and_over_http_then_training(shardwriter_shards, fmnist, http_root,
                                                                              tiny_config, s3_endpoint, tmp_path):
    """`foundry prep manifest` reads the shards once where they are: in S3 it writes the manifest and DALI
    index files beside them, behind HTTP (read-only) into a local folder that names where they are.
    Counts, sha256s, classes and the undecodable sample are right; DALI's reader (through the indexes)
    sees every other sample once; both loaders train on them."""
    from ssl_foundry.pipeline.data.dali_loader import DaliStream

    make_bucket("made-elsewhere").put(str(shardwriter_shards), "made-elsewhere/wds", recursive=True)
    done = run_cli(["prep", "manifest", "s3://made-elsewhere/wds", "--workers", "2"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("s3://made-elsewhere/wds: manifest of 64 samples in 4 shards (")
    assert "labelled), 63 indexed, 1 left out" in done.stdout
    manifest = read_manifest("s3://made-elsewhere/wds")
    tars = sorted(shardwriter_shards.glob("*.tar"))
    assert [(s["name"], s["num_samples"], s["bytes"], s["sha256"]) for s in manifest["shards"]] == [
        (p.name, 16, p.stat().st_size, shard_format.file_sha256(p)) for p in tars]
    assert manifest["classes"] == [str(i) for i in range(10)] and manifest["labelled"]
    [(name, skipped)] = [(s["name"], s["index_skipped"]) for s in manifest["shards"] if s["index_skipped"]]
    assert name == "part-0002.tar" and skipped[0]["key"] == CORRUPT_KEY and "png: UnidentifiedImageError" in \
        skipped[0]["detail"]
    data = tiny_data(fmnist)
    dali = DaliStream("s3://made-elsewhere/wds", data.views, data.mean, data.std, 9, num_threads=1)
    keys = [k for b in itertools.islice(iter(dali), dali.steps_per_epoch()) for k in b["key"]]
    assert len(keys) == len(set(keys)) == 63 and CORRUPT_KEY not in keys

    root, url = http_root
    shutil.copytree(shardwriter_shards, root / "wds")
    listed = f"{url}/wds/part-{{0000..0003}}.tar"
    describe_shards(listed, tmp_path / "described", workers=1)
    described = read_manifest(tmp_path / "described")
    assert described["shard_root"] == f"{url}/wds"
    without_detail = [[{**s, "index_skipped": [k["key"] for k in s["index_skipped"]]} for s in m["shards"]]
                      for m in (described, manifest)]
    assert without_detail[0] == without_detail[1]
    assert_same_batches(take(stream(tmp_path / "described", fmnist, on_bad_sample="skip"), 4),
                        take(stream("s3://made-elsewhere/wds", fmnist, on_bad_sample="skip"), 4))

    result = train(tiny_config(tmp_path / "run", "data.train=s3://made-elsewhere/wds", "data.on_bad_sample=skip",
                               "train.max_steps=3", "data.num_workers=1"))
    assert result.steps == 3 and np.isfinite(result.final_loss)


def test_a_shard_list_without_manifest_trains_resampled_and_resumes_exactly(shardwriter_shards, fmnist):
    """No manifest, no sample counts: the list trains only with data.resampled=true, every reader drawing
    shards with replacement in one endless epoch; a stream started at batch k is the uninterrupted one."""
    listed = f"{shardwriter_shards}/part-{{0000..0003}}.tar"
    with pytest.raises(ConfigError, match="shard list without manifest.json.*data.resampled=true"):
        stream(listed, fmnist)
    batches = take(stream(listed, fmnist, resampled=True, num_workers=2, on_bad_sample="skip"), 12)
    assert [(b["epoch"], b["batch"]) for b in batches] == [(0, i) for i in range(12)]
    keys = [k for b in batches for k in b["key"]]
    assert len(keys) == 96 and len(set(keys)) < 64  # more draws than samples: some are drawn again
    resumed = take(stream(listed, fmnist, resampled=True, num_workers=2, on_bad_sample="skip",
                          start=LoaderPosition(0, 5)), 7)
    assert_same_batches(resumed, batches[5:])


# ----------------------------------------------------------------------------- prep into S3, 2-rank training from it


def test_killed_prep_into_s3_resumes_and_writes_its_manifest_last(class_folder, s3_endpoint, tmp_path):
    """`foundry prep images SRC s3://...` killed while it writes the 3rd shard: the 2 uploaded shards are in
    its progress record, no manifest.json is there (loaders refuse the prefix); the rerun uploads the
    other 2 and writes the manifest, the same shards byte for byte as a local prep."""
    make_bucket("prep")
    out = "s3://prep/images"
    killed = subprocess.run([sys.executable, "-c", KILLED_PREP, str(class_folder), out, "11"], cwd=REPO,
                            capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()
    with pytest.raises(shard_format.ManifestError, match="no shards at 's3://prep/images'"):
        read_manifest(out)
    progress = json.loads(shard_format.read_location(f"{out}/.foundry-prep-progress.json"))
    assert [s["complete"] for s in progress["shards"]] == [True, True, False, False]

    summary = prep_images(class_folder, out, shard_size=4, workers=2)
    assert (summary["shards_reused"], summary["shards_written"]) == (2, 2)
    prep_images(class_folder, tmp_path / "local", shard_size=4, workers=1)
    assert read_manifest(out)["shards"] == read_manifest(tmp_path / "local")["shards"]
    assert shard_format.read_location(f"{out}/.foundry-prep-progress.json") is None
    verify_shards(out, "sha256")


@pytest.mark.slow
def test_two_rank_pretrain_from_s3_is_the_local_run_also_killed_and_resumed(fmnist, tiny_config, s3_endpoint,
                                                                            tmp_path):
    """`foundry prep fashion-mnist s3://...` uploads the same shards as a local prep; a 2-rank `foundry pretrain`
    from s3:// (loader workers reading S3), killed whole after step 4 and rerun, ends with the local
    uninterrupted run's weights and every loss of it, bitwise: the same batches, and an exact resume."""
    make_bucket("fmnist")
    done = run_cli(["prep", "fashion-mnist", "s3://fmnist/tiny", "--limit", str(FMNIST_LIMIT), "--shard-size",
                    str(FMNIST_SHARD_SIZE), "--workers", "2"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert read_manifest("s3://fmnist/tiny/train")["shards"] == read_manifest(fmnist / "train")["shards"]

    (tmp_path / "local").mkdir()
    tiny_config(tmp_path / "local" / "run")
    code, out = finish(start_torchrun(tmp_path / "local" / "run.yaml", tmp_path / "local"))
    assert code == 0, out[-5000:]

    tiny_config(tmp_path / "run", "data.train=s3://fmnist/tiny/train")
    run = start_torchrun(tmp_path / "run.yaml", tmp_path, "data.train=s3://fmnist/tiny/train")
    run_until_step(run, 4)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    code, out = finish(start_torchrun(tmp_path / "run.yaml", tmp_path, "data.train=s3://fmnist/tiny/train"))
    assert code == 0 and "INFO resumed at step " in out, out[-5000:]
    assert_same_run(tmp_path / "run", tmp_path / "local" / "run")


# ----------------------------------------------------------------------------- credentials


def test_no_credential_reaches_mlflow_or_the_logs(fmnist, served, tiny_config, s3_endpoint, tmp_path, capfd):
    """A run that read its training shards over HTTP with a password in the URL and its evaluation shards
    from S3 with the AWS_* credentials: neither appears in its MLflow params, tags or artifacts (config,
    checkpoints) nor in anything it printed; the URL is logged with ``***`` for its credentials."""
    make_bucket("evaluation").put(str(fmnist), "evaluation/fmnist", recursive=True)
    password = "url-password-7f3a9c"
    train_url = served.replace("//", f"//foundry:{password}@") + "/train"
    cfg = tiny_config(tmp_path / "run", f"data.train={train_url}", "data.eval_train=s3://evaluation/fmnist/train",
                      "data.eval_test=s3://evaluation/fmnist/test", "eval.after_pretrain=true", "train.max_steps=2",
                      "data.num_workers=1")
    result = train(cfg)
    assert result.knn_top1 is not None
    logs = "".join(capfd.readouterr())
    client = MlflowClient(tracking_uri=result.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.data.params["data.train"] == served.replace("//", "//***@") + "/train"
    records = [json.dumps(run.data.params), json.dumps(run.data.tags), logs]
    artifacts = Path(default_artifact_location(result.tracking_uri))  # train.log is there too
    assert any(artifacts.rglob("config.yaml")) and any(artifacts.rglob("*.pt"))
    records += [path.read_bytes().decode("latin-1") for path in artifacts.rglob("*") if path.is_file()]
    for secret in (password, AWS_SECRET, AWS_KEY_ID):
        assert not any(secret in record for record in records), secret

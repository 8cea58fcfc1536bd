"""Backbone export + MLflow tracking/registry, end to end, the way a downstream user consumes them.

Consumers run in a separate Python process that imports only what a user would have (json, torch,
timm, safetensors; plus mlflow for registry references), never ssl-foundry. MLflow runs both as a
real ``mlflow server`` over HTTP (one per module, ~10 s to start) and as the default sqlite store.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from mlflow import MlflowClient

from ssl_foundry.pipeline.registry.export import export_timm_backbone, load_timm_backbone, resolve_backbone
from ssl_foundry.pipeline.registry.tracking import RunTracker, default_artifact_location, resolve_tracking_uri
from ssl_foundry.pipeline.registry.tracking_server import TrackingError, check_reachable
from conftest import REPO, run_cli
from mlflow_server import free_port, mlflow_server  # noqa: F401  (tests/ is on sys.path; module-scoped fixture)

IMAGE_SIZE = 32
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
ARCHITECTURES = {
    "resnet18": {},
    "vit_tiny_patch16_224": {"img_size": IMAGE_SIZE, "patch_size": 8},
}

# Loads an export folder the two ways a user would (see pipeline.registry.export) and saves the features.
PLAIN_TIMM_CONSUMER = """
import json, sys, torch, timm, safetensors
input_path, output_path, folder = sys.argv[1:]
torch.set_num_threads(1)
cfg = json.load(open(f"{folder}/config.json"))
overlay = dict(cfg["pretrained_cfg"], file=f"{folder}/model.safetensors")
explicit = timm.create_model(cfg["architecture"], pretrained=True, num_classes=0, pretrained_cfg_overlay=overlay,
                             **cfg["model_args"]).eval()
by_folder = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
x = torch.load(input_path)
with torch.no_grad():
    torch.save({"explicit": explicit(x), "local_dir": by_folder(x)}, output_path)
assert not any(name.split(".")[0] in ("pipeline", "models", "launch") for name in sys.modules)
"""

# Downloads registry/run references with plain MLflow (store from MLFLOW_TRACKING_URI) and loads them.
MLFLOW_CONSUMER = """
import sys, torch, timm, mlflow
input_path, output_path, *refs = sys.argv[1:]
torch.set_num_threads(1)
x = torch.load(input_path)
features = {}
for ref in refs:
    folder = mlflow.artifacts.download_artifacts(artifact_uri=ref)
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    with torch.no_grad():
        features[ref] = model(x)
torch.save(features, output_path)
"""


@pytest.fixture(scope="module", autouse=True)
def quiet_mlflow_env():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        yield


def make_backbone(arch: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(arch, pretrained=False, num_classes=0, **ARCHITECTURES[arch]).eval()


def features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Single-threaded, like the consumer processes, so results are bitwise comparable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            return model(x)
    finally:
        torch.set_num_threads(threads)


def fixed_input(tmp_path: Path) -> tuple[torch.Tensor, Path]:
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "input.pt")
    return x, tmp_path / "input.pt"


def run_consumer(code: str, tmp_path: Path, input_path: Path, *refs: str, env: dict | None = None) -> dict:
    """Run a consumer script in a fresh Python process; returns the features it saved."""
    output_path = tmp_path / "consumer_features.pt"
    done = subprocess.run([sys.executable, "-c", code, str(input_path), str(output_path), *refs], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(output_path)


def export(backbone: torch.nn.Module, arch: str, out_dir: Path, **extra) -> Path:
    return export_timm_backbone(backbone, arch, ARCHITECTURES[arch], out_dir, (3, IMAGE_SIZE, IMAGE_SIZE),
                                MEAN, STD, extra=extra)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_export_loads_in_plain_timm_with_identical_features(arch, tmp_path):
    backbone = make_backbone(arch, seed=0)
    x, input_path = fixed_input(tmp_path)
    expected = features(backbone, x)
    # Trainers keep CNNs channels_last: the export must still write contiguous safetensors.
    folder = export(backbone.to(memory_format=torch.channels_last), arch, tmp_path / "backbone", method="simclr")
    export(backbone, arch, folder, method="simclr", steps=10)  # replacing an export is atomic too

    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == arch and config["num_classes"] == 0
    assert config["num_features"] == backbone.num_features
    assert config["model_args"] == ARCHITECTURES[arch]
    assert config["pretrained_cfg"]["input_size"] == [3, IMAGE_SIZE, IMAGE_SIZE]
    assert config["pretrained_cfg"]["mean"] == list(MEAN) and config["pretrained_cfg"]["std"] == list(STD)
    assert config["ssl_foundry"] == {"method": "simclr", "steps": 10}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backbone", "input.pt"]  # no staging leftovers

    loaded = run_consumer(PLAIN_TIMM_CONSUMER, tmp_path, input_path, str(folder))
    assert torch.equal(loaded["explicit"], expected)
    assert torch.equal(loaded["local_dir"], expected)
    assert torch.equal(features(load_timm_backbone(folder), x), expected)


def test_loading_a_damaged_export_fails_instead_of_using_random_weights(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = export(make_backbone("resnet18", 0), "resnet18", tmp_path / "backbone")
    tensors = load_file(folder / "model.safetensors")
    del tensors["layer4.1.bn2.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(RuntimeError, match="Missing key.*layer4.1.bn2.weight"):
        load_timm_backbone(folder)


def register_two_versions(tracker: RunTracker, name: str, tmp_path: Path) -> dict[str, torch.nn.Module]:
    """Registers two different backbones from one run; returns them by version."""
    by_version = {}
    for seed in (0, 1):
        backbone = make_backbone("resnet18", seed)
        folder = export(backbone, "resnet18", tmp_path / f"export_{seed}", mlflow_run_id=tracker.run_id)
        by_version[tracker.log_backbone(str(folder), name)] = backbone
    return by_version


def test_tracking_and_registry_over_http_server(mlflow_server, tmp_path):  # noqa: F811
    uri = mlflow_server.uri
    x, input_path = fixed_input(tmp_path)
    tracker = RunTracker(uri, "ssl-http", run_name="pretrain")
    params = {"model.backbone": "resnet18", "train.lr": 0.1, "data.mean": [0.5, 0.5, 0.5]}
    tracker.log_params(params)
    tracker.log_metrics({"loss": 2.0, "lr": 0.1}, step=1)
    tracker.log_environment()
    tracker.set_tags({"purpose": "test"})
    (tmp_path / "config.yaml").write_text("model: resnet18\n")
    tracker.log_artifact(str(tmp_path / "config.yaml"), "configs")
    backbones = register_two_versions(tracker, "ssl-resnet18", tmp_path)
    assert list(backbones) == ["1", "2"]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.set_registered_model_alias("ssl-resnet18", "best", "2")
    tracker.end()

    # A consumer with only mlflow + timm + torch, pointed at the server by MLFLOW_TRACKING_URI.
    refs = ["models:/ssl-resnet18/1", "models:/ssl-resnet18/2", "models:/ssl-resnet18@best",
            f"runs:/{tracker.run_id}/backbone"]
    loaded = run_consumer(MLFLOW_CONSUMER, tmp_path, input_path, *refs, env={"MLFLOW_TRACKING_URI": uri})
    first, second = features(backbones["1"], x), features(backbones["2"], x)
    assert not torch.equal(first, second)
    assert torch.equal(loaded["models:/ssl-resnet18/1"], first)  # version 1 was not overwritten by 2
    assert torch.equal(loaded["models:/ssl-resnet18/2"], second)
    assert torch.equal(loaded["models:/ssl-resnet18@best"], second)
    assert torch.equal(loaded[f"runs:/{tracker.run_id}/backbone"], first)
    best = resolve_backbone("models:/ssl-resnet18@best", uri)
    assert torch.equal(features(load_timm_backbone(best), x), second)
    # Downloaded once into the user's cache: the same reference again, or the version it names, is that folder.
    assert best.is_relative_to(Path(os.environ["XDG_CACHE_HOME"]) / "ssl-foundry" / "backbones")
    weights = (best / "model.safetensors").stat()
    assert resolve_backbone("models:/ssl-resnet18/2", uri) == best == resolve_backbone("models:/ssl-resnet18@best", uri)
    assert (best / "model.safetensors").stat().st_mtime_ns == weights.st_mtime_ns  # not downloaded again
    assert resolve_backbone("models:/ssl-resnet18/1", uri) != best
    assert not [p for p in best.parent.iterdir() if p.name.startswith(".")]  # no staging folder left

    # Resume: the same run keeps receiving metrics; re-logged params are skipped, a changed one is a tag.
    resumed = RunTracker(uri, "ssl-http", run_id=tracker.run_id)
    assert resumed.run_id == tracker.run_id
    resumed.log_params({**params, "train.lr": 0.2})
    resumed.log_metrics({"loss": 1.0}, step=2)
    resumed.end()

    run = client.get_run(tracker.run_id)
    assert [(m.step, m.value) for m in client.get_metric_history(tracker.run_id, "loss")] == [(1, 2.0), (2, 1.0)]
    assert run.data.params == {"model.backbone": "resnet18", "train.lr": "0.1", "data.mean": "[0.5, 0.5, 0.5]"}
    assert run.data.tags["param_changed.train.lr"] == "0.2"
    assert run.data.tags["purpose"] == "test"
    assert run.data.tags["env.torch"] == torch.__version__ and run.data.tags["env.timm"] == timm.__version__
    assert run.info.status == "FINISHED"
    assert [f.path for f in client.list_artifacts(tracker.run_id, "configs")] == ["configs/config.yaml"]


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    """The config key, else MLFLOW_TRACKING_URI, else runs/mlflow.db of the working directory with
    artifacts beside it; a relative sqlite path is made absolute (a Slurm job starts elsewhere)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5001")
    assert resolve_tracking_uri("http://127.0.0.1:5002") == "http://127.0.0.1:5002"
    assert resolve_tracking_uri("") == "http://127.0.0.1:5001"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///stores/team.db")
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path / 'stores' / 'team.db'}"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    uri = resolve_tracking_uri()
    assert uri == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert default_artifact_location(uri) == str(tmp_path / "runs" / "mlartifacts")
    assert default_artifact_location("http://127.0.0.1:5000") is None


# The repository's SimCLR and BYOL recipes, tiny: ResNet-10t, batch 8, 2 steps on one thread.
TINY_RECIPE_OVERRIDES = {
    "simclr_resnet18_fmnist": ["model.method_args.proj_hidden_dim=32", "model.method_args.proj_out_dim=16"],
    "byol_resnet18_fmnist": ["model.method_args.proj_hidden_dim=32", "model.method_args.pred_hidden_dim=32",
                             "model.method_args.proj_out_dim=16"],
}
TINY_RUN = ["model.backbone=resnet10t", "data.num_workers=0", "data.shuffle_buffer=16", "train.batch_size=8",
            "train.max_steps=2", "train.warmup_steps=0", "train.threads=1", "train.precision=fp32",
            "eval.after_pretrain=false"]


def test_two_recipes_eval_and_registry_share_the_default_store(fmnist, mlflow_db_template, tmp_path, monkeypatch):
    """No store named anywhere: `foundry pretrain` of two recipes (their own output_dir runs/<name>),
    `foundry eval` and `foundry registry` run in one working directory all use its runs/mlflow.db."""
    cwd = tmp_path / "checkout"
    (cwd / "runs").mkdir(parents=True)
    shutil.copyfile(mlflow_db_template, cwd / "runs" / "mlflow.db")  # MLflow's migrations done once per session
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    data = [f"data.{key}={fmnist / split}" for key, split in
            (("train", "train"), ("eval_train", "train"), ("eval_test", "test"))]
    recipes = {name: str(REPO / "configs" / f"{name}.yaml") for name in TINY_RECIPE_OVERRIDES}
    for name, recipe in recipes.items():
        done = run_cli(["pretrain", recipe, *data, *TINY_RUN, *TINY_RECIPE_OVERRIDES[name]], tmp_path, cwd=cwd)
        assert done.returncode == 0, done.stderr[-3000:]
    done = run_cli(["eval", "knn", recipes["simclr_resnet18_fmnist"], "--backbone", "models:/byol-resnet18-fmnist/1",
                    *data, "data.eval_image_size=32"], tmp_path, cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    eval_run_id = json.loads(done.stdout.strip().splitlines()[-1])["eval_run_id"]
    done = run_cli(["registry", "card", "simclr-resnet18-fmnist", "1"], tmp_path, cwd=cwd)
    assert done.returncode == 0 and done.stdout.startswith("# simclr-resnet18-fmnist v1"), done.stderr[-3000:]

    assert sorted(p.relative_to(cwd) for p in cwd.rglob("mlflow.db")) == [Path("runs/mlflow.db")]
    assert sorted(p.name for p in (cwd / "runs").iterdir()) == [
        "byol_resnet18_fmnist", "mlartifacts", "mlflow.db", "simclr_resnet18_fmnist"]
    client = MlflowClient(tracking_uri=f"sqlite:///{cwd / 'runs' / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert sorted(r.data.params.get("model.method", r.data.tags.get("eval.kind")) for r in runs) == [
        "byol", "knn", "simclr"]
    assert client.get_run(eval_run_id).data.tags["lineage.model_name"] == "byol-resnet18-fmnist"
    assert {m.name for m in client.search_registered_models()} == {"simclr-resnet18-fmnist", "byol-resnet18-fmnist"}


def test_registry_with_the_default_local_store(tmp_path, monkeypatch, mlflow_db_template):
    cwd = tmp_path / "cwd"
    (cwd / "runs").mkdir(parents=True)
    shutil.copyfile(mlflow_db_template, cwd / "runs" / "mlflow.db")  # MLflow's migrations done once per session
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    uri = resolve_tracking_uri()
    x, input_path = fixed_input(tmp_path)

    tracker = RunTracker(uri, "ssl-sqlite", artifact_location=default_artifact_location(uri))
    tracker.log_metrics({"loss": 3.0}, step=0)
    backbones = register_two_versions(tracker, "ssl-local", tmp_path)
    MlflowClient(tracking_uri=uri, registry_uri=uri).set_registered_model_alias("ssl-local", "candidate", "2")
    tracker.end()

    for ref, version in [("models:/ssl-local/2", "2"), ("models:/ssl-local@candidate", "2"),
                         (f"runs:/{tracker.run_id}/backbone", "1")]:
        folder = resolve_backbone(ref, uri)
        assert torch.equal(features(load_timm_backbone(folder), x), features(backbones[version], x)), ref
    # The two MLflow models, each with the timm hub files, under runs/mlartifacts beside the store.
    assert len(list((cwd / "runs" / "mlartifacts").glob("models/*/artifacts/model.safetensors"))) == 2
    assert list(cwd.iterdir()) == [cwd / "runs"]  # no mlruns / mlartifacts elsewhere in the working directory

    loaded = run_consumer(MLFLOW_CONSUMER, tmp_path, input_path, "models:/ssl-local/2",
                          env={"MLFLOW_TRACKING_URI": uri})
    assert torch.equal(loaded["models:/ssl-local/2"], features(backbones["2"], x))


def test_resolve_backbone_errors_name_the_reference(mlflow_server, tmp_path):  # noqa: F811
    uri = mlflow_server.uri
    tracker = RunTracker(uri, "ssl-errors")
    folder = export(make_backbone("resnet18", 0), "resnet18", tmp_path / "backbone")
    tracker.log_backbone(str(folder), "ssl-errors-model")
    tracker.end()

    with pytest.raises(FileNotFoundError, match=r"models:/no-such-model/1.*registered models: .*ssl-errors-model"):
        resolve_backbone("models:/no-such-model/1", uri)
    with pytest.raises(FileNotFoundError, match=r"models:/ssl-errors-model@prod.*versions 1 and aliases none"):
        resolve_backbone("models:/ssl-errors-model@prod", uri)
    with pytest.raises(FileNotFoundError, match=r"models:/ssl-errors-model/7.*versions 1"):
        resolve_backbone("models:/ssl-errors-model/7", uri)
    missing = tmp_path / "no-export-here"
    with pytest.raises(FileNotFoundError, match=rf"{missing}.*does not exist"):
        resolve_backbone(str(missing), uri)
    assert resolve_backbone(str(folder)) == folder


def test_unreachable_server_fails_fast_with_the_fix():
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(TrackingError, match=rf"MLflow tracking server {uri} is unreachable .*mlflow server"):
        check_reachable(uri)
    with pytest.raises(TrackingError, match=uri):
        RunTracker(uri, "never-created")
    assert time.monotonic() - started < 5

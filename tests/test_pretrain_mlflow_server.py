"""A short pretrain logging to a real ``mlflow server`` (sqlite backend, proxied artifacts,
127.0.0.1, free port) registers its backbone as an MLflow model. The three ways a downstream team
loads it give the trainer's features for the same real images: a separate Python process with only
mlflow, timm and torch (plain timm from the downloaded folder, ``mlflow.pytorch.load_model`` and
``mlflow.pyfunc``), and a real ``mlflow models serve`` process answering ``/invocations``. The run's
TensorBoard event files hold the loss MLflow has."""
import copy
import os
import subprocess
import sys

import timm
import torch
from mlflow import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import IMAGE_SIZE, subprocess_env
from mlflow_server import ModelServer
from ssl_foundry.pipeline.data.augment.torch_backend import eval_transform
from ssl_foundry.pipeline.data.loader import ShardStream
from ssl_foundry.pipeline.train.checkpoint import checkpoint_path, load_checkpoint
from ssl_foundry.pipeline.train.trainer import Trainer

MODEL_NAME = "tiny-simclr-fmnist"
STEPS = 3

# What a downstream user runs (docs/downstream.md): the registry reference, then plain timm on the
# downloaded folder, MLflow's pytorch flavour, and its pyfunc.
CONSUMER = """
import json, sys, mlflow, timm, torch
ref, alias_ref, input_path, output_path = sys.argv[1:]
torch.set_num_threads(1)
x = torch.load(input_path)
folder = mlflow.artifacts.download_artifacts(artifact_uri=ref)  # MLFLOW_TRACKING_URI: the server
cfg = json.load(open(f"{folder}/config.json"))
model = timm.create_model(cfg["architecture"], pretrained=True, num_classes=0,
                          pretrained_cfg_overlay=dict(file=f"{folder}/model.safetensors"),
                          **cfg["model_args"]).eval()
module = mlflow.pytorch.load_model(alias_ref).eval()
embeddings = mlflow.pyfunc.load_model(alias_ref).predict(x.numpy())
with torch.no_grad():
    features = {"timm": model(x), "mlflow.pytorch": module(x), "pyfunc": torch.from_numpy(embeddings)}
torch.save({"features": features, "config": cfg, "module_class": type(module).__module__}, output_path)
project = [m for m in sys.modules if m.split(".")[0] in ("ssl_foundry", "pipeline", "models", "launch", "data_prep")]
assert not project, project
"""


def single_thread_features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like the consumer: same kernels, same reduction order
    try:
        with torch.no_grad():
            return model.eval()(x)
    finally:
        torch.set_num_threads(threads)


def test_registered_backbone_loads_three_ways_and_serves_the_trainers_features(mlflow_server, tiny_config, fmnist,
                                                                                 tmp_path):
    uri = mlflow_server.uri
    cfg = tiny_config(tmp_path / "run", f"mlflow.tracking_uri={uri}", f"mlflow.registered_model={MODEL_NAME}",
                      f"train.max_steps={STEPS}", "eval.after_pretrain=true", "mlflow.tensorboard=true")
    trainer = Trainer(cfg)
    result = trainer.train()
    assert result.tracking_uri == uri and result.model_version == "1"
    assert not (tmp_path / "run" / "mlflow.db").exists()  # everything went to the server

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["model.backbone"] == "vit_tiny_patch16_224" and params["train.max_steps"] == str(STEPS)
    assert params["mlflow.registered_model"] == MODEL_NAME and params["data.train"] == str(fmnist / "train")
    for key in ("loss", "lr", "grad_norm", "images_per_s"):
        assert [m.step for m in client.get_metric_history(result.run_id, key)] == list(range(1, STEPS + 1)), key
    assert 0.0 <= run.data.metrics["knn_top1"] <= 1.0 and run.data.metrics["knn_top1"] == result.knn_top1
    assert run.data.tags["env.torch"] == torch.__version__ and run.data.tags["env.timm"] == timm.__version__
    assert {f.path for f in client.list_artifacts(result.run_id)} >= {"config.yaml", "checkpoints"}
    assert [f.path for f in client.list_artifacts(result.run_id, "checkpoints")] == [
        f"checkpoints/{checkpoint_path('', STEPS).name}"]
    # The backbone is the run's MLflow model, registered as version 1, with the timm hub files beside MLmodel.
    (model,) = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{result.run_id}'")
    version = client.get_model_version(MODEL_NAME, "1")
    assert model.name == "backbone" and version.run_id == result.run_id and version.source == model.artifact_location
    files = {f.path for f in client.list_logged_model_artifacts(model.model_id)}
    assert {"MLmodel", "requirements.txt", "input_example.json", "config.json", "model.safetensors"} <= files
    client.set_registered_model_alias(MODEL_NAME, "production", "1")

    # TensorBoard beside MLflow: the same loss at the same steps (event files store float32).
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    mlflow_loss = {m.step: m.value for m in client.get_metric_history(result.run_id, "loss")}
    assert {e.step: e.value for e in events.Scalars("loss")} == {
        step: float(torch.tensor(value, dtype=torch.float32)) for step, value in mlflow_loss.items()}

    # Real test images, preprocessed the way the export's pretrained_cfg says (16 px, mean/std).
    stream = ShardStream(str(fmnist / "test"), eval_transform(IMAGE_SIZE, cfg.data.mean, cfg.data.std), 8,
                         finite=True)
    x = next(iter(stream))["views"][0]
    torch.save(x, tmp_path / "input.pt")
    done = subprocess.run([sys.executable, "-c", CONSUMER, f"models:/{MODEL_NAME}/1", f"models:/{MODEL_NAME}@production",
                           str(tmp_path / "input.pt"), str(tmp_path / "out.pt")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env={**subprocess_env(tmp_path, MLFLOW_TRACKING_URI=uri), "PYTHONPATH": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    consumer = torch.load(tmp_path / "out.pt")
    assert consumer["config"]["model_args"] == cfg.model.backbone_args
    assert consumer["config"]["pretrained_cfg"]["input_size"] == [3, IMAGE_SIZE, IMAGE_SIZE]
    assert consumer["module_class"].startswith("timm.models")  # mlflow.pytorch gives the timm module itself

    # A served endpoint: `mlflow models serve` of version 1, one torch thread; JSON carries float32 exactly.
    with ModelServer(tmp_path / "serve", f"models:/{MODEL_NAME}/1", uri) as server:
        reply = server.predict({"inputs": x.tolist()})
    served = torch.tensor(reply["predictions"], dtype=torch.float32)

    # All four bitwise equal to the final checkpoint's backbone in a fresh timm model (same layout,
    # one thread)...
    state = load_checkpoint(checkpoint_path(tmp_path / "run" / "checkpoints", STEPS))
    fresh = timm.create_model(cfg.model.backbone, num_classes=0, **cfg.model.backbone_args)
    fresh.load_state_dict({k.removeprefix("backbone."): v for k, v in state["model"].items()
                           if k.startswith("backbone.")})
    expected = single_thread_features(fresh, x)
    assert expected.shape == (len(x), fresh.num_features)
    for way, features in {**consumer["features"], "served": served}.items():
        assert torch.equal(features, expected), way
    # ...and to the trainer's in-memory backbone: bitwise in the standard memory layout; as trained
    # (channels_last weights pick other conv kernels) to float rounding.
    in_memory = trainer.model.backbone
    assert torch.equal(expected, single_thread_features(copy.deepcopy(in_memory).to(memory_format=torch.contiguous_format), x))
    torch.testing.assert_close(expected, single_thread_features(in_memory, x), rtol=1e-4, atol=1e-5)
    assert os.environ.get("MLFLOW_TRACKING_URI") != uri  # the consumers got the server only through their env

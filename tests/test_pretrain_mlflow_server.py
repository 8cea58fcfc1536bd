"""A short pretrain logging to a real ``mlflow server`` (sqlite backend, proxied artifacts,
127.0.0.1, free port) registers its backbone; a separate Python process with only mlflow, timm and
torch resolves ``models:/<name>/<version>``, loads it with plain timm and gets the trainer's features."""
import copy
import os
import subprocess
import sys

import timm
import torch
from mlflow import MlflowClient

from conftest import IMAGE_SIZE, subprocess_env
from ssl_foundry.pipeline.data.augment.torch_backend import eval_transform
from ssl_foundry.pipeline.data.loader import ShardStream
from ssl_foundry.pipeline.train.checkpoint import checkpoint_path, load_checkpoint
from ssl_foundry.pipeline.train.trainer import Trainer

MODEL_NAME = "tiny-simclr-fmnist"
STEPS = 3

# What a downstream user runs: the registry reference and the timm call from the README/issue.
CONSUMER = """
import json, sys, mlflow, timm, torch
ref, input_path, output_path = sys.argv[1:]
torch.set_num_threads(1)
folder = mlflow.artifacts.download_artifacts(artifact_uri=ref)  # MLFLOW_TRACKING_URI: the server
cfg = json.load(open(f"{folder}/config.json"))
model = timm.create_model(cfg["architecture"], pretrained=True, num_classes=0,
                          pretrained_cfg_overlay=dict(file=f"{folder}/model.safetensors"),
                          **cfg["model_args"]).eval()
with torch.no_grad():
    features = model(torch.load(input_path))
torch.save({"features": features, "config": cfg}, output_path)
assert not any(name.split(".")[0] in ("pipeline", "models", "launch", "data_prep") for name in sys.modules)
"""


def single_thread_features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like the consumer: same kernels, same reduction order
    try:
        with torch.no_grad():
            return model.eval()(x)
    finally:
        torch.set_num_threads(threads)


def test_pretrain_registers_a_backbone_plain_timm_loads_from_the_server(mlflow_server, tiny_config, fmnist, tmp_path):
    uri = mlflow_server.uri
    cfg = tiny_config(tmp_path / "run", f"mlflow.tracking_uri={uri}", f"mlflow.registered_model={MODEL_NAME}",
                      f"train.max_steps={STEPS}", "eval.after_pretrain=true")
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
    assert {f.path for f in client.list_artifacts(result.run_id)} >= {"config.yaml", "checkpoints", "backbone"}
    assert [f.path for f in client.list_artifacts(result.run_id, "checkpoints")] == [
        f"checkpoints/{checkpoint_path('', STEPS).name}"]
    version = client.get_model_version(MODEL_NAME, "1")
    assert version.run_id == result.run_id

    # Real test images, preprocessed the way the export's pretrained_cfg says (16 px, mean/std).
    stream = ShardStream(str(fmnist / "test"), eval_transform(IMAGE_SIZE, cfg.data.mean, cfg.data.std), 8,
                         finite=True)
    x = next(iter(stream))["views"][0]
    torch.save(x, tmp_path / "input.pt")
    done = subprocess.run([sys.executable, "-c", CONSUMER, f"models:/{MODEL_NAME}/1", str(tmp_path / "input.pt"),
                           str(tmp_path / "out.pt")], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**subprocess_env(tmp_path, MLFLOW_TRACKING_URI=uri), "PYTHONPATH": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    consumer = torch.load(tmp_path / "out.pt")
    assert consumer["config"]["model_args"] == cfg.model.backbone_args
    assert consumer["config"]["pretrained_cfg"]["input_size"] == [3, IMAGE_SIZE, IMAGE_SIZE]

    # Bitwise equal to the final checkpoint's backbone in a fresh timm model (same layout, one thread)...
    state = load_checkpoint(checkpoint_path(tmp_path / "run" / "checkpoints", STEPS))
    fresh = timm.create_model(cfg.model.backbone, num_classes=0, **cfg.model.backbone_args)
    fresh.load_state_dict({k.removeprefix("backbone."): v for k, v in state["model"].items()
                           if k.startswith("backbone.")})
    assert torch.equal(consumer["features"], single_thread_features(fresh, x))
    # ...and to the trainer's in-memory backbone: bitwise in the standard memory layout; as trained
    # (channels_last weights pick other conv kernels) to float rounding.
    in_memory = trainer.model.backbone
    assert torch.equal(consumer["features"],
                       single_thread_features(copy.deepcopy(in_memory).to(memory_format=torch.contiguous_format), x))
    torch.testing.assert_close(consumer["features"], single_thread_features(in_memory, x), rtol=1e-4, atol=1e-5)
    assert os.environ.get("MLFLOW_TRACKING_URI") != uri  # the consumer got the server only through its env

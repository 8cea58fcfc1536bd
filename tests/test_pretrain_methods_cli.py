"""A real pretrain of every method through the CLI on 2 ranks (torch elastic launch, gloo): each
recipe for Fashion-MNIST with a tiny model, 2 steps on a few real shards, logging to MLflow and
exporting a backbone that plain timm loads; SwAV (multi-crop), VICReg, SimSiam and NNCLR also on one
process. Distillation, which needs a registered teacher, is in test_distill.py.

One run costs ~20 s on 2 cores, nearly all of it process start-up (torch, timm and MLflow imports in
the launcher and each rank). One process is covered in-process by test_recipes.py (a training step
of every recipe's model) and through the CLI for SimCLR by the trainer tests.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from mlflow import MlflowClient

from ssl_foundry.data_prep.fashion_mnist import prep_fashion_mnist

REPO = Path(__file__).resolve().parents[1]
TINY = {  # per recipe: overrides that make the model tiny
    "moco_v2_resnet18_fmnist": ["model.backbone=resnet10t", "model.method_args.proj_hidden_dim=32",
                                "model.method_args.queue_size=32"],
    "moco_v3_resnet18_fmnist": ["model.backbone=resnet10t", "model.method_args.proj_hidden_dim=32",
                                "model.method_args.pred_hidden_dim=32", "model.method_args.proj_out_dim=16"],
    "byol_resnet18_fmnist": ["model.backbone=resnet10t", "model.method_args.proj_hidden_dim=32",
                             "model.method_args.pred_hidden_dim=32", "model.method_args.proj_out_dim=16"],
    "barlow_twins_resnet18_fmnist": ["model.backbone=resnet10t", "model.method_args.proj_hidden_dim=32",
                                     "model.method_args.proj_out_dim=32"],
    # a method that takes labels: they reach it through DDP on both ranks, 10 % of them kept
    "s4l_resnet18_fmnist": ["model.backbone=resnet10t"],
    "mae_vit_tiny_fmnist": ["model.backbone_args.depth=2", "model.method_args.decoder_embed_dim=32",
                            "model.method_args.decoder_depth=1", "model.method_args.decoder_num_heads=2"],
    # multi-crop (2 x 32 px + 4 x 16 px); the queue fills in step 1, the prototypes train from step 2
    "swav_resnet18_fmnist": ["model.backbone=resnet10t", "model.method_args.proj_hidden_dim=32",
                             "model.method_args.num_prototypes=30", "model.method_args.queue_size=8",
                             "model.method_args.queue_start_step=0", "model.method_args.freeze_prototypes_steps=1"],
    "vicreg_resnet18_fmnist": ["model.backbone=resnet10t", "model.method_args.proj_hidden_dim=32",
                               "model.method_args.proj_out_dim=32"],
    "simsiam_resnet18_fmnist": ["model.backbone=resnet10t", "model.method_args.proj_hidden_dim=32",
                                "model.method_args.proj_out_dim=32", "model.method_args.pred_hidden_dim=8"],
    "nnclr_resnet18_fmnist": ["model.backbone=resnet10t", "model.method_args.proj_hidden_dim=32",
                              "model.method_args.pred_hidden_dim=32", "model.method_args.queue_size=32"],
    # multi-crop: 2 global views of 32 px and 6 local views of 16 px per image, the centre over both ranks
    "dino_vit_tiny_fmnist": ["model.backbone_args.depth=2", "model.method_args.out_dim=64",
                             "model.method_args.hidden_dim=32", "model.method_args.bottleneck_dim=16"],
    # multi-crop through a CNN: 2 global views of 32 px and 6 local views of 16 px, BatchNorm in the backbone
    "dino_resnet18_fmnist": ["model.backbone=resnet10t", "model.method_args.out_dim=64",
                             "model.method_args.hidden_dim=32", "model.method_args.bottleneck_dim=16"],
    "ibot_vit_tiny_fmnist": ["model.backbone_args.depth=2", "model.method_args.out_dim=64",
                             "model.method_args.patch_out_dim=64", "model.method_args.hidden_dim=32",
                             "model.method_args.bottleneck_dim=16"],
}
ONE_PROCESS = ("swav_resnet18_fmnist", "vicreg_resnet18_fmnist", "simsiam_resnet18_fmnist", "nnclr_resnet18_fmnist")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fmnist")
    prep_fashion_mnist(out, shard_size=16, limit=64, workers=1)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("recipe,ranks", [(recipe, 2) for recipe in TINY] + [(recipe, 1) for recipe in ONE_PROCESS])
def test_pretrain_through_cli_logs_and_exports(recipe, ranks, shards, tmp_path):
    out = tmp_path / "run"
    args = [
        f"configs/{recipe}.yaml", f"output_dir={out}",
        f"data.train={shards}/train", f"data.eval_train={shards}/train", f"data.eval_test={shards}/test",
        "data.num_workers=0", "data.shuffle_buffer=16", f"launch.nproc_per_node={ranks}",
        "train.max_steps=2", "train.batch_size=8", "train.log_every=1", "train.warmup_steps=0",
        "train.threads=1", "train.precision=fp32", "eval.after_pretrain=false", "mlflow.registered_model=",
        *TINY[recipe],
    ]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "TMPDIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "ssl_foundry.launch", "pretrain", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]

    result = json.loads((out / "result.json").read_text())
    assert result["steps"] == 2 and math.isfinite(result["final_loss"])
    run = MlflowClient(tracking_uri=result["tracking_uri"]).get_run(result["run_id"])
    assert run.info.status == "FINISHED" and "loss" in run.data.metrics
    assert run.data.params["model.method"] == recipe.split("_resnet")[0].split("_vit")[0]
    assert run.data.tags["env.world_size"] == str(ranks)

    backbone = timm.create_model(f"local-dir:{result['backbone_dir']}", pretrained=True).eval()
    with torch.no_grad():
        features = backbone(torch.randn(2, 3, 32, 32))
    assert features.shape == (2, backbone.num_features) and torch.isfinite(features).all()

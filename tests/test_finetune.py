"""`foundry eval finetune`: layer-wise lr decay groups, a short fine-tune with mixup + cutmix and
label smoothing logged with its lineage and loss / lr curves, the fine-tuned classifier exported
for plain timm, and the same command on 2 gloo ranks."""
from __future__ import annotations

import json

import mlflow.artifacts
import timm
import torch
from mlflow import MlflowClient

from conftest import register_backbone, run_cli
from ssl_foundry.launch.cli import main
from ssl_foundry.models.backbones import create_backbone
from ssl_foundry.pipeline.evaluate.finetune import build_finetune_optimizer, top1_accuracy

SHORT = ["eval.finetune.steps=6", "eval.finetune.batch_size=16", "eval.finetune.warmup_steps=2",
         "eval.finetune.log_every=2", "eval.finetune.lr=1e-3", "train.threads=1"]


def test_layer_decay_scales_each_vit_block_lr_by_its_depth_from_the_head(tiny_config, tmp_path):
    cfg = tiny_config(tmp_path / "run", "eval.finetune.layer_decay=0.5")
    model = create_backbone(cfg.model.backbone, **cfg.model.backbone_args)  # depth 2
    model.reset_classifier(10)
    names = {id(p): n for n, p in model.named_parameters()}
    scale, decay = {}, {}
    for group in build_finetune_optimizer(model, cfg).param_groups:
        for p in group["params"]:
            scale[names[id(p)]], decay[names[id(p)]] = group["lr_scale"], group["weight_decay"]
    assert set(scale) == set(names.values())  # every parameter trains
    # The head at the full lr, each block 0.5x the one above it, the embeddings below block 0.
    assert scale["head.weight"] == scale["head.bias"] == 1.0
    assert scale["blocks.1.attn.qkv.weight"] == 0.5 and scale["blocks.0.mlp.fc1.weight"] == 0.25
    assert scale["patch_embed.proj.weight"] == scale["cls_token"] == 0.125
    # Weight decay on weight matrices only, not on biases, norms and tokens.
    assert decay["blocks.0.attn.qkv.weight"] == decay["head.weight"] == 0.05
    assert decay["blocks.0.attn.qkv.bias"] == decay["blocks.0.norm1.weight"] == decay["cls_token"] == 0.0


def test_finetune_logs_lineage_curves_and_a_classifier_plain_timm_loads(tiny_config, fmnist, tmp_path, capsys,
                                                                         mlflow_store):
    cfg = tiny_config(tmp_path / "run")
    pretrain_run, version = register_backbone(cfg, "to-finetune")
    code = main(["eval", "finetune", str(tmp_path / "run.yaml"), "--backbone", "models:/to-finetune@candidate"])
    assert code == 2 and "aliases none" in capsys.readouterr().err
    code = main(["eval", "finetune", str(tmp_path / "run.yaml"), "--backbone", f"models:/to-finetune/{version}",
                 *SHORT, "eval.finetune.mixup_alpha=0.8", "eval.finetune.cutmix_alpha=1.0",
                 "eval.gate.metric=finetune_top1", "eval.gate.threshold=0.0"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and report["world_size"] == 1 and "gate passed" in report["gate"]
    uri = mlflow_store
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = client.get_run(report["eval_run_id"])
    assert run.data.tags["eval.kind"] == "finetune" and run.data.tags["lineage.pretrain_run_id"] == pretrain_run
    assert run.data.params["eval.finetune.mixup_alpha"] == "0.8" and run.data.params["eval.finetune.steps"] == "6"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [2, 4, 6]
    lrs = [m.value for m in client.get_metric_history(run.info.run_id, "lr")]
    assert lrs[0] > lrs[1] > lrs[2] >= 0  # past the 2 warmup steps: cosine decay
    assert {f.path for f in client.list_artifacts(run.info.run_id, "plots")} == {"plots/curves.png"}
    assert str(client.get_registered_model("to-finetune").aliases["candidate"]) == version  # sqlite: an int

    # The classifier artifact is a timm hub folder: plain timm loads it with its 10-class head,
    # and it scores what the run logged.
    folder = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="classifier", tracking_uri=uri)
    classifier = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    assert classifier.num_classes == 10
    assert top1_accuracy(classifier, cfg, torch.device("cpu")) == run.data.metrics["finetune_top1"]
    # ...and its backbone moved away from the registered one.
    torch.manual_seed(0)  # register_backbone's initialisation
    registered = create_backbone(cfg.model.backbone, **cfg.model.backbone_args)
    assert not torch.equal(classifier.state_dict()["blocks.0.attn.qkv.weight"],
                           registered.state_dict()["blocks.0.attn.qkv.weight"])


def test_finetune_on_two_gloo_ranks(tiny_config, tmp_path, mlflow_store):
    cfg = tiny_config(tmp_path / "run")
    register_backbone(cfg, "ddp-finetune")
    done = run_cli(["eval", "finetune", str(tmp_path / "run.yaml"), "--backbone", "models:/ddp-finetune/1",
                    "launch.nproc_per_node=2", *SHORT], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])  # only rank 0 reports
    assert report["world_size"] == 2 and 0.0 <= report["finetune_top1"] <= 1.0
    uri = mlflow_store
    run = MlflowClient(tracking_uri=uri).get_run(report["eval_run_id"])
    assert run.data.tags["env.world_size"] == "2" and run.data.tags["lineage.model_version"] == "1"
    runs = MlflowClient(tracking_uri=uri).search_runs([run.info.experiment_id], "tags.`eval.kind` = 'finetune'")
    assert len(runs) == 1  # one run, from rank 0

"""Downstream evaluations through the real CLI (`foundry eval knn|linear`, `foundry registry`),
against a real ``mlflow server`` on 127.0.0.1 and against the default local sqlite store:
backbone references (version, alias, run id, folder), lineage tags on a new run, registry tags,
the evaluation gate (@candidate), promotion (@production), the model card, and the messages for a
model that does not exist, an alias that is not set and a backbone that refuses the image size.
A downstream client with only mlflow + timm + torch fine-tunes ``models:/NAME@candidate``."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from mlflow import MlflowClient

from conftest import IMAGE_SIZE, register_backbone, run_cli, subprocess_env
from ssl_foundry.data_prep.shard_format import file_sha256
from ssl_foundry.launch.cli import main
from ssl_foundry.models.backbones import create_backbone
from ssl_foundry.pipeline.config import save_config
from ssl_foundry.pipeline.data.augment.torch_backend import eval_transform
from ssl_foundry.pipeline.data.loader import ShardStream
from ssl_foundry.pipeline.registry.export import export_digest

# A quick probe: the protocol is tested in test_linear_probe.py; here the plumbing is.
PROBE = ["eval.linear.epochs=5", "eval.linear.lrs=[0.01,0.1]"]


def foundry(capsys, *args: str) -> tuple[int, str, str]:
    """The `foundry` CLI in this process (as tests/test_config_cli.py): (exit code, stdout, stderr)."""
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_eval_lineage_gate_card_and_promotion_against_a_real_server(mlflow_server, tiny_config, fmnist,
                                                                    tmp_path, capsys):
    uri, name = mlflow_server.uri, "downstream-server"
    cfg = tiny_config(tmp_path / "run", f"mlflow.tracking_uri={uri}")
    recipe = str(tmp_path / "server.yaml")
    save_config(cfg, recipe)  # the tiny recipe, logging to the server
    pretrain_run, version = register_backbone(cfg, name)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)

    # Registration wrote the card: manifest hash of the pretraining shards, steps, the 3-line load.
    card = client.get_model_version(name, version).description
    manifest_sha = file_sha256(fmnist / "train" / "manifest.json")
    assert f"# {name} v1" in card and f"manifest sha256 `{manifest_sha}`" in card and "- steps: 7" in card
    assert f'artifact_uri="models:/{name}/1"' in card and 'timm.create_model(f"local-dir:{folder}"' in card
    assert "`model.backbone`: `vit_tiny_patch16_224`" in card and "- `env.cpu_count`:" in card
    assert f"model_cards/{name}-v1.md" in {f.path for f in client.list_artifacts(pretrain_run, "model_cards")}

    # No @candidate yet: the alias is named, with what the registry has instead.
    code, _, err = foundry(capsys, "eval", "linear", recipe, "--backbone", f"models:/{name}@candidate", *PROBE)
    assert code == 2 and f"models:/{name}@candidate" in err and "has versions 1 and aliases none" in err
    code, _, err = foundry(capsys, "eval", "knn", recipe, "--backbone", "models:/no-such-model/1")
    assert code == 2 and "no registered model 'no-such-model'" in err and name in err

    # kNN on version 1 below the gate's threshold: logged and tagged, no alias.
    code, out, _ = foundry(capsys, "eval", "knn", recipe, "--backbone", f"models:/{name}/1",
                           "eval.gate.metric=knn_top1", "eval.gate.threshold=0.999")
    knn = last_json(out)
    assert code == 0 and "gate not passed" in knn["gate"] and not client.get_registered_model(name).aliases
    run = client.get_run(knn["eval_run_id"])
    assert run.info.status == "FINISHED" and run.data.metrics["knn_top1"] == knn["knn_top1"]
    assert run.data.tags["eval.kind"] == "knn" and run.data.tags["lineage.model_name"] == name
    assert run.data.tags["lineage.model_version"] == "1" and run.data.tags["lineage.pretrain_run_id"] == pretrain_run
    assert run.data.tags["lineage.backbone_sha256"] == export_digest(tmp_path / "run" / "export-0")
    assert run.data.tags["lineage.backbone_ref"] == f"models:/{name}/1"

    # Passing the gate moves @candidate; the linear probe then reads the model by its alias.
    code, out, _ = foundry(capsys, "eval", "knn", recipe, "--backbone", f"models:/{name}/1",
                           "eval.gate.metric=knn_top1", "eval.gate.threshold=0.0")
    assert code == 0 and "gate passed" in last_json(out)["gate"]
    assert client.get_registered_model(name).aliases == {"candidate": "1"}
    code, out, _ = foundry(capsys, "eval", "linear", recipe, "--backbone", f"models:/{name}@candidate", *PROBE)
    linear = last_json(out)
    assert code == 0 and 0.0 <= linear["linear_top1"] <= 1.0 and linear["linear_best_lr"] in (0.01, 0.1)
    run = client.get_run(linear["eval_run_id"])
    assert run.data.tags["lineage.model_version"] == "1" and run.data.tags["eval.kind"] == "linear"
    assert run.data.params["eval.linear.epochs"] == "5" and set(run.data.metrics) >= {
        "linear_top1", "linear_best_lr", "linear_val_top1.lr_0.01", "linear_val_top1.lr_0.1"}
    tags = client.get_model_version(name, "1").tags
    assert tags["eval.linear_top1.run_id"] == linear["eval_run_id"] and "gate.passed" in tags
    assert float(tags["eval.linear_top1"]) == pytest.approx(linear["linear_top1"], abs=1e-5)

    # Fine-tuning reads the same alias; its run carries the same lineage.
    code, out, _ = foundry(capsys, "eval", "finetune", recipe, "--backbone", f"models:/{name}@candidate",
                           "eval.finetune.steps=2", "eval.finetune.batch_size=16", "eval.finetune.warmup_steps=1",
                           "train.threads=1")
    finetuned = last_json(out)
    assert code == 0 and finetuned["model_version"] == "1"
    run = client.get_run(finetuned["eval_run_id"])
    assert run.data.tags["eval.kind"] == "finetune" and run.data.tags["lineage.pretrain_run_id"] == pretrain_run
    assert {f.path for f in client.list_artifacts(run.info.run_id, "classifier")} == {
        "classifier/config.json", "classifier/model.safetensors"}

    # The card now lists the evaluations and the alias.
    card = client.get_model_version(name, "1").description
    assert "- aliases: @candidate" in card and "Evaluation gate: passed, knn_top1=" in card
    assert f"| linear linear_top1 | {linear['linear_top1']:.4f} | `{linear['eval_run_id']}` |" in card
    assert f"| knn knn_top1 | {knn['knn_top1']:.4f} | `{knn['eval_run_id']}` |" in card
    assert f"| finetune finetune_top1 | {finetuned['finetune_top1']:.4f} |" in card

    # Promotion: a version that never passed a gate is refused (unless forced); version 1 moves @production.
    _, second = register_backbone(cfg, name, seed=1)
    code, _, err = foundry(capsys, "registry", "promote", name, second, "--tracking-uri", uri)
    assert code == 2 and "has not passed an evaluation gate" in err
    code, out, _ = foundry(capsys, "registry", "promote", name, "1", "--tracking-uri", uri)
    assert code == 0 and f"models:/{name}@production -> version 1" in out
    assert client.get_registered_model(name).aliases == {"candidate": "1", "production": "1"}
    assert "- aliases: @candidate, @production" in client.get_model_version(name, "1").description
    code, _, err = foundry(capsys, "registry", "promote", name, "9", "--tracking-uri", uri)
    assert code == 2 and "versions 1, 2" in err


def test_wrong_input_size_is_named_before_any_data_is_read(tiny_config, tmp_path, capsys):
    cfg = tiny_config(tmp_path / "run")
    _, version = register_backbone(cfg, "sized")
    code, _, err = foundry(capsys, "eval", "linear", str(tmp_path / "run.yaml"), "--backbone", "models:/sized/1",
                           f"data.eval_image_size={2 * IMAGE_SIZE}")
    assert code == 2 and "does not take 3x32x32 images (data.eval_image_size=32)" in err
    assert f"exported for input_size [3, {IMAGE_SIZE}, {IMAGE_SIZE}]" in err
    assert f"set data.eval_image_size={IMAGE_SIZE}" in err


def test_pretrain_gates_its_version_and_eval_by_run_id_on_the_local_store(tiny_config, tmp_path, mlflow_store):
    """`foundry pretrain` with a local sqlite store: the end-of-training kNN passes the gate,
    the card has its accuracy, the run has its plots and online kNN curve; `foundry eval linear`
    by bare run id is tagged with that run and logs the t-SNE map of the test features."""
    tiny_config(tmp_path / "run")  # writes run.yaml
    recipe = str(tmp_path / "run.yaml")
    done = run_cli(["pretrain", recipe, "mlflow.registered_model=local-model", "eval.after_pretrain=true",
                    "eval.gate.metric=knn_top1", "eval.gate.threshold=0.05", "train.threads=1",
                    "eval.knn_every=2"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "evaluation gate:   gate passed (knn_top1=" in done.stdout
    uri = mlflow_store
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version_by_alias("local-model", "candidate")
    knn = client.get_run(version.run_id).data.metrics["knn_top1"]
    assert f"| pretraining knn_top1 | {knn:.4f} |" in version.description and "- steps: 4" in version.description
    # Online kNN monitor every 2 steps; the views and the curves as plots on the pretraining run.
    assert [m.step for m in client.get_metric_history(version.run_id, "knn_monitor_top1")] == [2, 4]
    plots = {f.path for f in client.list_artifacts(version.run_id, "plots")}
    assert plots == {"plots/augmentations.png", "plots/curves.png"}

    done = run_cli(["eval", "linear", recipe, "--backbone", version.run_id, *PROBE], tmp_path,
                   OMP_NUM_THREADS="1")
    assert done.returncode == 0, done.stderr[-3000:]
    report = last_json(done.stdout)
    assert report["pretrain_run_id"] == version.run_id and report["model_version"] is None
    run = client.get_run(report["eval_run_id"])
    assert run.data.tags["lineage.pretrain_run_id"] == version.run_id
    assert run.data.tags["lineage.backbone_ref"] == f"runs:/{version.run_id}/backbone"
    assert "lineage.model_version" not in run.data.tags  # a run reference names no version
    assert {f.path for f in client.list_artifacts(run.info.run_id, "plots")} == {"plots/embedding_tsne.png"}
    assert len(list((tmp_path / "run" / "feature_cache").glob("*.pt"))) == 2  # train and test, extracted once

    # kNN on the local export folder: the pretraining run comes from its config.json; the linear
    # probe's cached features are reused (no new cache files).
    done = run_cli(["eval", "knn", recipe, "--backbone", str(tmp_path / "run" / "backbone")], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    run = client.get_run(last_json(done.stdout)["eval_run_id"])
    assert run.data.tags["lineage.pretrain_run_id"] == version.run_id and run.data.tags["eval.kind"] == "knn"
    assert run.data.tags["lineage.backbone_sha256"] == export_digest(tmp_path / "run" / "backbone")
    assert len(list((tmp_path / "run" / "feature_cache").glob("*.pt"))) == 2


# A downstream team's script: mlflow, timm and torch only. Resolves the alias in the registry of
# MLFLOW_TRACKING_URI, loads the backbone with a fresh classifier and fine-tunes a few steps.
DOWNSTREAM_CLIENT = """
import sys, mlflow, timm, torch
ref, data_path, out_path = sys.argv[1:]
torch.manual_seed(0)
torch.set_num_threads(1)
folder = mlflow.artifacts.download_artifacts(artifact_uri=ref)
model = timm.create_model(f"local-dir:{folder}", pretrained=True, num_classes=10)
pretrained = {k: v.clone() for k, v in model.state_dict().items()}
images, labels = torch.load(data_path)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
model.train()
losses = []
for step in range(8):
    loss = torch.nn.functional.cross_entropy(model(images), labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    losses.append(loss.item())
changed = [k for k, v in model.state_dict().items() if k in pretrained and not torch.equal(v, pretrained[k])]
torch.save({"losses": losses, "changed": changed, "pretrained": pretrained}, out_path)
project = [m for m in sys.modules if m.split(".")[0] in ("launch", "pipeline", "models", "data_prep")]
assert not project, project
"""


def test_downstream_client_fine_tunes_the_candidate_with_only_mlflow_timm_and_torch(mlflow_server, tiny_config,
                                                                                      fmnist, tmp_path):
    uri, name = mlflow_server.uri, "downstream-client"
    cfg = tiny_config(tmp_path / "run", f"mlflow.tracking_uri={uri}")
    _, version = register_backbone(cfg, name, seed=3)
    MlflowClient(tracking_uri=uri, registry_uri=uri).set_registered_model_alias(name, "candidate", version)
    batch = next(iter(ShardStream(str(fmnist / "train"), eval_transform(IMAGE_SIZE, cfg.data.mean, cfg.data.std),
                                  32, finite=True)))
    torch.save((batch["views"][0], batch["label"]), tmp_path / "batch.pt")
    script = tmp_path / "client.py"
    script.write_text(DOWNSTREAM_CLIENT)
    # -I: isolated mode, no PYTHONPATH, no user site, no script folder injected beyond its own.
    done = subprocess.run([sys.executable, "-I", str(script), f"models:/{name}@candidate", str(tmp_path / "batch.pt"),
                           str(tmp_path / "out.pt")], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=subprocess_env(tmp_path, MLFLOW_TRACKING_URI=uri))
    assert done.returncode == 0, done.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    assert all(torch.isfinite(torch.tensor(out["losses"])))
    assert out["losses"][-1] < out["losses"][0]  # 8 steps on one batch: it fits it
    assert any(k.startswith("blocks.") for k in out["changed"]) and any(k.startswith("head.") for k in out["changed"])
    # The client's starting weights are the registered backbone's (the new head aside).
    torch.manual_seed(3)  # register_backbone's seed: the same initialisation
    exported = create_backbone(cfg.model.backbone, **cfg.model.backbone_args)
    for key, value in exported.state_dict().items():
        assert torch.equal(out["pretrained"][key], value), key


def test_registry_commands_on_the_local_store(tiny_config, tmp_path, capsys, mlflow_store, monkeypatch):
    cfg = tiny_config(tmp_path / "run")
    pretrain_run, version = register_backbone(cfg, "local-registry")
    uri = mlflow_store
    code, out, _ = foundry(capsys, "registry", "card", "local-registry", version)  # the store of MLFLOW_TRACKING_URI
    assert code == 0 and out.startswith("# local-registry v1") and f"pretraining run: `{pretrain_run}`" in out
    code, _, err = foundry(capsys, "registry", "promote", "local-registry", version, "--tracking-uri", uri)
    assert code == 2 and "never gated" in err and "--force" in err
    code, out, _ = foundry(capsys, "registry", "promote", "local-registry", version, "--tracking-uri", uri, "--force")
    assert code == 0 and "@production -> version 1" in out
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert str(client.get_registered_model("local-registry").aliases["production"]) == version
    assert "- aliases: @production" in client.get_model_version("local-registry", version).description
    code, _, err = foundry(capsys, "registry", "card", "nope", "1", "--tracking-uri", uri)
    assert code == 2 and "no registered model 'nope'; registered models: local-registry" in err

    # No store named and none in the working directory: said so, and no empty store is created.
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    code, _, err = foundry(capsys, "registry", "card", "local-registry", version)
    assert code == 2 and f"no MLflow store at {tmp_path / 'elsewhere' / 'runs' / 'mlflow.db'}" in err
    assert list((tmp_path / "elsewhere").iterdir()) == []

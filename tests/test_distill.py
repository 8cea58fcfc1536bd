"""Distillation (`model.method=distill`) end to end: a student of another architecture trained
through `foundry pretrain` to match a frozen teacher that is a version registered in a real MLflow
store (by alias, on one process) or an export folder (on two ranks). The student exports and
registers like any other backbone, and its run, export and model card carry the teacher's lineage.
Bad teacher references fail before training with one line naming model.teacher."""
import json
from pathlib import Path

import pytest
import timm
import torch
from mlflow import MlflowClient

from conftest import IMAGE_SIZE, register_backbone, run_cli, write_recipe
from ssl_foundry.pipeline.config import ConfigError, load_config
from ssl_foundry.pipeline.registry.export import export_digest, load_timm_backbone, locate_backbone
from ssl_foundry.pipeline.registry.tracking import resolve_tracking_uri
from ssl_foundry.pipeline.train.checkpoint import latest_checkpoint, load_checkpoint

DISTILL = ["model.method=distill", "model.backbone=resnet10t", "model.backbone_args={}",
           "model.method_args={loss: cosine}",
           f"data.views=[{{count: 1, ops: [{{op: random_resized_crop, args: {{size: {IMAGE_SIZE}}}}}]}}]",
           "train.optimizer=adamw", "train.lr=0.001", "train.max_steps=2", "train.checkpoint_every=2"]


@pytest.fixture(scope="module")
def teacher(tiny_config, tmp_path_factory):
    """A ViT-Tiny backbone pretrained (here: initialised) by a run of its own and registered as
    ``teacher`` version 1 with the alias @production, in a sqlite store."""
    root = tmp_path_factory.mktemp("teacher")
    cfg = tiny_config(root / "pretrain")
    run_id, version = register_backbone(cfg, "teacher", seed=3)
    uri = resolve_tracking_uri(cfg.mlflow.tracking_uri)
    MlflowClient(tracking_uri=uri, registry_uri=uri).set_registered_model_alias("teacher", "production", version)
    return {"uri": uri, "run_id": run_id, "version": version, "folder": Path(cfg.output_dir) / "export-3",
            "root": root}


@pytest.mark.slow
def test_distill_from_a_registered_teacher_records_its_lineage(teacher, fmnist, tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml", fmnist, tmp_path / "student")
    done = run_cli(["pretrain", str(recipe), *DISTILL, "model.teacher=models:/teacher@production",
                    f"mlflow.tracking_uri={teacher['uri']}", "mlflow.registered_model=student"], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    result = json.loads((tmp_path / "student" / "result.json").read_text())
    assert result["steps"] == 2 and result["model_version"] == "1"

    client = MlflowClient(tracking_uri=teacher["uri"], registry_uri=teacher["uri"])
    run = client.get_run(result["run_id"])
    lineage = {"ref": "models:/teacher@production", "model_name": "teacher", "model_version": teacher["version"],
               "pretrain_run_id": teacher["run_id"], "sha256": export_digest(teacher["folder"])}
    assert {k: run.data.tags[f"lineage.teacher.{k}"] for k in lineage} == lineage
    assert run.data.params["model.teacher"] == "models:/teacher@production"
    exported = json.loads((Path(result["backbone_dir"]) / "config.json").read_text())
    assert exported["architecture"] == "resnet10t" and exported["ssl_foundry"]["teacher"] == lineage

    student = locate_backbone("models:/student/1", teacher["uri"])  # registered like any backbone
    assert student.pretrain_run_id == result["run_id"]
    card = client.get_model_version("student", "1").description
    assert "distilled from: `models:/teacher@production`" in card and "`model.teacher`" in card
    plain = timm.create_model(f"local-dir:{student.folder}", pretrained=True).eval()
    assert plain(torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)).shape == (1, 512)

    # the frozen teacher trained along is the registered one, untouched
    state = load_checkpoint(latest_checkpoint(tmp_path / "student" / "checkpoints"))["model"]
    registered = load_timm_backbone(teacher["folder"]).state_dict()
    assert all(torch.equal(state[f"teacher.{k}"], v) for k, v in registered.items())


@pytest.mark.slow
def test_distill_from_an_export_folder_on_two_ranks(teacher, fmnist, tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml", fmnist, tmp_path / "student")
    done = run_cli(["pretrain", str(recipe), *DISTILL, f"model.teacher={teacher['folder']}",
                    "launch.nproc_per_node=2", "data.num_workers=0"], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    result = json.loads((tmp_path / "student" / "result.json").read_text())
    run = MlflowClient(tracking_uri=result["tracking_uri"]).get_run(result["run_id"])
    assert run.data.tags["env.world_size"] == "2"
    assert run.data.tags["lineage.teacher.ref"] == str(teacher["folder"])
    assert run.data.tags["lineage.teacher.pretrain_run_id"] == teacher["run_id"]  # from the export's config.json
    assert "lineage.teacher.model_name" not in run.data.tags
    assert load_timm_backbone(result["backbone_dir"]).num_features == 512


@pytest.mark.slow
def test_a_teacher_that_does_not_resolve_or_fit_fails_before_training(teacher, fmnist, tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml", fmnist, tmp_path / "student")
    base = ["pretrain", str(recipe), *DISTILL, f"mlflow.tracking_uri={teacher['uri']}", "launch.nproc_per_node=2"]
    missing = run_cli([*base, "model.teacher=models:/teacher@staging"], tmp_path)
    assert missing.returncode == 2
    assert "config error: model.teacher: backbone 'models:/teacher@staging' not found" in missing.stderr
    assert "aliases @production -> 1" in missing.stderr and "Traceback" not in missing.stderr
    other_norm = run_cli([*base, f"model.teacher={teacher['folder']}", "data.mean=[0.5,0.5,0.5]"], tmp_path)
    assert other_norm.returncode == 2 and "set data.mean=[0.286, 0.286, 0.286]" in other_norm.stderr
    too_big = run_cli([*base, f"model.teacher={teacher['folder']}",
                       "data.views=[{count: 1, ops: [{op: random_resized_crop, args: {size: 24}}]}]"], tmp_path)
    assert too_big.returncode == 2 and "does not take the 24x24 views of data.views" in too_big.stderr
    assert not (tmp_path / "student" / "checkpoints").exists()


def test_model_teacher_is_set_exactly_for_distillation():
    with pytest.raises(ConfigError, match="model.teacher: method 'distill' distils a frozen teacher"):
        load_config("configs/distill_resnet18_fmnist.yaml", ["model.teacher="], check_paths=False)
    with pytest.raises(ConfigError, match="method 'simclr' takes no teacher.*distill.*drop the key"):
        load_config("configs/simclr_resnet18_fmnist.yaml", ["model.teacher=runs/x/backbone"], check_paths=False)


def test_a_run_id_resolves_to_the_teacher_that_run_exported(teacher, tiny_config, tmp_path):
    from ssl_foundry.pipeline.registry.teacher import load_teacher

    cfg = tiny_config(tmp_path / "student", *DISTILL, f"model.teacher={teacher['run_id']}",
                      f"mlflow.tracking_uri={teacher['uri']}")
    loaded = load_teacher(cfg)
    assert loaded.lineage() == {"ref": f"runs:/{teacher['run_id']}/backbone", "pretrain_run_id": teacher["run_id"],
                                "sha256": export_digest(teacher["folder"])}
    registered = load_timm_backbone(teacher["folder"]).state_dict()
    assert all(torch.equal(loaded.module.state_dict()[k], v) for k, v in registered.items())
    assert not loaded.module.training

"""Multi-crop end to end on one process, on real Fashion-MNIST shards: both loaders (torch, with
loader workers whose parts are joined, and DALI's CPU backend) deliver the global and local views at
their sizes; `foundry pretrain` trains DINO from DALI and exports the teacher; an iBOT run (masks from
the RNG, centres, the steps' clock, the weight-decay cosine) resumes bitwise. Two processes:
test_pretrain_methods_cli.py; DDP vs ZeRO-1/2/3: test_deepspeed.py."""
import json

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from conftest import IMAGE_SIZE, run_cli, write_recipe
from ssl_foundry.pipeline.data.loader import build_train_loader
from ssl_foundry.pipeline.data.position import LoaderPosition
from ssl_foundry.pipeline.train.checkpoint import checkpoint_path, load_checkpoint
from ssl_foundry.pipeline.train.optim import cosine_weight_decay
from test_resume import SimulatedCrash, assert_state_equal, crash_after_checkpoint

LOCAL_SIZE = IMAGE_SIZE // 2
MULTI_CROP = ("data.views=[{count: 2, ops: [{op: random_resized_crop, args: {size: 16, scale: [0.4, 1.0]}}, "
              "{op: horizontal_flip, p: 0.5}]}, {count: 3, ops: [{op: random_resized_crop, args: {size: 8, "
              "scale: [0.05, 0.4]}}, {op: color_jitter, p: 0.8, args: {brightness: 0.4, contrast: 0.4}}]}]")
TINY_VIT = "model.backbone_args={img_size: 16, patch_size: 4, depth: 2, dynamic_img_size: true}"
DINO = ["model.method=dino", TINY_VIT, MULTI_CROP, "train.optimizer=adamw", "train.lr=0.001", "train.grad_clip=3.0",
        "train.weight_decay=0.04", "train.weight_decay_end=0.4",
        "model.method_args={out_dim: 64, hidden_dim: 32, bottleneck_dim: 16, freeze_last_layer_steps: 1}"]
IBOT = [*DINO[:-1], "model.method=ibot",
        "model.method_args={out_dim: 64, patch_out_dim: 64, hidden_dim: 32, bottleneck_dim: 16, koleo_weight: 0.1, "
        "freeze_last_layer_steps: 1, warmup_teacher_temp_steps: 3}"]
SHAPES = [(4, 3, IMAGE_SIZE, IMAGE_SIZE)] * 2 + [(4, 3, LOCAL_SIZE, LOCAL_SIZE)] * 3


@pytest.mark.parametrize("backend,workers", [("torch", 2), ("dali", 1)])
def test_both_loaders_deliver_global_and_local_views_at_their_sizes(tiny_config, tmp_path, one_thread, backend,
                                                                    workers):
    cfg = tiny_config(tmp_path / "run", *DINO, f"data.backend={backend}", f"data.num_workers={workers}")
    batches = build_train_loader(cfg.data, 4, "image", cfg.train.seed, 0, 1, LoaderPosition(), torch.device("cpu"))
    for _ in range(2):
        batch = next(batches)
        assert [tuple(v.shape) for v in batch["views"]] == SHAPES
        assert all(v.dtype == torch.float32 and v.std() > 0.1 for v in batch["views"])
        assert len(batch["key"]) == 4 and not torch.equal(batch["views"][2], batch["views"][3])  # independent crops


def teacher_backbone(state: dict) -> dict[str, torch.Tensor]:
    prefix = "teacher.module.backbone."
    return {k.removeprefix(prefix): v for k, v in state["model"].items() if k.startswith(prefix)}


@pytest.mark.slow
def test_dino_pretrains_from_dali_and_exports_the_teacher(fmnist, tmp_path):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "run.yaml", fmnist, out)
    done = run_cli(["pretrain", str(recipe), *DINO, "data.backend=dali", "data.num_workers=1", "train.max_steps=3",
                    "train.warmup_steps=0", "mlflow.tracking_uri=sqlite:///" + str(tmp_path / "m.db")], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "INFO training loader: dali on cpu" in done.stderr and "INFO step 3/3 " in done.stderr
    result = json.loads((out / "result.json").read_text())
    state = load_checkpoint(checkpoint_path(out / "checkpoints", 3))
    exported, teacher = load_file(out / "backbone" / "model.safetensors"), teacher_backbone(state)
    assert exported.keys() == teacher.keys() and all(torch.equal(exported[k], teacher[k]) for k in exported)
    student = {k.removeprefix("backbone."): v for k, v in state["model"].items() if k.startswith("backbone.")}
    assert any(not torch.equal(exported[k], student[k]) for k in exported)  # the teacher, not the student
    assert int(state["model"]["steps_done"]) == 3 and state["model"]["center.center"].abs().sum() > 0
    history = MlflowClient(result["tracking_uri"]).get_metric_history(result["run_id"], "weight_decay")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(
        [cosine_weight_decay(k, 3, 0.04, 0.4) for k in range(3)])


@pytest.mark.slow
def test_ibot_resume_is_bitwise_identical_to_a_straight_run(tiny_config, tmp_path, monkeypatch):
    from ssl_foundry.pipeline.train.trainer import train

    overrides = [*IBOT, "train.max_steps=4", "train.checkpoint_every=1", "train.keep_checkpoints=4", "data.num_workers=1"]
    straight = train(tiny_config(tmp_path / "straight", *overrides))
    resumed_dir = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        crash_after_checkpoint(patch, 2)
        with pytest.raises(SimulatedCrash):
            train(tiny_config(resumed_dir, *overrides))
    resumed = train(tiny_config(resumed_dir, *overrides))
    assert straight.steps == resumed.steps == 4 and straight.final_loss == resumed.final_loss
    a = load_checkpoint(checkpoint_path(tmp_path / "straight" / "checkpoints", 4))
    b = load_checkpoint(checkpoint_path(resumed_dir / "checkpoints", 4))
    assert_state_equal(a["model"], b["model"], "model")  # teacher, centres, mask token, steps_done
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]  # lr and weight decay of step 4
    exported = load_file(resumed_dir / "backbone" / "model.safetensors")
    assert all(torch.equal(exported[k], v) for k, v in teacher_backbone(b).items())
    first = load_checkpoint(checkpoint_path(resumed_dir / "checkpoints", 2))
    assert not all(torch.equal(first["model"][k], b["model"][k]) for k in b["model"])  # it trained on

"""Every video recipe through `foundry pretrain` on clip shards of the real packaged videos (tiny
models, a few steps): it trains, logs to MLflow and exports a backbone that plain timm loads; then
`foundry eval temporal-order` on an export. Image methods train on frames of the same shards."""
from __future__ import annotations

import json
import math

import pytest
import timm
import torch
from conftest import run_cli
from mlflow import MlflowClient

from ssl_foundry.data_prep.shard_format import read_manifest
from ssl_foundry.pipeline.config import LinearProbeConfig
from ssl_foundry.pipeline.evaluate.temporal_order import temporal_order_accuracy

TINY = {  # per recipe: overrides that make the model tiny
    "tcn_resnet18_video": ["model.backbone=resnet10t", "model.method_args.proj_hidden_dim=32"],
    "shuffle_and_learn_resnet18_video": ["model.backbone=resnet10t", "model.method_args.classifier_hidden_dim=32"],
    "cpc_resnet18_video": ["model.backbone=resnet10t", "model.method_args.embed_dim=16",
                           "model.method_args.context_dim=16"],
    "video_mae_vit_tiny_video": ["model.backbone_args.depth=2", "model.backbone_args.img_size=32",
                                 "model.method_args.decoder_embed_dim=32", "model.method_args.decoder_depth=1",
                                 "model.method_args.decoder_num_heads=2"],
    "simclr_resnet18_video": ["model.backbone=resnet10t", "model.method_args.proj_hidden_dim=32"],
}


def pretrain_args(recipe: str, clips, out, *extra: str) -> list[str]:
    size = 32
    return ["pretrain", f"configs/{recipe}.yaml", f"output_dir={out}", f"data.train={clips}",
            f"data.eval_test={clips}", f"data.eval_image_size={size}", "data.num_workers=0",
            "data.shuffle_buffer=8", "train.max_steps=2", "train.batch_size=4", "train.log_every=1",
            "train.warmup_steps=0", "train.threads=1", "train.precision=fp32", "mlflow.registered_model=",
            *([] if recipe.startswith("simclr") else ["data.clip_frames=4", "data.frame_stride=2"]),
            f"data.views=[{{count: {2 if recipe.startswith('simclr') else 1}, ops: [{{op: random_resized_crop, "
            f"args: {{size: {size}}}}}, {{op: horizontal_flip, p: 0.5}}]}}]", *TINY[recipe], *extra]


@pytest.mark.parametrize("recipe", list(TINY))
def test_video_recipe_pretrains_and_exports_a_timm_backbone(recipe, video_clips, tmp_path):
    out = tmp_path / "run"
    done = run_cli(pretrain_args(recipe, video_clips, out), tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    result = json.loads((out / "result.json").read_text())
    assert result["steps"] == 2 and math.isfinite(result["final_loss"])
    run = MlflowClient(tracking_uri=result["tracking_uri"]).get_run(result["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["model.method"] == recipe.split("_resnet")[0].split(
        "_vit")[0]
    backbone = timm.create_model(f"local-dir:{result['backbone_dir']}", pretrained=True).eval()
    with torch.no_grad():
        features = backbone(torch.randn(2, 3, 32, 32))
    assert features.shape == (2, backbone.num_features) and torch.isfinite(features).all()
    if recipe.startswith("tcn"):  # the video probe on this export, logged as an evaluation run
        probe = run_cli(["eval", "temporal-order", f"configs/{recipe}.yaml", f"output_dir={out}",
                         f"data.train={video_clips}", f"data.eval_test={video_clips}", "data.eval_image_size=32",
                         "eval.linear.epochs=5", "eval.linear.lrs=[0.1]",
                         f"mlflow.tracking_uri={result['tracking_uri']}"], tmp_path)
        assert probe.returncode == 0, probe.stderr[-3000:]
        report = json.loads(probe.stdout.strip().splitlines()[-1])
        assert 0.0 <= report["temporal_order_top1"] <= 1.0
        evaluation = MlflowClient(tracking_uri=result["tracking_uri"]).get_run(report["eval_run_id"])
        assert "temporal_order_top1.vtest" in evaluation.data.metrics


def test_video_method_on_image_shards_is_a_config_error(fmnist, tmp_path):
    done = run_cli(["pretrain", "configs/tcn_resnet18_video.yaml", f"output_dir={tmp_path / 'run'}",
                    f"data.train={fmnist}/train", "data.eval_test=", "train.max_steps=1"], tmp_path)
    assert done.returncode != 0
    assert "trains on video clips" in done.stderr and "foundry prep video" in done.stderr


def test_video_method_on_two_ranks(video_clips, tmp_path):
    """TCN's negatives come from the global batch: 2 gloo ranks through the elastic launcher."""
    out = tmp_path / "run"
    done = run_cli(pretrain_args("tcn_resnet18_video", video_clips, out, "launch.nproc_per_node=2"), tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert json.loads((out / "result.json").read_text())["steps"] == 2


def test_clip_too_short_for_the_pretext_task_is_a_config_error(video_clips):
    from ssl_foundry.pipeline.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="needs clips of at least 7 frames.*data.clip_frames=4 gives 4"):
        load_config("configs/tcn_resnet18_video.yaml", [f"data.train={video_clips}", f"data.eval_test={video_clips}",
                                                         "data.clip_frames=4", "model.method_args.negative_margin=6"])
    # data.clip_frames=0 takes the stored clips whole: 8 frames (conftest.VIDEO_CLIP)
    with pytest.raises(ConfigError, match=r"needs clips of at least 11 frames.*\(8 frames"):
        load_config("configs/cpc_resnet18_video.yaml", [f"data.train={video_clips}", f"data.eval_test={video_clips}",
                                                         "data.clip_frames=0", "model.method_args.prediction_steps=10"])
    load_config("configs/cpc_resnet18_video.yaml", [f"data.train={video_clips}", f"data.eval_test={video_clips}",
                                                     "data.clip_frames=0"])


def test_bench_temporal_order_writes_json(video_clips, tmp_path):
    overrides = pretrain_args("tcn_resnet18_video", video_clips, tmp_path / "unused")[3:]  # the run's keys
    overrides = [o for o in overrides if not o.startswith(("output_dir=", "train.max_steps="))]
    done = run_cli(["bench", "temporal-order", "--recipe", "configs/tcn_resnet18_video.yaml", "--budget-minutes",
                    "1", "--seeds", "2", "--train-seeds", "2", "--out-dir", str(tmp_path / "bench"), *overrides,
                    "train.max_steps=2", "eval.linear.epochs=5", "eval.linear.lrs=[0.1]"], tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "bench" / "temporal_order.json").read_text())
    assert [(r["method"], r["seed"], r["steps"]) for r in report["runs"]] == [("tcn", 0, 2), ("tcn", 1, 2)]
    assert (tmp_path / "bench" / "tcn_resnet18_video.seed1" / "backbone").is_dir()
    first = report["runs"][0]
    assert first["clips"] == sum(v["clips"] for v in read_manifest(video_clips)["videos"])
    assert [b["seed"] for b in report["random_init"]] == [0, 1]
    for row in [*report["runs"], *report["random_init"]]:
        assert 0 <= row["temporal_order_top1"] <= 1 and set(row["per_video"]) >= {"vtest.avi", "bikes.mp4"}
    for name, rows in [("tcn_resnet18_video", report["runs"]), ("random init resnet10t", report["random_init"])]:
        top1 = [r["temporal_order_top1"] for r in rows]
        assert report["summary"][name] == pytest.approx({"seeds": 2, "mean": sum(top1) / 2,
                                                         "sd": abs(top1[0] - top1[1]) / 2 ** 0.5})


def drifting_clip_features(drift_per_video: list[float], clips: int = 20, frames: int = 4, dim: int = 2,
                           seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """(N, frames, dim) features: noise, plus a feature 0 that moves by ``drift`` per frame within
    each clip of a video -- an arrow-of-time cue whose sign each video sets."""
    g = torch.Generator().manual_seed(seed)
    rows, videos = [], []
    for v, drift in enumerate(drift_per_video):
        x = torch.randn(clips, frames, dim, generator=g) * 0.1
        x[..., 0] += drift * torch.arange(frames) + torch.randn(clips, 1, generator=g)  # a per-clip offset
        rows.append(x)
        videos += [f"video{v}.avi"] * clips
    return torch.cat(rows), videos


def test_temporal_order_probe_scores_cues_that_transfer_to_the_held_out_video():
    """The probe measures what carries over to an unseen video: a drift shared by every video is
    read perfectly on each held-out one; a drift whose sign one video reverses is read backwards
    on that video (and on no other), which is why few videos make the probe noisy."""
    probe = LinearProbeConfig(epochs=30, lrs=[0.1, 1.0])
    shared = temporal_order_accuracy(*drifting_clip_features([1.0] * 5), probe)
    assert shared["temporal_order_top1"] == 1.0 and shared["clips"] == 100
    assert set(shared["per_video"]) == {f"video{v}.avi" for v in range(5)}
    odd_one_out = temporal_order_accuracy(*drifting_clip_features([1.0, 1.0, 1.0, 1.0, -1.0]), probe)
    assert odd_one_out["per_video"]["video4.avi"] <= 0.1  # read backwards
    assert all(odd_one_out["per_video"][f"video{v}.avi"] >= 0.85 for v in range(4))  # 1 of 4 training videos misleads
    no_cue = temporal_order_accuracy(*drifting_clip_features([0.0] * 5), probe)
    assert 0.2 < no_cue["temporal_order_top1"] < 0.8
    with pytest.raises(ValueError, match="2 videos or more"):
        temporal_order_accuracy(*drifting_clip_features([1.0]), probe)

"""`foundry bench temporal-order` to completion: one tiny TCN recipe trained 2 steps on the sample
videos' clips, probed, beside its backbone at 2 random initialisations; the summary is the mean
and standard deviation of the rows it summarises."""
import json
import statistics

import pytest
from conftest import run_cli

TINY_TCN = ["model.backbone=resnet10t", "model.method_args.proj_hidden_dim=32", "data.clip_frames=4",
            "data.frame_stride=2", "data.eval_image_size=32", "data.num_workers=0", "data.shuffle_buffer=8",
            "data.views=[{count: 1, ops: [{op: random_resized_crop, args: {size: 32}}]}]", "train.batch_size=4",
            "train.warmup_steps=0", "train.threads=1", "train.precision=fp32", "eval.linear.epochs=5",
            "eval.linear.lrs=[0.1]"]


def test_bench_temporal_order_trains_probes_and_summarises(video_clips, tmp_path):
    out = tmp_path / "bench"
    # The overrides come after the bench's own: 2 steps instead of a time budget.
    done = run_cli(["bench", "temporal-order", f"data.train={video_clips}", f"data.eval_test={video_clips}",
                    *TINY_TCN, "train.budget_minutes=0", "train.max_steps=2", "--recipe",
                    "configs/tcn_resnet18_video.yaml", "--seeds", "2", "--out-dir", str(out)], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "temporal_order.json").read_text())
    assert report["benchmark"] == "temporal-order" and report["recipes"] == ["configs/tcn_resnet18_video.yaml"]
    (run,) = report["runs"]
    assert run["recipe"] == "tcn_resnet18_video" and run["steps"] == 2 and run["seed"] == 0
    assert 0.0 <= run["temporal_order_top1"] <= 1.0 and run["probe_s"] > 0
    assert [(r["backbone"], r["seed"]) for r in report["random_init"]] == [("resnet10t", 0), ("resnet10t", 1)]
    init = [r["temporal_order_top1"] for r in report["random_init"]]
    assert report["summary"] == {
        "tcn_resnet18_video": {"seeds": 1, "mean": run["temporal_order_top1"], "sd": None},
        "random init resnet10t": {"seeds": 2, "mean": pytest.approx(statistics.fmean(init)),
                                  "sd": pytest.approx(statistics.stdev(init))}}

"""`foundry bench train` to completion on the tiny recipe (a 2-block ViT on 16 px Fashion-MNIST):
the report's numbers add up, and --profile writes the profiler's table and trace."""
import json

import pytest
from conftest import run_cli, write_recipe


def test_bench_train_reports_throughput_and_its_parts(fmnist, tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml", fmnist, tmp_path / "unused")
    out, profile = tmp_path / "train.json", tmp_path / "profile.txt"
    done = run_cli(["bench", "train", str(recipe), "--steps", "2", "--warmup", "1", "--out", str(out),
                    "--profile", str(profile)], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["benchmark"] == "train" and report["method"] == "simclr" and report["views"] == 2
    assert report["batch_size"] == 8 and report["precision"] == "fp32"  # the tiny recipe trains in fp32
    assert report["steps_measured"] == 2 and report["warmup_steps_skipped"] == 1
    assert report["resolved_config"]["train"]["max_steps"] == 3
    assert report["step_time_s"] == pytest.approx(report["data_wait_s"] + report["compute_s"], rel=1e-9)
    assert report["images_per_s"] == pytest.approx(8 / report["step_time_s"], rel=1e-9)
    assert 0.0 <= report["data_wait_fraction"] <= 1.0 and report["compute_s"] > 0
    assert report["wall_s_including_setup"] >= 2 * report["step_time_s"]  # it includes the 2 measured steps
    assert report["loader_workers"] == 0 and report["processes"] >= 1 and report["peak_rss_mb"] > 0
    assert {"cpu_count", "torch", "cpu_fast_bf16"} <= set(report["machine"])
    assert json.loads(done.stdout[done.stdout.rindex("\n{\n"):]) == report  # the same JSON, last on stdout
    assert "Self CPU" in profile.read_text() and profile.with_suffix(".trace.json").is_file()

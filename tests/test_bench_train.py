"""`foundry bench train` to completion on the tiny recipe (a 2-block ViT on 16 px Fashion-MNIST):
the report's numbers add up, --profile writes the profiler's table and trace, and the trainer's
steady throughput stands beside the same work done by a plain lightly-style loop (interleaved
blocks), both as fractions of the matmul peak measured in the same command. Numbers only: no speed
is asserted."""
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


def test_bench_train_reports_the_trainer_beside_the_reference_loop(fmnist, tmp_path):
    recipe = write_recipe(tmp_path / "run.yaml", fmnist, tmp_path / "unused")
    out = tmp_path / "train.json"
    done = run_cli(["bench", "train", str(recipe), "train.threads=1", "--steps", "4", "--warmup", "1",
                    "--block", "2", "--out", str(out)], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["steps_measured"] == 4 and report["precision"] in ("fp32", "torch.bfloat16")
    reference = report["reference"]
    assert reference["steps_measured"] == 4 and reference["loader_workers"] == 2  # two blocks of two
    assert report["speedup_vs_reference"] == reference["step_time_s"] / report["step_time_s"]
    peaks = report["matmul_peak_gflops"]
    assert peaks["fp32"] > 0 and peaks["bf16"] > 0 and report["model_gflop_per_step"] > 0
    assert report["fraction_of_bf16_peak"] == report["gflops"] / peaks["bf16"]
    assert report["cpu_s_per_step"] > 0 and reference["cpu_s_per_step"] > 0
    assert reference["fraction_of_fp32_peak"] == reference["gflops"] / peaks["fp32"]

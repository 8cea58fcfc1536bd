"""`foundry bench train`: the trainer's steady throughput beside the same work done by a plain
lightly-style loop (interleaved blocks), and both as fractions of the matmul peak measured in the
same command. Numbers only: no speed is asserted."""
import json

from conftest import run_cli, write_recipe


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

"""`foundry bench strategies`: the same short run under DDP and DeepSpeed ZeRO, one JSON row per case
with step time and every rank's peak RSS beside ZeRO's model-state arithmetic."""
import json

import pytest
from conftest import REPO, run_cli, write_recipe

from ssl_foundry.launch.bench import model_state_mb_per_rank

MB = 2**20


def test_model_state_arithmetic_by_stage():
    """Hand-worked: 1 Mi trained + 0.5 Mi frozen parameters, AdamW (8 B of moments), 4 ranks."""
    trained, frozen, ranks = MB, MB // 2, 4
    expect = {  # parameters (4 B, trained + frozen) + gradients (4 B) + moments (8 B), in MiB
        "ddp": 6 + 4 + 8,
        "zero1": 6 + 4 + 8 / 4,
        "zero2": 6 + (4 + 8) / 4,
        "zero3": (6 + 4 + 8) / 4,
        "zero2-offload": 6 + (4 + 8) / 4,  # offloaded shards are still one rank's share (in CPU memory)
        "zero3-offload": (6 + 4 + 8) / 4,
    }
    for case, mb in expect.items():
        assert model_state_mb_per_rank(case, trained, frozen, "adamw", ranks) == pytest.approx(mb), case
    assert model_state_mb_per_rank("ddp", trained, 0, "sgd", ranks) == pytest.approx(4 + 4 + 4)


@pytest.mark.slow
def test_bench_strategies_writes_a_row_per_case(fmnist, tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml", fmnist, tmp_path / "unused")
    out = tmp_path / "bench"
    shipped_json = REPO / "configs" / "deepspeed" / "small_buckets.json"  # for the DeepSpeed case only
    proc = run_cli(["bench", "strategies", str(recipe), "train.optimizer=adamw", f"deepspeed.config_json={shipped_json}",
                    "--steps", "3", "--cases", "ddp", "zero3", "--out-dir", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads((out / "strategies.json").read_text())
    assert report["ranks"] == 2 and [row["case"] for row in report["cases"]] == ["ddp", "zero3"]
    for row in report["cases"]:
        assert "error" not in row
        for key in ("rss_mb_per_rank", "peak_rss_mb_per_rank"):
            assert len(row[key]) == 2 and all(mb > 0 for mb in row[key])
        assert row["step_time_s"] > 0 and row["images_per_s"] > 0
    ddp, zero3 = report["cases"]
    assert zero3["model_state_mb_per_rank"] == pytest.approx(ddp["model_state_mb_per_rank"] / 2)
    assert report["trained_params"] > 0 and report["frozen_params"] == 0  # SimCLR: no momentum target
    assert not list(out.glob("*/checkpoints")) and not list(out.glob("mlartifacts/*/artifacts/checkpoints"))
    assert list(out.glob("mlartifacts/*/artifacts/config.yaml"))  # the runs' other artifacts stay
    used = json.loads((out / "zero3" / "deepspeed_config.json").read_text())
    assert used["zero_optimization"]["reduce_bucket_size"] == 5_000_000

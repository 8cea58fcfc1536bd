"""`foundry bench loader` to completion on the 40 package photos (their DALI-indexed shards): DALI's
CPU backend, the torch loader and the batched one at 1 and 2 workers, and the per-op CPU breakdown of the SimCLR
Fashion-MNIST recipe (numbers only: no speed is asserted)."""
import json

import pytest
from conftest import REPO, run_cli


def test_bench_loader_writes_json_for_every_backend(photos, tmp_path):
    out = tmp_path / "loader.json"
    # No warm-up: 2 tiny batches that workers already prefetched can cost less than the CPU clock's 10 ms
    # tick, so cpu_s > 0 would be luck; with the workers' start-up inside the window it is not.
    done = run_cli(["bench", "loader", str(REPO / "configs" / "simclr_resnet18_fmnist.yaml"), "--data", str(photos),
                    "--batch-size", "4", "--batches", "2", "--warmup", "0", "--workers", "1", "2",
                    "--out", str(out)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["benchmark"] == "loader" and report["data"] == [str(photos)]
    assert [(r["backend"], r["workers"]) for r in report["runs"]] == [
        ("dali-cpu", 1), ("dali-cpu", 2), ("torch", 1), ("torch", 2), ("batched", 1), ("batched", 2)]
    for run in report["runs"]:
        assert run["images"] == 8 and run["cpu_s"] > 0
        assert run["images_per_s"] == pytest.approx(run["images"] / run["wall_s"])
        assert run["cpu_ms_per_image"] == pytest.approx(1000 * run["cpu_s"] / run["images"])
    assert report["view_sizes"] == [[32, 32], [32, 32]] and report["samples"] == 40
    for backend in ("dali-cpu", "torch", "batched"):
        rows = report["cpu_breakdown_1_thread"][backend]
        steps = [row["step"] for row in rows]
        assert steps[0].startswith("read + decode + random_resized_crop") and steps[1:] == [
            "horizontal_flip", "color_jitter"]
        for before, row in zip(rows, rows[1:]):  # each op's cost is the difference of cumulative times
            assert row["cumulative_cpu_ms_per_image"] == pytest.approx(
                before["cumulative_cpu_ms_per_image"] + row["cpu_ms_per_image"])

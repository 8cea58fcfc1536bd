"""`foundry bench prep` to completion on 32 Fashion-MNIST images per split."""
import json

from conftest import run_cli


def test_bench_prep_reports_shard_writing_throughput(tmp_path):
    out = tmp_path / "prep.json"
    done = run_cli(["bench", "prep", "--limit", "32", "--workers", "1", "--out", str(out)], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["benchmark"] == "prep" and report["source"] == "fashion-mnist" and report["workers"] == 1
    assert report["samples"] == 64 and report["skipped"] == 0 and report["shards"] == 2  # one per split
    assert report["images_per_s"] == report["samples"] / report["wall_s"] > 0
    assert report["mib_per_s"] > 0 and report["check_s"] >= 0 and 0 < report["write_s"] <= report["wall_s"]
    assert report["processes"] == 2 and report["peak_rss_mb"] > 0

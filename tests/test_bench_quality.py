"""`foundry bench quality`: every recipe trains for the same time budget in its own process, is
kNN-evaluated and linear-probed, and lands in a JSON + markdown table beside raw-pixel and
random-init baselines computed by the same code. Two tiny recipes (a ViT and a ResNet SimCLR) on 128 real
Fashion-MNIST images per split, a few seconds of budget each, and a distillation recipe, which the bench
runs last, from the better of the two."""
from __future__ import annotations

import gzip
import json
import sqlite3
from pathlib import Path

import numpy as np
import yaml

from conftest import FMNIST_LIMIT, run_cli, tiny_recipe
from ssl_foundry.data_prep.fashion_mnist import SOURCE_DIR, split_files

BUDGET_MINUTES = 0.1  # 6 s of training: past the 15 steps the budget probe measures


def _write_recipes(fmnist: Path, tmp_path: Path) -> list[Path]:
    vit = tiny_recipe(fmnist, tmp_path / "unused")
    resnet = tiny_recipe(fmnist, tmp_path / "unused")
    resnet["model"].update(backbone="resnet10t", backbone_args={})
    distill = tiny_recipe(fmnist, tmp_path / "unused")
    distill["model"] = {"method": "distill", "backbone": "resnet10t", "teacher": "set-by-the-bench"}
    distill["data"]["views"][0]["count"] = 1
    paths = []
    for name, recipe in {"tiny_distill": distill, "tiny_vit": vit, "tiny_resnet": resnet}.items():
        recipe["eval"]["after_pretrain"] = True
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        paths.append(path)
    return paths


def _raw_pixel_knn(k: int, temperature: float, mean: float, std: float) -> float:
    """Reference: the paper's weighted kNN vote (Wu et al. 2018) in numpy on the idx files' own
    pixels, normalised as the eval transform does (the 3 grey channels scale every norm alike)."""
    def load(prefix):
        images, labels = split_files(SOURCE_DIR, prefix)
        x = np.frombuffer(gzip.open(images).read()[16:], np.uint8)[: FMNIST_LIMIT * 784].reshape(-1, 784)
        y = np.frombuffer(gzip.open(labels).read()[8:], np.uint8)[:FMNIST_LIMIT].astype(int)
        x = (x / 255.0 - mean) / std
        return x / np.linalg.norm(x, axis=1, keepdims=True), y

    bank, bank_y = load("train")
    queries, query_y = load("t10k")
    sim = queries @ bank.T
    k = min(k, len(bank))
    correct = 0
    for row, label in zip(sim, query_y):
        top = np.argsort(-row)[:k]
        votes = np.bincount(bank_y[top], weights=np.exp(row[top] / temperature), minlength=10)
        correct += int(votes.argmax() == label)
    return correct / len(query_y)


def test_bench_quality_trains_each_recipe_for_the_budget_and_tabulates_with_baselines(fmnist, tmp_path):
    recipes = _write_recipes(fmnist, tmp_path)
    out = tmp_path / "quality"
    done = run_cli(["bench", "quality", "--budget-minutes", str(BUDGET_MINUTES), "--out-dir", str(out),
                    *[a for r in recipes for a in ("--recipe", str(r))], "train.checkpoint_every=1000"], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "quality.json").read_text())

    assert [r["recipe"] for r in report["runs"]] == ["tiny_vit", "tiny_resnet", "tiny_distill"]  # the student last
    for run in report["runs"]:
        result = json.loads((out / run["recipe"] / "result.json").read_text())
        assert run["steps"] == result["steps"] and run["knn_top1"] == result["knn_top1"]
        # The budget, not the (lifted) step count, ended the run, after the probe measured it.
        assert 15 <= run["steps"] < 10**7
        assert run["train_minutes"] > 0  # how long is the machine's business: no time limit in a test
        assert run["images_per_s"] > 0 and 0.0 <= run["knn_top1"] <= 1.0
        assert 0.0 <= run["linear_top1"] <= 1.0 and run["linear_best_lr"] in report["linear_lrs"]
        assert len(list((out / run["recipe"] / "feature_cache").glob("*.pt"))) == 2  # train and test features
    student, teachers = report["runs"][2], report["runs"][:2]
    best = max(teachers, key=lambda r: r["knn_top1"])
    assert student["teacher"] == best["recipe"]
    assert student["knn_share_of_teacher"] == student["knn_top1"] / best["knn_top1"]
    config = json.loads((out / "tiny_distill" / "backbone" / "config.json").read_text())
    assert config["ssl_foundry"]["teacher"]["ref"] == str(out / best["recipe"] / "backbone")
    # Every run is in the bench's MLflow store, finished, with its kNN metric.
    with sqlite3.connect(out / "mlflow.db") as db:
        finished = dict(db.execute("SELECT run_uuid, status FROM runs").fetchall())
        knn_runs = {r for (r,) in db.execute("SELECT run_uuid FROM metrics WHERE key = 'knn_top1'")}
    for run in report["runs"]:
        assert finished[run["mlflow_run_id"]] == "FINISHED" and run["mlflow_run_id"] in knn_runs

    # One raw-pixel row and one random-init row per distinct backbone; raw pixels match a
    # reference computed here from the idx files (within one tied vote).
    baselines = {(b["recipe"], b["backbone"]): b for b in report["baselines"]}
    assert set(baselines) == {("raw pixels (28 px)", "-"), ("raw pixels (28 px, unnormalised)", "-"),
                              ("random init (16 px)", "vit_tiny_patch16_224"), ("random init (16 px)", "resnet10t")}
    cfg = yaml.safe_load(recipes[0].read_text())
    expected = _raw_pixel_knn(report["knn_k"], report["knn_temperature"], cfg["data"]["mean"][0], cfg["data"]["std"][0])
    assert abs(baselines["raw pixels (28 px)", "-"]["knn_top1"] - expected) <= 1 / FMNIST_LIMIT
    expected = _raw_pixel_knn(report["knn_k"], report["knn_temperature"], 0.0, 1.0)
    assert abs(baselines["raw pixels (28 px, unnormalised)", "-"]["knn_top1"] - expected) <= 1 / FMNIST_LIMIT

    assert all(0.0 <= b["linear_top1"] <= 1.0 for b in report["baselines"])

    table = (out / "quality.md").read_text()
    assert f"--budget-minutes {BUDGET_MINUTES:g}" in table and "| kNN top-1 | linear top-1 |" in table
    for name in ["tiny_vit", "tiny_resnet", "tiny_distill", "raw pixels (28 px)", "random init (16 px)"]:
        assert f"| {name} |" in table
    assert f"tiny_distill distils {best['recipe']}: its kNN top-1 is" in table

    # --reuse-runs: evaluated again from the run folders, nothing trained (no new MLflow run).
    done = run_cli(["bench", "quality", "--budget-minutes", str(BUDGET_MINUTES), "--out-dir", str(out), "--reuse-runs",
                    *[a for r in recipes for a in ("--recipe", str(r))]], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    again = json.loads((out / "quality.json").read_text())
    assert [r["steps"] for r in again["runs"]] == [r["steps"] for r in report["runs"]]
    assert [r["linear_top1"] for r in again["runs"]] == [r["linear_top1"] for r in report["runs"]]
    with sqlite3.connect(out / "mlflow.db") as db:
        assert len(db.execute("SELECT run_uuid FROM runs").fetchall()) == len(finished)

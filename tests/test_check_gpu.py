"""`foundry check gpu`: its CPU twin end to end (`--dry-run`, every item through real processes:
DALI's CPU backend, gloo ranks, DeepSpeed's CPU accelerator), the runner's isolation of items that
fail, hang or die, the GPU peak table behind MFU, and the record that lets data.backend=auto pick
DALI on a GPU where the check passed."""
import json
import os
import subprocess
import sys
import time

import psutil
import pytest
import torch

from conftest import run_cli
from ssl_foundry.launch.check_gpu import update_dali_acceptance
from ssl_foundry.launch.isolated_items import Item, run_items
from ssl_foundry.launch.gpu_checks import ITEMS, Context, peak_bf16_tflops
from ssl_foundry.pipeline.data.dali_acceptance import auto_backend_on_gpu, dali_build, record_path
from ssl_foundry.pipeline.data.loader import train_backend

# timm's ResNet-18 at 32 px: 0.217 GFLOP per view, forward + backward (/work/shared/notes/platform-facts.md:
# 3 x the forward's 2 x 36.2 M multiply-adds), less what layer4's 3x3 convolutions would spend on zero
# padding around its 1x1 outputs (models/backbones.py SingleOutputConv2d computes only the taps on the
# input: 6.95 M multiply-adds fewer): 3 x 2 x 29.26 M = 0.176 GFLOP. SimCLR's projector adds < 0.1 %.
RESNET18_32PX_GFLOP_PER_VIEW = 0.176


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("check")
    out, cache = tmp / "check", tmp / "cache"
    done = run_cli(["check", "gpu", "--dry-run", "--out", str(out), "--peak-tflops", "1"], tmp,
                   XDG_CACHE_HOME=str(cache))
    return done, out, cache


@pytest.mark.slow
def test_dry_run_passes_every_item_and_writes_the_report(dry_run):
    done, out, cache = dry_run
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["mode"] == "dry-run" and report["passed"]
    assert report["command"].endswith("--dry-run --peak-tflops 1.0")
    assert list(report["items"]) == [item.name for item in ITEMS]
    for name, item in report["items"].items():
        assert item["status"] == "passed", (name, item)
        assert all(item["checks"].values()) and item["seconds"] > 0 and item["summary"]
        assert (out / item["log"]).is_file()
    table = (out / "summary.txt").read_text()
    assert all(f"{name:<26}passed" in table for name in report["items"]) and "9/9 items passed" in done.stdout
    # a CPU run is no evidence for a GPU: nothing recorded
    assert report["dali_acceptance"] is None and not (cache / "ssl-foundry").exists()


@pytest.mark.slow
def test_dry_run_figures(dry_run):
    _, out, _ = dry_run
    items = json.loads((out / "gpu_check.json").read_text())["items"]

    dali = items["dali_loader"]
    assert dali["decode"] == "cpu" and dali["view_sizes"] == [[32, 32], [32, 32]]
    assert dali["images_per_s"]["dali"] > 0 and dali["images_per_s"]["torch"] > 0
    (whole,) = dali["per_op"]  # the twin compares the whole spec only: BYOL's 6 ops
    assert (whole["ops"], whole["through"]) == (6, "solarize")
    # 3 channels x (mean, std), all 40 photos paired (a whole epoch from each backend)
    assert len(whole["statistics"]) == 6 and {s["images"] for s in whole["statistics"]} == {40}
    assert all(abs(s["difference"]) <= s["bound"] for s in whole["statistics"])

    simclr = items["train_simclr_resnet50"]
    views = simclr["batch_size"] * len(simclr["view_sizes"])
    assert simclr["flops_per_step"] / views / 1e9 == pytest.approx(RESNET18_32PX_GFLOP_PER_VIEW, rel=0.05)
    for name in ("train_simclr_resnet50", "train_mae_vit_b16", "compile_simclr_resnet50", "compile_mae_vit_b16"):
        run = items[name]
        assert run["images_per_s"] == pytest.approx(run["batch_size"] / run["step_time_s"])
        assert run["mfu"] == pytest.approx(run["flops_per_step"] / run["step_time_s"] / 1e12)  # --peak-tflops 1
        assert run["peak_memory_mb"] > 0 and run["timed_steps"] == 2
    assert items["compile_mae_vit_b16"]["compile_backend"] == "aot_eager"
    assert items["compile_mae_vit_b16"]["flops_per_step"] == items["train_mae_vit_b16"]["flops_per_step"]
    assert items["compile_mae_vit_b16"]["speedup_over_eager"] > 0

    nccl = items["nccl_simclr"]
    assert (nccl["backend"], nccl["world_size"], nccl["global_batch"]) == ("gloo", 2, 8)

    zero = items["deepspeed_zero"]
    assert zero["cpu_adam"]["accelerator"] == "cpu" and set(zero["zero"]) == {"zero2", "zero3", "zero2_offload"}
    assert all(case["max_loss_rel_diff"] <= 5e-5 for case in zero["zero"].values())

    knn = items["export_knn"]
    assert (knn["bank"], knn["queries"]) == (256, 256) and 0.2 < knn["knn_top1"] <= 1
    assert knn["prediction_agreement_with_cpu"] == 1.0


# The item processes fork from a server that has imported these (the items below live here).
PRELOAD = ["ssl_foundry.launch.gpu_checks", __name__]


def raises(ctx):
    raise ValueError("boom")


def hangs(ctx):
    """Starts a grandchild that would outlive it, then never returns."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    (ctx.out / "grandchild.pid").write_text(str(child.pid))
    time.sleep(600)


def dies(ctx):
    os._exit(3)


def fails_a_check(ctx):
    return {"checks": {"agrees": False, "runs": True}, "summary": "ran, disagreed"}


def passes(ctx, greeting):
    return {"checks": {"ok": True}, "summary": f"{greeting}; before me: {', '.join(sorted(ctx.previous))}"}


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_each_item_failure_is_recorded_and_the_next_item_runs(tmp_path):
    items = [Item("raises", raises), Item("hangs", hangs), Item("dies", dies), Item("fails", fails_a_check),
             Item("passes", passes, {"greeting": "hello"})]
    limits = {"raises": 60, "hangs": 10, "dies": 60, "fails": 60, "passes": 60}
    results = run_items(items, Context(dry_run=True, out=tmp_path), limits, total_s=None, preload=PRELOAD)
    assert results["raises"]["status"] == "error" and results["raises"]["error"] == "ValueError: boom"
    assert "Traceback" in (tmp_path / results["raises"]["log"]).read_text()
    assert results["hangs"]["status"] == "timeout" and results["hangs"]["seconds"] >= 10
    assert gone(int((tmp_path / "grandchild.pid").read_text()))  # killed with the item
    assert results["dies"]["status"] == "error" and "exit code 3" in results["dies"]["error"]
    assert results["fails"]["status"] == "failed" and results["fails"]["failed_checks"] == ["agrees"]
    assert results["passes"]["status"] == "passed"
    assert results["passes"]["summary"] == "hello; before me: dies, fails, hangs, raises"


def test_items_beyond_the_total_budget_are_skipped(tmp_path):
    results = run_items([Item("passes", passes, {"greeting": "hi"})], Context(dry_run=True, out=tmp_path),
                        {"passes": 60}, total_s=5, preload=PRELOAD)
    assert results["passes"] == {"status": "skipped", "error": "the check's budget of 5 s is spent"}


def test_unknown_item_is_refused_naming_the_items(tmp_path):
    done = run_cli(["check", "gpu", "--dry-run", "--only", "dali", "--out", str(tmp_path)], tmp_path)
    assert done.returncode == 2
    assert "--only dali: no such item; items: data, dali_loader, train_simclr_resnet50" in done.stderr


@pytest.mark.parametrize("name,tflops", [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.4), ("NVIDIA H200 NVL", 835.0), ("NVIDIA GH200 480GB", 989.4),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA L4", 121.0),
    ("NVIDIA L40S", 362.0), ("NVIDIA L40", 181.0), ("NVIDIA B200", 2250.0),
    ("NVIDIA A10G", None), ("Tesla V100-SXM2-16GB", None)])
def test_the_gpu_peak_is_looked_up_by_its_most_specific_name(name, tflops):
    """Device names contain each other (H200 in GH200, L4 in L40S, H100 in H100 PCIe): the lookup
    must take the right row; a GPU without bf16 tensor cores, or not in the table, has none."""
    assert peak_bf16_tflops(name) == tflops


def test_auto_picks_dali_on_a_gpu_only_where_the_check_passed(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    build = dali_build()
    backend, why = auto_backend_on_gpu("NVIDIA H200")
    assert backend == "torch" and f"DALI {build} has not passed `foundry check gpu` on NVIDIA H200" in why

    report = {"mode": "gpu", "started": "2026-12-04T00:00:00+00:00", "report": "gpu-check/gpu_check.json",
              "machine": {"gpus": [{"name": "NVIDIA H200"}]},
              "items": {"dali_loader": {"status": "passed", "dali": build, "images_per_s": {"dali": 1.0}}}}
    recorded = update_dali_acceptance(report)
    assert recorded["accepted"] and recorded["record"] == str(record_path("NVIDIA H200", build))
    assert json.loads(record_path("NVIDIA H200", build).read_text())["report"] == "gpu-check/gpu_check.json"
    assert auto_backend_on_gpu("NVIDIA H200")[0] == "dali"
    assert auto_backend_on_gpu("NVIDIA L4")[0] == "torch"  # another GPU model is not vouched for

    report["items"]["dali_loader"]["status"] = "failed"  # a later failing check withdraws the record
    assert update_dali_acceptance(report)["accepted"] is False
    assert auto_backend_on_gpu("NVIDIA H200")[0] == "torch"

    assert train_backend("auto", torch.device("cpu")) == ("batched", "auto: on cpu")
    assert train_backend("dali", torch.device("cpu")) == ("dali", "data.backend=dali")

"""`foundry check gpu`: one command that runs every GPU path of ssl-foundry on a machine and says what
works, as an acceptance test (docs/gpu-acceptance.md): DALI's GPU decode and augmentation against
the torch loader, training throughput and MFU, torch.compile, DeepSpeed ZeRO on CUDA against DDP,
an NCCL process group, export to plain timm and kNN on the GPU (the items: launch/gpu_checks.py).

Each item runs in a process of its own under a time limit, so a CUDA fault, a crash or a hang costs
that item only: its error (or timeout) is recorded and the next item runs. The whole check fits in
8 minutes on one GPU. It writes ``gpu_check.json`` (every item's figures and checks), ``summary.txt``
(the table it prints) and one log per item; when DALI's item passes on a GPU, ``data.backend=auto``
picks DALI there from then on (pipeline/data/dali_acceptance.py).

``--dry-run`` runs each item's CPU twin at tiny sizes: what a machine without a GPU and the test
suite run. It proves the plumbing and the JSON's shape, not the GPU.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from ssl_foundry.launch.bench.report import machine as cpu_machine
from ssl_foundry.launch.gpu_checks import ITEMS, Context
from ssl_foundry.launch.isolated_items import run_items, write_json
from ssl_foundry.pipeline.data.dali_acceptance import record_acceptance, withdraw_acceptance

REPORT_NAME, SUMMARY_NAME = "gpu_check.json", "summary.txt"


def _machine() -> dict:
    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    gpus = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
    return {**cpu_machine(), "host": platform.node(), "torch_cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if gpus else None,
            "gpus": [{"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                      "compute_capability": f"{p.major}.{p.minor}"} for p in gpus],
            "packages": {name: version(name) for name in ("timm", "deepspeed", "nvidia-dali-cuda120",
                                                          "nvidia-dali-cuda130")}}


def update_dali_acceptance(report: dict) -> dict | None:
    """On a GPU: record DALI's pass (data.backend=auto then picks it there), or withdraw an old record."""
    dali = report["items"].get("dali_loader")
    if report["mode"] != "gpu" or not dali or "dali" not in dali:  # not run, or DALI did not even start
        return None
    gpu = report["machine"]["gpus"][0]["name"]
    if dali["status"] != "passed":
        withdraw_acceptance(gpu, dali["dali"])
        return {"gpu": gpu, "dali": dali["dali"], "accepted": False}
    path = record_acceptance(gpu, dali["dali"], {"checked": report["started"], "report": report["report"],
                                                 "images_per_s": dali["images_per_s"]})
    return {"gpu": gpu, "dali": dali["dali"], "accepted": True, "record": str(path)}


def summary_table(report: dict) -> str:
    items = report["items"]
    passed = sum(r["status"] == "passed" for r in items.values())
    mode = "dry run: the CPU twins" if report["mode"] == "dry-run" else ", ".join(
        sorted({g["name"] for g in report["machine"]["gpus"]}))
    lines = [f"foundry check gpu ({mode}): {passed}/{len(items)} items passed in {report['seconds']:.0f} s; "
             f"{report['report']}",
             f"{'item':<26}{'status':<9}{'time':>7}  result"]
    for name, result in items.items():
        seconds = f"{result['seconds']:.0f} s" if "seconds" in result else "-"
        detail = result.get("summary", "")
        if result["status"] != "passed":
            detail = "; ".join(filter(None, [detail, result.get("error"), ", ".join(result.get("failed_checks", []))]))
        lines.append(f"{name:<26}{result['status']:<9}{seconds:>7}  {detail}")
    acceptance = report.get("dali_acceptance")
    if acceptance:
        lines.append(f"data.backend=auto on {acceptance['gpu']}: "
                     f"{'DALI' if acceptance['accepted'] else 'torch (DALI did not pass)'}")
    return "\n".join(lines) + "\n"


def _command(args: argparse.Namespace) -> str:
    words = ["foundry", "check", "gpu", "--out", args.out, *(["--dry-run"] if args.dry_run else []),
             *(["--only", *args.only] if args.only else []),
             *(["--peak-tflops", str(args.peak_tflops)] if args.peak_tflops else [])]
    return shlex.join(words)


def check_gpu(args: argparse.Namespace) -> int:
    unknown = set(args.only or []) - {item.name for item in ITEMS}
    if unknown:
        print(f"foundry check gpu: --only {' '.join(sorted(unknown))}: no such item; items: "
              f"{', '.join(item.name for item in ITEMS)}", file=sys.stderr)
        return 2
    if not args.dry_run and not torch.cuda.is_available():
        print("foundry check gpu: no CUDA device is visible; on a machine without a GPU run "
              "`foundry check gpu --dry-run` (the items' CPU twins)", file=sys.stderr)
        return 2
    if args.dry_run:  # the CPU twins: tiny models, one thread per process (see gpu_checks.CPU_TWIN)
        os.environ["OMP_NUM_THREADS"] = "1"
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(dry_run=args.dry_run, out=out, peak_tflops=args.peak_tflops)
    items = [item for item in ITEMS if not args.only or item.name in args.only or item.name == "data"]
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    tic = time.perf_counter()
    results = run_items(items, ctx, {item.name: ctx.limit_s(item.name) for item in items}, ctx.scale.total_s,
                        preload=["ssl_foundry.launch.gpu_checks"])
    report = {"command": _command(args), "mode": "dry-run" if args.dry_run else "gpu",
              "passed": all(r["status"] == "passed" for r in results.values()), "started": started,
              "seconds": time.perf_counter() - tic, "report": str(out / REPORT_NAME), "machine": _machine(),
              "items": results}
    report["dali_acceptance"] = update_dali_acceptance(report)
    write_json(out / REPORT_NAME, report)
    table = summary_table(report)
    (out / SUMMARY_NAME).write_text(table)
    print(table, end="")
    return 0 if report["passed"] else 1


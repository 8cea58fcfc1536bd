"""`foundry check gpu`: one command that runs every GPU path of ssl-foundry on a machine and says what
works, as an acceptance test (docs/gpu-acceptance.md): DALI's GPU decode and augmentation against
the torch loader, training throughput and MFU, torch.compile, DeepSpeed ZeRO on CUDA against DDP,
an NCCL process group, export to plain timm and kNN on the GPU (the items: launch/gpu_checks.py).

Each item runs in a process of its own under a time limit, so a CUDA fault, a crash or a hang costs
that item only: its error (or timeout) is recorded and the next item runs. The whole check fits in
8 minutes on one GPU. It writes ``gpu_check.json`` (every item's figures and checks), ``summary.txt``
(the table it prints) and one log per item; when DALI's item passes on a GPU, ``data.backend=auto``
picks DALI there from then on (pipeline/dali_acceptance.py).

``--dry-run`` runs each item's CPU twin at tiny sizes: what a machine without a GPU and the test
suite run. It proves the plumbing and the JSON's shape, not the GPU.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import shlex
import sys
import time
import traceback
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import psutil

REPORT_NAME, SUMMARY_NAME = "gpu_check.json", "summary.txt"
MIN_ITEM_S = 10  # an item with less of the budget left is skipped, not started


@dataclass(frozen=True)
class Item:
    """One check: ``check(ctx, **args)`` returns its figures, with ``checks`` (name -> bool) that must
    all hold for it to pass and a one-line ``summary``."""

    name: str
    check: Callable[..., dict]
    args: dict[str, Any] = field(default_factory=dict)


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _run_item(item: Item, ctx, result_path: Path, log_path: Path) -> None:
    """The item's process: output to its log, the result (or the error) to ``result_path``."""
    log = open(log_path, "w", buffering=1)
    os.dup2(log.fileno(), 1)  # the item's child processes (ranks, loader workers) log there too
    os.dup2(log.fileno(), 2)
    try:
        result = item.check(ctx, **item.args)
        failed = [name for name, ok in result.get("checks", {}).items() if not ok]
        result = {"status": "failed" if failed else "passed", **({"failed_checks": failed} if failed else {}),
                  **result}
    except Exception as err:
        traceback.print_exc()
        result = {"status": "error", "error": f"{type(err).__name__}: {err}"}
    sys.stdout.flush()
    sys.stderr.flush()
    _write_json(result_path, {**result, "cpu_s": _cpu_seconds()})


def _cpu_seconds() -> float:
    """CPU time of this process and of its children that finished (loader workers, ranks)."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def _kill_tree(pid: int) -> None:
    """The item's process and everything it started (ranks, loader workers, compile workers)."""
    try:
        parent = psutil.Process(pid)
        processes = [*parent.children(recursive=True), parent]
    except psutil.NoSuchProcess:
        return
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(processes, timeout=30)


def _log_tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def run_isolated(item: Item, ctx, limit_s: float, preload: list[str]) -> dict:
    """``item`` in a fresh process (forked from a server that has imported ``preload``: starts in
    milliseconds, shares no state with this one), killed with its children after ``limit_s``."""
    for folder in ("items", "logs"):
        (ctx.out / folder).mkdir(parents=True, exist_ok=True)
    result_path, log_path = ctx.out / "items" / f"{item.name}.json", ctx.out / "logs" / f"{item.name}.log"
    result_path.unlink(missing_ok=True)
    spawner = multiprocessing.get_context("forkserver")
    spawner.set_forkserver_preload(preload)
    process = spawner.Process(target=_run_item, args=(item, ctx, result_path, log_path), name=f"check-{item.name}")
    tic = time.perf_counter()
    process.start()
    process.join(limit_s)
    timed_out = process.is_alive()
    if timed_out:
        _kill_tree(process.pid)
        process.join()
    record = {"seconds": time.perf_counter() - tic, "limit_s": limit_s, "log": str(log_path.relative_to(ctx.out))}
    if timed_out:
        return {"status": "timeout", "error": f"no result within {limit_s:.0f} s; its log ends: {_log_tail(log_path)}",
                **record}
    if not result_path.is_file():
        return {"status": "error", "error": f"its process died (exit code {process.exitcode}); its log ends: "
                                            f"{_log_tail(log_path)}", **record}
    return {**json.loads(result_path.read_text()), **record}


def run_items(items: list[Item], ctx, limits_s: dict[str, float], total_s: float | None,
              preload: list[str]) -> dict[str, dict]:
    """Every item in order, each seeing the results before it (``ctx.previous``), within ``total_s``."""
    results: dict[str, dict] = {}
    start = time.perf_counter()
    for item in items:
        left = float("inf") if total_s is None else total_s - (time.perf_counter() - start)
        if left < MIN_ITEM_S:
            results[item.name] = {"status": "skipped", "error": f"the check's budget of {total_s:.0f} s is spent"}
        else:
            limit = min(limits_s[item.name], left)
            print(f"[check gpu] {item.name} (limit {limit:.0f} s) ...", flush=True)
            results[item.name] = run_isolated(item, replace(ctx, previous=dict(results)), limit, preload)
        result = results[item.name]
        print(f"[check gpu] {item.name}: {result['status']} {result.get('summary') or result.get('error', '')}",
              flush=True)
    return results


def _machine() -> dict:
    import importlib.metadata

    import torch

    from launch.bench import _machine as cpu_machine

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
    from pipeline.dali_acceptance import record_acceptance, withdraw_acceptance

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
    import torch

    from launch.gpu_checks import ITEMS, Context

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
                        preload=["launch.gpu_checks"])
    report = {"command": _command(args), "mode": "dry-run" if args.dry_run else "gpu",
              "passed": all(r["status"] == "passed" for r in results.values()), "started": started,
              "seconds": time.perf_counter() - tic, "report": str(out / REPORT_NAME), "machine": _machine(),
              "items": results}
    report["dali_acceptance"] = update_dali_acceptance(report)
    _write_json(out / REPORT_NAME, report)
    table = summary_table(report)
    (out / SUMMARY_NAME).write_text(table)
    print(table, end="")
    return 0 if report["passed"] else 1


def add_parser(sub) -> None:
    check = sub.add_parser("check", help="acceptance checks of a machine")
    kinds = check.add_subparsers(dest="kind", required=True)
    gpu = kinds.add_parser("gpu", help="every GPU path (DALI, training and MFU, torch.compile, DeepSpeed, NCCL, "
                           "export, kNN) in <= 8 minutes on one GPU: one JSON and a table (docs/gpu-acceptance.md)")
    gpu.add_argument("--out", default="gpu-check", help="folder for gpu_check.json, summary.txt, logs/ and the "
                     "prepared data (reused by a later run into the same folder; default: gpu-check)")
    gpu.add_argument("--dry-run", action="store_true", help="each item's CPU twin at tiny sizes (no GPU needed): "
                     "proves the plumbing and the JSON, not the GPU")
    gpu.add_argument("--only", nargs="+", metavar="ITEM", help="run these items (and data) only, e.g. to rerun one "
                     "after a fix")
    gpu.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, for the MFU of a GPU missing "
                     "from the table in launch/gpu_checks.py")
    gpu.set_defaults(func=check_gpu)

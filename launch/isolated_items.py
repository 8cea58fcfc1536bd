"""Check items run one by one, each in a fresh process under a time limit: a crash, a CUDA fault or a
hang costs that item only (its error or timeout is recorded) and the next item runs. Used by
`foundry check gpu` (launch/check_gpu.py, items in launch/gpu_checks.py)."""
from __future__ import annotations

import json
import multiprocessing
import os
import resource
import sys
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import psutil

MIN_ITEM_S = 10  # an item with less of the budget left is skipped, not started


@dataclass(frozen=True)
class Item:
    """One check: ``check(ctx, **args)`` returns its figures, with ``checks`` (name -> bool) that must
    all hold for it to pass and a one-line ``summary``."""

    name: str
    check: Callable[..., dict]
    args: dict[str, Any] = field(default_factory=dict)


def write_json(path: Path, obj: dict) -> None:
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
    write_json(result_path, {**result, "cpu_s": _cpu_seconds()})


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
            print(f"[check] {item.name} (limit {limit:.0f} s) ...", flush=True)
            results[item.name] = run_isolated(item, replace(ctx, previous=dict(results)), limit, preload)
        result = results[item.name]
        print(f"[check] {item.name}: {result['status']} {result.get('summary') or result.get('error', '')}",
              flush=True)
    return results

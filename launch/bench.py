"""`foundry bench`: benchmarks that write JSON (numbers, never pass/fail)."""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import psutil

from launch.config import load_config, to_dict


def _peak_rss_mb() -> dict[str, float]:
    """Peak resident memory of this process and of its (finished) children, e.g. loader workers."""
    return {
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_rss_children_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def _machine() -> dict:
    import torch

    from pipeline.runtime import cpu_has_fast_bf16

    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "cpu_fast_bf16": cpu_has_fast_bf16(),
            "cuda": torch.cuda.is_available()}


def _write(report: dict, out: str | None) -> None:
    text = json.dumps(report, indent=2)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    print(text)


def _step_profiler(trainer, warmup: int, steps: int):
    """torch.profiler over the measured steps only (the trainer calls ``step`` after each step)."""
    from torch.profiler import ProfilerActivity, profile, schedule

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.rt.device.type == "cuda" else [])
    profiler = profile(activities=activities, schedule=schedule(wait=max(0, warmup - 1), warmup=1, active=steps))
    trainer.step_callbacks.append(lambda step: profiler.step())
    return profiler


def _write_profile(profiler, path: str) -> None:
    """The ops that take the time, by self time, as a text table (and a Chrome trace beside it)."""
    table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(table)
    profiler.export_chrome_trace(str(Path(path).with_suffix(".trace.json")))
    print(table)


def bench_train(args: argparse.Namespace) -> int:
    """Steady-state training throughput of a recipe on one process, loader included."""
    from pipeline.trainer import Trainer

    with tempfile.TemporaryDirectory(prefix="foundry-bench-") as tmp:
        overrides = list(args.overrides) + [
            f"output_dir={tmp}", f"train.max_steps={args.warmup + args.steps}", "train.budget_minutes=0",
            "train.resume=never",
            f"train.checkpoint_every={10**9}", "eval.after_pretrain=false", "mlflow.registered_model=",
            "mlflow.tracking_uri=",
        ]
        cfg = load_config(args.config, overrides)
        trainer = Trainer(cfg)
        profiler = _step_profiler(trainer, args.warmup, args.steps) if args.profile else nullcontext()
        start = time.perf_counter()
        with profiler:
            trainer.train()
        wall = time.perf_counter() - start
        if args.profile:
            _write_profile(profiler, args.profile)
        process = psutil.Process()
        measured = trainer.step_times[args.warmup:]
        waits = [w for w, _ in measured]
        computes = [c for _, c in measured]
        step_s = statistics.mean(w + c for w, c in measured)
        report = {
            "benchmark": "train",
            "config": args.config,
            "overrides": args.overrides,
            "method": cfg.model.method,
            "backbone": cfg.model.backbone,
            "batch_size": cfg.train.batch_size,
            "views": sum(v.count for v in cfg.data.views),
            "precision": str(trainer.amp_dtype or "fp32"),
            "steps_measured": len(measured),
            "warmup_steps_skipped": args.warmup,
            "images_per_s": cfg.train.batch_size / step_s,
            "step_time_s": step_s,
            "data_wait_s": statistics.mean(waits),
            "compute_s": statistics.mean(computes),
            "data_wait_fraction": sum(waits) / (sum(waits) + sum(computes)),
            "wall_s_including_setup": wall,
            "loader_workers": cfg.data.num_workers,
            "threads_main_process": process.num_threads(),
            "processes": 1 + len(process.children(recursive=True)),
            **_peak_rss_mb(),
            "machine": _machine(),
            "resolved_config": to_dict(cfg),
        }
    _write(report, args.out)
    return 0


def bench_prep(args: argparse.Namespace) -> int:
    """Shard-writing throughput: ``foundry prep`` on Fashion-MNIST (``--limit`` images per split)
    or an image folder, into a temporary folder; check (decode) and write phases separately."""
    from data_prep.shards import default_workers

    workers = args.workers or default_workers()
    with tempfile.TemporaryDirectory(prefix="foundry-bench-prep-") as tmp:
        start = time.perf_counter()
        if args.source == "fashion-mnist":
            from data_prep.fashion_mnist import prep_fashion_mnist

            summaries = list(prep_fashion_mnist(tmp, workers=workers, limit=args.limit).values())
        else:
            from data_prep.images import prep_images

            summaries = [prep_images(args.source, tmp, workers=workers)]
        wall = time.perf_counter() - start
    samples = sum(s["samples"] for s in summaries)
    total_bytes = sum(s["bytes"] for s in summaries)
    report = {
        "benchmark": "prep",
        "source": args.source,
        "workers": workers,
        "samples": samples,
        "shards": sum(s["shards"] for s in summaries),
        "skipped": sum(s["skipped"] for s in summaries),
        "images_per_s": samples / wall,
        "mib_per_s": total_bytes / 2**20 / wall,
        "wall_s": wall,
        "check_s": sum(s.get("check_seconds", 0.0) for s in summaries),
        "write_s": sum(s.get("write_seconds", s["seconds"]) for s in summaries),
        "threads_main_process": psutil.Process().num_threads(),
        "processes": 1 + workers,
        **_peak_rss_mb(),
        "machine": _machine(),
    }
    _write(report, args.out)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks that write JSON")
    kinds = p.add_subparsers(dest="kind", required=True)
    t = kinds.add_parser("train", help="training images/s, data-wait vs compute, memory")
    t.add_argument("config")
    t.add_argument("overrides", nargs="*")
    t.add_argument("--steps", type=int, default=20, help="measured steps")
    t.add_argument("--warmup", type=int, default=3, help="steps run first and not measured")
    t.add_argument("--out", help="write the JSON here too")
    t.add_argument("--profile", metavar="FILE", help="torch.profiler table of the measured steps to FILE "
                   "(and a Chrome trace to FILE.trace.json)")
    t.set_defaults(func=bench_train)
    prep = kinds.add_parser("prep", help="shard-writing images/s, MiB/s, memory")
    prep.add_argument("--source", default="fashion-mnist",
                      help="fashion-mnist (the Debian package) or an image folder (default: fashion-mnist)")
    prep.add_argument("--limit", type=int, default=10000, help="Fashion-MNIST images per split (default 10000)")
    prep.add_argument("--workers", type=int, default=None, help="prep processes (default: usable CPUs)")
    prep.add_argument("--out", help="write the JSON here too")
    prep.set_defaults(func=bench_prep)

"""`foundry bench train`: steady-state training throughput of a recipe on one process, loader
included: images/s, data wait against compute, threads, processes and peak memory (optionally a
torch.profiler table of the measured steps)."""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import psutil

from ssl_foundry.launch.bench.report import machine, peak_rss_mb, write_report
from ssl_foundry.pipeline.config import load_config, to_dict


def _step_profiler(trainer, warmup: int, steps: int):
    """torch.profiler over the measured steps only (the trainer calls ``step`` after each step). One
    cycle (``repeat=1``): with a repeating schedule and no wait, the step after the last one would
    start a new cycle and drop the measured one."""
    from torch.profiler import ProfilerActivity, profile, schedule

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.rt.device.type == "cuda" else [])
    profiler = profile(activities=activities,
                       schedule=schedule(wait=max(0, warmup - 1), warmup=1, active=steps, repeat=1))
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
    from ssl_foundry.pipeline.train.runtime import autocast_dtype
    from ssl_foundry.pipeline.train.trainer import Trainer

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
            "precision": str(autocast_dtype(cfg.train, trainer.rt.device) or "fp32"),
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
            **peak_rss_mb(),
            "machine": machine(),
            "resolved_config": to_dict(cfg),
        }
    write_report(report, args.out)
    return 0


def add_parser(kinds) -> None:
    t = kinds.add_parser("train", help="training images/s, data-wait vs compute, memory")
    t.add_argument("config")
    t.add_argument("overrides", nargs="*")
    t.add_argument("--steps", type=int, default=20, help="measured steps")
    t.add_argument("--warmup", type=int, default=3, help="steps run first and not measured")
    t.add_argument("--out", help="write the JSON here too")
    t.add_argument("--profile", metavar="FILE", help="torch.profiler table of the measured steps to FILE "
                   "(and a Chrome trace to FILE.trace.json)")
    t.set_defaults(func=bench_train)

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


def bench_train(args: argparse.Namespace) -> int:
    """Steady-state training throughput of a recipe on one process, loader included."""
    from pipeline.trainer import Trainer

    with tempfile.TemporaryDirectory(prefix="foundry-bench-") as tmp:
        overrides = list(args.overrides) + [
            f"output_dir={tmp}", f"train.max_steps={args.warmup + args.steps}", "train.resume=never",
            f"train.checkpoint_every={10**9}", "eval.after_pretrain=false", "mlflow.registered_model=",
            "mlflow.tracking_uri=",
        ]
        cfg = load_config(args.config, overrides)
        trainer = Trainer(cfg)
        start = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - start
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


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks that write JSON")
    kinds = p.add_subparsers(dest="kind", required=True)
    t = kinds.add_parser("train", help="training images/s, data-wait vs compute, memory")
    t.add_argument("config")
    t.add_argument("overrides", nargs="*")
    t.add_argument("--steps", type=int, default=20, help="measured steps")
    t.add_argument("--warmup", type=int, default=3, help="steps run first and not measured")
    t.add_argument("--out", help="write the JSON here too")
    t.set_defaults(func=bench_train)

"""`foundry bench prep`: shard-writing throughput of `foundry prep` on Fashion-MNIST or an image
folder, into a temporary folder: images/s, MiB/s, the check (decode) and write phases apart."""
from __future__ import annotations

import argparse
import tempfile
import time

import psutil

from ssl_foundry.data_prep.fashion_mnist import prep_fashion_mnist
from ssl_foundry.data_prep.images import prep_images
from ssl_foundry.data_prep.shards import default_workers
from ssl_foundry.launch.bench.report import machine, peak_rss_mb, write_report


def bench_prep(args: argparse.Namespace) -> int:
    """Shard-writing throughput: ``foundry prep`` on Fashion-MNIST (``--limit`` images per split)
    or an image folder, into a temporary folder; check (decode) and write phases separately."""
    workers = args.workers or default_workers()
    with tempfile.TemporaryDirectory(prefix="foundry-bench-prep-") as tmp:
        start = time.perf_counter()
        if args.source == "fashion-mnist":
            summaries = list(prep_fashion_mnist(tmp, workers=workers, limit=args.limit).values())
        else:
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
        **peak_rss_mb(),
        "machine": machine(),
    }
    write_report(report, args.out)
    return 0

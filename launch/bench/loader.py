"""`foundry bench loader`: DALI (its CPU backend here), the torchvision loader and the batched one on
the same shards and recipe: images/s and CPU time per image by worker count, and where each backend spends
its CPU time, op by op."""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time

import torch

from ssl_foundry.data_prep.images import prep_images
from ssl_foundry.data_prep.photos import write_photo_folder
from ssl_foundry.data_prep.shard_format import read_manifest, redact
from ssl_foundry.launch.bench.report import cpu_seconds, machine, write_report
from ssl_foundry.models.registry import method_class
from ssl_foundry.pipeline.config import ConfigError, load_config
from ssl_foundry.pipeline.data.augment.spec import view_sizes
from ssl_foundry.pipeline.data.loader import build_train_loader, train_backend
from ssl_foundry.pipeline.data.position import LoaderPosition

LOADER_BACKENDS = ("dali", "torch", "batched")


def _time_loader(cfg, backend: str, workers: int, batches: int, warmup: int) -> dict:
    """Images/s and CPU time per image of one rank's training loader (views on the CPU)."""
    data = dataclasses.replace(cfg.data, backend=backend, num_workers=workers)
    loader = build_train_loader(data, cfg.train.batch_size, method_class(cfg.model.method).input_kind,
                                cfg.train.seed, 0, 1, LoaderPosition(), torch.device("cpu"))
    for _ in range(warmup):  # worker start-up, shuffle-buffer fill, allocator warm-up
        next(loader)
    cpu, start = cpu_seconds(), time.perf_counter()
    for _ in range(batches):
        next(loader)
    wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    del loader  # stops torch loader workers
    images = batches * cfg.train.batch_size
    return {"backend": "dali-cpu" if backend == "dali" else backend, "workers": workers, "images": images,
            "images_per_s": images / wall, "cpu_ms_per_image": 1000 * cpu / images, "wall_s": wall, "cpu_s": cpu}


def truncated_views(views: list, ops: int) -> list:
    """The recipe with only the first ``ops`` ops of every view."""
    return [dataclasses.replace(v, ops=v.ops[:ops]) for v in views]


def _cpu_breakdown(cfg, backend: str, batches: int, warmup: int, repeats: int = 2) -> list[dict]:
    """Where a backend's CPU time goes (one thread, in this process for torch): the recipe timed
    with its first 1, 2, 3, ... ops; each op's cost is the difference to the previous prefix.
    The first row also holds reading, decoding, normalising and batching (its first op fixes the
    view size, without which views cannot be batched). Each prefix is timed ``repeats`` times and
    the least CPU time kept: interference from other processes only ever adds time."""
    rows, previous = [], 0.0
    for k in range(1, max(len(v.ops) for v in cfg.data.views) + 1):
        prefix = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, views=truncated_views(cfg.data.views, k)))
        cpu_ms = min(_time_loader(prefix, backend, 1 if backend == "dali" else 0, batches, warmup)["cpu_ms_per_image"]
                     for _ in range(repeats))
        names = " / ".join(sorted({v.ops[k - 1].op for v in cfg.data.views if len(v.ops) >= k}))
        rows.append({"step": f"read + decode + {names} + normalise + batch" if k == 1 else names,
                     "cpu_ms_per_image": cpu_ms - previous, "cumulative_cpu_ms_per_image": cpu_ms})
        previous = cpu_ms
    return rows


def _readable_by(backend: str, location: str) -> bool:
    """Whether a training loader backend reads the shards at ``location`` (DALI: not over HTTP)."""
    try:
        train_backend(backend, torch.device("cpu"), location)
    except ConfigError:
        return False
    return True


def bench_loader(args: argparse.Namespace) -> int:
    """DALI (its CPU backend here), the torchvision loader and the batched one on the same shards and
    recipe: images/s and CPU time per image at 1 and 2 workers (DALI threads / torch loader
    processes), and where each spends its CPU time; with several --data locations (the same shards on local disk,
    behind HTTP, in S3), side by side for each."""
    torch.set_num_threads(1)  # the main process only hands batches over; workers do the work
    with tempfile.TemporaryDirectory(prefix="foundry-bench-loader-") as tmp:
        locations = args.data
        if not locations:  # real photos, each written --copies times, so that an epoch outlasts the timing
            write_photo_folder(f"{tmp}/images", short_side=args.short_side, copies=args.copies)
            locations = [f"{tmp}/shards"]
            prep_images(f"{tmp}/images", locations[0], shard_size=64)
        configs = {data: load_config(args.config, [*args.overrides, f"data.train={data}",
                                                   f"train.batch_size={args.batch_size}", "train.grad_accum_steps=1",
                                                   "data.readers=0", "data.resampled=false"], check_paths=False)
                   for data in locations}
        runs = [{"data": redact(data), **_time_loader(cfg, backend, workers, args.batches, args.warmup)}
                for data, cfg in configs.items() for backend in LOADER_BACKENDS if _readable_by(backend, data)
                for workers in args.workers]
        cfg = configs[locations[0]]
        breakdown = {("dali-cpu" if b == "dali" else b): _cpu_breakdown(cfg, b, args.batches, args.warmup)
                     for b in LOADER_BACKENDS} if args.breakdown else {}
        samples = read_manifest(locations[0])["num_samples"]
    report = {
        "benchmark": "loader",
        "config": args.config,
        "overrides": args.overrides,
        "data": [redact(d) for d in args.data] if args.data else
        f"foundry prep photos (short side {args.short_side} px, x{args.copies} copies)",
        "samples": samples,
        "batch_size": args.batch_size,
        "batches_measured": args.batches,
        "warmup_batches": args.warmup,
        "view_sizes": [list(size) if size else None for size in view_sizes(cfg.data.views)],
        "runs": runs,
        "cpu_breakdown_1_thread": breakdown,
        "machine": machine(),
    }
    write_report(report, args.out)
    return 0

"""`foundry bench train`: steady-state training throughput of a recipe on one process, loader
included: images/s, data wait against compute, threads, processes and peak memory (optionally a
torch.profiler table of the measured steps); side by side with a plain lightly-style loop on the
same work, and as a fraction of the CPU's measured matmul peak."""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import psutil
import torch
import webdataset as wds
from torch.profiler import ProfilerActivity, profile, schedule
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from ssl_foundry.data_prep.shard_format import shard_paths
from ssl_foundry.launch.bench.report import cpu_seconds, machine, peak_rss_mb, write_report
from ssl_foundry.models.backbones import single_output_convs
from ssl_foundry.pipeline.config import load_config, to_dict
from ssl_foundry.pipeline.data.augment.spec import view_sizes
from ssl_foundry.pipeline.data.augment.torch_backend import MultiViewTransform
from ssl_foundry.pipeline.train.optim import build_optimizer
from ssl_foundry.pipeline.train.runtime import autocast_dtype
from ssl_foundry.pipeline.train.trainer import Trainer, build_model


def _step_profiler(trainer, warmup: int, steps: int):
    """torch.profiler over the measured steps only (the trainer calls ``step`` after each step). One
    cycle (``repeat=1``): with a repeating schedule and no wait, the step after the last one would
    start a new cycle and drop the measured one."""
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


def matmul_peak_gflops(dtype, n: int = 2048, repeats: int = 10) -> float:
    """The CPU's practical peak in ``dtype``: the best of ``repeats`` n x n matmuls on this
    process's threads (the best, because other processes only ever slow one down)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        tic = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - tic)
    return 2 * n**3 / best / 1e9


def step_gflop(cfg) -> float:
    """FLOPs of one training step's forward and backward of the recipe's model on a batch of its
    views (torch's FLOP counter: convolutions and matmuls, the loss's included)."""
    sizes = view_sizes(cfg.data.views)
    model = build_model(cfg)
    views = [torch.randn(cfg.train.batch_size, 3, *size) for size in sizes]
    with FlopCounterMode(display=False) as counter:
        model(views)["loss"].backward()
    return counter.get_total_flops() / 1e9


def lightly_style_loop(cfg, workers: int = 2):
    """The reference: the recipe's work (its shards, model, optimizer, batch and views) as the plain
    loop of lightly's SimCLR example runs it. Torchvision transforms per image in a torch DataLoader
    with ``workers`` processes (a WebDataset pipeline over the shards), fp32, NCHW, default threads,
    timm's convolutions as they are.
    Returns ``run(steps)``, which starts the loader, trains ``steps`` steps and returns each one's
    seconds (data wait included) and the CPU seconds (this process and its loader workers) of all
    but the first (which starts the workers); the loader stops between calls, so that its workers
    do not compete with whatever runs in between."""
    d = cfg.data
    urls = shard_paths(d.train)
    dataset = (wds.WebDataset(urls, shardshuffle=len(urls), empty_check=False).shuffle(d.shuffle_buffer)
               .decode("torchrgb8").to_tuple("png;jpg;jpeg;webp", "cls")
               .map_tuple(MultiViewTransform(d.views, d.mean, d.std), int))
    torch.manual_seed(cfg.train.seed)
    model = single_output_convs(build_model(cfg), enabled=False).train()  # timm's convolutions, as the peers run them
    optimizer = build_optimizer(cfg, model)

    def run(steps: int) -> tuple[list[float], float]:
        seconds: list[float] = []
        loader = iter(DataLoader(dataset, batch_size=cfg.train.batch_size, num_workers=workers, drop_last=True))
        tic = time.perf_counter()
        while len(seconds) < steps:
            for views, _ in loader:
                loss = model(views)["loss"]
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                seconds.append(time.perf_counter() - tic)
                tic = time.perf_counter()
                if len(seconds) == 1:
                    cpu = cpu_seconds()
                if len(seconds) == steps:
                    break
            else:
                loader = iter(DataLoader(dataset, batch_size=cfg.train.batch_size, num_workers=workers,
                                         drop_last=True))  # the next epoch
        return seconds, cpu_seconds() - cpu  # measured while the workers still live

    return run


def bench_train(args: argparse.Namespace) -> int:
    """Steady-state training throughput of a recipe on one process, loader included; side by
    side with the same work done by a plain lightly-style loop (blocks of ``--block`` steps,
    interleaved, so both see the same load), and as a fraction of the CPU's matmul peak."""
    with tempfile.TemporaryDirectory(prefix="foundry-bench-") as tmp:
        overrides = list(args.overrides) + [
            f"output_dir={tmp}", f"train.max_steps={args.warmup + args.steps}", "train.budget_minutes=0",
            "train.resume=never",
            f"train.checkpoint_every={10**9}", "eval.after_pretrain=false", "mlflow.registered_model=",
            "mlflow.tracking_uri=",
        ]
        cfg = load_config(args.config, overrides)
        trainer = Trainer(cfg)
        peaks = {"fp32": matmul_peak_gflops(torch.float32), "bf16": matmul_peak_gflops(torch.bfloat16)}
        gflop = step_gflop(cfg)
        profiler = _step_profiler(trainer, args.warmup, args.steps) if args.profile else nullcontext()
        reference = lightly_style_loop(cfg, args.reference_workers) if args.reference and not args.profile else None
        block = max(1, min(args.block, args.steps))
        reference_s: list[float] = []
        cpu = {"trainer": 0.0, "reference": 0.0, "mark": 0.0}  # CPU seconds over whole blocks

        def block_boundary(step: int) -> None:
            """After each block of measured trainer steps: its CPU time, then a reference block."""
            if step == args.warmup:
                cpu["mark"] = cpu_seconds()
            elif step > args.warmup and (step - args.warmup) % block == 0:
                cpu["trainer"] += cpu_seconds() - cpu["mark"]
                if reference is not None:
                    seconds, cpu_s = reference(1 + block)  # its first step starts the loader
                    reference_s.extend(seconds[1:])
                    cpu["reference"] += cpu_s
                cpu["mark"] = cpu_seconds()

        trainer.step_callbacks.append(block_boundary)
        start = time.perf_counter()
        with profiler:
            trainer.train()
        wall = time.perf_counter() - start
        if args.profile:
            _write_profile(profiler, args.profile)
        for dtype, gflops in (("fp32", matmul_peak_gflops(torch.float32)), ("bf16", matmul_peak_gflops(torch.bfloat16))):
            peaks[dtype] = max(peaks[dtype], gflops)
        process = psutil.Process()
        measured = trainer.step_times[args.warmup:]
        waits = [w for w, _ in measured]
        computes = [c for _, c in measured]
        step_s = statistics.median(w + c for w, c in measured)
        report = {
            "benchmark": "train",
            "config": args.config,
            "overrides": args.overrides,
            "method": cfg.model.method,
            "backbone": cfg.model.backbone,
            "batch_size": cfg.train.batch_size,
            "views": sum(v.count for v in cfg.data.views),
            "loader_backend": cfg.data.backend,
            "precision": str(autocast_dtype(cfg.train, trainer.rt.device) or "fp32"),
            "channels_last": cfg.train.channels_last,
            "steps_measured": len(measured),
            "warmup_steps_skipped": args.warmup,
            "images_per_s": cfg.train.batch_size / step_s,
            "step_time_s": step_s,
            "data_wait_s": statistics.mean(waits),
            "compute_s": statistics.mean(computes),
            "data_wait_fraction": sum(waits) / (sum(waits) + sum(computes)),
            "cpu_s_per_step": cpu["trainer"] / (args.steps // block * block),
            "matmul_peak_gflops": peaks,
            "model_gflop_per_step": gflop,
            "gflops": gflop / step_s,
            "fraction_of_bf16_peak": gflop / step_s / peaks["bf16"],
            "fraction_of_fp32_peak": gflop / step_s / peaks["fp32"],
            "wall_s_including_setup": wall,
            "loader_workers": cfg.data.num_workers,
            "threads_main_process": process.num_threads(),
            "processes": 1 + len(process.children(recursive=True)),
            **peak_rss_mb(),
            "machine": machine(),
            "resolved_config": to_dict(cfg),
        }
        if reference_s:
            ref_s = statistics.median(reference_s)
            report["reference"] = {
                "what": "lightly-style loop: torchvision per image in a DataLoader, fp32, NCHW, default threads",
                "loader_workers": args.reference_workers, "steps_measured": len(reference_s),
                "step_time_s": ref_s, "images_per_s": cfg.train.batch_size / ref_s, "gflops": gflop / ref_s,
                "fraction_of_fp32_peak": gflop / ref_s / peaks["fp32"],
                "cpu_s_per_step": cpu["reference"] / len(reference_s)}
            report["speedup_vs_reference"] = ref_s / step_s
            # CPU seconds a step costs (loader workers included): what a loaded machine makes scarce.
            report["cpu_ratio_reference_to_trainer"] = report["reference"]["cpu_s_per_step"] / report["cpu_s_per_step"]
    write_report(report, args.out)
    return 0

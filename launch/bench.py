"""`foundry bench`: benchmarks that write JSON (numbers, never pass/fail)."""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import psutil

from ssl_foundry.pipeline.config import ConfigError, load_config, to_dict

REPO = Path(__file__).resolve().parents[1]


def _peak_rss_mb() -> dict[str, float]:
    """Peak resident memory of this process and of its (finished) children, e.g. loader workers."""
    return {
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_rss_children_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def _cpu() -> dict:
    """The CPU's model name and the flags that decide bf16 speed (figures differ between machines)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    return {"cpu_model": model or platform.processor(),
            "cpu_flags": sorted(flags & {"avx2", "avx512_bf16", "amx_bf16"})}


def _machine() -> dict:
    import torch

    from ssl_foundry.pipeline.train.runtime import cpu_has_fast_bf16

    return {"cpu_count": os.cpu_count(), **_cpu(), "platform": platform.platform(), "torch": torch.__version__,
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
    from ssl_foundry.data_prep.shards import default_workers

    workers = args.workers or default_workers()
    with tempfile.TemporaryDirectory(prefix="foundry-bench-prep-") as tmp:
        start = time.perf_counter()
        if args.source == "fashion-mnist":
            from ssl_foundry.data_prep.fashion_mnist import prep_fashion_mnist

            summaries = list(prep_fashion_mnist(tmp, workers=workers, limit=args.limit).values())
        else:
            from ssl_foundry.data_prep.images import prep_images

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


# --------------------------------------------------------------------------- strategies
STRATEGY_CASES = {
    "ddp": ["train.strategy=ddp"],
    "zero1": ["train.strategy=deepspeed", "deepspeed.zero_stage=1"],
    "zero2": ["train.strategy=deepspeed", "deepspeed.zero_stage=2"],
    "zero3": ["train.strategy=deepspeed", "deepspeed.zero_stage=3"],
    "zero2-offload": ["train.strategy=deepspeed", "deepspeed.zero_stage=2", "deepspeed.offload_optimizer=cpu"],
    "zero3-offload": ["train.strategy=deepspeed", "deepspeed.zero_stage=3", "deepspeed.offload_optimizer=cpu",
                      "deepspeed.offload_params=cpu"],
}
OPTIMIZER_STATE_BYTES = {"adamw": 8, "sgd": 4, "lars": 4}  # fp32 moments per trained parameter


def model_state_mb_per_rank(case: str, trained: int, frozen: int, optimizer: str, ranks: int) -> float:
    """ZeRO's accounting (Rajbhandari et al. 2020, sec. 3) for fp32 master weights as trained here:
    parameters 4 B + gradients 4 B + optimizer moments K B per trained parameter, 4 B per frozen
    one (momentum target). Stage 1 shards the moments, 2 also the gradients, 3 also the parameters;
    offloaded shards live in CPU memory instead (on a CPU machine: the same memory)."""
    k = OPTIMIZER_STATE_BYTES[optimizer]
    params, grads, moments = 4 * (trained + frozen), 4 * trained, k * trained
    stage = 0 if case == "ddp" else int(case[4])
    per_rank = (params / (ranks if stage >= 3 else 1) + grads / (ranks if stage >= 2 else 1)
                + moments / (ranks if stage >= 1 else 1))
    return per_rank / 2**20


def _drop_checkpoints(run_dir: Path, result: dict) -> None:
    """A benchmark keeps numbers, not weights: the run's checkpoints and their MLflow copy (GBs
    per case for a ViT-B with Adam) are deleted once its result is read."""
    from urllib.parse import urlparse

    from mlflow import MlflowClient

    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    artifact_uri = MlflowClient(tracking_uri=result["tracking_uri"]).get_run(result["run_id"]).info.artifact_uri
    if urlparse(artifact_uri).scheme in ("", "file"):
        shutil.rmtree(Path(urlparse(artifact_uri).path) / "checkpoints", ignore_errors=True)


def bench_strategies(args: argparse.Namespace) -> int:
    """The same short run under DDP and each ZeRO stage (and offload), ``--nproc`` ranks: steady
    step time, images/s and each rank's memory after training (RSS now and peak; GPU memory on a
    GPU), beside the model-state memory ZeRO predicts."""
    from ssl_foundry.pipeline.train.trainer import build_model

    out = Path(args.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    common = [f"launch.nproc_per_node={args.nproc}", f"train.max_steps={args.steps}", "train.resume=never",
              "eval.after_pretrain=false", f"train.checkpoint_every={10**6}", "mlflow.registered_model=",
              f"mlflow.tracking_uri=sqlite:///{out / 'mlflow.db'}", *args.overrides]
    def case_overrides(case: str) -> list[str]:  # deepspeed.* overrides are for the DeepSpeed cases only
        kept = [o for o in common if case != "ddp" or not o.startswith("deepspeed.")]
        return [*kept, *STRATEGY_CASES[case]]

    cfg = load_config(args.config, case_overrides(args.cases[0]))
    model = build_model(cfg)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    del model
    rows = []
    for case in args.cases:
        run_dir, log_path = out / case, out / f"{case}.log"
        overrides = [*case_overrides(case), f"output_dir={run_dir}"]
        print(f"[bench strategies] {case}: {args.steps} steps on {args.nproc} ranks, log {log_path}", flush=True)
        with open(log_path, "w") as log:
            done = subprocess.run([sys.executable, "-m", "ssl_foundry.launch", "pretrain", args.config, *overrides],
                                  cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        row = {"case": case, "overrides": STRATEGY_CASES[case],
               "model_state_mb_per_rank": model_state_mb_per_rank(case, trained, frozen, cfg.train.optimizer,
                                                                   args.nproc)}
        result_path = run_dir / "result.json"
        if done.returncode != 0 or not result_path.is_file():
            row["error"] = f"exit {done.returncode}; see {log_path}"
        else:
            result = json.loads(result_path.read_text())
            _drop_checkpoints(run_dir, result)
            row.update(step_time_s=result["timing"]["steady_step_time_s"],
                       images_per_s=result["timing"]["steady_images_per_s"],
                       **{f"{key}_mb_per_rank": values for key, values in result["memory_mb"].items()})
        rows.append(row)
        print(f"[bench strategies] {json.dumps(row)}", flush=True)
    report = {"benchmark": "strategies", "command": " ".join(["foundry bench strategies", args.config,
                                                             *args.overrides]),
              "ranks": args.nproc, "steps": args.steps, "method": cfg.model.method, "backbone": cfg.model.backbone,
              "trained_params": trained, "frozen_params": frozen, "optimizer": cfg.train.optimizer,
              "global_batch": cfg.train.batch_size, "cases": rows, "machine": _machine(),
              "torch_threads_per_rank": max(1, (os.cpu_count() or 1) // args.nproc)}
    _write(report, str(out / "strategies.json"))
    return 1 if any("error" in r for r in rows) else 0


# --------------------------------------------------------------------------- loader
LOADER_RECIPE = "configs/byol_resnet50_imagenet.yaml"  # two 224-px views (BYOL's asymmetric pair)


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its live children (torch loader workers)."""
    me = psutil.Process()
    total = 0.0
    for process in [me, *me.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def _time_loader(cfg, backend: str, workers: int, batches: int, warmup: int) -> dict:
    """Images/s and CPU time per image of one rank's training loader (views on the CPU)."""
    import dataclasses

    import torch

    from ssl_foundry.pipeline.data.loader import build_train_loader
    from ssl_foundry.pipeline.data.position import LoaderPosition

    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, backend=backend, num_workers=workers))
    loader = build_train_loader(cfg, cfg.train.batch_size, 0, 1, LoaderPosition(), torch.device("cpu"))
    for _ in range(warmup):  # worker start-up, shuffle-buffer fill, allocator warm-up
        next(loader)
    cpu, start = _cpu_seconds(), time.perf_counter()
    for _ in range(batches):
        next(loader)
    wall, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    del loader  # stops torch loader workers
    images = batches * cfg.train.batch_size
    return {"backend": "dali-cpu" if backend == "dali" else backend, "workers": workers, "images": images,
            "images_per_s": images / wall, "cpu_ms_per_image": 1000 * cpu / images, "wall_s": wall, "cpu_s": cpu}


def _truncated_views(views: list, ops: int) -> list:
    """The recipe with only the first ``ops`` ops of every view."""
    import dataclasses

    return [dataclasses.replace(v, ops=v.ops[:ops]) for v in views]


def _cpu_breakdown(cfg, backend: str, batches: int, warmup: int, repeats: int = 2) -> list[dict]:
    """Where a backend's CPU time goes (one thread, in this process for torch): the recipe timed
    with its first 1, 2, 3, ... ops; each op's cost is the difference to the previous prefix.
    The first row also holds reading, decoding, normalising and batching (its first op fixes the
    view size, without which views cannot be batched). Each prefix is timed ``repeats`` times and
    the least CPU time kept: interference from other processes only ever adds time."""
    import dataclasses

    rows, previous = [], 0.0
    for k in range(1, max(len(v.ops) for v in cfg.data.views) + 1):
        prefix = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, views=_truncated_views(cfg.data.views, k)))
        cpu_ms = min(_time_loader(prefix, backend, 1 if backend == "dali" else 0, batches, warmup)["cpu_ms_per_image"]
                     for _ in range(repeats))
        names = " / ".join(sorted({v.ops[k - 1].op for v in cfg.data.views if len(v.ops) >= k}))
        rows.append({"step": f"read + decode + {names} + normalise + batch" if k == 1 else names,
                     "cpu_ms_per_image": cpu_ms - previous, "cumulative_cpu_ms_per_image": cpu_ms})
        previous = cpu_ms
    return rows


def _readable_by(backend: str, location: str) -> bool:
    """Whether a training loader backend reads the shards at ``location`` (DALI: not over HTTP)."""
    import torch

    from ssl_foundry.pipeline.data.loader import train_backend

    try:
        train_backend(backend, torch.device("cpu"), location)
    except ConfigError:
        return False
    return True


def bench_loader(args: argparse.Namespace) -> int:
    """DALI (its CPU backend here) against the torchvision loader on the same shards and recipe:
    images/s and CPU time per image at 1 and 2 workers (DALI threads / torch loader processes),
    and where each spends its CPU time; with several --data locations (the same shards on local disk,
    behind HTTP, in S3), side by side for each."""
    import torch

    from ssl_foundry.data_prep.images import prep_images
    from ssl_foundry.data_prep.photos import write_photo_folder
    from ssl_foundry.data_prep.shard_format import read_manifest, redact
    from ssl_foundry.pipeline.data.augment.spec import parse_views

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
                for data, cfg in configs.items() for backend in ("dali", "torch") if _readable_by(backend, data)
                for workers in args.workers]
        cfg = configs[locations[0]]
        breakdown = {("dali-cpu" if b == "dali" else b): _cpu_breakdown(cfg, b, args.batches, args.warmup)
                     for b in ("dali", "torch")} if args.breakdown else {}
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
        "view_sizes": [next((list(s.params.size) for s in steps if hasattr(s.params, "size")), None)
                       for steps in parse_views(cfg.data.views)],
        "runs": runs,
        "cpu_breakdown_1_thread": breakdown,
        "machine": _machine(),
    }
    _write(report, args.out)
    return 0


# --------------------------------------------------------------------------- quality
def _pretrain_within_budget(recipe: str, args: argparse.Namespace, out: Path, tracking_uri: str,
                            teacher: dict | None = None) -> dict:
    """One recipe through `foundry pretrain` in its own process for ``--budget-minutes`` of
    training (the recipe's step count lifted, so the budget decides), then its kNN top-1 (from the
    pretraining) and linear-probe top-1 (on the exported backbone). With ``--reuse-runs``, a recipe
    whose run folder already has a result.json is not trained again, only evaluated. A distillation
    recipe distils ``teacher`` (a row of this bench) when given: its row gets the student's kNN as a
    share of the teacher's."""
    name = Path(recipe).stem
    run_dir, log_path = out / name, out / f"{name}.log"
    overrides = [f"output_dir={run_dir}", f"train.budget_minutes={args.budget_minutes}",
                 f"train.max_steps={10**7}", "train.resume=never", "eval.after_pretrain=true",
                 f"mlflow.tracking_uri={tracking_uri}", "mlflow.registered_model=",
                 *([f"model.teacher={out / teacher['recipe'] / 'backbone'}"] if teacher else []), *args.overrides]
    cfg = load_config(recipe, overrides)
    row = {"recipe": name, "method": cfg.model.method, "backbone": cfg.model.backbone,
           "batch_size": cfg.train.batch_size, "log": str(log_path)}
    result_path = run_dir / "result.json"
    if args.reuse_runs and result_path.is_file():
        print(f"[bench quality] {name}: reusing {result_path}", flush=True)
        done = subprocess.CompletedProcess([], 0)
    else:
        print(f"[bench quality] {name}: {args.budget_minutes:g} min of training, log {log_path}", flush=True)
        start = time.perf_counter()
        with open(log_path, "w") as log:
            done = subprocess.run([sys.executable, "-m", "ssl_foundry.launch", "pretrain", recipe, *overrides],
                                  cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        row["wall_s"] = time.perf_counter() - start
    if done.returncode != 0 or not result_path.is_file():
        tail = log_path.read_text().splitlines()[-5:]
        row["error"] = f"exit {done.returncode}; last lines of {log_path}: " + " | ".join(tail)
        print(f"[bench quality] {name} FAILED: {row['error']}", flush=True)
        return row
    result = json.loads(result_path.read_text())
    timing = result["timing"]
    row.update(steps=result["steps"], images_per_s=timing["steady_images_per_s"],
               train_minutes=timing["train_s"] / 60, knn_top1=result["knn_top1"], knn_s=timing.get("knn_s"),
               final_loss=result["final_loss"], mlflow_run_id=result["run_id"])
    row.update(_linear_probe_export(str(run_dir / "backbone"), cfg))  # where pretraining exports it
    if teacher:
        row.update(teacher=teacher["recipe"], knn_share_of_teacher=row["knn_top1"] / teacher["knn_top1"])
    print(f"[bench quality] {name}: {row['steps']} steps, {row['images_per_s']:.0f} images/s, "
          f"kNN top-1 {100 * row['knn_top1']:.2f}%, linear top-1 {100 * row['linear_top1']:.2f}%", flush=True)
    return row


def _linear_probe_export(backbone_dir: str, cfg) -> dict:
    """`foundry eval linear`'s protocol on an exported backbone (features cached in the run folder)."""
    import torch

    from ssl_foundry.pipeline.evaluate.knn import eval_features
    from ssl_foundry.pipeline.evaluate.linear_probe import linear_probe
    from ssl_foundry.pipeline.registry.export import export_digest, load_timm_backbone

    tic = time.perf_counter()
    features = eval_features(load_timm_backbone(backbone_dir), cfg, torch.device("cpu"), export_digest(backbone_dir))
    probe = linear_probe(*features, cfg.eval.linear)
    return {"linear_top1": probe.test_top1, "linear_best_lr": probe.best_lr, "linear_s": time.perf_counter() - tic}


def _baselines(configs: list, raw_pixel_size: int) -> list[dict]:
    """Raw pixels and each distinct backbone at random initialisation, through the same kNN code."""
    import dataclasses

    import torch

    from ssl_foundry.models.backbones import create_backbone
    from ssl_foundry.pipeline.evaluate.knn import eval_features, knn_accuracy
    from ssl_foundry.pipeline.evaluate.linear_probe import linear_probe

    def evaluate(name: str, arch: str, backbone: torch.nn.Module, cfg) -> dict:
        tic = time.perf_counter()
        features = eval_features(backbone, cfg, torch.device("cpu"))
        top1 = knn_accuracy(*features, cfg.eval.knn_k, cfg.eval.knn_temperature)
        knn_s = time.perf_counter() - tic
        probe = linear_probe(*features, cfg.eval.linear)
        print(f"[bench quality] baseline {name}: kNN top-1 {100 * top1:.2f}%, linear top-1 "
              f"{100 * probe.test_top1:.2f}%", flush=True)
        return {"recipe": name, "method": "baseline", "backbone": arch, "steps": 0, "knn_top1": top1,
                "knn_s": knn_s, "linear_top1": probe.test_top1, "linear_best_lr": probe.best_lr,
                "linear_s": time.perf_counter() - tic - knn_s}

    first = configs[0]
    rows = []
    # Pixels standardised as the recipes' eval transform does (cosine then compares centred
    # images), and as plain [0, 1] values (the usual "raw pixels" figure).
    for label, mean, std in (("", first.data.mean, first.data.std), (", unnormalised", [0.0] * 3, [1.0] * 3)):
        data = dataclasses.replace(first.data, eval_image_size=raw_pixel_size, mean=mean, std=std)
        rows.append(evaluate(f"raw pixels ({raw_pixel_size} px{label})", "-", torch.nn.Flatten(),
                             dataclasses.replace(first, data=data)))
    seen = set()
    for cfg in configs:
        key = (cfg.model.backbone, json.dumps(cfg.model.backbone_args, sort_keys=True), cfg.data.eval_image_size)
        if key in seen:
            continue
        seen.add(key)
        torch.manual_seed(cfg.train.seed)
        backbone = create_backbone(cfg.model.backbone, **cfg.model.backbone_args)
        rows.append(evaluate(f"random init ({cfg.data.eval_image_size} px)", cfg.model.backbone, backbone, cfg))
    return rows


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.2f} %"


def _quality_markdown(report: dict) -> str:
    lines = [f"kNN top-1 (cosine, k={report['knn_k']}, T={report['knn_temperature']}) and linear-probe top-1 "
             f"(`foundry eval linear`: lr swept over {report['linear_lrs']}) on the Fashion-MNIST test "
             f"set after {report['budget_minutes']:g} min of training per recipe "
             f"({report['machine']['cpu_count']} CPUs, torch {report['machine']['torch']}).",
             f"Command: `{report['command']}`", "",
             "| recipe | method | backbone | batch | steps | images/s | train min | kNN top-1 | linear top-1 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        if "error" in r:
            lines.append(f"| {r['recipe']} | {r['method']} | {r['backbone']} | {r['batch_size']} | failed: "
                         f"see {r['log']} | | | | |")
            continue
        lines.append(f"| {r['recipe']} | {r['method']} | {r['backbone']} | {r['batch_size']} | {r['steps']} | "
                     f"{r['images_per_s']:.0f} | {r['train_minutes']:.1f} | {_percent(r['knn_top1'])} | "
                     f"{_percent(r['linear_top1'])} |")
    for r in report["baselines"]:
        lines.append(f"| {r['recipe']} | baseline | {r['backbone']} | - | 0 | - | - | {_percent(r['knn_top1'])} | "
                     f"{_percent(r['linear_top1'])} |")
    lines += [f"\n{r['recipe']} distils {r['teacher']}: its kNN top-1 is {_percent(r['knn_share_of_teacher'])} of the "
              f"teacher's, at the same budget." for r in report["runs"] if "knn_share_of_teacher" in r]
    return "\n".join(lines) + "\n"


def bench_quality(args: argparse.Namespace) -> int:
    """Every Fashion-MNIST recipe for the same CPU budget, kNN-evaluated, beside the baselines."""
    from ssl_foundry.models.registry import takes_teacher

    recipes = args.recipe or sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").glob("*_fmnist.yaml"))
    out = Path(args.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    tracking_uri = args.tracking_uri or f"sqlite:///{out / 'mlflow.db'}"
    configs = [load_config(recipe, list(args.overrides)) for recipe in recipes]
    distills = {recipe for recipe, cfg in zip(recipes, configs) if takes_teacher(cfg.model.method)}
    runs = [_pretrain_within_budget(recipe, args, out, tracking_uri) for recipe in recipes if recipe not in distills]
    # Distillation last, from the best backbone trained here (none: the recipe's own model.teacher).
    teacher = max((r for r in runs if "error" not in r), key=lambda r: r["knn_top1"], default=None)
    runs += [_pretrain_within_budget(recipe, args, out, tracking_uri, teacher) for recipe in recipes
             if recipe in distills]
    report = {
        "benchmark": "quality",
        "command": " ".join(["foundry bench quality", f"--budget-minutes {args.budget_minutes:g}",
                             *(f"--recipe {r}" for r in args.recipe or []),
                             *(["--reuse-runs"] if args.reuse_runs else []), *args.overrides]),
        "budget_minutes": args.budget_minutes,
        "knn_k": configs[0].eval.knn_k,
        "knn_temperature": configs[0].eval.knn_temperature,
        "linear_lrs": configs[0].eval.linear.lrs,
        "tracking_uri": tracking_uri,
        "runs": runs,
        "baselines": _baselines(configs, args.raw_pixel_size),
        "machine": _machine(),
    }
    (out / "quality.md").write_text(_quality_markdown(report))
    _write(report, str(out / "quality.json"))
    print(_quality_markdown(report))
    return 1 if any("error" in r for r in runs) else 0


def bench_video(args: argparse.Namespace) -> int:
    """Clip prep throughput per codec, then decode throughput per decoder on those shards (clips/s
    and frames/s, one process), on the packaged sample videos (or --source)."""
    from webdataset.tariterators import tarfile_samples

    from ssl_foundry.data_prep.sample_videos import copy_sample_videos
    from ssl_foundry.data_prep.shard_format import CLIP_CODECS, shard_paths
    from ssl_foundry.data_prep.video import ClipSettings, prep_video
    from ssl_foundry.pipeline.data.video import clip_bytes, clip_decoder

    work = Path(tempfile.mkdtemp(prefix="bench-video-"))
    try:
        source = Path(args.source) if args.source else work / "src"
        if not args.source:
            copy_sample_videos(source)
        rows = []
        for codec in args.codecs:
            settings = ClipSettings(clip_frames=args.clip_frames, stride=args.stride, fps=args.fps,
                                    max_side=args.max_side, codec=codec)
            out = work / codec
            prep = prep_video(source, out, settings, shard_size=50, workers=args.workers)
            clips = [clip_bytes(s) for s in tarfile_samples([{"url": p} for p in shard_paths(out)])]
            row = {"codec": codec, "clips": prep["samples"], "videos": prep["videos"],
                   "prep_check_s": prep["check_seconds"], "prep_write_s": prep["write_seconds"],
                   "prep_clips_per_s": prep["samples"] / prep["write_seconds"],
                   "mib_per_clip": prep["bytes"] / prep["samples"] / 2**20, "decode": {}}
            decoders = ["pyav"] + (["dali"] if CLIP_CODECS[codec].dali_cpu else [])
            for name in decoders:
                decode = clip_decoder(name, args.batch_size)
                decode(clips[:args.batch_size])  # warm-up: DALI's first run allocates
                tic = time.perf_counter()
                frames = sum(c.shape[0] for i in range(0, len(clips), args.batch_size)
                             for c in decode(clips[i:i + args.batch_size]))
                seconds = time.perf_counter() - tic
                row["decode"][name] = {"clips_per_s": len(clips) / seconds, "frames_per_s": frames / seconds}
            print(f"[bench video] {codec}: prep {row['prep_clips_per_s']:.1f} clips/s, "
                  f"{row['mib_per_clip']:.3f} MiB/clip, decode " + ", ".join(
                      f"{k} {v['clips_per_s']:.0f} clips/s" for k, v in row["decode"].items()), flush=True)
            rows.append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {"benchmark": "video", "clip_frames": args.clip_frames, "fps": args.fps, "stride": args.stride,
              "max_side": args.max_side, "prep_workers": args.workers, "decode_batch": args.batch_size,
              "source": args.source or "packaged sample videos (foundry prep sample-videos)",
              "codecs": rows, "machine": _machine()}
    _write(report, args.out)
    return 0


def _temporal_order_of(backbone, cfg, seed_note: str) -> dict:
    from ssl_foundry.pipeline.evaluate.temporal_order import clip_frame_features, temporal_order_accuracy

    d = cfg.data
    tic = time.perf_counter()
    features = clip_frame_features(backbone, d.eval_test, cfg.eval.temporal_order_frames, d.eval_image_size,
                                   d.mean, d.std, cfg.eval.batch_size)
    result = temporal_order_accuracy(*features, cfg.eval.linear)
    print(f"[bench temporal-order] {seed_note}: {100 * result['temporal_order_top1']:.1f}%", flush=True)
    return {**result, "probe_s": time.perf_counter() - tic}


def bench_temporal_order(args: argparse.Namespace) -> int:
    """Every video recipe for the same CPU budget (at ``--train-seeds`` seeds), then `foundry eval
    temporal-order`'s probe on its export, beside the same backbones at random initialisation
    (``--seeds`` seeds): the probe on a few videos is noisy, so the spread over seeds is part of
    the result, and ``summary`` gives each side's mean and standard deviation."""
    import torch

    from ssl_foundry.models.backbones import create_backbone
    from ssl_foundry.pipeline.registry.export import load_timm_backbone

    recipes = args.recipe or sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").glob("*_video.yaml"))
    out = Path(args.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    tracking_uri = f"sqlite:///{out / 'mlflow.db'}"
    runs, baselines, seen = [], [], set()
    for recipe, seed in itertools.product(recipes, range(args.train_seeds)):
        name = Path(recipe).stem
        run_name = name if args.train_seeds == 1 else f"{name}.seed{seed}"
        run_dir, log_path = out / run_name, out / f"{run_name}.log"
        overrides = [f"output_dir={run_dir}", f"train.budget_minutes={args.budget_minutes}", f"train.max_steps={10**7}",
                     "train.resume=never", f"mlflow.tracking_uri={tracking_uri}", "mlflow.registered_model=",
                     f"train.checkpoint_every={10**7}", f"train.seed={seed}", *args.overrides]
        cfg = load_config(recipe, overrides)
        if args.reuse_runs and (run_dir / "result.json").is_file():
            print(f"[bench temporal-order] {run_name}: reusing {run_dir / 'result.json'}", flush=True)
            done = subprocess.CompletedProcess([], 0)
        else:
            print(f"[bench temporal-order] {run_name}: {args.budget_minutes:g} min of training, log {log_path}",
                  flush=True)
            with open(log_path, "w") as log:
                done = subprocess.run([sys.executable, "-m", "ssl_foundry.launch", "pretrain", recipe, *overrides],
                                      cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        row = {"recipe": name, "seed": cfg.train.seed, "method": cfg.model.method, "backbone": cfg.model.backbone}
        if done.returncode != 0:
            row["error"] = f"exit {done.returncode}, see {log_path}"
        else:
            result = json.loads((run_dir / "result.json").read_text())
            row.update(steps=result["steps"], final_loss=result["final_loss"],
                       **_temporal_order_of(load_timm_backbone(str(run_dir / "backbone")), cfg, run_name))
        runs.append(row)
        key = (cfg.model.backbone, json.dumps(cfg.model.backbone_args, sort_keys=True))
        if key in seen:
            continue
        seen.add(key)
        for init_seed in range(args.seeds):
            torch.manual_seed(init_seed)
            backbone = create_backbone(cfg.model.backbone, **cfg.model.backbone_args)
            baselines.append({"backbone": cfg.model.backbone, "seed": init_seed, **_temporal_order_of(
                backbone, cfg, f"random init {cfg.model.backbone} seed {init_seed}")})

    def spread(rows: list[dict]) -> dict:
        top1 = [r["temporal_order_top1"] for r in rows if "temporal_order_top1" in r]
        return {"seeds": len(top1), "mean": statistics.fmean(top1) if top1 else None,
                "sd": statistics.stdev(top1) if len(top1) > 1 else None}

    summary = {**{name: spread([r for r in runs if r["recipe"] == name]) for name in dict.fromkeys(
                   r["recipe"] for r in runs)},
               **{f"random init {b}": spread([r for r in baselines if r["backbone"] == b]) for b in dict.fromkeys(
                   r["backbone"] for r in baselines)}}
    report = {"benchmark": "temporal-order", "budget_minutes": args.budget_minutes, "recipes": recipes,
              "summary": summary, "runs": runs, "random_init": baselines, "machine": _machine()}
    _write(report, str(out / "temporal_order.json"))
    return 1 if any("error" in r for r in runs) else 0


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks that write JSON")
    kinds = p.add_subparsers(dest="kind", required=True)
    st = kinds.add_parser("strategies", help="DDP vs DeepSpeed ZeRO-1/2/3 (+ offload) on the same run: step time, "
                          "peak memory per rank, ZeRO's model-state arithmetic")
    st.add_argument("config")
    st.add_argument("overrides", nargs="*", help="dotted key=value applied to every case (deepspeed.* keys: to "
                    "the DeepSpeed cases)")
    st.add_argument("--nproc", type=int, default=2, help="ranks (default 2)")
    st.add_argument("--steps", type=int, default=15, help="steps per case (default 15; the first 5 are not timed)")
    st.add_argument("--cases", nargs="+", choices=list(STRATEGY_CASES), default=list(STRATEGY_CASES))
    st.add_argument("--out-dir", default="bench/strategies", help="runs, logs and strategies.json")
    st.set_defaults(func=bench_strategies)
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
    lo = kinds.add_parser("loader", help="training loader images/s and CPU per image: DALI (CPU backend) vs "
                          "torchvision on the same shards and recipe, by worker count, with a per-op CPU breakdown")
    lo.add_argument("config", nargs="?", default=str(REPO / LOADER_RECIPE), help=f"recipe (default {LOADER_RECIPE})")
    lo.add_argument("overrides", nargs="*")
    lo.add_argument("--data", nargs="+", help="shard locations, each measured (the same shards on local disk, "
                    "http(s)://, s3://: DALI is skipped where it cannot read them; default: package photos, made in "
                    "a temp folder); the CPU breakdown is of the first")
    lo.add_argument("--copies", type=int, default=25, help="times each of the 40 photos is written (default 25)")
    lo.add_argument("--short-side", type=int, default=256, help="photo size in px (default 256)")
    lo.add_argument("--batch-size", type=int, default=32)
    lo.add_argument("--batches", type=int, default=20, help="measured batches per run (default 20)")
    lo.add_argument("--warmup", type=int, default=3, help="batches run first and not measured")
    lo.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="DALI threads / torch loader processes")
    lo.add_argument("--no-breakdown", dest="breakdown", action="store_false",
                    help="skip the per-op CPU breakdown (one run per op prefix and backend)")
    lo.add_argument("--out", help="write the JSON here too")
    lo.set_defaults(func=bench_loader)
    vi = kinds.add_parser("video", help="clip prep clips/s per codec and decode clips/s per decoder (PyAV, DALI CPU)")
    vi.add_argument("--source", help="video folder (default: the packaged sample videos)")
    vi.add_argument("--codecs", nargs="+", default=["mjpeg", "vp9", "h264"])
    vi.add_argument("--clip-frames", type=int, default=16)
    vi.add_argument("--stride", type=int, default=8)
    vi.add_argument("--fps", type=float, default=10.0)
    vi.add_argument("--max-side", type=int, default=128)
    vi.add_argument("--workers", type=int, default=None, help="prep processes (default: usable CPUs)")
    vi.add_argument("--batch-size", type=int, default=16, help="clips per decode call")
    vi.add_argument("--out", help="write the JSON here too")
    vi.set_defaults(func=bench_video)
    to = kinds.add_parser("temporal-order", help="every video recipe for the same CPU budget, then the "
                          "forward-vs-reversed probe (foundry eval temporal-order) beside random-init backbones")
    to.add_argument("overrides", nargs="*", help="dotted key=value applied to every recipe")
    to.add_argument("--recipe", action="append",
                    help="a recipe YAML; repeat for several (default: configs/*_video.yaml)")
    to.add_argument("--budget-minutes", type=float, default=5.0, help="training minutes per recipe (default 5)")
    to.add_argument("--seeds", type=int, default=3, help="random-init seeds per backbone (default 3)")
    to.add_argument("--train-seeds", type=int, default=1, help="training seeds per recipe (train.seed 0..N-1; "
                    "default 1); with more than 1, run folders are <recipe>.seed<N>")
    to.add_argument("--reuse-runs", action="store_true", help="a recipe whose run folder in --out-dir already "
                    "has a result.json is probed without training again")
    to.add_argument("--out-dir", default="bench/temporal-order", help="runs, logs and temporal_order.json")
    to.set_defaults(func=bench_temporal_order)
    q = kinds.add_parser("quality", help="kNN and linear-probe top-1 of every Fashion-MNIST recipe after the same "
                         "CPU budget, "
                         "with raw-pixel and random-init baselines (JSON + markdown)")
    q.add_argument("overrides", nargs="*", help="dotted key=value applied to every recipe")
    q.add_argument("--recipe", action="append", help="a recipe YAML; repeat for several (default: every "
                   "configs/*_fmnist.yaml)")
    q.add_argument("--budget-minutes", type=float, default=20.0, help="training minutes per recipe (default 20)")
    q.add_argument("--out-dir", default="bench/quality", help="runs, logs, quality.json and quality.md")
    q.add_argument("--tracking-uri", help="MLflow store for the runs (default: sqlite in --out-dir)")
    q.add_argument("--reuse-runs", action="store_true", help="a recipe whose run folder in --out-dir already "
                   "has a result.json is evaluated (kNN from it, linear probe) without training again")
    q.add_argument("--raw-pixel-size", type=int, default=28,
                   help="image side for the raw-pixel baseline (default 28, Fashion-MNIST's own)")
    q.set_defaults(func=bench_quality)

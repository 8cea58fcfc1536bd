"""`foundry bench temporal-order`: every video recipe for the same CPU budget (at several training
seeds), then `foundry eval temporal-order`'s probe on its export, beside the same backbones at
random initialisation (several seeds): the spread over seeds is part of the result."""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import time
from pathlib import Path

import torch

from ssl_foundry.launch.bench.report import machine, write_report
from ssl_foundry.launch.bench.runs import pretrain_process, shipped_recipes
from ssl_foundry.models.backbones import create_backbone
from ssl_foundry.pipeline.config import load_config
from ssl_foundry.pipeline.evaluate.temporal_order import clip_frame_features, temporal_order_accuracy
from ssl_foundry.pipeline.registry.export import load_timm_backbone


def _temporal_order_of(backbone, cfg, seed_note: str) -> dict:
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
    recipes = args.recipe or shipped_recipes("*_video.yaml")
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
            done = pretrain_process(recipe, overrides, log_path)
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
              "summary": summary, "runs": runs, "random_init": baselines, "machine": machine()}
    write_report(report, str(out / "temporal_order.json"))
    return 1 if any("error" in r for r in runs) else 0

"""`foundry bench quality`: every Fashion-MNIST recipe trains for the same CPU budget in its own
process, is kNN-evaluated and linear-probed, and lands in a JSON + markdown table beside raw-pixel
and random-init baselines computed by the same code."""
from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import time
from pathlib import Path

import torch

from ssl_foundry.launch.bench.report import machine, write_report
from ssl_foundry.launch.bench.runs import pretrain_process, shipped_recipes
from ssl_foundry.models.backbones import create_backbone
from ssl_foundry.models.registry import takes_teacher
from ssl_foundry.pipeline.config import load_config
from ssl_foundry.pipeline.evaluate.knn import eval_features, knn_accuracy
from ssl_foundry.pipeline.evaluate.linear_probe import linear_probe
from ssl_foundry.pipeline.registry.export import export_digest, load_timm_backbone


def _pretrain_row(recipe: str, variant: list[str], args: argparse.Namespace, out: Path, tracking_uri: str,
                 teacher: dict | None = None) -> dict:
    """One row: a recipe (with a ``--variant``'s overrides) through `foundry pretrain` in its own
    process, for ``--budget-minutes`` of training (the recipe's step count lifted, so the budget
    decides) or exactly ``--steps`` steps; then its kNN top-1 (from the pretraining) and, unless
    ``--no-linear``, the linear-probe top-1 (on the exported backbone). With ``--reuse-runs``, a row
    whose run folder already has a result.json is not trained again, only evaluated. A distillation
    recipe distils ``teacher`` (a row of this bench) when given: its row gets the student's kNN as a
    share of the teacher's."""
    name = Path(recipe).stem + (f".{variant[0]}" if variant else "")
    run_dir, log_path = out / name, out / f"{name}.log"
    length = ([f"train.max_steps={args.steps}", "train.budget_minutes=0"] if args.steps
              else [f"train.budget_minutes={args.budget_minutes}", f"train.max_steps={10**7}"])
    overrides = [f"output_dir={run_dir}", *length, "train.resume=never", "eval.after_pretrain=true",
                 f"mlflow.tracking_uri={tracking_uri}", "mlflow.registered_model=",
                 *([f"model.teacher={out / teacher['recipe'] / 'backbone'}"] if teacher else []), *args.overrides,
                 *variant[1:]]
    cfg = load_config(recipe, overrides)
    row = {"recipe": name, "method": cfg.model.method, "backbone": cfg.model.backbone,
           "batch_size": cfg.train.batch_size, "overrides": variant[1:], "log": str(log_path)}
    result_path = run_dir / "result.json"
    if args.reuse_runs and result_path.is_file():
        print(f"[bench quality] {name}: reusing {result_path}", flush=True)
        done = subprocess.CompletedProcess([], 0)
    else:
        what = f"{args.steps} steps" if args.steps else f"{args.budget_minutes:g} min of training"
        print(f"[bench quality] {name}: {what}, log {log_path}", flush=True)
        start = time.perf_counter()
        done = pretrain_process(recipe, overrides, log_path)
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
    if args.linear:
        row.update(_linear_probe_export(str(run_dir / "backbone"), cfg))  # where pretraining exports it
    if teacher:
        row.update(teacher=teacher["recipe"], knn_share_of_teacher=row["knn_top1"] / teacher["knn_top1"])
    print(f"[bench quality] {name}: {row['steps']} steps, {row['images_per_s']:.0f} images/s, "
          f"kNN top-1 {_percent(row['knn_top1'])}, linear top-1 {_percent(row.get('linear_top1'))}", flush=True)
    return row


def _linear_probe_export(backbone_dir: str, cfg) -> dict:
    """`foundry eval linear`'s protocol on an exported backbone (features cached in the run folder)."""
    tic = time.perf_counter()
    features = eval_features(load_timm_backbone(backbone_dir), cfg, torch.device("cpu"), export_digest(backbone_dir))
    probe = linear_probe(*features, cfg.eval.linear)
    return {"linear_top1": probe.test_top1, "linear_best_lr": probe.best_lr, "linear_s": time.perf_counter() - tic}


def _baselines(configs: list, raw_pixel_size: int) -> list[dict]:
    """Raw pixels and each distinct backbone at random initialisation, through the same kNN code."""
    def evaluate(name: str, arch: str, backbone: torch.nn.Module, cfg) -> dict:
        tic = time.perf_counter()
        features = eval_features(backbone, cfg, torch.device("cpu"))
        top1 = knn_accuracy(*features, cfg.eval.knn_k, cfg.eval.knn_temperature, cfg.eval.knn_whiten)
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
    length = (f"{report['steps']} steps" if report["steps"] else f"{report['budget_minutes']:g} min of training")
    whitened = ", whitened" if report["knn_whiten"] else ""
    lines = [f"kNN top-1 (cosine, k={report['knn_k']}, T={report['knn_temperature']}{whitened}) and linear-probe top-1 "
             f"(`foundry eval linear`: lr swept over {report['linear_lrs']}) on the Fashion-MNIST test "
             f"set after {length} per recipe "
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
                     f"{_percent(r.get('linear_top1'))} |")
    for r in report["baselines"]:
        lines.append(f"| {r['recipe']} | baseline | {r['backbone']} | - | 0 | - | - | {_percent(r['knn_top1'])} | "
                     f"{_percent(r['linear_top1'])} |")
    lines += [f"\n{r['recipe']} distils {r['teacher']}: its kNN top-1 is {_percent(r['knn_share_of_teacher'])} of the "
              f"teacher's, at the same budget." for r in report["runs"] if "knn_share_of_teacher" in r]
    return "\n".join(lines) + "\n"


def bench_quality(args: argparse.Namespace) -> int:
    """Every Fashion-MNIST recipe for the same CPU budget, kNN-evaluated, beside the baselines."""
    recipes = args.recipe or shipped_recipes("*_fmnist.yaml")
    out = Path(args.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    tracking_uri = args.tracking_uri or f"sqlite:///{out / 'mlflow.db'}"
    variants = args.variant or [[]]
    configs = [load_config(recipe, list(args.overrides)) for recipe in recipes]
    distills = {recipe for recipe, cfg in zip(recipes, configs) if takes_teacher(cfg.model.method)}
    runs = [_pretrain_row(recipe, variant, args, out, tracking_uri) for recipe in recipes if recipe not in distills
            for variant in variants]
    # Distillation last, from the best backbone trained here (none: the recipe's own model.teacher).
    teacher = max((r for r in runs if "error" not in r), key=lambda r: r["knn_top1"], default=None)
    runs += [_pretrain_row(recipe, variant, args, out, tracking_uri, teacher) for recipe in recipes
             if recipe in distills for variant in variants]
    report = {
        "benchmark": "quality",
        "command": " ".join(["foundry bench quality", f"--steps {args.steps}" if args.steps
                             else f"--budget-minutes {args.budget_minutes:g}",
                             *(f"--recipe {r}" for r in args.recipe or []),
                             *(f"--variant {' '.join(v)}" for v in args.variant or []),
                             *([] if args.linear else ["--no-linear"]), *([] if args.baselines else ["--no-baselines"]),
                             *(["--reuse-runs"] if args.reuse_runs else []), *args.overrides]),
        "budget_minutes": None if args.steps else args.budget_minutes,
        "steps": args.steps or None,
        "knn_k": configs[0].eval.knn_k,
        "knn_temperature": configs[0].eval.knn_temperature,
        "knn_whiten": configs[0].eval.knn_whiten,
        "linear_lrs": configs[0].eval.linear.lrs,
        "tracking_uri": tracking_uri,
        "runs": runs,
        "baselines": _baselines(configs, args.raw_pixel_size) if args.baselines else [],
        "machine": machine(),
    }
    (out / "quality.md").write_text(_quality_markdown(report))
    write_report(report, str(out / "quality.json"))
    print(_quality_markdown(report))
    return 1 if any("error" in r for r in runs) else 0

"""`foundry pretrain` and `foundry eval`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from launch.config import load_config


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="recipe YAML, e.g. configs/simclr_resnet18_fmnist.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value, e.g. train.max_steps=200")


def pretrain(args: argparse.Namespace) -> int:
    from launch.local import launch_pretrain

    cfg = load_config(args.config, args.overrides)
    result = launch_pretrain(cfg)
    if result is not None and getattr(result, "run_id", None):
        print_summary(result, cfg)
    return 0


def print_summary(result, cfg) -> None:
    print("\n=== ssl-foundry pretraining finished ===")
    print(f"shards:            {cfg.data.train}")
    print(f"steps:             {result.steps} (final loss {result.final_loss:.4f})")
    print(f"MLflow run:        {result.run_id} at {result.tracking_uri}")
    if result.model_version:
        print(f"registered model:  models:/{cfg.mlflow.registered_model}/{result.model_version}")
    print(f"backbone (timm):   {result.backbone_dir}")
    if result.knn_top1 is not None:
        print(f"kNN top-1 (k={cfg.eval.knn_k}, T={cfg.eval.knn_temperature}): {100 * result.knn_top1:.2f}%")
    if result.timing:
        print(f"throughput:        {result.timing.get('images_per_s', 0):.0f} images/s")
    if result.tracking_uri and result.tracking_uri.startswith("sqlite"):
        print(f"open the UI:       mlflow ui --backend-store-uri {result.tracking_uri} --port 5000")


def eval_knn(args: argparse.Namespace) -> int:
    import torch

    from pipeline.evaluate import knn_evaluate
    from pipeline.export import load_timm_backbone, resolve_backbone
    from pipeline.tracking import resolve_tracking_uri

    cfg = load_config(args.config, args.overrides)
    ref = args.backbone or str(Path(cfg.output_dir) / "backbone")
    uri = resolve_tracking_uri(cfg.mlflow.tracking_uri, cfg.output_dir)
    backbone = load_timm_backbone(resolve_backbone(ref, uri))
    top1 = knn_evaluate(backbone, cfg, torch.device("cpu"))
    print(json.dumps({"backbone": ref, "knn_top1": top1, "k": cfg.eval.knn_k,
                      "temperature": cfg.eval.knn_temperature}))
    if args.log:
        from pipeline.tracking import RunTracker

        tracker = RunTracker(uri, cfg.mlflow.experiment, run_name=f"knn {ref}")
        tracker.set_tags({"source_backbone": ref})
        tracker.log_metrics({"knn_top1": top1}, step=0)
        tracker.end()
    return 0


def add_pretrain_parser(sub) -> None:
    p = sub.add_parser("pretrain", help="self-supervised pretraining from shards")
    _add_config_args(p)
    p.set_defaults(func=pretrain)


def add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a backbone")
    kinds = p.add_subparsers(dest="kind", required=True)
    knn = kinds.add_parser("knn", help="kNN top-1 on data.eval_train (bank) / data.eval_test (queries)")
    _add_config_args(knn)
    knn.add_argument("--backbone", help="models:/name/version, models:/name@alias, runs:/id/backbone "
                     "or an export folder (default: <output_dir>/backbone)")
    knn.add_argument("--log", action="store_true", help="log the accuracy to a new MLflow run")
    knn.set_defaults(func=eval_knn)

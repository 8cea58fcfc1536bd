"""What `foundry eval knn|linear|finetune|temporal-order` runs (its arguments: launch/cli.py): resolve
the backbone, measure it, log a new MLflow run with its lineage, tag the registry version, apply the
gate, refresh the model card."""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import torch
from mlflow import MlflowClient

from ssl_foundry.data_prep.console import setup_logging
from ssl_foundry.data_prep.shard_format import read_manifest, redact
from ssl_foundry.launch.commands import user_errors
from ssl_foundry.launch.local import launch_ranks
from ssl_foundry.pipeline.config import (ConfigError, config_from_dict, flatten, load_config, require_labels, to_dict,
                                         validate_finetune, world_size)
from ssl_foundry.pipeline.evaluate.finetune import export_classifier, finetune
from ssl_foundry.pipeline.evaluate.knn import eval_features, knn_evaluate
from ssl_foundry.pipeline.evaluate.linear_probe import linear_probe
from ssl_foundry.pipeline.evaluate.temporal_order import clip_frame_features, temporal_order_accuracy
from ssl_foundry.pipeline.registry.downstream import apply_gate, lineage_tags, record_version_metrics, write_model_card
from ssl_foundry.pipeline.registry.embedding_map import embedding_map
from ssl_foundry.pipeline.registry.export import check_input_size, export_digest, load_timm_backbone, locate_backbone
from ssl_foundry.pipeline.registry.plots import log_figures, metric_curves
from ssl_foundry.pipeline.registry.tracking import RunTracker, default_artifact_location, resolve_tracking_uri
from ssl_foundry.pipeline.train.runtime import init_runtime, shutdown_runtime

logger = logging.getLogger(__name__)


def _describe(source) -> str:
    """A backbone reference, and the folder it resolved to where that is another."""
    return source.ref if Path(source.ref) == source.folder else f"{source.ref} ({source.folder})"


def _knn(backbone, cfg, digest: str) -> tuple[dict[str, float], dict]:
    top1 = knn_evaluate(backbone, cfg, torch.device("cpu"), backbone_digest=digest)
    return {"knn_top1": top1}, {"eval.knn_k": cfg.eval.knn_k, "eval.knn_temperature": cfg.eval.knn_temperature,
                                "eval.knn_whiten": cfg.eval.knn_whiten}


def _linear(backbone, cfg, digest: str) -> tuple[dict[str, float], dict]:
    result = linear_probe(*eval_features(backbone, cfg, torch.device("cpu"), backbone_digest=digest), cfg.eval.linear)
    metrics = {"linear_top1": result.test_top1, "linear_best_lr": result.best_lr,
               **{f"linear_val_top1.lr_{lr:g}": top1 for lr, top1 in result.val_top1.items()}}
    return metrics, flatten(to_dict(cfg.eval.linear), "eval.linear")


def _temporal_order(backbone, cfg, digest: str) -> tuple[dict[str, float], dict]:
    d, frames = cfg.data, cfg.eval.temporal_order_frames
    if not d.eval_test:
        raise ConfigError("foundry eval temporal-order reads the clip shards of data.eval_test: set it (e.g. "
                          "data.eval_test=data/videos/clips)")
    result = temporal_order_accuracy(*clip_frame_features(backbone, d.eval_test, frames, d.eval_image_size, d.mean,
                                                          d.std, cfg.eval.batch_size), cfg.eval.linear)
    metrics = {"temporal_order_top1": result["temporal_order_top1"],
               **{f"temporal_order_top1.{Path(v).stem}": top1 for v, top1 in result["per_video"].items()}}
    return metrics, {"eval.temporal_order_frames": frames}


_EVALUATIONS = {"knn": _knn, "linear": _linear, "temporal-order": _temporal_order}


def _embedding_map(backbone, cfg, digest: str) -> bytes:
    """t-SNE of the (cached) test features, coloured by the shards' class names."""
    _, _, test_features, test_labels = eval_features(backbone, cfg, torch.device("cpu"), backbone_digest=digest)
    logger.info("embedding map: t-SNE of %d test features", min(len(test_features), cfg.eval.embedding_map_points))
    return embedding_map(test_features, test_labels, read_manifest(cfg.data.eval_test).get("classes"),
                         max_points=cfg.eval.embedding_map_points, seed=cfg.train.seed)


@user_errors
def evaluate(args: argparse.Namespace) -> int:
    """`foundry eval knn|linear`: resolve the backbone, measure, log a new run with its lineage,
    tag the registry version, apply the gate, refresh the model card."""
    cfg = load_config(args.config, args.overrides)
    if args.kind in ("knn", "linear"):
        require_labels(cfg.data, ("eval_train", "eval_test"), f"foundry eval {args.kind}")
    uri = resolve_tracking_uri(cfg.mlflow.tracking_uri)
    source = locate_backbone(args.backbone or str(Path(cfg.output_dir) / "backbone"), uri)
    backbone = load_timm_backbone(source.folder)
    check_input_size(backbone, source, cfg.data.eval_image_size)
    logger.info("eval %s of %s", args.kind, _describe(source))
    digest = export_digest(source.folder)
    metrics, params = _EVALUATIONS[args.kind](backbone, cfg, digest)
    report = {"backbone": source.ref, "model_version": source.model_version,
              "pretrain_run_id": source.pretrain_run_id, **metrics}
    if args.log:
        labelled_images = args.kind in ("knn", "linear")  # the map colours test images by class
        figures = ({"embedding_tsne.png": _embedding_map(backbone, cfg, digest)}
                   if cfg.eval.embedding_map_points and labelled_images else {})
        report.update(_log_evaluation(args.kind, source, metrics, params, cfg, uri, figures=figures))
    print(json.dumps(report))
    return 0


def _log_evaluation(kind: str, source, metrics: dict[str, float], params: dict, cfg, uri: str,
                    history: list[tuple[int, dict[str, float]]] = (), artifacts: dict[str, str] | None = None,
                    figures: dict[str, bytes] | None = None) -> dict:
    """A new MLflow run for one evaluation: lineage tags, environment, params, ``metrics`` (and
    per-step ``history``), ``artifacts`` (local path -> artifact folder), ``figures`` (PNGs, into
    ``plots/``); then the registry version's tags, the gate and its model card."""
    tracker = RunTracker(uri, cfg.mlflow.experiment, run_name=f"{kind} {source.ref}",
                         artifact_location=default_artifact_location(uri))
    tracker.set_tags(lineage_tags(source, kind))
    tracker.log_environment()
    tracker.log_params({"data.eval_train": redact(cfg.data.eval_train), "data.eval_test": redact(cfg.data.eval_test),
                        "data.eval_image_size": cfg.data.eval_image_size, **params})
    for step, values in history:
        tracker.log_metrics(values, step=step)
    tracker.log_metrics(metrics, step=history[-1][0] if history else 0)
    for local_path, artifact_path in (artifacts or {}).items():
        tracker.log_artifact(local_path, artifact_path)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    if figures:
        log_figures(client, tracker.run_id, figures)
    tracker.end()
    logger.info("logged to MLflow run %s at %s", tracker.run_id, uri)
    record_version_metrics(client, source, metrics, tracker.run_id)
    gate = apply_gate(client, source, metrics, cfg.eval.gate)
    if source.model_version:
        write_model_card(client, source.model_name, source.model_version)
    return {"eval_run_id": tracker.run_id, "tracking_uri": uri, "gate": gate}


def _finetune_rank(config: dict, source, log: bool) -> dict | None:
    """One rank of `foundry eval finetune` (in this process or started by the elastic launcher)."""
    setup_logging()  # a rank started by the launcher knows its RANK now
    cfg = config_from_dict(config)
    rt = init_runtime(cfg.launch, cfg.train)
    try:
        result = finetune(source, cfg, rt, num_classes=len(read_manifest(cfg.data.eval_train)["classes"]))
    finally:
        shutdown_runtime()
    if result is None:
        return None
    metrics = {"finetune_top1": result.top1}
    report = {"backbone": source.ref, "model_version": source.model_version,
              "pretrain_run_id": source.pretrain_run_id, "world_size": rt.world_size, **metrics,
              "final_loss": result.losses[-1][1]}
    if log:
        uri = resolve_tracking_uri(cfg.mlflow.tracking_uri)
        history = [(step, {"loss": loss, "lr": lr}) for step, loss, lr in result.losses]
        curves = metric_curves({"loss": [(step, loss) for step, loss, _ in result.losses],
                                "lr": [(step, lr) for step, _, lr in result.losses]}, title=f"fine-tuning {source.ref}")
        with tempfile.TemporaryDirectory() as tmp:
            classifier = export_classifier(result, source, cfg, f"{tmp}/classifier")
            report.update(_log_evaluation("finetune", source, metrics,
                                          flatten(to_dict(cfg.eval.finetune), "eval.finetune"), cfg, uri, history,
                                          {str(classifier): "classifier"}, {"curves.png": curves}))
    return report


@user_errors
def eval_finetune(args: argparse.Namespace) -> int:
    """`foundry eval finetune`: the backbone is resolved (and downloaded) once, here, then every rank
    fine-tunes it (launch.nproc_per_node ranks, or the ranks torchrun started)."""
    cfg = load_config(args.config, args.overrides)
    validate_finetune(cfg, world_size(cfg))
    uri = resolve_tracking_uri(cfg.mlflow.tracking_uri)
    source = locate_backbone(args.backbone or str(Path(cfg.output_dir) / "backbone"), uri)
    check_input_size(load_timm_backbone(source.folder), source, cfg.data.eval_image_size)
    logger.info("eval finetune of %s on %d rank(s)", _describe(source), cfg.launch.nproc_per_node * cfg.launch.nnodes)
    report = launch_ranks(cfg, _finetune_rank, to_dict(cfg), source, args.log)
    if report is not None:
        print(json.dumps(report))
    return 0

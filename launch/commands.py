"""What `foundry pretrain`, `foundry eval` and `foundry registry` run (their arguments: launch/cli.py)."""
from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from mlflow import MlflowClient

from ssl_foundry.data_prep.console import setup_logging
from ssl_foundry.data_prep.shard_format import read_manifest, redact
from ssl_foundry.launch.dry_run import dry_run_report
from ssl_foundry.launch.local import NodeLostError, RanksFailed, launch_pretrain, launch_ranks
from ssl_foundry.models.registry import method_class, takes_teacher
from ssl_foundry.pipeline.config import (ConfigError, config_from_dict, flatten, load_config, public_dict,
                                         require_labels, to_dict, validate_finetune, world_size)
from ssl_foundry.pipeline.data.loader import validate_batch
from ssl_foundry.pipeline.evaluate.finetune import export_classifier, finetune
from ssl_foundry.pipeline.evaluate.knn import eval_features, knn_evaluate
from ssl_foundry.pipeline.evaluate.linear_probe import linear_probe
from ssl_foundry.pipeline.evaluate.temporal_order import clip_frame_features, temporal_order_accuracy
from ssl_foundry.pipeline.registry.downstream import (PRODUCTION_ALIAS, RegistryError, apply_gate, lineage_tags,
                                                      promote, record_version_metrics, write_model_card)
from ssl_foundry.pipeline.registry.export import (BackboneInputError, check_input_size, export_digest,
                                                  load_timm_backbone, locate_backbone)
from ssl_foundry.pipeline.registry.plots import embedding_map, log_figures, metric_curves
from ssl_foundry.pipeline.registry.teacher import load_teacher
from ssl_foundry.pipeline.registry.tracking import RunTracker, default_artifact_location, resolve_tracking_uri
from ssl_foundry.pipeline.registry.tracking_server import TrackingError, check_reachable, check_store_exists
from ssl_foundry.pipeline.train.checkpoint import CheckpointError
from ssl_foundry.pipeline.train.output_lock import OutputDirLock, OutputDirLocked
from ssl_foundry.pipeline.train.run_dir import plan_run
from ssl_foundry.pipeline.train.runtime import init_runtime, shutdown_runtime
from ssl_foundry.pipeline.train.trainer import NonFiniteLossError

logger = logging.getLogger(__name__)


# Errors whose message says what happened and what to do: a backbone reference that does not
# resolve, a backbone that refuses the image size, an unreachable store, a refused registry
# operation, a locked output_dir, a refused or unwritable checkpoint, a non-finite loss.
USER_ERRORS = (FileNotFoundError, BackboneInputError, TrackingError, RegistryError, OutputDirLocked, CheckpointError,
               NonFiniteLossError)


def _raised_in_a_rank(err, known: tuple[type[Exception], ...]) -> Exception | None:
    """The exception a rank raised (``launch.local.RanksFailed``), rebuilt from its type's name and
    message when it is one of ``known`` (or a subclass); None for any other."""
    by_name, todo = {}, list(known)
    while todo:
        cls = todo.pop()
        by_name[cls.__name__] = cls
        todo.extend(cls.__subclasses__())
    cls = by_name.get(err.error_type)
    return cls(err.message) if cls is not None else None


def _user_errors(command):
    """The errors of ``USER_ERRORS`` (and config errors) as one line, no traceback, also when
    a rank of a multi-process run raised them; exit status 2 for what stops a command before it
    starts, 1 for a run that failed on the way (a full disk, a non-finite loss, a store that went
    away). Any other failure of a rank: torch elastic's report with its traceback, exit status 1."""
    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except RanksFailed as failed:
            err = _raised_in_a_rank(failed, (*USER_ERRORS, ConfigError))
            if err is None:
                print(failed.details, file=sys.stderr)
                return 1
            if isinstance(err, ConfigError):
                raise err from None
        except USER_ERRORS as raised:
            err = raised
        print(f"foundry: error: {err}", file=sys.stderr)
        return getattr(err, "exit_status", 2)
    return run


@_user_errors
def pretrain(args: argparse.Namespace) -> int:
    """Before any rank starts: the config (with the batch's split over the ranks), the teacher of a
    multi-rank distillation, the tracking server, the output_dir's lock (held by this process for the
    run; under torchrun and on several nodes by rank 0)."""
    cfg = load_config(args.config, args.overrides, check_paths=not args.print_config)
    if args.print_config:
        print(yaml.safe_dump(public_dict(cfg), sort_keys=False), end="")
        return 0
    validate_batch(cfg)
    if args.dry_run:
        print("\n".join(dry_run_report(cfg)) + "\nnothing was run (--dry-run)")
        return 0
    plan_run(cfg)  # a changed config on another run's output_dir: refused here, before any rank starts
    if int(os.environ.get("RANK", "0")) != 0:
        return _pretrain(cfg)
    if takes_teacher(cfg.model.method) and cfg.launch.nproc_per_node * cfg.launch.nnodes > 1:
        load_teacher(cfg)  # a teacher that does not resolve or fit fails here once, not in every rank
    check_reachable(resolve_tracking_uri(cfg.mlflow.tracking_uri))
    if cfg.launch.nnodes > 1:  # every node runs this command on the shared output_dir: rank 0 takes the lock
        return _pretrain(cfg)
    with OutputDirLock(cfg.output_dir):
        return _pretrain(cfg)


def _pretrain(cfg) -> int:
    try:
        result = launch_pretrain(cfg)
    except NodeLostError as err:
        print(f"foundry: error: {err}", file=sys.stderr)
        return 1
    if result is not None and getattr(result, "run_id", None):
        print_summary(result, cfg)
    return 0


def print_summary(result, cfg) -> None:
    print("\n=== ssl-foundry pretraining finished ===")
    print(f"shards:            {redact(cfg.data.train)}")
    print(f"steps:             {result.steps} (final loss {result.final_loss:.4f})")
    print(f"MLflow run:        {result.run_id} at {result.tracking_uri}")
    if result.model_version:
        print(f"registered model:  models:/{cfg.mlflow.registered_model}/{result.model_version}")
    print(f"backbone (timm):   {result.backbone_dir}")
    if result.knn_top1 is not None:
        print(f"kNN top-1 (k={cfg.eval.knn_k}, T={cfg.eval.knn_temperature}): {100 * result.knn_top1:.2f}%")
    if result.timing:
        unit = "clips" if method_class(cfg.model.method).input_kind == "clip" else "images"
        print(f"throughput:        {result.timing.get('images_per_s', 0):.0f} {unit}/s")
    if result.tracking_uri and result.tracking_uri.startswith("sqlite"):
        print(f"open the UI:       mlflow ui --backend-store-uri {result.tracking_uri} --port 5000")
    if result.model_version:
        print(f"serve it:          MLFLOW_TRACKING_URI={result.tracking_uri} mlflow models serve -m "
              f"models:/{cfg.mlflow.registered_model}/{result.model_version} --env-manager local --port 5001")


def _describe(source) -> str:
    """A backbone reference, and the folder it resolved to where that is another."""
    return source.ref if Path(source.ref) == source.folder else f"{source.ref} ({source.folder})"


def _knn(backbone, cfg, digest: str) -> tuple[dict[str, float], dict]:
    top1 = knn_evaluate(backbone, cfg, torch.device("cpu"), backbone_digest=digest)
    return {"knn_top1": top1}, {"eval.knn_k": cfg.eval.knn_k, "eval.knn_temperature": cfg.eval.knn_temperature}


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


@_user_errors
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


@_user_errors
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


@_user_errors
def registry(args: argparse.Namespace) -> int:
    """`foundry registry promote|card NAME VERSION`."""
    uri = resolve_tracking_uri(args.tracking_uri)
    check_store_exists(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    if args.action == "promote":
        promote(client, args.name, args.version, force=args.force)
        print(f"models:/{args.name}@{PRODUCTION_ALIAS} -> version {args.version}")
    else:
        print(write_model_card(client, args.name, args.version))
    return 0

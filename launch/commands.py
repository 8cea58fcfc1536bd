"""What `foundry pretrain` and `foundry registry` run (their arguments: launch/cli.py), and the errors
every command explains in one line (``user_errors``)."""
from __future__ import annotations

import argparse
import functools
import os
import sys

import yaml
from mlflow import MlflowClient

from ssl_foundry.data_prep.shard_format import redact
from ssl_foundry.launch.dry_run import dry_run_report
from ssl_foundry.launch.local import NodeLostError, RanksFailed, launch_pretrain
from ssl_foundry.models.registry import method_class, takes_teacher
from ssl_foundry.pipeline.config import ConfigError, load_config, public_dict
from ssl_foundry.pipeline.data.loader import validate_batch
from ssl_foundry.pipeline.evaluate.knn import knn_protocol
from ssl_foundry.pipeline.registry.downstream import PRODUCTION_ALIAS, RegistryError, promote, write_model_card
from ssl_foundry.pipeline.registry.export import BackboneInputError
from ssl_foundry.pipeline.registry.teacher import load_teacher
from ssl_foundry.pipeline.registry.tracking import resolve_tracking_uri
from ssl_foundry.pipeline.registry.tracking_server import TrackingError, check_reachable, check_store_exists
from ssl_foundry.pipeline.train.checkpoint import CheckpointError
from ssl_foundry.pipeline.train.output_lock import OutputDirLock, OutputDirLocked
from ssl_foundry.pipeline.train.run_dir import plan_run
from ssl_foundry.pipeline.train.trainer import NonFiniteLossError


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


def user_errors(command):
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


@user_errors
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
        print(f"kNN top-1 ({knn_protocol(cfg.eval)}): {100 * result.knn_top1:.2f}%")
    if result.timing:
        unit = "clips" if method_class(cfg.model.method).input_kind == "clip" else "images"
        print(f"throughput:        {result.timing.get('steady_images_per_s', 0):.0f} {unit}/s (median step)")
    if result.tracking_uri and result.tracking_uri.startswith("sqlite"):
        print(f"open the UI:       mlflow ui --backend-store-uri {result.tracking_uri} --port 5000")
    if result.model_version:
        print(f"serve it:          MLFLOW_TRACKING_URI={result.tracking_uri} mlflow models serve -m "
              f"models:/{cfg.mlflow.registered_model}/{result.model_version} --env-manager local --port 5001")


@user_errors
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

"""One rank's whole pretraining run, whatever launched it (`foundry pretrain` in this process or as
elastic ranks, torchrun, a `foundry submit` Slurm job): training (with the online kNN monitor of
``eval.knn_every`` and the end-of-pretraining kNN on every rank), then on rank 0 alone what a
finished run adds to MLflow: its plots and, for a registered version, the evaluation gate on the
end-of-pretraining kNN and the refreshed model card."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from mlflow import MlflowClient

from ssl_foundry.pipeline.config import Config
from ssl_foundry.pipeline.registry.downstream import apply_gate, write_model_card
from ssl_foundry.pipeline.registry.export import BackboneSource
from ssl_foundry.pipeline.registry.plots import augmentation_grid, log_figures, metric_curves
from ssl_foundry.pipeline.train.trainer import Trainer, TrainResult, train


def run_pretraining(cfg: Config, setup: Callable[[Trainer], None] | None = None) -> TrainResult:
    """``train``, then (rank 0) the run's plots, gate and card. ``setup`` is the launcher's own hook
    on the constructed Trainer (Slurm: the stop signal, job tags). ``train`` has left the process
    group by then: the other ranks return at once, and none waits for rank 0 in a collective."""
    result = train(cfg, setup=setup)
    if result.run_id:  # rank 0 of a tracked run
        client = MlflowClient(tracking_uri=result.tracking_uri, registry_uri=result.tracking_uri)
        _log_pretraining_plots(client, result, cfg)
        if result.model_version:
            _gate_registered_version(client, result, cfg)
    return result


def _log_pretraining_plots(client: MlflowClient, result: TrainResult, cfg: Config) -> None:
    """The views the method saw, and its loss / lr (/ online kNN) curves, on the pretraining run."""
    history = {key: [(m.step, m.value) for m in client.get_metric_history(result.run_id, key)]
               for key in ("loss", "lr", "knn_monitor_top1")}
    d = cfg.data
    log_figures(client, result.run_id, {
        "augmentations.png": augmentation_grid(d.train, d.views, d.mean, d.std, seed=cfg.train.seed),
        "curves.png": metric_curves(history, title=f"{cfg.model.method} {cfg.model.backbone}")})


def _gate_registered_version(client: MlflowClient, result: TrainResult, cfg: Config) -> None:
    """The end-of-pretraining kNN is an evaluation too: it may pass the gate, and the version's
    card (written at registration, before the kNN ran) gets its accuracy."""
    name, version = cfg.mlflow.registered_model, result.model_version
    if result.knn_top1 is not None:
        source = BackboneSource(f"models:/{name}/{version}", Path(result.backbone_dir), name, version, result.run_id)
        print(f"evaluation gate:   {apply_gate(client, source, {'knn_top1': result.knn_top1}, cfg.eval.gate)}",
              flush=True)
    write_model_card(client, name, version)

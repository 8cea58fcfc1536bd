"""The frozen teacher of a distillation run (``model.method=distill``): ``model.teacher``, a registry
reference (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``), an MLflow run id or an export folder,
resolved in the registry of ``mlflow.tracking_uri`` (as `foundry eval --backbone` resolves its
reference) and loaded with plain timm; its lineage is recorded on the student's run and export."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ssl_foundry.pipeline.config import Config, ConfigError
from ssl_foundry.pipeline.data.augment.spec import view_sizes
from ssl_foundry.pipeline.registry.export import BackboneSource, export_digest, load_timm_backbone, locate_backbone
from ssl_foundry.pipeline.registry.tracking import resolve_tracking_uri
from ssl_foundry.pipeline.registry.tracking_server import TrackingError


@dataclass
class Teacher:
    module: torch.nn.Module
    source: BackboneSource

    def lineage(self) -> dict[str, str]:
        """Where the teacher's weights came from: the reference, its content digest, and the
        registered model, version and pretraining run where the reference tells them."""
        s = self.source
        fields = {"ref": s.ref, "sha256": export_digest(s.folder), "model_name": s.model_name,
                  "model_version": s.model_version, "pretrain_run_id": s.pretrain_run_id}
        return {key: value for key, value in fields.items() if value}


def load_teacher(cfg: Config) -> Teacher:
    """The teacher module (eval mode) and where it came from. A reference that does not resolve (or a
    tracking server that does not answer), a teacher exported with another normalisation than
    ``data.mean``/``data.std`` (it would see other pixel values than it was trained on), or one that
    refuses the views' size is a ConfigError naming ``model.teacher`` and the fix."""
    ref = cfg.model.teacher
    try:
        source = locate_backbone(ref, resolve_tracking_uri(cfg.mlflow.tracking_uri))
    except (FileNotFoundError, TrackingError) as err:
        raise ConfigError(f"model.teacher: {err}") from None
    preprocessing = source.config.get("pretrained_cfg", {})
    for key in ("mean", "std"):
        exported, ours = preprocessing.get(key), getattr(cfg.data, key)
        if exported is not None and [round(v, 6) for v in exported] != [round(v, 6) for v in ours]:
            raise ConfigError(f"model.teacher={ref} was exported for inputs normalised with {key} {exported}, the "
                              f"views use data.{key}={ours}: set data.{key}={exported}")
    with torch.random.fork_rng(devices=[]):  # the student's initial weights depend on train.seed only
        module = load_timm_backbone(source.folder)
    for h, w in sorted({size for size in view_sizes(cfg.data.views) if size}):  # those that set one
        try:
            with torch.no_grad():
                module(torch.zeros(1, 3, h, w))
        except (RuntimeError, AssertionError, ValueError) as err:
            raise ConfigError(f"model.teacher={ref} ({source.config.get('architecture')}, exported for input_size "
                              f"{preprocessing.get('input_size')}) does not take the {h}x{w} views of data.views; "
                              f"crop the views to a size it takes ({err})") from None
    return Teacher(module, source)

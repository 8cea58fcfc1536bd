"""Downstream evaluations in MLflow: lineage, the evaluation gate, promotion and model cards.

Every evaluation (`foundry eval knn|linear`) logs to a *new* run, tagged with where its backbone
came from (``lineage.*``: the reference, registered model and version, pretraining run, content
digest), so the MLflow UI links an accuracy to the exact weights and the run that made them. An
evaluation of a registered version also tags that version with the metric (``eval.<metric>``).

Registry workflow (aliases are MLflow's, one version each):

- pretraining registers a new version (``pipeline.registry.tracking.RunTracker.log_backbone``), which
  gets its model card;
- an evaluation whose ``eval.gate.metric`` reaches ``eval.gate.threshold`` moves ``@candidate``
  to the evaluated version and tags it ``gate.passed``;
- ``foundry registry promote NAME VERSION`` moves ``@production`` to a version that passed a gate.

The model card is markdown, stored both as the version's description (the registry UI renders it)
and as the artifact ``model_cards/<name>-v<version>.md`` of the pretraining run. It is rebuilt from
what MLflow holds, whenever a version is registered, evaluated or promoted.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import mlflow.artifacts
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from ssl_foundry.data_prep.shard_format import ManifestError, manifest_sha256
from ssl_foundry.pipeline.config import GATE_METRICS, GateConfig
from ssl_foundry.pipeline.registry.export import BackboneSource, registry_listing, export_digest

CANDIDATE_ALIAS, PRODUCTION_ALIAS = "candidate", "production"
# Recipe keys quoted in a model card, from the pretraining run's params (the flattened config).
_CARD_RECIPE_KEYS = ("model.method", "model.backbone", "model.backbone_args", "model.method_args", "model.teacher",
                     "data.train", "data.views", "train.batch_size", "train.optimizer", "train.lr",
                     "train.weight_decay", "train.warmup_steps", "train.budget_minutes", "train.precision",
                     "train.seed")
_CARD_HARDWARE_TAGS = ("env.cuda_devices", "env.cpu_count", "env.world_size", "env.hostname", "env.torch",
                       "env.timm", "env.git_commit")


class RegistryError(ValueError):
    """A registry operation the user asked for cannot be done; the message says why and what exists."""


def lineage_tags(source: BackboneSource, kind: str) -> dict[str, str]:
    """Tags of an evaluation run: which evaluation, on which weights, from which pretraining."""
    tags = {"eval.kind": kind, "lineage.backbone_ref": source.ref,
            "lineage.backbone_sha256": export_digest(source.folder)}
    for key, value in (("lineage.model_name", source.model_name), ("lineage.model_version", source.model_version),
                       ("lineage.pretrain_run_id", source.pretrain_run_id)):
        if value:
            tags[key] = value
    return tags


def record_version_metrics(client: MlflowClient, source: BackboneSource, metrics: dict[str, float],
                           eval_run_id: str) -> None:
    """Tag the evaluated registry version with its accuracies (the metrics a gate may test) and the
    run that measured each."""
    if not source.model_version:
        return
    for key, value in metrics.items():
        if key not in GATE_METRICS:
            continue
        client.set_model_version_tag(source.model_name, source.model_version, f"eval.{key}", f"{value:.6g}")
        client.set_model_version_tag(source.model_name, source.model_version, f"eval.{key}.run_id", eval_run_id)


def apply_gate(client: MlflowClient, source: BackboneSource, metrics: dict[str, float],
               gate: GateConfig) -> str:
    """Move ``@candidate`` to the evaluated version if ``gate.metric`` reaches ``gate.threshold``.

    Returns what happened, in words, for the command's output. The gate applies only to a
    registered version evaluated on the metric it names."""
    if not gate.metric or gate.metric not in metrics:
        return "no gate for this evaluation"
    if not source.model_version:
        return f"gate skipped: '{source.ref}' is not a registered model version"
    value, name, version = metrics[gate.metric], source.model_name, source.model_version
    verdict = f"{gate.metric}={value:.4f} {'>=' if value >= gate.threshold else '<'} {gate.threshold}"
    client.set_model_version_tag(name, version, "gate.last", verdict)
    if value < gate.threshold:
        return f"gate not passed ({verdict}): @{CANDIDATE_ALIAS} unchanged"
    client.set_model_version_tag(name, version, "gate.passed", verdict)
    client.set_registered_model_alias(name, CANDIDATE_ALIAS, version)
    return f"gate passed ({verdict}): models:/{name}@{CANDIDATE_ALIAS} -> version {version}"


def _registered_version(client: MlflowClient, name: str, version: str, action: str):
    try:
        return client.get_model_version(name, version)
    except MlflowException:
        raise RegistryError(f"cannot {action} {name} version {version}: {registry_listing(client, name)}") from None


def promote(client: MlflowClient, name: str, version: str, force: bool = False) -> None:
    """Move ``@production`` to ``version``, which must have passed an evaluation gate (or ``force``)."""
    model_version = _registered_version(client, name, version, "promote")
    if "gate.passed" not in model_version.tags and not force:
        raise RegistryError(
            f"{name} version {version} has not passed an evaluation gate (no gate.passed tag; last: "
            f"{model_version.tags.get('gate.last', 'never gated')}). Evaluate it with eval.gate.metric and "
            f"eval.gate.threshold set, or promote anyway with --force.")
    client.set_registered_model_alias(name, PRODUCTION_ALIAS, version)
    write_model_card(client, name, version)


def _manifest_sha256(shard_location: str) -> str | None:
    """The hash of the run's shard manifest; None where it cannot be read from here."""
    try:
        return manifest_sha256(shard_location) if shard_location else None
    except ManifestError:
        return None


def _export_config(client: MlflowClient, name: str, version: str) -> dict[str, Any]:
    source = client.get_model_version_download_uri(name, version)
    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(artifact_uri=f"{source.rstrip('/')}/config.json",
                                                   tracking_uri=client.tracking_uri, dst_path=tmp)
        return json.loads(Path(path).read_text())


def _evaluations(client: MlflowClient, name: str, version: str) -> list:
    """Finished evaluation runs of this version, newest first, in any experiment of the store."""
    return client.search_runs(
        [e.experiment_id for e in client.search_experiments()], order_by=["attributes.start_time DESC"],
        filter_string=f"tags.`lineage.model_name` = '{name}' and tags.`lineage.model_version` = '{version}' "
                      f"and attributes.status = 'FINISHED'")


def model_card(client: MlflowClient, name: str, version: str) -> str:
    """The markdown card of a registered version, from the registry, its pretraining run, the
    export's config.json and the evaluation runs tagged with its lineage."""
    model_version = _registered_version(client, name, version, "describe")
    run = client.get_run(model_version.run_id)
    params, tags = run.data.params, run.data.tags
    export = _export_config(client, name, version)
    provenance = export.get("ssl_foundry", {})
    aliases = sorted(alias for alias, v in client.get_registered_model(name).aliases.items() if str(v) == str(version))
    manifest = model_version.tags.get("data.manifest_sha256", "unknown (shards not on the registering machine)")
    lines = [f"# {name} v{version}", "",
             f"Self-supervised {provenance.get('method', params.get('model.method', '?'))} backbone "
             f"`{export['architecture']}` ({export.get('num_features', '?')} features), pretrained by ssl-foundry.", "",
             f"- aliases: {', '.join('@' + a for a in aliases) or 'none'}",
             f"- pretraining run: `{model_version.run_id}` (experiment {run.info.experiment_id}, {run.info.status})",
             f"- steps: {provenance.get('steps', '?')}",
             *([f"- distilled from: `{tags['lineage.teacher.ref']}` (sha256 `{tags.get('lineage.teacher.sha256')}`)"]
               if "lineage.teacher.ref" in tags else []),
             f"- data: `{params.get('data.train', '?')}`, manifest sha256 `{manifest}`",
             f"- input: {export['pretrained_cfg']['input_size']}, mean {export['pretrained_cfg']['mean']}, "
             f"std {export['pretrained_cfg']['std']}",
             "", "## Load it", "", "```python",
             "import mlflow, timm  # MLFLOW_TRACKING_URI: this registry",
             f'folder = mlflow.artifacts.download_artifacts(artifact_uri="models:/{name}/{version}")',
             'backbone = timm.create_model(f"local-dir:{folder}", pretrained=True)  # plain timm; features: num_classes=0',
             f'backbone = mlflow.pytorch.load_model("models:/{name}/{version}")  # the same timm module',
             f'embed = mlflow.pyfunc.load_model("models:/{name}/{version}").predict  # float32 NCHW batch -> embeddings',
             "```", "",
             f"Served: `mlflow models serve -m models:/{name}/{version} --env-manager local`; POST "
             '`{"inputs": <float32 NCHW batch>}` to `/invocations` answers `{"predictions": <embeddings>}`.',
             "", "## Recipe", ""]
    lines += [f"- `{key}`: `{params[key]}`" for key in _CARD_RECIPE_KEYS if params.get(key, "") != ""]
    lines += ["", "## Hardware", ""]
    lines += [f"- `{key}`: {tags[key]}" for key in _CARD_HARDWARE_TAGS if tags.get(key)]
    lines += ["", "## Metrics", "", "| metric | value | run |", "|---|---|---|"]
    lines += [f"| pretraining {key} | {value:.4f} | `{run.info.run_id}` |" for key, value in
              sorted(run.data.metrics.items()) if key in ("loss", "knn_top1")]
    for evaluation in _evaluations(client, name, version):
        kind = evaluation.data.tags.get("eval.kind", "eval")
        lines += [f"| {kind} {key} | {value:.4f} | `{evaluation.info.run_id}` |"
                  for key, value in sorted(evaluation.data.metrics.items()) if key.endswith("top1")]
    gate = model_version.tags.get("gate.passed")
    lines += ["", f"Evaluation gate: {'passed, ' + gate if gate else model_version.tags.get('gate.last', 'not run')}."]
    return "\n".join(lines) + "\n"


def write_model_card(client: MlflowClient, name: str, version: str, data_folder: str | None = None) -> str:
    """(Re)write a version's card: its description, and the pretraining run's artifact
    ``model_cards/<name>-v<version>.md``. ``data_folder`` (the pretraining shards, at registration)
    fixes the manifest hash recorded in the version's tag ``data.manifest_sha256``."""
    if data_folder and (digest := _manifest_sha256(data_folder)):
        client.set_model_version_tag(name, version, "data.manifest_sha256", digest)
    card = model_card(client, name, version)
    client.update_model_version(name, version, description=card)
    run_id = client.get_model_version(name, version).run_id
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}-v{version}.md"
        path.write_text(card)
        client.log_artifact(run_id, str(path), "model_cards")
    client.set_model_version_tag(name, version, "model_card", f"model_cards/{name}-v{version}.md")
    return card

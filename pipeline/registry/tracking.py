"""MLflow tracking for pretraining runs: params, metrics, environment, artifacts and the model registry.

Everything goes through an ``MlflowClient`` with explicit run ids, never MLflow's global "active
run", so several trackers (or an eval run beside a training run) in one process do not interfere.

Which store (``resolve_tracking_uri``, the one rule of every command: pretrain, eval, registry, submit):
the config key ``mlflow.tracking_uri`` when set, else ``$MLFLOW_TRACKING_URI``, else the local sqlite
store ``runs/mlflow.db`` of the working directory, with artifacts in ``runs/mlartifacts`` beside it:
no server needed, and every run of every recipe started there shows in one ``mlflow ui``.

- ``http(s)://host:port``: an ``mlflow server``. It is checked up front (``check_reachable``) so a
  dead server fails in seconds with the command that starts one, instead of after MLflow's
  default ~4 minutes of retries; MLflow's own HTTP retries are also shortened (see
  ``_HTTP_RETRY_DEFAULTS``).
- anything else MLflow accepts (``sqlite:///...``, ``postgresql://...``) is used as is, a relative
  sqlite path made absolute (a Slurm job may start in another directory).

The registry URI is always the tracking URI. With ``mlflow.tensorboard`` the metrics also go to
TensorBoard event files.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow
import timm
import torch
from mlflow import MlflowClient
from mlflow.entities import LoggedModelOutput, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH

from ssl_foundry.pipeline.registry.downstream import write_model_card
from ssl_foundry.pipeline.registry.export import save_mlflow_model
from ssl_foundry.pipeline.registry.tracking_server import TrackingError, check_reachable, sqlite_file

logger = logging.getLogger(__name__)

# MLflow's defaults (7 retries, backoff factor 2, 120 s timeout) keep retrying a dead server for
# minutes. These give up after ~10 s of retries; an explicit value in the environment still wins.
_HTTP_RETRY_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
_RUN_END_STATUSES = ("FINISHED", "FAILED", "KILLED")
_REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_STORE = Path("runs") / "mlflow.db"  # relative to the working directory


def resolve_tracking_uri(configured: str = "") -> str:
    """The MLflow store to use: ``configured`` (the config's ``mlflow.tracking_uri``) when set, else
    ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/runs/mlflow.db``; sqlite paths made absolute."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_STORE}"
    db = sqlite_file(uri)
    return f"sqlite:///{db}" if db else uri


def default_artifact_location(uri: str) -> str | None:
    """Artifact root for new experiments: ``mlartifacts`` beside the db for a local sqlite store
    (MLflow's own default, ``./mlruns``, would fill whatever the current directory is with
    checkpoints), else the store's own default (``None``), which for a server is its
    ``--default-artifact-root`` or proxy."""
    db = sqlite_file(uri)
    return str(db.parent / "mlartifacts") if db else None


def _param_value(value: Any) -> str:
    """MLflow params are strings of at most MAX_PARAM_VAL_LENGTH characters; lists/dicts as JSON."""
    text = json.dumps(value, default=str) if isinstance(value, (list, tuple, dict)) else str(value)
    return text[:MAX_PARAM_VAL_LENGTH]


def _git_tags() -> dict[str, str]:
    """Commit and dirtiness of the ssl-foundry checkout; empty when it is not a git checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(_REPO_ROOT), *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"env.git_commit": commit, "env.git_dirty": str(dirty)}


class RunTracker:
    """One MLflow run: created new, or resumed by ``run_id`` so it keeps receiving metrics.

    A new run goes into ``experiment``, which is created (with ``artifact_location``) if missing.
    A resumed run stays where it is (``experiment``, ``run_name`` and ``artifact_location`` are
    not used) and is set back to RUNNING. With ``tensorboard_dir``, ``log_metrics`` also writes
    TensorBoard event files there.

    Params on a resumed run: a key already logged with the same value is skipped; a key whose
    value changed (e.g. a longer schedule on resume) keeps its original param (MLflow params are
    immutable) and the new value is recorded as the tag ``param_changed.<key>``, with a warning.
    """

    def __init__(self, tracking_uri: str, experiment: str, run_name: str = "", run_id: str | None = None,
                 artifact_location: str | None = None, tensorboard_dir: str | None = None):
        check_reachable(tracking_uri)
        for name, value in _HTTP_RETRY_DEFAULTS.items():
            os.environ.setdefault(name, value)
        if db := sqlite_file(tracking_uri):
            db.parent.mkdir(parents=True, exist_ok=True)
        self.tracking_uri = tracking_uri
        self._client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        if run_id:
            run = self._resume_run(run_id)
        else:
            experiment_id = self._experiment_id(experiment, artifact_location)
            run = self._client.create_run(experiment_id, run_name=run_name or None)
        self._run_id = run.info.run_id
        self._params: dict[str, str] = dict(run.data.params)
        self._tensorboard = None
        if tensorboard_dir:  # the metrics also as event files (a resumed run adds a file to the folder)
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package: only if asked

            self._tensorboard = SummaryWriter(tensorboard_dir)

    @property
    def run_id(self) -> str:
        return self._run_id

    def _experiment_id(self, name: str, artifact_location: str | None) -> str:
        experiment = self._client.get_experiment_by_name(name)
        if experiment is None:
            try:
                return self._client.create_experiment(name, artifact_location=artifact_location)
            except MlflowException as err:  # created concurrently by another process
                if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                    raise
                experiment = self._client.get_experiment_by_name(name)
        if experiment.lifecycle_stage == "deleted":
            raise TrackingError(
                f"MLflow experiment '{name}' in {self.tracking_uri} is deleted. Restore it with "
                f"`mlflow experiments restore --experiment-id {experiment.experiment_id}` (with "
                f"MLFLOW_TRACKING_URI={self.tracking_uri}) or set mlflow.experiment to another name.")
        return experiment.experiment_id

    def _resume_run(self, run_id: str):
        try:
            run = self._client.get_run(run_id)
        except MlflowException as err:
            raise TrackingError(
                f"cannot resume MLflow run {run_id}: not found in {self.tracking_uri} ({err.message}). "
                f"Use the tracking URI the run was created in, or start a new run.") from err
        if run.info.status != "RUNNING":
            self._client.update_run(run_id, status="RUNNING")
        return run

    def log_params(self, params: dict[str, Any]) -> None:
        """Log a flat ``{"a.b.c": value}`` dict; MLflow sends at most 100 params per request."""
        new, changed = [], {}
        for key, value in params.items():
            text = _param_value(value)
            logged = self._params.get(key)
            if logged is None:
                new.append(Param(key, text))
                self._params[key] = text
            elif logged != text:
                changed[f"param_changed.{key}"] = text
        if changed:
            logger.warning("run %s: params changed since first logged (kept the originals, new values "
                           "as tags): %s", self._run_id, ", ".join(changed))
        self._client.log_batch(self._run_id, params=new, tags=self._tag_list(changed), synchronous=True)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        timestamp_ms = int(time.time() * 1000)
        batch = [Metric(key, float(value), timestamp_ms, int(step)) for key, value in metrics.items()]
        self._client.log_batch(self._run_id, metrics=batch, synchronous=True)
        if self._tensorboard is not None:
            for key, value in metrics.items():
                self._tensorboard.add_scalar(key, float(value), int(step))

    @staticmethod
    def _tag_list(tags: dict[str, Any]) -> list[RunTag]:
        return [RunTag(key, str(value)[:MAX_TAG_VAL_LENGTH]) for key, value in tags.items()]

    def set_tags(self, tags: dict[str, str]) -> None:
        self._client.log_batch(self._run_id, tags=self._tag_list(tags), synchronous=True)

    def log_environment(self) -> None:
        """Tags ``env.*``: library versions, hardware, host, git commit and world size."""
        cuda = torch.cuda.is_available()
        tags = {
            "env.python": platform.python_version(),
            "env.torch": torch.__version__,
            "env.timm": timm.__version__,
            "env.mlflow": mlflow.__version__,
            "env.cuda_available": str(cuda),
            "env.cuda_devices": ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
            if cuda else "",
            "env.cpu_count": str(os.cpu_count()),
            "env.hostname": socket.gethostname(),
            "env.world_size": os.environ.get("WORLD_SIZE", "1"),
            **_git_tags(),
        }
        self.set_tags(tags)

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        """Upload a file to ``<artifact_path>/<name>``, or a directory's contents to
        ``<artifact_path>/`` (default: the directory's own name, like a file)."""
        path = Path(local_path)
        if path.is_dir():
            self._client.log_artifacts(self._run_id, str(path), artifact_path or path.name)
        elif path.is_file():
            self._client.log_artifact(self._run_id, str(path), artifact_path)
        else:
            raise FileNotFoundError(f"log_artifact: {local_path} does not exist")

    def _free_model_name(self, experiment_id: str, name: str) -> str:
        """``name``, or ``<name>-2``, ``-3``... if this run already logged a model of that name."""
        taken = {m.name for m in self._client.search_logged_models(
            [experiment_id], filter_string=f"source_run_id = '{self._run_id}'")}
        candidate, n = name, 1
        while candidate in taken:
            n += 1
            candidate = f"{name}-{n}"
        return candidate

    def log_backbone(self, local_dir: str, registered_model: str = "", step: int = 0) -> str | None:
        """Log an export folder as this run's MLflow model ``backbone`` and, with ``registered_model``,
        register it as a new version of that name; returns the version ("1", "2", ...) or None.

        The model is an MLflow 3 logged model (``export.save_mlflow_model``: the pytorch flavour and
        its pyfunc, signature, input example, pip requirements, and the export's config.json +
        model.safetensors at its root), so ``models:/<name>/<version>``, ``models:/<name>@<alias>``
        and ``runs:/<run_id>/backbone`` load with ``mlflow.pytorch``, ``mlflow.pyfunc``, ``mlflow
        models serve`` and plain timm alike. Versions are immutable: a second backbone of the same
        run (a finished run resumed to train on) is the model ``backbone-2`` etc., and
        ``runs:/<run_id>/backbone`` stays the first. A version gets its model card
        (``pipeline.registry.downstream``), with the manifest hash of the run's ``data.train`` shards.
        """
        folder = Path(local_dir)
        missing = [f for f in ("config.json", "model.safetensors") if not (folder / f).is_file()]
        if missing:
            raise FileNotFoundError(f"log_backbone: {local_dir} lacks {', '.join(missing)}; "
                                    f"write it with pipeline.registry.export.export_timm_backbone.")
        experiment_id = self._client.get_run(self._run_id).info.experiment_id
        model = self._client.create_logged_model(experiment_id, name=self._free_model_name(experiment_id, "backbone"),
                                                 source_run_id=self._run_id)
        try:
            with tempfile.TemporaryDirectory() as tmp:
                recorded = Model(artifact_path=model.artifact_location, model_uuid=model.model_id,
                                 run_id=self._run_id, model_id=model.model_id)  # as mlflow.<flavour>.log_model records it
                save_mlflow_model(folder, Path(tmp) / "model", recorded)
                self._client.log_model_artifacts(model.model_id, str(Path(tmp) / "model"))
        except BaseException:
            self._client.finalize_logged_model(model.model_id, "FAILED")
            raise
        self._client.finalize_logged_model(model.model_id, "READY")
        self._client.log_outputs(self._run_id, [LoggedModelOutput(model.model_id, step=step)])
        if not registered_model:
            return None
        try:
            self._client.create_registered_model(registered_model)
        except MlflowException as err:
            if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
        # The source is the model's artifact location, not models:/<model_id>: MLflow 3.17's sqlite
        # registry looks the latter up in the *global* tracking URI, not this client's.
        version = self._client.create_model_version(registered_model, source=model.artifact_location,
                                                    run_id=self._run_id, model_id=model.model_id)
        write_model_card(self._client, registered_model, str(version.version), data_folder=self._params.get("data.train"))
        return str(version.version)

    def end(self, status: str = "FINISHED") -> None:
        """Mark the run FINISHED, FAILED or KILLED (may be called again to correct the status)."""
        if status not in _RUN_END_STATUSES:
            raise ValueError(f"RunTracker.end: status must be one of {_RUN_END_STATUSES}, got {status!r}")
        if self._tensorboard is not None:
            self._tensorboard.flush()
        self._client.set_terminated(self._run_id, status=status)

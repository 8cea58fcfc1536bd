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

Tracking never costs training. Params, tags and metrics go into a queue that a background thread
sends in order (``RunLogQueue``), so a step never waits for the server. A call that fails because
the server is unreachable is one warning line; what it carried stays queued, is mirrored to a spool
file (``<output_dir>/mlflow-unsent.jsonl``) and is sent when the server answers again, or by the
next run of the same output_dir (which replays the spool first). MLflow's own asynchronous logging
(``log_batch(synchronous=False)``) is not used: it drops a batch whose request failed (and runs
batches in a thread pool, unordered). Uploads and the registry are synchronous and wait (up to
``outage_s``) for the queue to drain first.

A metric is logged once per step: a resumed run skips the (key, step) points its run already has,
i.e. the steps trained after the last checkpoint by the attempt that died keep that attempt's values.
After an exact resume those are the very values the resumed run computes again.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import socket
import subprocess
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
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


class TrackingUnavailable(TrackingError):
    """The store stopped answering and did not come back in time; what was logged is kept."""

    exit_status = 1


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


@dataclass
class RunData:
    """One ``log_batch`` call's worth of a run's params, tags and metrics."""

    run_id: str
    metrics: list[Metric] = field(default_factory=list)
    params: list[Param] = field(default_factory=list)
    tags: list[RunTag] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps({"run_id": self.run_id,
                           "metrics": [[m.key, m.value, m.timestamp, m.step] for m in self.metrics],
                           "params": [[p.key, p.value] for p in self.params],
                           "tags": [[t.key, t.value] for t in self.tags]})

    @classmethod
    def from_json(cls, line: str) -> RunData:
        d = json.loads(line)
        return cls(d["run_id"], [Metric(*m) for m in d["metrics"]], [Param(*p) for p in d["params"]],
                   [RunTag(*t) for t in d["tags"]])


def _short_reason(err: Exception) -> str:
    """The gist of a failed MLflow call in a few words (its messages nest whole urllib3 reprs)."""
    text = str(err)
    found = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text) or re.search(r"(Read timed out|Connection aborted|"
                                                                     r"Max retries exceeded|\d{3} Server Error)", text)
    if found:
        return found.group(1).strip()
    return text.splitlines()[0][:120] if text else type(err).__name__


def logged_steps(client: MlflowClient, run_id: str) -> dict[str, int]:
    """The last step the run has of each of its metric keys."""
    run = client.get_run(run_id)
    return {key: max(m.step for m in client.get_metric_history(run_id, key)) for key in run.data.metrics}


def _retryable(err: Exception) -> bool:
    """A failure the server's return can cure: connection errors, timeouts, 5xx. A 4xx (a refused
    value) would fail again."""
    return not isinstance(err, MlflowException) or err.get_http_status_code() >= 500


class RunLogQueue:
    """Params, tags and metrics sent in order by a background thread; kept while the tracking store
    does not answer (a warning per failed call, retried with backoff up to 30 s) and mirrored to
    ``spool`` so that a run killed meanwhile loses nothing: the next queue on that spool sends them."""

    MAX_BACKOFF_S = 30.0

    def __init__(self, client: MlflowClient, uri: str, spool: Path | None = None):
        self._client, self._uri, self.spool = client, uri, spool
        # What the spool held, queued first (the sender may have sent it by the time anyone asks).
        self.replayed: list[RunData] = self._unsent(spool) if spool is not None and spool.is_file() else []
        self._items = deque(self.replayed)
        self._failures = 0  # consecutive failed calls
        self._stop = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._send_forever, name="mlflow-sender", daemon=True)
        self._thread.start()

    def _unsent(self, spool: Path) -> list[RunData]:
        """The spool's items, less the points their runs already have (sent just before a kill)."""
        items = [RunData.from_json(line) for line in spool.read_text().splitlines() if line.strip()]
        for run_id in {item.run_id for item in items}:
            try:
                last = logged_steps(self._client, run_id)
            except MlflowException:  # not in this store: sending says so, once
                continue
            for item in items:
                if item.run_id == run_id:
                    item.metrics = [m for m in item.metrics if m.step > last.get(m.key, -1)]
        return [item for item in items if item.metrics or item.params or item.tags]

    def put(self, item: RunData) -> None:
        with self._cond:
            self._items.append(item)
            if self._failures:
                self._write_spool()
            self._cond.notify_all()

    def persist(self) -> None:
        """Mirror what is not sent yet to the spool (the trainer calls it before each checkpoint)."""
        with self._cond:
            if self._items:
                self._write_spool()

    def flush(self, timeout_s: float) -> bool:
        """Wait until everything is sent (True) or ``timeout_s`` has passed (False)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._items and not self._stop and time.monotonic() < deadline:
                self._cond.wait(timeout=deadline - time.monotonic())
            return not self._items

    def close(self, timeout_s: float) -> bool:
        """``flush``, then stop the thread; what is left stays in the spool. True if all was sent."""
        sent = self.flush(timeout_s)
        with self._cond:
            self._stop = True
            if self._items:
                self._write_spool()
            self._cond.notify_all()
        self._thread.join(timeout=60)
        return sent

    def pending(self) -> int:
        """Params, tags and metric values not sent yet."""
        with self._cond:
            return sum(len(item.metrics) + len(item.params) + len(item.tags) for item in self._items)

    @property
    def failing(self) -> bool:
        """Whether the last call failed (the store did not answer)."""
        return self._failures > 0

    def _write_spool(self) -> None:
        if self.spool is None:
            return
        try:
            tmp = self.spool.with_name(self.spool.name + ".tmp")
            tmp.write_text("".join(item.to_json() + "\n" for item in self._items))
            os.replace(tmp, self.spool)
        except OSError as err:
            logger.warning("MLflow: cannot keep the %d unsent items in %s (%s)", len(self._items), self.spool,
                           err.strerror)

    def _next_call(self) -> list[RunData]:
        """The front item; consecutive metric-only items of its run join it, up to the 1000 values MLflow
        sends in one request (so that a call fails or succeeds whole, and a retry duplicates nothing)."""
        first = self._items[0]
        call, count = [first], len(first.metrics)
        if first.params or first.tags:
            return call
        for item in list(self._items)[1:]:
            if item.run_id != first.run_id or item.params or item.tags or count + len(item.metrics) > 1000:
                break
            call.append(item)
            count += len(item.metrics)
        return call

    def _send_forever(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                call = self._next_call()
            try:
                self._client.log_batch(call[0].run_id, metrics=[m for item in call for m in item.metrics],
                                       params=[p for item in call for p in item.params],
                                       tags=[t for item in call for t in item.tags], synchronous=True)
                error = None
            except Exception as err:  # a dead server, a refused value: never the training's problem
                error = err
            with self._cond:
                if error is None or not _retryable(error):
                    for _ in call:
                        self._items.popleft()
                    if error is not None:
                        logger.warning("MLflow: %s refused %d logged value(s) of run %s, dropped: %s", self._uri,
                                       sum(len(i.metrics) + len(i.params) + len(i.tags) for i in call),
                                       call[0].run_id, _short_reason(error))
                    elif self._failures:
                        logger.warning("MLflow: %s answers again, sending what was kept", self._uri)
                        self._failures = 0
                    if self.spool is not None and self.spool.exists() and not self._items:
                        self.spool.unlink(missing_ok=True)
                    elif self.spool is not None and self.spool.exists():
                        self._write_spool()
                else:
                    self._failures += 1
                    delay = min(self.MAX_BACKOFF_S, 2.0 ** self._failures)
                    self._write_spool()
                    logger.warning("MLflow: %s unreachable (%s): %d logged values kept%s, retrying in %.0f s",
                                   self._uri, _short_reason(error), self.pending(),
                                   f" in {self.spool}" if self.spool else "", delay)
                self._cond.notify_all()
                if error is not None and _retryable(error):  # back off; new items do not cut it short
                    resume_at = time.monotonic() + delay
                    while not self._stop and time.monotonic() < resume_at:
                        self._cond.wait(timeout=resume_at - time.monotonic())


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
    Metrics on a resumed run: a (key, step) the run already has is skipped (see the module doc).

    Params, tags and metrics are queued (``RunLogQueue``, spooled to ``spool``); uploads, the
    registry and ``end`` first wait up to ``outage_s`` for the queue to drain.
    """

    def __init__(self, tracking_uri: str, experiment: str, run_name: str = "", run_id: str | None = None,
                 artifact_location: str | None = None, spool: Path | None = None, outage_s: float = 60.0,
                 tensorboard_dir: str | None = None):
        check_reachable(tracking_uri)
        for name, value in _HTTP_RETRY_DEFAULTS.items():
            os.environ.setdefault(name, value)
        if db := sqlite_file(tracking_uri):
            db.parent.mkdir(parents=True, exist_ok=True)
        self.tracking_uri = tracking_uri
        self.outage_s = outage_s
        self._client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        if run_id:
            run = self._resume_run(run_id)
        else:
            experiment_id = self._experiment_id(experiment, artifact_location)
            run = self._client.create_run(experiment_id, run_name=run_name or None)
        self._run_id = run.info.run_id
        self._params: dict[str, str] = dict(run.data.params)
        self._queue = RunLogQueue(self._client, tracking_uri, spool)
        # The last step of every metric key: the run's own history, then what the spool still sends.
        self._last_step = logged_steps(self._client, self._run_id) if run_id else {}
        for item in self._queue.replayed:
            if item.run_id == self._run_id:
                self._params.update({p.key: p.value for p in item.params})
                for m in item.metrics:
                    self._last_step[m.key] = max(m.step, self._last_step.get(m.key, m.step))
        self._tags: dict[str, str] = dict(run.data.tags)
        self._tensorboard = None
        if tensorboard_dir:  # the metrics also as event files (a resumed run adds a file to the folder)
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package: only if asked

            self._tensorboard = SummaryWriter(tensorboard_dir)

    @property
    def run_id(self) -> str:
        return self._run_id

    @property
    def tags(self) -> dict[str, str]:
        """The run's tags: those it had when opened, and those set since."""
        return dict(self._tags)

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
        if new or changed:
            self._queue.put(RunData(self._run_id, params=new, tags=self._tag_list(changed)))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue ``metrics`` at ``step``, leaving out the keys the run already has at ``step`` or later."""
        timestamp_ms = int(time.time() * 1000)
        batch = [Metric(key, float(value), timestamp_ms, int(step)) for key, value in metrics.items()
                 if step > self._last_step.get(key, -1)]
        self._last_step.update({m.key: m.step for m in batch})
        if batch:
            self._queue.put(RunData(self._run_id, metrics=batch))
        if self._tensorboard is not None:
            for m in batch:
                self._tensorboard.add_scalar(m.key, m.value, m.step)

    def persist(self) -> None:
        """Mirror what is not sent yet to the spool file (before a checkpoint: those steps are not retrained)."""
        self._queue.persist()

    def _drain(self) -> None:
        """Before a synchronous call: everything queued is sent, or TrackingError after ``outage_s``."""
        if self._queue.failing:
            logger.warning("MLflow: waiting up to %g min (mlflow.outage_minutes) for %s to take the %d kept values",
                           self.outage_s / 60, self.tracking_uri, self._queue.pending())
        if not self._queue.flush(self.outage_s):
            raise TrackingUnavailable(
                f"MLflow tracking server {self.tracking_uri} has not answered for {self.outage_s / 60:g} min "
                f"(mlflow.outage_minutes): {self._queue.pending()} logged values of run {self._run_id} are kept"
                f"{' in ' + str(self._queue.spool) if self._queue.spool else ''}; the run stays RUNNING. "
                f"Rerun the same command once the server answers: it sends them and finishes the run.")

    @staticmethod
    def _tag_list(tags: dict[str, Any]) -> list[RunTag]:
        return [RunTag(key, str(value)[:MAX_TAG_VAL_LENGTH]) for key, value in tags.items()]

    def set_tags(self, tags: dict[str, str]) -> None:
        self._queue.put(RunData(self._run_id, tags=self._tag_list(tags)))
        self._tags.update({key: str(value) for key, value in tags.items()})

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
        self._drain()
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
        self._drain()
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

    def end(self, status: str = "FINISHED", wait_s: float | None = None) -> None:
        """Send what is queued (waiting up to ``wait_s``, default ``outage_s``), then mark the run
        FINISHED, FAILED or KILLED. An unreachable server: TrackingError, what was queued kept in the
        spool, the run left RUNNING (a rerun finishes it)."""
        if status not in _RUN_END_STATUSES:
            raise ValueError(f"RunTracker.end: status must be one of {_RUN_END_STATUSES}, got {status!r}")
        if wait_s is not None:
            self.outage_s = wait_s
        if self._tensorboard is not None:
            self._tensorboard.flush()
        try:
            self._drain()
            self._client.set_terminated(self._run_id, status=status)
        except MlflowException as err:
            raise TrackingUnavailable(f"MLflow tracking server {self.tracking_uri}: run {self._run_id} not marked "
                                f"{status} ({_short_reason(err)}); it stays RUNNING") from None
        finally:
            self._queue.close(timeout_s=0)

"""What a run does with its ``output_dir``: start a new run, or continue the one there, which it may
only do with the config that run started with (``<output_dir>/config.yaml``, written at every
start), so two experiments never mix in one folder, one checkpoint and one MLflow run."""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from ssl_foundry.data_prep.shard_format import is_remote
from ssl_foundry.pipeline.config import Config, ConfigError, config_from_dict, flatten, public_dict, to_dict
from ssl_foundry.pipeline.train.checkpoint import checkpoint_step, latest_checkpoint

# Keys a resume may change: how long to train (a longer schedule is allowed), how often to log and
# checkpoint, how to check and wait for the data, the evaluations, how the run is tracked (the store
# is named by the key, MLFLOW_TRACKING_URI or the default, `foundry submit` writes it out; a store
# without the checkpoint's MLflow run says so), and where / on what the ranks run (a different world
# size is refused by the checkpoint itself). Any other change is a new run.
RESUMABLE_CHANGES = ("output_dir", "train.max_steps", "train.budget_minutes", "train.resume", "train.log_every",
                     "train.checkpoint_every", "train.keep_checkpoints", "train.threads", "data.prefetch_batches",
                     "data.timeout_s", "data.verify", "data.max_sample_bytes", "data.eval_train", "data.eval_test",
                     "data.eval_image_size", "eval.", "mlflow.registered_model", "mlflow.run_name",
                     "mlflow.tracking_uri", "mlflow.outage_minutes", "mlflow.tensorboard", "launch.")


# train.resume=never in an output_dir that holds a run: that run's files move here, under the time
# the new run started, so its checkpoints are neither resumed nor pruned as the new run's.
REPLACED_DIR = "replaced"
PREVIOUS_RUN_FILES = ("checkpoints", "backbone", "result.json", "config.yaml", "deepspeed_config.json")


@dataclass
class RunPlan:
    checkpoint: Path | None  # what the run continues from; None: a new run from step 0
    replaces: Path | None = None  # the checkpoint of the run that train.resume=never sets aside

    def describe(self) -> str:
        if self.replaces is not None:
            return (f"a new run from step 0; the run there (at step {checkpoint_step(self.replaces)}) moves to "
                    f"{REPLACED_DIR}/")
        if self.checkpoint is None:
            return "a new run from step 0"
        return f"continues the run there from step {checkpoint_step(self.checkpoint)} ({self.checkpoint})"


def set_aside_previous_run(output_dir: str | Path) -> Path:
    """Move the files of the run in ``output_dir`` to ``replaced/<UTC start time>-<unique>/`` (kept, not deleted)."""
    out = Path(output_dir)
    (out / REPLACED_DIR).mkdir(exist_ok=True)
    aside = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%dT%H%M%SZ-", time.gmtime()), dir=out / REPLACED_DIR))
    for name in PREVIOUS_RUN_FILES:
        if (out / name).exists():
            os.replace(out / name, aside / name)
    return aside


def _resumable(key: str) -> bool:
    return any(key == free or free.endswith(".") and key.startswith(free) for free in RESUMABLE_CHANGES)


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else "..."


def changed_keys(started: dict, cfg: Config) -> list[str]:
    """``key: old -> new`` for each key that differs from the config a run ``started`` with and
    is not one a resume may change."""
    try:
        started = to_dict(config_from_dict(started))  # new keys of this version at their defaults
    except ConfigError:
        pass  # a key this version dropped: compare the trees as they are
    old, new = flatten(started), flatten(public_dict(cfg))  # as config.yaml keeps it: credentials cut out
    for tree in (old, new):  # `foundry submit` makes a local data path absolute; the same shards either way
        train = tree.get("data.train") or ""
        tree["data.train"] = train if not train or is_remote(train) else os.path.abspath(train)
    return [f"{key}: {_shown(old.get(key))} -> {_shown(new.get(key))}"
            for key in sorted(old.keys() | new.keys()) if old.get(key) != new.get(key) and not _resumable(key)]


def plan_run(cfg: Config) -> RunPlan:
    """Where this run starts. With ``train.resume=auto`` and a checkpoint in ``output_dir`` it
    continues that run, which must have started with the same config (up to RESUMABLE_CHANGES);
    else a ConfigError names the differing keys and the two ways forward."""
    out = Path(cfg.output_dir)
    checkpoint = latest_checkpoint(out / "checkpoints")
    if cfg.train.resume == "never":
        return RunPlan(None, replaces=checkpoint)
    if cfg.train.resume != "auto":
        return RunPlan(Path(cfg.train.resume))  # an explicit checkpoint: the user chose what to continue
    started = out / "config.yaml"
    if checkpoint is None or not started.is_file():
        return RunPlan(checkpoint)
    changed = changed_keys(yaml.safe_load(started.read_text()) or {}, cfg)
    if changed:
        shown = "; ".join(changed[:6]) + (f"; and {len(changed) - 6} more" if len(changed) > 6 else "")
        raise ConfigError(f"output_dir {out} holds a run started with another config ({shown}; see {started}): "
                          f"continuing it would mix two runs. Start a new run with train.resume=never (the run "
                          f"there moves to {out / REPLACED_DIR}/) or with a new output_dir=...; or rerun with that "
                          f"config to continue it")
    return RunPlan(checkpoint)

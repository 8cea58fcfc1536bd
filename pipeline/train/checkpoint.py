"""Checkpoints, written so that a crash at any moment leaves the previous one intact and never a
half-written checkpoint under a final name.

Two layouts share one folder naming (``step-XXXXXXXX``), so ``train.resume=auto`` and pruning
treat them alike:

- a file ``step-XXXXXXXX.pt`` (``train.strategy=ddp``): written to a temp name, fsynced, renamed;
- a directory ``step-XXXXXXXX/`` (``train.strategy=deepspeed``: one shard per rank): every rank
  writes into a temp directory, rank 0 renames it once all are done (``commit_checkpoint_dir``).
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

_NAME = re.compile(r"^step-(\d{8})(\.pt)?$")


def checkpoint_path(folder: str | Path, step: int) -> Path:
    """The single-file checkpoint of ``step`` (DDP)."""
    return Path(folder) / f"step-{step:08d}.pt"


def checkpoint_dir(folder: str | Path, step: int) -> Path:
    """The sharded checkpoint directory of ``step`` (DeepSpeed)."""
    return Path(folder) / f"step-{step:08d}"


def checkpoint_step(path: str | Path) -> int:
    match = _NAME.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not a checkpoint name (step-XXXXXXXX.pt or step-XXXXXXXX/)")
    return int(match.group(1))


def _fsync_dir(path: Path) -> None:
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make a rename in this directory durable
    finally:
        os.close(dir_fd)


def save_checkpoint(state: dict[str, Any], folder: str | Path, step: int, keep: int = 2) -> Path:
    """Atomically write ``state`` as ``folder/step-XXXXXXXX.pt``; keep the newest ``keep``."""
    path = checkpoint_path(folder, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    prune_checkpoints(folder, keep)
    return path


def commit_checkpoint_dir(tmp: Path, final: Path, keep: int) -> Path:
    """Publish the fully written checkpoint directory ``tmp`` as ``final`` (one rename; a previous
    ``final`` of the same step is replaced), then keep the newest ``keep``."""
    for root, _, files in os.walk(tmp):
        for name in files:
            with open(Path(root) / name, "rb") as f:
                os.fsync(f.fileno())
    if final.exists():  # the same step saved again (e.g. a stop request right after a save)
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)
    prune_checkpoints(final.parent, keep)
    return final


def prune_checkpoints(folder: str | Path, keep: int) -> None:
    for old in list_checkpoints(folder)[:-keep] if keep > 0 else []:
        if old.is_dir():
            shutil.rmtree(old)
        else:
            old.unlink(missing_ok=True)


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Complete checkpoints in ``folder`` (files and directories), oldest first; temp files and
    directories (dot names) are ignored."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir()
             if (m := _NAME.match(p.name)) and (p.is_file() if m.group(2) else p.is_dir())]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(folder: str | Path) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1] if found else None


def world_size_mismatch(path: str | Path, saved: int, current: int) -> RuntimeError:
    return RuntimeError(
        f"checkpoint {path} was written by {saved} ranks, this run has {current}: the loader position "
        f"(and under DeepSpeed the optimizer shards) are per rank. Resume with the same "
        f"launch.nproc_per_node x nnodes, or start fresh with train.resume=never")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A single-file (DDP) checkpoint."""
    if Path(path).is_dir():
        raise RuntimeError(f"checkpoint {path} is a DeepSpeed checkpoint directory: resume it with "
                           f"train.strategy=deepspeed (and the same deepspeed.zero_stage and world size)")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated or foreign file: say which and what to do
        raise RuntimeError(
            f"checkpoint {path} cannot be read ({err}); delete it to resume from the previous one, "
            f"or set train.resume=never"
        ) from err

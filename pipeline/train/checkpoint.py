"""Checkpoints, written so that a crash at any moment leaves the previous one intact and never a
half-written checkpoint under a final name.

Two layouts share one folder naming (``step-XXXXXXXX``), so ``train.resume=auto`` and pruning
treat them alike:

- a file ``step-XXXXXXXX.pt`` (``train.strategy=ddp``): written to a temp name, fsynced, renamed;
- a directory ``step-XXXXXXXX/`` (``train.strategy=deepspeed``: one shard per rank): every rank
  writes into a temp directory, rank 0 renames it once all are done (``commit_checkpoint_dir``).

A write that fails (a full disk) removes its temp file and raises ``CheckpointWriteError`` naming
the path and the free space; temp files of a writer that was killed are removed when the next run
of the folder starts (``remove_stale_temps``). Checkpoints hold tensors and plain values only, and
are loaded with ``torch.load(weights_only=True)``: a file holding anything else is refused, since
unpickling it could run code.
"""
from __future__ import annotations

import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch

_NAME = re.compile(r"^step-(\d{8})(\.pt)?$")
# Temp names of a checkpoint being written: .step-X.pt.tmp-PID (file), .step-X.tmp/ and .step-X.old/ (directories).
_TEMP_NAME = re.compile(r"^\.step-\d{8}(\.pt\.tmp-\d+|\.tmp|\.old)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message names it and what to do."""

    exit_status = 2  # found before training starts


class CheckpointWriteError(CheckpointError):
    """A checkpoint that could not be written (a full disk); its temp file is removed."""

    exit_status = 1


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def write_error(path: Path, err: BaseException, needed: int | None = None) -> CheckpointWriteError:
    """The one-line report of a failed checkpoint write: the path, the cause, the free space."""
    free = shutil.disk_usage(path.parent).free
    if isinstance(err, OSError) and err.strerror:
        reason = err.strerror
    elif needed and free < needed:  # torch's zip writer reports ENOSPC as a short write ("unexpected pos")
        reason = "no space left on device"
    else:
        reason = str(err).splitlines()[0]
    need = f", the checkpoint needs ~{_mib(needed)}" if needed else ""
    return CheckpointWriteError(
        f"checkpoint {path} not written ({reason}): {_mib(free)} free in {path.parent}{need}; the previous "
        f"checkpoints are intact. Free space (or lower train.keep_checkpoints) and rerun: train.resume=auto "
        f"continues from the last one.")


def state_bytes(state: Any) -> int:
    """Bytes of the tensors in ``state`` (nested dicts, lists, tuples): a checkpoint's size, near enough."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 0


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
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)  # a full disk: OSError, or RuntimeError from torch's zip writer
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as err:
        tmp.unlink(missing_ok=True)
        raise write_error(path, err, state_bytes(state)) from None
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


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete what killed checkpoint writers left in ``folder`` (temp files and directories); call it
    only while holding the output_dir's lock, when no writer can be running. Returns what it removed."""
    folder = Path(folder)
    stale = sorted(p for p in folder.iterdir() if _TEMP_NAME.match(p.name)) if folder.is_dir() else []
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return stale


def latest_checkpoint(folder: str | Path) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1] if found else None


def world_size_mismatch(path: str | Path, saved: int, current: int, saved_readers: int,
                        readers: int) -> CheckpointError:
    """A DDP checkpoint whose batches cannot continue at another world size."""
    same_batches = (f"set data.readers={saved_readers}, the checkpoint's" if saved_readers else
                    "start fresh with train.resume=never and data.readers set, to change world sizes later")
    return CheckpointError(
        f"checkpoint {path} was written by {saved} ranks with data.readers={saved_readers}, this run has {current} "
        f"with data.readers={readers}: the batches continue at another world size only with the checkpoint's "
        f"fixed data.readers (not 0). Resume with {saved} ranks (launch.nproc_per_node x nnodes), or {same_batches}")


def safe_load(path: str | Path, allowed: list[type] = (), map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)``: tensors and plain values, plus exactly the classes in
    ``allowed``. Anything else is refused (CheckpointError) before any of it is built."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))
        raise CheckpointError(
            f"checkpoint {path} holds {found.group(1) if found else 'objects'} besides tensors and plain values: "
            f"refused, since unpickling it could run code. Resume only from checkpoints written by ssl-foundry, "
            f"or set train.resume=never") from None
    except Exception as err:  # a truncated or foreign file: say which and what to do
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({str(err).splitlines()[0]}); delete it to resume from the "
            f"previous one, or set train.resume=never") from err


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A single-file (DDP) checkpoint."""
    if Path(path).is_dir():
        raise CheckpointError(f"checkpoint {path} is a DeepSpeed checkpoint directory: resume it with "
                              f"train.strategy=deepspeed (and the same deepspeed.zero_stage and world size)")
    return safe_load(path)

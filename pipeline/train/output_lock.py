"""One run per ``output_dir``: two runs writing one folder would resume each other's checkpoints,
log into one MLflow run and register two versions of one model.

The lock is ``<output_dir>/.foundry.lock``, held with ``flock`` for the run's lifetime and holding
its holder (host, PID, process start time, command). The kernel releases it when the holder's
process ends, however it ends, so a lock left by a killed run is free: the next run takes it over
and says whose it was. A held lock refuses the second run with the holder's details. The process
that holds it may start ranks that take it again (``foundry pretrain`` starting its ranks,
torchrun's rank 0): the holder being this process or one of its ancestors counts as holding it.
On shared file systems ``flock`` needs working locks (NFSv4 has them; ``local_lock=all`` mounts
make them node-local).
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
from datetime import datetime
from pathlib import Path

import psutil

LOCK_NAME = ".foundry.lock"


class OutputDirLocked(RuntimeError):
    """Another live run holds the output_dir; the message names it."""

    exit_status = 2


def _describe(holder: dict) -> str:
    started = datetime.fromtimestamp(holder["started"]).isoformat(timespec="seconds")
    return f"PID {holder['pid']} on {holder['host']} (started {started}: {holder['command']})"


def _is_self_or_ancestor(holder: dict) -> bool:
    """Whether ``holder`` is this process or one of its parents (same host, PID and start time)."""
    if holder.get("host") != socket.gethostname():
        return False
    for process in [psutil.Process(), *psutil.Process().parents()]:
        if process.pid == holder.get("pid") and process.create_time() == holder.get("started"):
            return True
    return False


class OutputDirLock:
    """``with OutputDirLock(output_dir):`` the run's claim on its folder (see the module doc)."""

    def __init__(self, output_dir: str | os.PathLike):
        self.path = Path(output_dir) / LOCK_NAME
        self._fd: int | None = None

    def _read(self, fd: int) -> dict:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 65536).decode(errors="replace")
        try:
            return json.loads(text) if text.strip() else {}
        except json.JSONDecodeError:
            return {}

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._read(fd)
            os.close(fd)
            if holder and _is_self_or_ancestor(holder):
                return  # the launcher of this rank holds it for the run
            who = _describe(holder) if holder else "another process"
            raise OutputDirLocked(f"output_dir {self.path.parent} is in use by the run of {who}: wait for it to "
                                  f"finish, stop it, or give this run another output_dir") from None
        previous = self._read(fd)
        if previous:
            print(f"{self.path}: taking over the lock of the run of {_describe(previous)}, which is gone",
                  file=sys.stderr, flush=True)
        me = psutil.Process()
        holder = {"host": socket.gethostname(), "pid": me.pid, "started": me.create_time(),
                  "command": " ".join(me.cmdline())[:500]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Empty the file (a free lock with no previous holder), then unlock. The file stays: removing it
        would let a run that opened it just before lock a file nobody else sees."""
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> OutputDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

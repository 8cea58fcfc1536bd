"""What every command prints while it works: time-stamped log lines and progress bars, the same for
`foundry prep`, `pretrain`, `eval` and each rank they start.

Log lines are records of the ``ssl_foundry`` logger (``logging.getLogger(__name__)`` in any module),
written to stderr as ``2026-12-05 10:31:02 INFO message``, with ``rank R`` after the time in a job
of several ranks; stdout is left to results (a command's JSON, the run summary). Rank 0 shows INFO
and up, the other ranks only their warnings and errors. ``log_file`` copies the lines into a file
(a run's ``train.log``).

Progress bars are tqdm's. On a terminal: the live bar, which log lines scroll above. Anywhere else
(CI, a Slurm log, a pipe or file): no bar and no carriage returns, but the bar's meter as a log line
every ``FOUNDRY_PROGRESS_EVERY_S`` seconds (default 30). Either way a finished bar leaves one log
line (what, how many, in how long, how fast), and ranks other than 0 show none.

It lives in data_prep/, the layer every other may import, because prep prints through it too.
"""
from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

logger = logging.getLogger("ssl_foundry")

_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
_PLAIN_METER = ("{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%), elapsed {elapsed}, eta {remaining}, "
                "{rate_fmt}{postfix}")
_PLAIN_METER_NO_TOTAL = "{desc}: {n_fmt} {unit}, elapsed {elapsed}, {rate_fmt}{postfix}"
_DONE = "{desc}: {n_fmt}/{total_fmt} {unit} in {elapsed} ({rate_fmt}{postfix})"
_DONE_NO_TOTAL = "{desc}: {n_fmt} {unit} in {elapsed} ({rate_fmt}{postfix})"


def process_rank() -> tuple[int, int]:
    """(rank, world size) of this process, as torchrun, the elastic launcher and submitit export
    them; (0, 1) in a process of its own."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _formatter() -> logging.Formatter:
    rank, world_size = process_rank()
    where = f" rank {rank}" if world_size > 1 else ""
    return logging.Formatter(f"%(asctime)s{where} %(levelname)s %(message)s", _TIME_FORMAT)


class _ConsoleHandler(logging.Handler):
    """Lines to stderr through ``tqdm.write``, which clears the live bars, writes, and redraws them."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def setup_logging() -> None:
    """The console configuration of every command and rank. Called again (by a rank once it knows
    its RANK), it replaces the previous one."""
    for handler in [h for h in logger.handlers if isinstance(h, _ConsoleHandler)]:
        logger.removeHandler(handler)
    rank, _ = process_rank()
    console = _ConsoleHandler(logging.INFO if rank == 0 else logging.WARNING)
    console.setFormatter(_formatter())
    logger.addHandler(console)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # a host program's root handlers would print every line twice


@contextmanager
def log_file(path: str | os.PathLike) -> Iterator[Path]:
    """Appends this process's log lines (INFO and up) to ``path`` while the block runs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(_formatter())
    logger.addHandler(handler)
    try:
        yield path
    finally:
        logger.removeHandler(handler)
        handler.close()


class _Discard:
    """Where a bar without a terminal 'draws' (its lines go to the logger instead)."""

    def write(self, text: str) -> None:
        pass

    def flush(self) -> None:
        pass


class Progress(tqdm):
    """A tqdm bar that keeps to the rules of the module docstring. ``periodic=False`` leaves out the
    plain lines where there is no terminal (a loop that logs lines of its own, like training).

    Set a postfix with ``refresh=False``: without a terminal, a refresh is a log line."""

    def __init__(self, iterable=None, desc: str = "", total: float | None = None, unit: str = "it",
                 periodic: bool = True, **kwargs):
        self.live = sys.stderr.isatty()
        self.periodic = periodic
        if self.live:
            # delay: loops shorter than that leave only their last line, no flash of a bar.
            options = dict(file=sys.stderr, delay=0.5)
        else:
            every = float(os.environ.get("FOUNDRY_PROGRESS_EVERY_S", "30"))
            options = dict(file=_Discard(), mininterval=every, delay=every)
        super().__init__(iterable, desc=desc, total=total, unit=unit, leave=False,
                         disable=process_rank()[0] != 0, **options, **kwargs)

    def meter(self, bar_format: str, average: bool = False) -> str:
        """The bar's numbers in ``bar_format`` (tqdm's fields: n_fmt, elapsed, remaining, rate_fmt,
        ...); with ``average``, rate and eta from the mean speed since the bar started rather than
        tqdm's recent (smoothed) one."""
        fields = {**self.format_dict, "bar_format": bar_format, "ncols": None}
        if average:
            fields["rate"] = None
        return " ".join(self.format_meter(**fields).split()).replace("( ", "(")  # tqdm pads rates to a width

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if self.live:
            return super().display(msg, pos)
        if msg is None and self.periodic:  # tqdm's periodic refresh (close and clear pass msg="")
            logger.info(self.meter(_PLAIN_METER if self.total else _PLAIN_METER_NO_TOTAL))
        return True

    def close(self) -> None:
        if getattr(self, "disable", True):  # closed already, not rank 0, or never fully made
            return
        super().close()
        logger.info(self.meter(_DONE if self.total else _DONE_NO_TOTAL, average=True))

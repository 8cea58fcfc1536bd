"""The resume point of a training stream, shared by the torch and the DALI loader and checkpointed
by the trainer."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoaderPosition:
    """Where a rank's stream stands: the next batch to read is ``batch`` of ``epoch``
    (counted over the rank's batches in DataLoader order)."""

    epoch: int = 0
    batch: int = 0

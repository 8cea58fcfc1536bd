"""The labelled subset of a semi-supervised run (``data.labelled_fraction``, e.g. S4L's 1 % or
10 % of the labels): which training samples keep their label, the same on every rank, resume
and loader backend, and different for another seed.

The keys of every sample of the training shards are ranked by a hash of ``(seed, key)`` and
the first ``round(fraction * N)`` are labelled: exactly that many, whatever the shard layout;
the others' labels are replaced by -1 (unlabelled) before the method sees them.
"""
from __future__ import annotations

import hashlib

import torch

from ssl_foundry.data_prep.shard_format import read_samples, shard_paths


def shard_keys(location: str) -> list[str]:
    """Every sample key of a shard location, in shard order (from the tar headers)."""
    return [key for shard in shard_paths(location) for key, _ in read_samples(shard)]


def _rank(seed: int, key: str) -> bytes:
    return hashlib.sha256(f"{seed}:{key}".encode()).digest()


def labelled_keys(folder: str, fraction: float, seed: int) -> frozenset[str]:
    """The keys of ``folder``'s samples that keep their label: ``round(fraction * N)`` of the N."""
    if not 0 < fraction <= 1:
        raise ValueError(f"data.labelled_fraction must be in (0, 1], got {fraction}")
    keys = shard_keys(folder)
    count = round(fraction * len(keys))
    if count == 0:
        raise ValueError(f"data.labelled_fraction={fraction} of the {len(keys)} samples in {folder} labels none; "
                         f"raise it to at least {1 / len(keys):.2g}")
    return frozenset(sorted(keys, key=lambda key: _rank(seed, key))[:count])


def mask_unlabelled(labels: torch.Tensor, keys: list[str], labelled: frozenset[str]) -> torch.Tensor:
    """``labels`` with -1 for every sample whose key is not in ``labelled``."""
    keep = torch.tensor([key in labelled for key in keys], dtype=torch.bool)
    return torch.where(keep, labels, -1)

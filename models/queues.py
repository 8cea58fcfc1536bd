"""A FIFO queue of embeddings of past global batches, identical on every rank: MoCo's dictionary of
negative keys, NNCLR's support set, SwAV's queue of features for Sinkhorn-Knopp."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class KeyQueue(nn.Module):
    """``size`` embeddings of dimension ``dim`` (MoCo sec. 3.2).

    Each step the embeddings of the current *global* batch (gathered in rank order, so every rank
    holds the same queue) replace the oldest ones: ``keys[ptr:ptr + n] = new``,
    ``ptr = (ptr + n) % size``. ``size`` must be a multiple of the global batch ``n`` so a batch
    never straddles the end. It starts as random unit vectors (MoCo, NNCLR) or, with
    ``random_init=False``, as zeros (SwAV, which uses its queue only once it is full: see
    :attr:`full`). Both ``keys`` and ``ptr`` are buffers: checkpointed, identical on every rank.
    """

    def __init__(self, size: int, dim: int, random_init: bool = True):
        super().__init__()
        keys = F.normalize(torch.randn(size, dim), dim=1) if random_init else torch.zeros(size, dim)
        self.register_buffer("keys", keys)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    @property
    def full(self) -> bool:
        """Every slot written at least once (for a zero-initialised queue of unit-norm embeddings:
        the last slot, written last on the first round, is no longer zero)."""
        return bool(self.keys[-1].any())

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        n = keys.shape[0]
        if self.size % n:
            raise ValueError(
                f"queue_size={self.size} is not a multiple of the global batch per forward "
                f"({n} = train.batch_size / train.grad_accum_steps); choose a queue_size divisible by it")
        ptr = int(self.ptr)
        self.keys[ptr:ptr + n] = keys.to(self.keys.dtype)
        self.ptr.fill_((ptr + n) % self.size)

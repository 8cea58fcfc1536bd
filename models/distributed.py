"""Everything that touches the global batch goes through here, so its gradients are tested once.

On one process the gathers and reductions are the identity (and the batch shuffle permutes the
local batch), so methods are written once for both cases.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends every rank the gradient of *all* ranks' losses with
    respect to its own slice: grad_x = all_reduce_sum(grad_gathered)[rank slice].

    Each rank's loss uses every rank's embeddings, so the sum over ranks is needed; DDP then
    averages parameter gradients, which makes the result equal to one process computing the
    mean loss over the concatenated batch. Local slices must have equal size.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        local = grad.shape[0] // dist.get_world_size()
        r = dist.get_rank()
        return grad[r * local : (r + 1) * local]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (same shape on every rank) over ranks in rank order, keeping gradients."""
    return _GatherWithGrad.apply(x) if is_distributed() else x


@torch.no_grad()
def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over ranks of a tensor, for logging (no gradient)."""
    if not is_distributed():
        return x
    x = x.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x / dist.get_world_size()


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` over ranks in rank order, without gradient (momentum-encoder keys,
    queue updates). Local slices must have equal size."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class _AllReduceSumWithGrad(torch.autograd.Function):
    """all_reduce(SUM) whose backward is also an all_reduce(SUM) of the incoming gradients.

    Every rank computes the same loss from the summed tensor, so the gradient of the sum of all
    ranks' losses with respect to one rank's summand is the sum of their gradients. DDP then
    averages parameter gradients, which makes the result equal to one process on the whole
    batch. A backward that passed on only the local gradient, which is what an in-place
    ``torch.distributed.all_reduce`` inside the graph amounts to (autograd does not see it; the
    Barlow Twins reference code does this), leaves a 1/world_size factor in every
    gradient.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone().contiguous()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone().contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def all_reduce_sum_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over ranks (identical on every rank), differentiable as explained above."""
    return _AllReduceSumWithGrad.apply(x) if is_distributed() else x


@torch.no_grad()
def batch_shuffle(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffling BN (He et al. 2020, MoCo sec. 3.3): give this rank a random slice of the
    *global* batch, so the BatchNorm statistics of a key come from other images than those of
    its query.

    The global batch is all-gathered, rank 0 draws a permutation of it (from the default torch
    generator, so a seeded single process draws the same one), broadcasts it, and each rank
    keeps its slice. Returns ``(x_shuffled_local, unshuffle_index)``; pass the index to
    :func:`batch_unshuffle`. On one process the whole batch is permuted.
    """
    x_all = gather_no_grad(x)
    perm = torch.randperm(x_all.shape[0]).to(x.device)
    if is_distributed():
        dist.broadcast(perm, src=0)
    unshuffle = torch.argsort(perm)
    local = x.shape[0]
    mine = perm[rank() * local:(rank() + 1) * local]
    return x_all[mine], unshuffle


@torch.no_grad()
def batch_unshuffle(x: torch.Tensor, unshuffle: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`batch_shuffle`: this rank gets back the outputs of its own samples,
    in their original order."""
    x_all = gather_no_grad(x)
    local = x.shape[0]
    return x_all[unshuffle[rank() * local:(rank() + 1) * local]]

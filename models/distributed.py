"""Everything that touches the global batch goes through here, so its gradients are tested once.

On one process every function is the identity, so methods are written once for both cases.
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

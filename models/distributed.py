"""Everything that touches the global batch goes through here, so its gradients are tested once.

On one process the gathers and reductions are the identity (and the batch shuffle permutes the
local batch), so methods are written once for both cases.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn


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
def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks of a tensor, without gradient (statistics of the global batch: DINO's centre,
    Sinkhorn-Knopp's normalisers, counts)."""
    if not is_distributed():
        return x
    x = x.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


@torch.no_grad()
def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over ranks of a tensor, without gradient (logging)."""
    return all_reduce_sum(x) / world_size()


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


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the *global* batch, over every rank:
    SimCLR's "global BN" (Chen et al. 2020, sec. 2.3), which BYOL, Barlow Twins and MoCo v3 also
    train with. torch's SyncBatchNorm does this on GPUs only; this runs on any process-group
    backend (gloo and NCCL alike), so the CPU tests exercise the code GPUs run.

    Two differentiable all-reduces (:func:`all_reduce_sum_with_grad`) give the global mean, then
    the global biased variance (two passes, not E[x^2] - E[x]^2, for accuracy); every rank's
    inputs then get the gradient one process would give them on the whole batch. The running
    variance is unbiased (n / (n - 1)), as in ``nn.BatchNorm``. In eval mode, or on one process,
    it is plain BatchNorm. Local batches may differ in size.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"GlobalBatchNorm expects (N, C, ...) input, got shape {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        xf = x.float()
        count = all_reduce_sum_with_grad(xf.new_tensor([x.numel() // x.shape[1]]))
        mean = all_reduce_sum_with_grad(xf.sum(dims)) / count
        centered = xf - mean.view(shape)
        var = all_reduce_sum_with_grad(centered.square().sum(dims)) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_((var * count / (count - 1)).to(self.running_var.dtype), momentum)
        y = centered * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_to_global_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm1d/2d/3d`` in ``module`` by a :class:`GlobalBatchNorm` that
    holds the same parameter and buffer tensors (state-dict keys unchanged, so exports stay plain
    timm), in place; returns ``module``."""
    plain = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    for name, child in module.named_children():
        if type(child) in plain:
            converted = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                        child.track_running_stats)
            # The very parameter and buffer tensors (frozen ones stay frozen, the device is kept).
            for key, tensor in child.named_parameters(recurse=False):
                setattr(converted, key, tensor)
            for key, tensor in child.named_buffers(recurse=False):
                converted.register_buffer(key, tensor)
            converted.train(child.training)
            setattr(module, name, converted)
        elif isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, GlobalBatchNorm):
            raise TypeError(f"{name}: {type(child).__name__} is a BatchNorm variant that global BN cannot "
                            f"replace faithfully (it may fuse an activation); use a backbone with plain BatchNorm "
                            f"or set train.global_batchnorm=false")
        else:
            convert_to_global_batchnorm(child)
    return module


def is_zero3_partitioned(param: torch.Tensor) -> bool:
    """True for a parameter DeepSpeed ZeRO-3 has partitioned: each rank keeps 1/world of it
    (``param.ds_tensor``) and ``param.data`` is empty outside a gather."""
    return hasattr(param, "ds_id")


def zero3_gathered(params: list[torch.Tensor], modifier_rank: int | None = None):
    """Context in which ZeRO-3 partitioned ``params`` are whole on every rank (identity for
    ordinary parameters). With ``modifier_rank`` set, that rank's values at exit are broadcast
    and re-partitioned, so an in-place update made there is kept (DeepSpeed's GatheredParameters)."""
    partitioned = [p for p in params if is_zero3_partitioned(p)]
    if not partitioned:
        return nullcontext()
    import deepspeed  # optional (train.strategy=deepspeed); partitioned parameters mean it is installed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank)


@torch.no_grad()
def set_parameter_(param: torch.nn.Parameter, value: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Set a *trained* parameter in place to ``value(param)`` (a function of its whole current
    value, identical on every rank), e.g. SwAV's renormalised prototypes, under any strategy.

    Under DDP the optimizer steps the parameter tensor itself. DeepSpeed ZeRO steps an fp32 master
    copy (a partition of it on each rank) and copies it into the parameter after each step, so an
    in-place change of the parameter alone would be undone at the next step: the master copy is
    set too (``safe_set_full_fp32_param``). Under ZeRO-3 the parameter is gathered whole first and
    its new value re-partitioned.
    """
    with zero3_gathered([param], modifier_rank=0):
        new = value(param.detach()).to(param.dtype)
        param.copy_(new)
    if is_zero3_partitioned(param) or hasattr(param, "_hp_mapping"):
        from deepspeed.utils import safe_set_full_fp32_param  # optional; DeepSpeed's parameters mean it is installed

        safe_set_full_fp32_param(param, new.float())

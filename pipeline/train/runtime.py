"""Process runtime: device, process group, threads and precision, chosen from the config and
the environment torchrun / submitit export (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

The GPU path and the CPU path differ only in what is chosen here: NCCL + cuda:LOCAL_RANK, or
gloo + cpu; bf16 autocast on either where the hardware is fast at it.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ssl_foundry.pipeline.config import LaunchConfig, TrainConfig, uses_cuda


@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def cpu_has_fast_bf16() -> bool:
    """AMX / AVX512-BF16 make bf16 matmuls several times faster than fp32 on CPU."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def autocast_dtype(train: TrainConfig, device: torch.device) -> torch.dtype | None:
    if train.precision == "fp32":
        return None
    if train.precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_fast_bf16() else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def init_runtime(launch: LaunchConfig, train: TrainConfig) -> Runtime:
    """Join the process group when started by torchrun/submitit, pick device and threads."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = uses_cuda(launch)
    if launch.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("launch.device=cuda but no CUDA device is visible; use launch.device=auto or cpu")
    device = torch.device("cuda", local_rank) if want_cuda else torch.device("cpu")
    if want_cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = launch.backend if launch.backend != "auto" else ("nccl" if want_cuda else "gloo")
        dist.init_process_group(backend, timeout=timedelta(minutes=10),
                                device_id=device if backend == "nccl" else None)
    if device.type == "cpu":
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        threads = train.threads or max(1, (os.cpu_count() or 1) // local_world)
        torch.set_num_threads(threads)
    return Runtime(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown_runtime(failed: bool = False) -> None:
    """Leaves the process group; after a failure without the final barrier: the other ranks may wait
    in another collective, which the barrier would never match (both would hang until the timeout),
    while this rank's exit ends theirs (torchrun stops them; gloo reports the closed connection)."""
    if dist.is_initialized():
        if not failed:
            dist.barrier()
        dist.destroy_process_group()

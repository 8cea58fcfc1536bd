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


# Ranks come up at their own pace (imports, model, checkpoint, a node restarted after a failure):
# until all are ready (``start_collective_timeout``) they wait this long for each other.
STARTUP_TIMEOUT = timedelta(minutes=10)


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
        try:
            dist.init_process_group(backend, timeout=STARTUP_TIMEOUT,
                                    device_id=device if backend == "nccl" else None)
        except dist.DistNetworkError as err:
            if "EADDRINUSE" not in str(err):
                raise
            port = os.environ.get("MASTER_PORT")
            raise RuntimeError(
                f"rank {rank} cannot listen on MASTER_PORT {port} of {os.environ.get('MASTER_ADDR')}: another "
                f"process on this node holds it ({err}). Free it, or set MASTER_PORT to a free port in the "
                f"job's environment (e.g. `export MASTER_PORT=29511` before foundry submit or sbatch)") from err
    if device.type == "cpu":
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        threads = train.threads or max(1, (os.cpu_count() or 1) // local_world)
        torch.set_num_threads(threads)
    return Runtime(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def start_collective_timeout(launch: LaunchConfig) -> None:
    """Called by every rank once it is ready to work (model, optimizer, checkpoint, tracker): after
    they all are, a collective that waits ``launch.collective_timeout_s`` fails (a peer that vanished
    without closing its connections) instead of hanging."""
    if dist.is_initialized():
        dist.barrier()
        dist.set_timeout(timedelta(seconds=launch.collective_timeout_s))


def shutdown_runtime() -> None:
    """Leave the process group, at once: called by every rank after its last collective, so that
    no rank waits (and times out) in a barrier while rank 0 alone exports, registers and logs."""
    if dist.is_initialized():
        dist.destroy_process_group()

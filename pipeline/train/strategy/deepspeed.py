"""DeepSpeed ZeRO (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion
Parameter Models"): each of N ranks keeps 1/N of the optimizer states (stage 1), of the gradients
too (stage 2), and of the parameters too (stage 3, gathered layer by layer for forward and
backward); ZeRO-Offload keeps optimizer states (and, at stage 3, parameters) in CPU memory.

The DeepSpeed JSON is generated from the run config (``pipeline.config.deepspeed_config``): the batch and
accumulation from train.*, clipping, bf16 as ``torch_autocast`` (fp32 master weights, bf16
compute, like the DDP strategy: momentum targets stay fp32, whose EMA increments of
(1 - m) = 0.004 would vanish under bf16 weights' 2^-8 resolution), and the optimizer is ours
(timm's, or DeepSpeed's CPU Adam with offload). ``deepspeed.config_json`` is merged over it.

On a GPU the engine runs on ``cuda:LOCAL_RANK`` with NCCL; here the same code runs on DeepSpeed's
CPU accelerator with gloo (``DS_ACCELERATOR`` follows ``launch.device``).

Checkpoints are DeepSpeed's sharded ones (every rank writes its partition), made atomic at the
directory level: all ranks write into ``.step-XXXXXXXX.tmp/``, rank 0 renames it to
``step-XXXXXXXX/`` after a barrier (so the checkpoint folder must be shared by all nodes, as
DeepSpeed assumes). DeepSpeed loads them with ``weights_only=True`` here (its own engine unpickles
anything), allowing exactly the three DeepSpeed classes its files hold. The exported backbone is
consolidated from the fp32 master weights of the checkpoint this run has just written (DeepSpeed's
``zero_to_fp32``).
"""
from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ssl_foundry.models.backbones import create_backbone
from ssl_foundry.pipeline.config import Config, deepspeed_config, offloads_optimizer, select_accelerator
from ssl_foundry.pipeline.train.checkpoint import (CheckpointError, checkpoint_dir, commit_checkpoint_dir, safe_load,
                                                   write_error)
from ssl_foundry.pipeline.train.optim import build_optimizer
from ssl_foundry.pipeline.train.runtime import Runtime, autocast_dtype


def load_weights_only(engine) -> None:
    """DeepSpeed's torch checkpoint engine unpickles anything (``weights_only=False``): give ``engine``
    one that loads tensors, plain values and the three DeepSpeed classes its files hold (ZeRO-1/2/3,
    with and without offload: the ZeRO stage, the loss scaler's settings, ZeRO-1/2's parameter
    fragment addresses). DeepSpeed's other engines load with torch's default, weights only, already."""
    # optional (the [deepspeed] extra): only a DeepSpeed engine, already made, comes here
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return safe_load(path, [ZeroStageEnum, LossScaler, fragment_address], map_location=map_location)

    if type(engine.checkpoint_engine) is TorchCheckpointEngine:
        engine.checkpoint_engine = WeightsOnlyCheckpointEngine(engine._config)


class DeepSpeedStrategy:
    name = "deepspeed"

    def __init__(self, cfg: Config, model: torch.nn.Module, rt: Runtime, micro_batch: int):
        select_accelerator(rt.device.type)
        import deepspeed  # optional, and it must see DS_ACCELERATOR (set just above) when first imported

        # DeepSpeed's own collectives call torch's deprecated all_gather_into_tensor each step.
        warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated", category=FutureWarning)

        self.cfg, self.model, self.rt = cfg, model, rt
        if not dist.is_initialized():  # one process: DeepSpeed still wants a process group; NCCL for
            cuda = rt.device.type == "cuda"  # CUDA tensors, as init_runtime and DeepSpeed itself would pick
            dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1,
                                    device_id=rt.device if cuda else None)
        for key, value in (("RANK", rt.rank), ("LOCAL_RANK", rt.local_rank), ("WORLD_SIZE", rt.world_size)):
            os.environ.setdefault(key, str(value))  # DeepSpeed reads them (a launcher has set them already)
        self.ds_config = deepspeed_config(cfg.deepspeed, cfg.train, micro_batch, autocast_dtype(cfg.train, rt.device),
                                          cuda=rt.device.type == "cuda")
        self.optimizer = build_optimizer(cfg, model, cpu_offload=offloads_optimizer(self.ds_config))
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=self.ds_config)
        load_weights_only(self.engine)

    def forward_backward(self, views: list[torch.Tensor], sync: bool, labels: torch.Tensor | None = None
                         ) -> torch.Tensor:
        """One micro-batch; the engine scales the gradient by 1 / grad_accum_steps and (stage 2/3)
        reduce-scatters it into the owners' partitions, only at the accumulation boundary.
        ``labels`` go to methods that take them (``uses_labels``), None to the others."""
        self.engine.set_gradient_accumulation_boundary(sync)
        loss = self.engine(views, labels)["loss"]
        self.engine.backward(loss)
        return loss.detach()

    def step(self) -> float:
        """Clip (gradient_clipping), step each rank's partition, re-gather parameters (stage 1/2),
        zero grads. Returns the global gradient norm before clipping."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def save(self, folder: Path, step: int, trainer_state: dict[str, Any]) -> Path | None:
        final = checkpoint_dir(folder, step)
        tmp = final.with_name(f".{final.name}.tmp")
        if self.rt.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crash mid-save
            folder.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        try:
            self.engine.save_checkpoint(str(folder), tag=tmp.name, client_state={"trainer": trainer_state},
                                        save_latest=False)
        except (OSError, RuntimeError) as err:  # a full disk; the next run's start removes the partial tmp
            raise write_error(final, err) from None
        dist.barrier()  # every rank's shard is written
        path = commit_checkpoint_dir(tmp, final, keep=self.cfg.train.keep_checkpoints) if self.rt.is_main else None
        dist.barrier()  # nobody reads or rewrites the folder before the rename
        return path

    def load(self, path: Path) -> dict[str, Any]:
        if not path.is_dir():
            raise CheckpointError(f"checkpoint {path} is a single file written by train.strategy=ddp: resume it "
                                  f"with train.strategy=ddp, or start fresh with train.resume=never")
        saved_ranks = len(list(path.glob("*zero_pp_rank_*_optim_states.pt")))
        if saved_ranks != self.rt.world_size:  # each rank owns its shard of the optimizer state
            raise CheckpointError(
                f"checkpoint {path} holds the ZeRO shards of {saved_ranks} ranks, this run has {self.rt.world_size}: "
                f"DeepSpeed's optimizer state is split per rank. Resume with {saved_ranks} ranks "
                f"(launch.nproc_per_node x nnodes). Resharding is DeepSpeed's universal checkpoint "
                f"(python -m deepspeed.checkpoint.ds_to_universal), which ssl-foundry does not load yet")
        loaded, client_state = self.engine.load_checkpoint(str(path.parent), tag=path.name,
                                                           load_optimizer_states=True, load_lr_scheduler_states=False)
        if loaded is None or "trainer" not in (client_state or {}):
            raise CheckpointError(f"checkpoint {path} is not a complete ssl-foundry DeepSpeed checkpoint; delete it "
                                  f"to resume from the previous one, or set train.resume=never")
        return client_state["trainer"]

    def consolidated_backbone(self, checkpoint: Path) -> torch.nn.Module:
        """The backbone (the method's ``exported_backbone``) with the full fp32 master weights of
        ``checkpoint``, gathered from every rank's shard (DeepSpeed's zero_to_fp32; frozen parameters,
        such as a teacher's, come from the shards too), as a plain timm model on the CPU: read from the
        files, so any rank may call it, alone."""
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # optional dependency

        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
        m = self.cfg.model
        backbone = create_backbone(m.backbone, **m.backbone_args)
        prefix = self.model.exported_backbone + "."
        backbone.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        return backbone

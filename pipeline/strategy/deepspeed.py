"""DeepSpeed ZeRO (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion
Parameter Models"): each of N ranks keeps 1/N of the optimizer states (stage 1), of the gradients
too (stage 2), and of the parameters too (stage 3, gathered layer by layer for forward and
backward); ZeRO-Offload keeps optimizer states (and, at stage 3, parameters) in CPU memory.

The DeepSpeed JSON is generated from the run config (``deepspeed_config``): the batch and
accumulation from train.*, clipping, bf16 as ``torch_autocast`` (fp32 master weights, bf16
compute, like the DDP strategy: momentum targets stay fp32, whose EMA increments of
(1 - m) = 0.004 would vanish under bf16 weights' 2^-8 resolution), and the optimizer is ours
(timm's, or DeepSpeed's CPU Adam with offload). ``deepspeed.config_json`` is merged over it.

On a GPU the engine runs on ``cuda:LOCAL_RANK`` with NCCL; here the same code runs on DeepSpeed's
CPU accelerator with gloo (``DS_ACCELERATOR`` follows ``launch.device``).

Checkpoints are DeepSpeed's sharded ones (every rank writes its partition), made atomic at the
directory level: all ranks write into ``.step-XXXXXXXX.tmp/``, rank 0 renames it to
``step-XXXXXXXX/`` after a barrier (so the checkpoint folder must be shared by all nodes, as
DeepSpeed assumes). The exported backbone is consolidated from the fp32 master weights of that
checkpoint (DeepSpeed's ``zero_to_fp32``).
"""
from __future__ import annotations

import difflib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from launch.config import Config, ConfigError
from models.backbones import create_backbone
from pipeline.checkpoint import checkpoint_dir, commit_checkpoint_dir
from pipeline.optim import build_optimizer
from pipeline.runtime import Runtime, autocast_dtype, uses_cuda

# Keys of a user JSON that train.* already decides: the trainer's loop, loader and schedule
# depend on them, so a second source of truth is refused with the key to use instead.
OWNED_KEYS = {
    "train_batch_size": "train.batch_size",
    "train_micro_batch_size_per_gpu": "train.batch_size (split over ranks x train.grad_accum_steps)",
    "gradient_accumulation_steps": "train.grad_accum_steps",
    "gradient_clipping": "train.grad_clip",
    "optimizer": "train.optimizer, train.lr, train.weight_decay, train.adam_betas",
    "scheduler": "train.warmup_steps, train.min_lr (the trainer's warmup + cosine)",
    "bf16": "train.precision (bf16: autocast with fp32 master weights)",
    "fp16": "train.precision (bf16 or fp32; fp16 loss scaling is not supported)",
    "torch_autocast": "train.precision",
}


def select_accelerator(device_type: str) -> None:
    """DeepSpeed picks its accelerator once, at import: make it the run's device (cpu or cuda)
    unless the environment already says (DS_ACCELERATOR)."""
    os.environ.setdefault("DS_ACCELERATOR", device_type)


def _read_user_json(path: str) -> dict[str, Any]:
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"deepspeed.config_json: '{path}' not found")
    try:
        loaded = json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"deepspeed.config_json: '{path}' is not valid JSON ({err})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"deepspeed.config_json: '{path}' must hold a JSON object at top level")
    for key, instead in OWNED_KEYS.items():
        if key in loaded:
            raise ConfigError(f"deepspeed.config_json: '{key}' in {path} is set by the run config; use {instead}")
    return loaded


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def deepspeed_config(cfg: Config, world_size: int, amp_dtype: torch.dtype | None, cuda: bool) -> dict[str, Any]:
    """The DeepSpeed JSON of this run: generated from deepspeed.* and train.*, then the user's
    ``deepspeed.config_json`` merged over it."""
    t, d = cfg.train, cfg.deepspeed
    zero: dict[str, Any] = {"stage": d.zero_stage}
    if d.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": d.offload_optimizer, "pin_memory": cuda}
    if d.offload_params != "none":
        zero["offload_param"] = {"device": d.offload_params, "pin_memory": cuda}
    generated = {
        # DeepSpeed derives train_batch_size = micro x accumulation x world size (= train.batch_size).
        "train_micro_batch_size_per_gpu": t.batch_size // (world_size * t.grad_accum_steps),
        "gradient_accumulation_steps": t.grad_accum_steps,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "torch_autocast": {"enabled": amp_dtype is not None, "dtype": "bfloat16"},
        # The optimizer is the run's own (timm's LARS/AdamW/SGD): DeepSpeed wants that confirmed.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # the trainer logs
    }
    return _merge(generated, _read_user_json(d.config_json))


def offloads_optimizer(ds_config: dict[str, Any]) -> bool:
    device = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device not in (None, "none")


def _unknown_top_level_keys(ds_config: dict[str, Any]) -> list[str]:
    """Top-level keys DeepSpeed's parser never reads (it ignores them silently: a typo such as
    'zero_optimisation' would train without ZeRO). Found by parsing a copy that records reads."""
    from deepspeed.runtime.config import DeepSpeedConfig as DeepSpeedParser

    read: set[str] = set()

    class RecordingDict(dict):
        def get(self, key, *default):
            read.add(key)
            return super().get(key, *default)

        def __getitem__(self, key):
            read.add(key)
            return super().__getitem__(key)

        def __contains__(self, key):
            read.add(key)
            return super().__contains__(key)

        def keys(self):
            return RecordingKeys(self)

    class RecordingKeys:
        def __init__(self, d):
            self.d = d

        def __contains__(self, key):
            read.add(key)
            return dict.__contains__(self.d, key)

        def __iter__(self):
            return iter(dict.keys(self.d))

        def __len__(self):
            return dict.__len__(self.d)

    DeepSpeedParser(RecordingDict(ds_config))
    return [key for key in ds_config if key not in read]


def validate_deepspeed(cfg: Config) -> None:
    """Everything about ``train.strategy=deepspeed`` that can be wrong, before any rank starts:
    our keys, the user JSON, and the merged config through DeepSpeed's own parser."""
    t, d = cfg.train, cfg.deepspeed
    if d.zero_stage == 0:
        raise ConfigError("deepspeed.zero_stage=0 is plain data parallelism: use train.strategy=ddp")
    if d.zero_stage not in (1, 2, 3):
        raise ConfigError(f"deepspeed.zero_stage: {d.zero_stage} is not a ZeRO stage; choose 1 (optimizer states "
                          f"sharded), 2 (+ gradients) or 3 (+ parameters)")
    for key in ("offload_optimizer", "offload_params"):
        if getattr(d, key) not in ("none", "cpu"):
            raise ConfigError(f"deepspeed.{key}: '{getattr(d, key)}' is not one of none, cpu "
                              f"(NVMe offload: set zero_optimization.offload_* in deepspeed.config_json)")
    if t.optimizer == "lars":
        raise ConfigError("train.optimizer=lars with train.strategy=deepspeed: ZeRO flattens the parameters into "
                          "shards, so LARS' layer-wise trust ratio would be computed over whole shards; use "
                          "train.optimizer=adamw or sgd, or train.strategy=ddp")
    select_accelerator("cuda" if uses_cuda(cfg.launch) else "cpu")
    ds_config = deepspeed_config(cfg, world_size=1, amp_dtype=None, cuda=False)
    source = f" (deepspeed.* and train.*{', merged with ' + d.config_json if d.config_json else ''})"
    zero = ds_config.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage not in (1, 2, 3):
        raise ConfigError(f"zero_optimization.stage={stage}{source}: choose 1, 2 or 3")
    if zero.get("offload_param", {}).get("device", "none") not in (None, "none") and stage != 3:
        raise ConfigError(f"parameter offload needs ZeRO stage 3 (parameters are only partitioned there); "
                          f"zero_optimization.stage is {stage}{source}: set deepspeed.zero_stage=3 or "
                          f"deepspeed.offload_params=none")
    if stage == 3 and cfg.eval.knn_every:
        raise ConfigError("eval.knn_every (the online kNN monitor) runs each rank's backbone on its own share of the "
                          "eval shards, whose parameters ZeRO-3 has partitioned over all ranks; use "
                          "deepspeed.zero_stage=1 or 2, or eval.knn_every=0 (the kNN at the end of pretraining runs "
                          "on the consolidated backbone)")
    if offloads_optimizer(ds_config) and t.optimizer != "adamw":
        raise ConfigError(f"optimizer offload runs DeepSpeed's CPU Adam: set train.optimizer=adamw (got "
                          f"{t.optimizer}), or deepspeed.offload_optimizer=none{source}")
    try:
        unknown = _unknown_top_level_keys(ds_config)
    except Exception as err:  # DeepSpeed's own validation (pydantic sections, removed keys)
        raise ConfigError(f"DeepSpeed rejects the config{source}: {err}") from None
    if unknown:
        hints = [f"'{k}'" + (f" (did you mean '{m[0]}'?)" if (m := difflib.get_close_matches(
            k, _KNOWN_SECTIONS, n=1)) else "") for k in unknown]
        raise ConfigError(f"deepspeed.config_json {d.config_json}: DeepSpeed does not know the key(s) "
                          f"{', '.join(hints)}; it would ignore them silently")


# For "did you mean" hints only (the check itself asks DeepSpeed's parser).
_KNOWN_SECTIONS = ["zero_optimization", "activation_checkpointing", "flops_profiler", "comms_logger",
                   "wall_clock_breakdown", "memory_breakdown", "steps_per_print", "communication_data_type",
                   "prescale_gradients", "gradient_predivide_factor", "aio", "checkpoint", "data_types",
                   "tensorboard", "wandb", "csv_monitor", "zero_allow_untested_optimizer",
                   "zero_force_ds_cpu_optimizer", "dump_state", "compile"]


class DeepSpeedStrategy:
    name = "deepspeed"

    def __init__(self, cfg: Config, model: torch.nn.Module, rt: Runtime):
        select_accelerator(rt.device.type)
        import deepspeed

        # DeepSpeed's own collectives call torch's deprecated all_gather_into_tensor each step.
        warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated", category=FutureWarning)

        self.cfg, self.model, self.rt = cfg, model, rt
        if not dist.is_initialized():  # one process: DeepSpeed still wants a process group
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        for key, value in (("RANK", rt.rank), ("LOCAL_RANK", rt.local_rank), ("WORLD_SIZE", rt.world_size)):
            os.environ.setdefault(key, str(value))  # DeepSpeed reads them (a launcher has set them already)
        self.ds_config = deepspeed_config(cfg, rt.world_size, autocast_dtype(cfg.train, rt.device),
                                          cuda=rt.device.type == "cuda")
        self.optimizer = build_optimizer(cfg, model, cpu_offload=offloads_optimizer(self.ds_config))
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=self.ds_config)

    def forward_backward(self, views: list[torch.Tensor], sync: bool, labels: torch.Tensor | None = None
                         ) -> torch.Tensor:
        """One micro-batch; the engine scales the gradient by 1 / grad_accum_steps and (stage 2/3)
        reduce-scatters it into the owners' partitions, only at the accumulation boundary.
        ``labels`` go to methods that take them (``uses_labels``)."""
        self.engine.set_gradient_accumulation_boundary(sync)
        loss = (self.engine(views) if labels is None else self.engine(views, labels))["loss"]
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
        self.engine.save_checkpoint(str(folder), tag=tmp.name, client_state={"trainer": trainer_state},
                                    save_latest=False)
        dist.barrier()  # every rank's shard is written
        path = commit_checkpoint_dir(tmp, final, keep=self.cfg.train.keep_checkpoints) if self.rt.is_main else None
        dist.barrier()  # nobody reads or rewrites the folder before the rename
        return path

    def load(self, path: Path) -> dict[str, Any]:
        if not path.is_dir():
            raise RuntimeError(f"checkpoint {path} is a single file written by train.strategy=ddp: resume it with "
                               f"train.strategy=ddp, or start fresh with train.resume=never")
        saved_ranks = len(list(path.glob("*zero_pp_rank_*_optim_states.pt")))
        if saved_ranks != self.rt.world_size:  # each rank owns its shard of the optimizer state
            raise RuntimeError(
                f"checkpoint {path} holds the ZeRO shards of {saved_ranks} ranks, this run has {self.rt.world_size}: "
                f"DeepSpeed's optimizer state is split per rank. Resume with {saved_ranks} ranks "
                f"(launch.nproc_per_node x nnodes). Resharding is DeepSpeed's universal checkpoint "
                f"(python -m deepspeed.checkpoint.ds_to_universal), which ssl-foundry does not load yet")
        loaded, client_state = self.engine.load_checkpoint(str(path.parent), tag=path.name,
                                                           load_optimizer_states=True, load_lr_scheduler_states=False)
        if loaded is None or "trainer" not in (client_state or {}):
            raise RuntimeError(f"checkpoint {path} is not a complete ssl-foundry DeepSpeed checkpoint; delete it to "
                               f"resume from the previous one, or set train.resume=never")
        return client_state["trainer"]

    def consolidated_backbone(self, checkpoint: Path) -> torch.nn.Module:
        """The backbone with the full fp32 master weights of ``checkpoint``, gathered from every
        rank's shard (DeepSpeed's zero_to_fp32), as a plain timm model on the CPU: read from the
        files, so any rank may call it, alone."""
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
        m = self.cfg.model
        backbone = create_backbone(m.backbone, **m.backbone_args)
        prefix = "backbone."
        backbone.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        return backbone

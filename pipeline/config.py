"""Typed run configuration: dataclasses, one YAML per recipe, dotted ``key=value`` overrides.

A recipe YAML may build on base recipes (``defaults: [base/fmnist.yaml]``, merged by OmegaConf,
the recipe's own keys last) and refer to other keys (``${data.train}``). The composed recipe is
merged onto the dataclass defaults, then each override is applied, then interpolations are
resolved (so they see the overrides) and the whole tree is validated: an unknown key names the
valid ones, a wrong type names the key and the type it wants, a missing data path says how to
make it. The resolved config is written with every run (``<output_dir>/config.yaml``) and logged
to MLflow.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ssl_foundry.data_prep.shard_format import (ManifestError, is_remote, location_scheme, read_manifest, redact,
                                                shard_list)
from ssl_foundry.models.backbones import create_backbone
from ssl_foundry.models.multicrop import check_view_sizes
from ssl_foundry.models.registry import method_arg_names, method_class, method_names, takes_teacher
from ssl_foundry.models.video import min_clip_frames
from ssl_foundry.pipeline.config_error import ConfigError
from ssl_foundry.pipeline.data.augment.batched_backend import compile_views
from ssl_foundry.pipeline.data.augment.spec import AugmentOp, ViewSpec, view_sizes
from ssl_foundry.pipeline.extras import require


# Metrics the eval commands log, which an evaluation gate (eval.gate) may test: higher is better.
GATE_METRICS = ("knn_top1", "linear_top1", "finetune_top1")


@dataclass
class DataConfig:
    # Shard locations (docs/data.md): a folder with manifest.json, local, s3://bucket/prefix or
    # http(s)://host/path, or a shard list (.../shard-{000000..000099}.tar).
    train: str = ""  # pretraining shards
    eval_train: str = ""  # labelled shards: the kNN memory bank
    eval_test: str = ""  # labelled shards: the kNN queries
    # Training loader: dali (NVIDIA DALI; decode + augmentation on the GPU, or DALI's CPU backend),
    # torch (torchvision, one sample at a time), batched (the torch loader augmenting each decoded
    # micro-batch at once with tensor ops), auto (dali on a GPU where DALI has passed
    # `foundry check gpu`, else batched; docs/gpu-acceptance.md).
    backend: str = "auto"
    num_workers: int = 2  # loader processes per rank (dali: DALI CPU threads per rank)
    prefetch_batches: int = 2  # batches each worker keeps ready
    shuffle_buffer: int = 2000  # samples in each reader's shuffle buffer
    # Virtual shard readers sharing every global batch. Fixed (a multiple of ranks x workers):
    # the global batch is the same at any world size, and so is the loss of a model without batch
    # statistics. 0: one reader per rank x worker (the composition then depends on the world size).
    readers: int = 0
    resampled: bool = False  # sample shards with replacement forever instead of epochs
    # Clip shards (`foundry prep video`): a training clip is clip_frames frames (0: all of a stored
    # clip), frame_stride apart, from a random start; decoded by dali where DALI decodes the
    # shards' codec, else pyav (auto), or as set. Image methods train on one frame of each clip.
    clip_frames: int = 0
    frame_stride: int = 1
    video_decoder: str = "auto"  # auto | dali | pyav
    eval_image_size: int = 32  # resize for feature extraction (kNN / probes)
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    views: list[ViewSpec] = field(default_factory=list)
    # Methods that take labels (S4L, SLA): the share of the training samples whose label they see,
    # an exact, seed-deterministic subset of the shards' keys (pipeline/data/labelled_subset.py).
    labelled_fraction: float = 1.0
    # Data faults (docs/faults-data.md). A rank that waits longer than timeout_s for one training
    # batch (a dead or stalled loader worker, a hung read) ends the run, naming the rank and the cause.
    timeout_s: float = 300.0
    # A failed read from s3:// or http(s):// (error status, reset, no data for timeout_s / (3 (retries + 1))
    # seconds) is tried again this many times, from the sample it broke off in, before the run ends naming it.
    retries: int = 3
    verify: str = "size"  # shards against manifest.json before training: size | sha256 | none
    on_bad_sample: str = "error"  # a sample that does not decode: error (the run ends, naming it) | skip
    max_sample_bytes: int = 64 * 2**20  # a tar member larger than this is refused unread


@dataclass
class ModelConfig:
    method: str = "simclr"  # key in models.registry
    backbone: str = "resnet18"  # any timm model name
    backbone_args: dict[str, Any] = field(default_factory=dict)  # timm create_model kwargs
    method_args: dict[str, Any] = field(default_factory=dict)  # validated by the method
    # method=distill: the frozen teacher, models:/NAME@ALIAS, models:/NAME/VERSION, an MLflow run id or
    # an export folder, resolved in mlflow.tracking_uri's registry (pipeline/registry/teacher.py)
    teacher: str = ""


@dataclass
class LinearProbeConfig:
    """`foundry eval linear` (pipeline/evaluate/linear_probe.py): a linear classifier on frozen, cached features."""

    lrs: list[float] = field(default_factory=lambda: [0.003, 0.01, 0.03, 0.1, 0.3])  # swept; best on val_fraction
    epochs: int = 100
    batch_size: int = 1024
    optimizer: str = "sgd"  # sgd | lars
    momentum: float = 0.9
    weight_decay: float = 0.0
    val_fraction: float = 0.1  # of the train features, held out to pick the lr
    seed: int = 0


@dataclass
class FinetuneConfig:
    """`foundry eval finetune` (pipeline/evaluate/finetune.py): the whole backbone plus a new linear classifier,
    trained on data.eval_train with labels, reported on data.eval_test (the recipe knobs of MAE /
    BEiT fine-tuning)."""

    steps: int = 1000
    batch_size: int = 256  # global: all ranks
    optimizer: str = "adamw"  # adamw | sgd | lars
    lr: float = 5e-4  # base lr for 256 samples (scaled linearly with batch_size)
    weight_decay: float = 0.05
    layer_decay: float = 0.75  # lr x decay^(depth from the head) per layer group (timm); 1.0: off
    warmup_steps: int = 50
    label_smoothing: float = 0.1
    mixup_alpha: float = 0.0  # > 0: mixup (timm.data.Mixup); needs an even per-rank batch
    cutmix_alpha: float = 0.0  # > 0: cutmix (with mixup too: one of them per batch)
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])  # random_resized_crop's area range
    log_every: int = 10


@dataclass
class GateConfig:
    """Evaluation gate: an eval of a registered version whose ``metric`` (knn_top1, linear_top1...)
    reaches ``threshold`` sets the registry alias ``@candidate`` on it. Empty metric: no gate."""

    metric: str = ""
    threshold: float = 0.0


@dataclass
class TrainConfig:
    max_steps: int = 100  # optimizer steps (an upper bound when budget_minutes is set)
    budget_minutes: float = 0.0  # > 0: fit the schedule to this much time, measured as it trains
    # What the budget covers: training (the training loop) | run (the whole process, with the
    # end-of-run export, registration and kNN evaluation estimated and reserved)
    budget_covers: str = "training"
    batch_size: int = 256  # global batch: all ranks x grad_accum_steps
    grad_accum_steps: int = 1
    optimizer: str = "lars"  # lars | adamw | sgd
    lr: float = 0.3  # base lr for lr_batch_ref samples (scaled linearly with batch_size)
    lr_batch_ref: int = 256
    min_lr: float = 0.0
    weight_decay: float = 1e-6
    # Set: weight decay follows a cosine from weight_decay at step 0 to this at the last step (DINO's
    # schedule, on the decayed parameter groups). Unset (null): constant.
    weight_decay_end: float | None = None
    momentum: float = 0.9  # lars and sgd
    nesterov: bool = False  # sgd: Nesterov momentum (RotNet's); false: plain momentum (MoCo v2, most papers)
    # Biases and norm parameters: weight decay on them too (MoCo v3's AdamW, SimSiam's SGD decay every
    # parameter; false: SimCLR/BYOL's rule, no decay and no LARS adaptation), and an lr multiplier
    # (Barlow Twins: 0.0048 / 0.2 = 0.024).
    decay_bias_and_norm: bool = False
    bias_and_norm_lr_scale: float = 1.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw (MAE: 0.9, 0.95)
    warmup_steps: int = 10
    grad_clip: float = 0.0  # 0 = off; the norm is always logged
    # > 0: evaluate and export an exponential moving average of the backbone's weights and BatchNorm
    # statistics (timm's ModelEmaV3): at step t decay min(ema_decay, 1 - t^(-3/4)), timm's warmup for
    # runs under ~10k steps, so that a short run's average does not hold its first steps. 0: off.
    ema_decay: float = 0.0
    # ddp: every rank holds the whole model (torch DDP). deepspeed: ZeRO shards optimizer states,
    # gradients and (stage 3) parameters over the ranks; see the deepspeed section.
    strategy: str = "ddp"
    # BatchNorm statistics over the global batch on every rank (SimCLR's global BN; what
    # SyncBatchNorm does on GPUs, here on any backend). Off: per-rank statistics.
    global_batchnorm: bool = False
    # Recompute each backbone block in backward instead of storing its activations (timm's
    # set_grad_checkpointing): activation memory ~ the blocks' inputs, ~1/3 more compute.
    activation_checkpointing: bool = False
    precision: str = "auto"  # auto (bf16 where fast) | bf16 | fp32
    channels_last: bool = True
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    resume: str = "auto"  # auto (latest in output_dir) | never | path to a checkpoint
    threads: int = 0  # torch intra-op threads per rank; 0 = cores / ranks


@dataclass
class DeepSpeedConfig:
    """``train.strategy=deepspeed`` (README "DeepSpeed ZeRO"). The DeepSpeed JSON is generated from
    these keys and train.* (batch, accumulation, clipping, precision); ``config_json`` adds to it."""

    zero_stage: int = 2  # 1: optimizer states sharded; 2: + gradients; 3: + parameters
    offload_optimizer: str = "none"  # none | cpu: optimizer states and step in CPU memory (train.optimizer=adamw)
    offload_params: str = "none"  # none | cpu: parameters in CPU memory between uses (zero_stage=3 only)
    # A DeepSpeed JSON merged over the generated one, its values win (bucket sizes, overlap_comm,
    # stage-3 prefetch, nvme offload paths, activation checkpointing, comms logging...). Keys with a
    # train.* equivalent (batch sizes, accumulation, clipping, precision, optimizer, scheduler) are refused.
    config_json: str = ""


@dataclass
class EvalConfig:
    knn_k: int = 200
    knn_temperature: float = 0.1
    # ZCA-whiten bank and queries with the bank's statistics before the cosine (docs/evaluation.md);
    # off: the protocol of solo-learn and lightly, which the benchmark tables use.
    knn_whiten: bool = False
    batch_size: int = 512
    after_pretrain: bool = True  # run kNN at the end of `foundry pretrain`
    knn_every: int = 0  # > 0: online kNN monitor, a kNN evaluation every N pretraining steps (all ranks)
    embedding_map_points: int = 2000  # test features in the eval runs' t-SNE plot; 0: no plot
    temporal_order_frames: int = 4  # frames per clip in `foundry eval temporal-order`
    linear: LinearProbeConfig = field(default_factory=LinearProbeConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    gate: GateConfig = field(default_factory=GateConfig)


@dataclass
class MlflowConfig:
    # empty: $MLFLOW_TRACKING_URI, else sqlite:///<working directory>/runs/mlflow.db, artifacts beside it
    tracking_uri: str = ""
    experiment: str = "ssl-foundry"
    registered_model: str = ""  # empty: don't register
    run_name: str = ""
    # A server that stops answering mid-run does not stop training: metrics wait in memory (and in
    # <output_dir>/mlflow-unsent.jsonl) and are sent when it answers again. The end of the run waits
    # this long for it, then exits (1) with the metrics kept; rerunning the command sends them.
    outage_minutes: float = 10.0
    tensorboard: bool = False  # also write the metrics as TensorBoard event files to <output_dir>/tensorboard


@dataclass
class LaunchConfig:
    nproc_per_node: int = 1  # >1: `foundry pretrain` starts the ranks (torch elastic)
    # Several nodes (docs/multinode.md): the same command on every node, meeting at rdzv_endpoint,
    # HOST:PORT of one of them (the head: its agent hosts the rendezvous store).
    nnodes: int = 1
    rdzv_endpoint: str = "127.0.0.1:29500"
    rdzv_id: str = ""  # the job's rendezvous name, the same on every node; empty: derived from output_dir
    # Elastic recovery: after a rank or node fails, the agents meet again (a lost node's command
    # restarted rejoins) and the ranks resume from the newest checkpoint.
    min_nodes: int = 0  # 0: nnodes. Fewer: go on without lost nodes, on fewer ranks (needs data.readers)
    max_restarts: int = -1  # restarts of the ranks after a failure; -1: 3 when nnodes > 1, else 0
    join_timeout_s: int = 600  # nodes not all met within this (at start, after a failure): the job fails
    last_call_s: int = 30  # min_nodes < nnodes: once min_nodes met, wait this long for the others
    collective_timeout_s: int = 600  # once all ranks are ready, a collective waiting this long fails
    backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | gloo | nccl
    device: str = "auto"  # auto | cpu | cuda
    # Slurm (`foundry submit`, launch/slurm.py). One task (rank) per GPU.
    nodes: int = 1  # Slurm nodes (nnodes above is torchrun's)
    gpus_per_node: int = 0  # > 0: --gpus-per-node, and tasks_per_node follows it
    tasks_per_node: int = 0  # ranks per node; 0: gpus_per_node, or 1 without GPUs
    cpus_per_task: int = 0  # 0: the partition's default
    partition: str = ""  # empty: the cluster's default partition
    time: str = "60"  # time limit: minutes, MM:SS, HH:MM:SS, D-HH or D-HH:MM[:SS] (quote it in YAML)
    account: str = ""
    qos: str = ""
    constraint: str = ""
    mem: str = ""  # per node, e.g. 64G or 500M; empty: the cluster's default
    signal_delay_s: int = 120  # USR2 this long before the time limit: checkpoint and requeue
    max_requeues: int = 3  # time-limit requeues before giving up (preemptions do not count)
    job_name: str = ""  # empty: foundry-<method>
    setup: list[str] = field(default_factory=list)  # shell lines before srun (module load ...)
    sbatch_args: dict[str, Any] = field(default_factory=dict)  # any other sbatch option, e.g. {exclusive: true}
    submit_dir: str = ""  # submitit's job folder (pickles, logs); empty: <output_dir>/slurm


@dataclass
class Config:
    output_dir: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)


@dataclass(frozen=True)
class Range:
    """The numbers a key accepts: ``low <= x`` (``low < x`` when ``low_open``), likewise ``high``."""

    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    note: str = ""  # what the bounds or 0 mean

    def __contains__(self, x: float) -> bool:
        above = x > self.low if self.low_open else x >= self.low
        below = x < self.high if self.high_open else x <= self.high
        return above and below

    def __str__(self) -> str:
        if self.high == math.inf:
            text = f"{'>' if self.low_open else '>='} {self.low:g}"
        else:
            text = f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        return f"{text} ({self.note})" if self.note else text


AT_LEAST_1, NON_NEGATIVE, POSITIVE = Range(1), Range(0), Range(0, low_open=True)
OFF_AT_0 = Range(0, note="0: off")
PROBABILITY = Range(0, 1)

# Every numeric key's range (list keys: each element's), checked before anything starts: a value
# outside is a ConfigError naming the key, the value and the range. Keys with a rule of their own
# (train.adam_betas, eval.linear.lrs, eval.finetune.crop_scale, deepspeed.zero_stage) are checked
# by it.
NUMBER_RANGES: dict[type, dict[str, Range]] = {
    AugmentOp: {"p": PROBABILITY},
    ViewSpec: {"count": AT_LEAST_1},
    DataConfig: {
        "num_workers": Range(0, note="0: load in the training process"), "prefetch_batches": AT_LEAST_1,
        "shuffle_buffer": Range(0, note="0 or 1: no shuffle buffer"),
        "readers": Range(0, note="0: one per rank x loader worker"),
        "clip_frames": Range(0, note="0: every frame of a stored clip"), "frame_stride": AT_LEAST_1,
        "eval_image_size": AT_LEAST_1, "mean": PROBABILITY, "std": POSITIVE,
        "labelled_fraction": Range(0, 1, low_open=True, note="e.g. 0.1 for 10 % of the labels"),
        "timeout_s": Range(0, low_open=True, note="the seconds a rank waits for one batch"),
        "max_sample_bytes": Range(1, note="the bytes of the largest tar member read"),
        "retries": Range(0, note="0: a failed read from a store ends the run"),
    },
    TrainConfig: {
        "max_steps": AT_LEAST_1, "budget_minutes": Range(0, note="0: no time budget"), "batch_size": AT_LEAST_1,
        "grad_accum_steps": AT_LEAST_1, "lr": Range(0, low_open=True, note="the base lr for train.lr_batch_ref samples"),
        "lr_batch_ref": AT_LEAST_1, "min_lr": NON_NEGATIVE, "weight_decay": NON_NEGATIVE,
        "weight_decay_end": Range(0, note="unset (null): constant weight decay"),
        "bias_and_norm_lr_scale": Range(0, low_open=True, note="1: the weights' lr"),
        "momentum": Range(0, 1, high_open=True), "warmup_steps": NON_NEGATIVE, "grad_clip": OFF_AT_0,
        "ema_decay": Range(0, 1, high_open=True, note="0: off; e.g. 0.999"),
        "seed": NON_NEGATIVE, "log_every": Range(1, note="steps between logged metrics"),
        "checkpoint_every": Range(1, note="steps between checkpoints"),
        "keep_checkpoints": Range(0, note="0: keep every checkpoint"),
        "threads": Range(0, note="0: cores / ranks"),
    },
    EvalConfig: {
        "knn_k": AT_LEAST_1, "knn_temperature": POSITIVE, "batch_size": AT_LEAST_1,
        "knn_every": Range(0, note="0: no online kNN monitor"), "embedding_map_points": Range(0, note="0: no plot"),
        "temporal_order_frames": Range(2, note="an order needs two frames"),
    },
    LinearProbeConfig: {
        "epochs": AT_LEAST_1, "batch_size": AT_LEAST_1, "momentum": Range(0, 1, high_open=True),
        "weight_decay": NON_NEGATIVE, "val_fraction": Range(0, 1, low_open=True, high_open=True), "seed": NON_NEGATIVE,
    },
    FinetuneConfig: {
        "steps": AT_LEAST_1, "batch_size": AT_LEAST_1, "lr": POSITIVE, "weight_decay": NON_NEGATIVE,
        "layer_decay": Range(0, 1, low_open=True, note="1: off"), "warmup_steps": NON_NEGATIVE,
        "label_smoothing": Range(0, 1, high_open=True), "mixup_alpha": OFF_AT_0, "cutmix_alpha": OFF_AT_0,
        "log_every": AT_LEAST_1,
    },
    GateConfig: {"threshold": Range(0, 1, note="a top-1 accuracy")},
    MlflowConfig: {"outage_minutes": NON_NEGATIVE},
    LaunchConfig: {
        "nproc_per_node": AT_LEAST_1, "nnodes": AT_LEAST_1, "nodes": AT_LEAST_1,
        "gpus_per_node": Range(0, note="0: no GPUs"), "tasks_per_node": Range(0, note="0: one per GPU, or 1"),
        "cpus_per_task": Range(0, note="0: the partition's default"), "signal_delay_s": NON_NEGATIVE,
        "max_requeues": NON_NEGATIVE, "max_restarts": Range(-1, note="-1: 3 when launch.nnodes > 1, else 0"),
    },
}


def check_ranges(node: Any, prefix: str = "") -> None:
    """Every key of ``node`` (a config dataclass) and of the dataclasses below it within its range."""
    ranges = NUMBER_RANGES.get(type(node), {})
    for f in dataclasses.fields(node):
        key, value = f"{prefix}.{f.name}" if prefix else f.name, getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            check_ranges(value, key)
        elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            for i, item in enumerate(value):
                check_ranges(item, f"{key}[{i}]")
        elif f.name in ranges and value is not None:  # None: an optional key left unset
            if not all(x in ranges[f.name] for x in (value if isinstance(value, list) else [value])):
                raise ConfigError(f"{key} must be {ranges[f.name]}, got {value}")


# --------------------------------------------------------------------------- building


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (from YAML or a CLI string) to annotation ``tp`` or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):  # X | None: an optional value, null = unset
        if value is None:
            return None
        (inner,) = [arg for arg in typing.get_args(tp) if arg is not type(None)]
        return _coerce(value, inner, key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {_type_name(tp)}, got {value!r}")
        return build(tp, value, prefix=key)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
        try:
            converted = tp(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}") from None
        if not math.isfinite(converted):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        if tp is int and isinstance(value, (float, str)) and float(value) != converted:
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return converted
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return "" if value is None else str(value)
    raise TypeError(f"unsupported config annotation {tp!r} at {key}")


def build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """Instantiate dataclass ``cls`` from a nested dict, naming any unknown key. A class that checks
    itself on construction (the augmentation spec's ops and views) has its error prefixed with the key."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise ConfigError(_unknown_key(dotted, key, names, prefix))
        kwargs[key] = _coerce(value, hints[key], dotted)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{prefix}: {err}" if prefix else str(err)) from None


def _unknown_key(dotted: str, key: str, names: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"unknown config key '{dotted}'.{hint} Valid keys{' under ' + prefix if prefix else ''}: {', '.join(names)}"


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def public_dict(cfg: Config) -> dict[str, Any]:
    """``to_dict(cfg)`` with the credentials a data location's URL may carry replaced by ``***``: what is
    logged to MLflow and kept beside a run (config.yaml, checkpoints)."""
    tree = to_dict(cfg)
    for key in ("train", "eval_train", "eval_test"):
        tree["data"][key] = redact(tree["data"][key])
    return tree


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists stay values): MLflow params."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and value:
            flat.update(flatten(value, dotted))
        else:
            flat[dotted] = value
    return flat


def _set_dotted(tree: dict[str, Any], dotted: str, raw: str) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    # YAML parsing gives numbers, bools, lists ("[0.2,1.0]") and mappings their types;
    # _coerce then checks them against the annotation.
    value = yaml.safe_load(raw) if raw != "" else ""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and ":" in raw:
        value = raw  # YAML 1.1 reads 1:30:00 as the base-60 number 5400; keep the text (launch.time)
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value (e.g. train.max_steps=100)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not all(key.split(".")):
            raise ConfigError(f"override '{item}': '{key}' is not a dotted key (e.g. train.max_steps=100)")
        pairs.append((key, raw))
    return pairs


def _read_yaml(path: Path) -> dict[str, Any]:
    # PyYAML, not OmegaConf's loader: scalars keep the types every recipe was written against
    # (its loader reads 1e-6 as a float where YAML 1.1 reads a string, which method_args keep).
    loaded = yaml.safe_load(path.read_text()) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping at top level")
    return loaded


def compose_recipe(path: str | os.PathLike, _chain: tuple[Path, ...] = ()) -> DictConfig:
    """A recipe merged over the bases its ``defaults:`` names (paths relative to the recipe, each
    composed the same way, applied in order), interpolations left for ``resolve``. Mappings merge
    key by key; lists (views, ops) are replaced whole."""
    p = Path(path)
    if not p.is_file():
        where = f" (named in {_chain[-1]}'s defaults)" if _chain else " (recipes live in configs/*.yaml)"
        raise ConfigError(f"config file '{path}' not found{where}")
    if p.resolve() in _chain:
        cycle = " -> ".join(str(c) for c in (*_chain, p.resolve()))
        raise ConfigError(f"config file '{path}': its defaults include itself ({cycle}); remove one")
    tree = _read_yaml(p)
    bases = tree.pop("defaults", [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: defaults must be a list of base recipe paths relative to it, got {bases!r}")
    layers = [compose_recipe(p.parent / base, (*_chain, p.resolve())) for base in bases]
    return OmegaConf.merge(*layers, OmegaConf.create(tree))


def resolve(tree: dict[str, Any], source: str) -> dict[str, Any]:
    """``tree`` over the defaults, its ``${key}`` interpolations (OmegaConf's, which may name any
    key, set or default) replaced by their values."""
    try:
        return OmegaConf.to_container(OmegaConf.merge(to_dict(Config()), tree), resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{source}: {str(err).splitlines()[0]} (full_key: {err.full_key})") from None


def load_config(path: str | os.PathLike | None, overrides: list[str] = (), check_paths: bool = True) -> Config:
    """Recipe YAML and its bases (or defaults when ``path`` is None) + overrides -> validated ``Config``."""
    tree: dict[str, Any] = {}
    if path is not None:
        tree = OmegaConf.to_container(compose_recipe(path), resolve=False)
    for key, raw in parse_overrides(list(overrides)):
        try:
            _set_dotted(tree, key, raw)
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"override '{key}={raw}': the value is not valid YAML ({problem})") from None
    cfg = build(Config, resolve(tree, str(path or "overrides")))
    validate(cfg, check_paths=check_paths)
    return cfg


def config_from_dict(tree: dict[str, Any]) -> Config:
    """Rebuild a Config saved with ``to_dict`` (checkpoint, MLflow, worker processes)."""
    return build(Config, tree)


def tasks_per_node(cfg: Config) -> int:
    """Slurm tasks (ranks) per node: one per GPU, else launch.tasks_per_node, else 1."""
    launch = cfg.launch
    return launch.gpus_per_node or launch.tasks_per_node or 1


def world_size(cfg: Config, launcher: str = "local") -> int:
    """The ranks of the run: WORLD_SIZE inside a rank torchrun or submitit started; else what
    `foundry pretrain` starts (``launcher="local"``: launch.nproc_per_node x launch.nnodes) or
    `foundry submit` asks Slurm for (``"slurm"``: launch.nodes x tasks_per_node)."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    if launcher == "slurm":
        return cfg.launch.nodes * tasks_per_node(cfg)
    return cfg.launch.nproc_per_node * cfg.launch.nnodes


_RANKS_HINT = " (ranks: launch.nproc_per_node x launch.nnodes; under Slurm launch.nodes x tasks per node)"


def split_batch(batch_size: int, world_size: int, grad_accum_steps: int = 1, readers: int | None = None,
                num_workers: int = 0, batch_key: str = "train.batch_size") -> int:
    """Samples per rank in one forward pass: ``batch_size`` (the global batch of ``batch_key``) over
    ranks x accumulation steps; with the torch loader's ``readers`` (data.readers, 0: one per rank x
    loader worker) also split evenly over the rank's readers, each of which makes an equal part of
    every batch. Anything else is a ConfigError naming the keys, their values and the fix."""
    per_pass = world_size * grad_accum_steps
    if batch_size % per_pass:
        over = f"{world_size} rank(s)" + (f" x train.grad_accum_steps={grad_accum_steps}" if grad_accum_steps > 1 else "")
        below, above = batch_size // per_pass * per_pass, (batch_size // per_pass + 1) * per_pass
        raise ConfigError(f"{batch_key}={batch_size} does not split over {over}: make it a multiple of {per_pass} "
                          f"(e.g. {below or above} or {above}){_RANKS_HINT}")
    local = batch_size // per_pass
    if readers is None:
        return local
    workers = max(1, num_workers)
    if readers % (world_size * workers):
        raise ConfigError(f"data.readers={readers} is not a multiple of {world_size} rank(s) x {workers} loader "
                          f"worker(s) (data.num_workers): set it to a multiple of {world_size * workers}")
    if local % ((readers or world_size * workers) // world_size):
        if readers:
            raise ConfigError(f"data.readers={readers} does not divide the {local * world_size} samples of a forward "
                              f"pass ({batch_key} / train.grad_accum_steps), of which every reader makes an equal "
                              f"part: set data.readers to a divisor of {local * world_size}")
        raise ConfigError(f"{batch_key}={batch_size} gives each rank {local} samples per forward pass, which do not "
                          f"split over data.num_workers={num_workers} loader workers (each makes an equal part of "
                          f"every batch): make {batch_key} a multiple of {per_pass * workers} or change "
                          f"data.num_workers")
    return local


def require_labels(data: DataConfig, keys: tuple[str, ...], needed_by: str, instead: str = "") -> None:
    """The shards of ``data.<key>`` are labelled, as their manifest says, since ``needed_by`` reads
    their labels (``instead``: the other way out, e.g. turning that evaluation off)."""
    for key in keys:
        folder = getattr(data, key)
        if folder and (Path(folder) / "manifest.json").is_file() and read_manifest(folder).get("labelled") is False:
            raise ConfigError(
                f"data.{key}={folder} holds unlabelled shards (made from a folder without one sub-folder per "
                f"class, e.g. ImageNet's flat val/) but {needed_by} needs labels: prep them from SRC/<class>/ "
                f"folders{', or ' + instead if instead else ''}")


def validate(cfg: Config, check_paths: bool = True) -> None:
    """Every rule of a run's config but the batch's split over ranks and loader readers, which needs
    the loader (``pipeline.data.loader.validate_batch``): the launchers check both before any rank starts."""
    check_ranges(cfg)
    t = cfg.train
    if cfg.model.method not in method_names():
        raise ConfigError(
            f"model.method: unknown method '{cfg.model.method}'. Registered: {', '.join(method_names())}"
        )
    valid_args = method_arg_names(cfg.model.method)
    for key in cfg.model.method_args:
        if key not in valid_args:
            raise ConfigError(_unknown_key(f"model.method_args.{key}", key, valid_args,
                                           f"model.method_args ({cfg.model.method})"))
    method = method_class(cfg.model.method)
    if cfg.data.views:
        try:
            method.check_view_count(sum(v.count for v in cfg.data.views))
        except ValueError as err:
            raise ConfigError(str(err)) from None
    validate_teacher(cfg.model)
    if cfg.data.labelled_fraction < 1 and not method.uses_labels:
        takes_labels = [m for m in method_names() if method_class(m).uses_labels]
        raise ConfigError(f"data.labelled_fraction={cfg.data.labelled_fraction}: method '{cfg.model.method}' takes "
                          f"no labels (those that do: {', '.join(takes_labels)}); drop the key")
    for key, data_value in (("pixel_mean", cfg.data.mean), ("pixel_std", cfg.data.std)):
        if key in cfg.model.method_args and list(cfg.model.method_args[key]) != list(data_value):
            raise ConfigError(f"model.method_args.{key}={cfg.model.method_args[key]} differs from the views' "
                              f"normalisation data.{key[6:]}={data_value}; set them equal")
    if not timm.is_model(cfg.model.backbone):
        close = difflib.get_close_matches(cfg.model.backbone, timm.list_models(), n=5)
        raise ConfigError(f"model.backbone: '{cfg.model.backbone}' is not a timm model"
                          f"{'. Did you mean ' + ', '.join(close) + '?' if close else ''}")
    validate_slurm(cfg.launch)
    validate_elastic(cfg)
    choices = {
        "train.optimizer": (t.optimizer, ("lars", "adamw", "sgd")),
        "train.precision": (t.precision, ("auto", "bf16", "fp32")),
        "train.strategy": (t.strategy, ("ddp", "deepspeed")),
        "train.budget_covers": (t.budget_covers, ("training", "run")),
        "data.backend": (cfg.data.backend, ("auto", "torch", "batched", "dali")),
        "data.video_decoder": (cfg.data.video_decoder, ("auto", "dali", "pyav")),
        "data.verify": (cfg.data.verify, ("size", "sha256", "none")),
        "data.on_bad_sample": (cfg.data.on_bad_sample, ("error", "skip")),
        "launch.backend": (cfg.launch.backend, ("auto", "gloo", "nccl")),
        "launch.device": (cfg.launch.device, ("auto", "cpu", "cuda")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key}: '{value}' is not one of {', '.join(allowed)}")
    if t.global_batchnorm and cfg.model.method == "moco_v2":
        raise ConfigError("train.global_batchnorm: MoCo v2 needs per-rank BatchNorm statistics for its "
                          "shuffling BN (He et al. 2020, sec. 3.3); set train.global_batchnorm=false")
    if t.nesterov and (t.optimizer != "sgd" or t.momentum <= 0):
        raise ConfigError(f"train.nesterov=true is Nesterov momentum for train.optimizer=sgd with train.momentum > 0 "
                          f"(got optimizer {t.optimizer}, momentum {t.momentum}); set train.nesterov=false")
    if t.weight_decay_end is not None and t.weight_decay <= 0:
        raise ConfigError(f"train.weight_decay_end={t.weight_decay_end}: the schedule goes from train.weight_decay="
                          f"{t.weight_decay} to it: weight_decay must be > 0, or set train.weight_decay_end=null "
                          f"for a constant weight decay")
    if len(t.adam_betas) != 2 or not all(0 <= b < 1 for b in t.adam_betas):
        raise ConfigError(f"train.adam_betas must be two numbers in [0, 1), e.g. [0.9, 0.95]; got {t.adam_betas}")
    if t.resume not in ("auto", "never") and not Path(t.resume).exists():
        raise ConfigError(f"train.resume: checkpoint '{t.resume}' not found (use auto, never or a .pt path)")
    if t.ema_decay > 0 and t.strategy == "deepspeed":
        raise ConfigError(f"train.ema_decay={t.ema_decay} averages the whole fp32 backbone on every rank, which "
                          f"train.strategy=deepspeed does not hold (ZeRO-3 shards it, the engine may keep it in "
                          f"bf16): use train.strategy=ddp, or set train.ema_decay=0")
    if t.strategy == "deepspeed":
        validate_deepspeed(cfg)
    elif cfg.deepspeed != DeepSpeedConfig():
        changed = [f"deepspeed.{f.name}" for f in dataclasses.fields(DeepSpeedConfig)
                   if getattr(cfg.deepspeed, f.name) != f.default]
        raise ConfigError(f"{', '.join(changed)} set but train.strategy={t.strategy}: they apply to "
                          f"train.strategy=deepspeed only; set it, or drop them")
    if not cfg.data.views:
        raise ConfigError("data.views is empty: a recipe must list its augmentation views")
    validate_views(cfg.data)
    if method.multi_crop:
        validate_multi_crop(cfg)
    validate_eval(cfg.eval)
    if cfg.mlflow.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("mlflow.tensorboard=true needs the tensorboard package: `pip install tensorboard` "
                          "(requirements.txt pins it), or set mlflow.tensorboard=false")
    if method.input_kind == "clip":
        validate_clip_length(cfg, check_paths)
    for key in ("train", "eval_train", "eval_test"):
        try:
            location_scheme(getattr(cfg.data, key))
        except ManifestError as err:
            raise ConfigError(f"data.{key}: {err}") from None
    if check_paths:  # local folders; remote locations and shard lists are checked when they are read
        for key in ("train", "eval_train", "eval_test"):
            value = getattr(cfg.data, key)
            local_folder = value and not is_remote(value) and not shard_list(value)
            if local_folder and not (Path(value) / "manifest.json").is_file():
                raise ConfigError(
                    f"data.{key}: no shards at '{value}' (no manifest.json). Make them with "
                    f"`foundry prep images SRC {value}`, `foundry prep video SRC {value}` or "
                    f"`foundry prep fashion-mnist DIR`."
                )
        manifest = Path(cfg.data.train) / "manifest.json"
        if manifest.is_file() and json.loads(manifest.read_text()).get("settings", {}).get("kind") == "clips":
            require("av", f"data.train={cfg.data.train} (video clips: the loaders decode them)")
    validate_labels(cfg, check_paths)


def validate_finetune(cfg: Config, ranks: int) -> None:
    """`foundry eval finetune` on ``ranks``: eval.finetune.batch_size splits over them (and the loader
    workers), mixup/cutmix have pairs in every rank's batch, and its shards are labelled."""
    ft = cfg.eval.finetune
    local = split_batch(ft.batch_size, ranks, readers=0, num_workers=cfg.data.num_workers,
                        batch_key="eval.finetune.batch_size")
    if (ft.mixup_alpha or ft.cutmix_alpha) and local % 2:
        raise ConfigError(f"eval.finetune.batch_size={ft.batch_size} gives {ranks} rank(s) {local} samples each, "
                          f"but mixup/cutmix pair the samples of a batch: make the per-rank batch even")
    require_labels(cfg.data, ("eval_train", "eval_test"), "foundry eval finetune")


def validate_labels(cfg: Config, check_paths: bool) -> None:
    """The evaluations a pretraining run makes (the kNN monitor, the kNN at its end) have their
    labelled shards, and a method that trains on labels (S4L, SLA) has labelled training shards."""
    e, d = cfg.eval, cfg.data
    if e.knn_every and not (d.eval_train and d.eval_test):
        raise ConfigError(f"eval.knn_every={e.knn_every} (the online kNN monitor) needs data.eval_train and "
                          f"data.eval_test (labelled shards): set them, or eval.knn_every=0")
    if not check_paths:
        return
    if e.knn_every:
        require_labels(d, ("eval_train", "eval_test"), f"the online kNN monitor (eval.knn_every={e.knn_every})",
                       "set eval.knn_every=0")
    if e.after_pretrain and d.eval_train and d.eval_test:
        require_labels(d, ("eval_train", "eval_test"), "the kNN at the end of pretraining (eval.after_pretrain)",
                       "set eval.after_pretrain=false")
    if method_class(cfg.model.method).uses_labels:
        require_labels(d, ("train",), f"model.method={cfg.model.method} (it trains on labels)")


def max_restarts(launch: LaunchConfig) -> int:
    """launch.max_restarts, its default (-1) resolved."""
    return launch.max_restarts if launch.max_restarts >= 0 else (3 if launch.nnodes > 1 else 0)


def validate_elastic(cfg: Config) -> None:
    """The multi-node keys, and what going on with fewer nodes (launch.min_nodes < nnodes) needs:
    a global batch that splits over every world size it may run at, and the same batches at each."""
    launch = cfg.launch
    if launch.nnodes < 1 or not 0 <= launch.min_nodes <= launch.nnodes:
        raise ConfigError(f"launch.nnodes must be >= 1 and launch.min_nodes in [0, nnodes] (0: nnodes), got "
                          f"nnodes={launch.nnodes}, min_nodes={launch.min_nodes}")
    for key in ("join_timeout_s", "last_call_s", "collective_timeout_s"):
        if getattr(launch, key) <= 0:
            raise ConfigError(f"launch.{key} must be > 0 seconds, got {getattr(launch, key)}")
    if ":" not in launch.rdzv_endpoint or not launch.rdzv_endpoint.rsplit(":", 1)[1].isdigit():
        raise ConfigError(f"launch.rdzv_endpoint: '{launch.rdzv_endpoint}' is not HOST:PORT (e.g. 10.0.0.1:29500)")
    if max_restarts(launch) and cfg.train.resume != "auto":
        raise ConfigError(f"train.resume={cfg.train.resume} with launch.max_restarts={max_restarts(launch)}: a restart "
                          f"after a failure would begin again from {'step 0' if cfg.train.resume == 'never' else 'it'}"
                          f" instead of the newest checkpoint; use train.resume=auto (with a fresh output_dir to "
                          f"start afresh), or launch.max_restarts=0")
    if not launch.min_nodes or launch.min_nodes == launch.nnodes:
        return
    fewer = f"launch.min_nodes={launch.min_nodes} < launch.nnodes={launch.nnodes} (going on without lost nodes)"
    if cfg.train.strategy != "ddp":
        raise ConfigError(f"{fewer} resumes on fewer ranks, which train.strategy={cfg.train.strategy} cannot (its "
                          f"optimizer shards are per rank): set launch.min_nodes=0 or train.strategy=ddp")
    if not cfg.data.readers:
        raise ConfigError(f"{fewer} resumes on fewer ranks; the batches are the same at any world size only with a "
                          f"fixed data.readers: set it (e.g. data.readers={launch.nnodes * launch.nproc_per_node})")
    workers = max(1, cfg.data.num_workers)
    for nodes in range(launch.min_nodes, launch.nnodes + 1):
        ranks = nodes * launch.nproc_per_node
        if cfg.train.batch_size % (ranks * cfg.train.grad_accum_steps) or cfg.data.readers % (ranks * workers):
            raise ConfigError(f"{fewer}: on {nodes} node(s), {ranks} ranks, train.batch_size={cfg.train.batch_size} "
                              f"must split over ranks x grad_accum_steps and data.readers={cfg.data.readers} over "
                              f"ranks x data.num_workers ({workers}); change them or launch.min_nodes")


def validate_teacher(model: ModelConfig) -> None:
    """model.teacher is set exactly for the methods that distil a teacher. Whether it resolves is
    checked when it is loaded (pipeline/registry/teacher.py), in the registry of mlflow.tracking_uri."""
    if takes_teacher(model.method) and not model.teacher:
        raise ConfigError(f"model.teacher: method '{model.method}' distils a frozen teacher; set model.teacher="
                          f"models:/NAME@ALIAS, models:/NAME/VERSION, an MLflow run id or an export folder")
    if model.teacher and not takes_teacher(model.method):
        distillers = [m for m in method_names() if takes_teacher(m)]
        raise ConfigError(f"model.teacher={model.teacher}: method '{model.method}' takes no teacher (those that do: "
                          f"{', '.join(distillers)}); drop the key")


def validate_multi_crop(cfg: Config) -> None:
    """A multi-crop method's views (models.multicrop): its global views first, at one size, then any
    local views; a ViT (built here on the meta device: no memory, no weights) takes views of several
    sizes only with dynamic_img_size, and sizes that are multiples of its patches."""
    try:
        with torch.device("meta"):
            backbone = create_backbone(cfg.model.backbone, **cfg.model.backbone_args)
    except TypeError as err:
        raise ConfigError(f"model.backbone_args={cfg.model.backbone_args}: {cfg.model.backbone} does not take them "
                          f"({err})") from None
    try:
        check_view_sizes(view_sizes(cfg.data.views), method_class(cfg.model.method).num_views, backbone)
    except ValueError as err:
        raise ConfigError(f"model.method={cfg.model.method}: {err}") from None


def validate_clip_length(cfg: Config, check_paths: bool) -> None:
    """A video method's training shards hold clips (when they exist), and its clips (data.clip_frames,
    or the stored clips' length when 0) hold at least the frames its pretext task needs with these
    method_args."""
    method = cfg.model.method
    needed = min_clip_frames(method_class(method), cfg.model.method_args)
    frames, source = cfg.data.clip_frames, f"data.clip_frames={cfg.data.clip_frames}"
    manifest = Path(cfg.data.train) / "manifest.json"
    settings = json.loads(manifest.read_text()).get("settings", {}) if check_paths and manifest.is_file() else {}
    if check_paths and manifest.is_file() and settings.get("kind") != "clips":
        raise ConfigError(f"model.method={method} trains on video clips but data.train={cfg.data.train} holds images: "
                          f"make clip shards with `foundry prep video SRC OUT`")
    if not frames and settings:
        frames = settings.get("clip_frames", 0)
        source = f"the clips of {cfg.data.train} ({frames} frames, data.clip_frames=0 takes them whole)"
    if frames and frames < needed:
        raise ConfigError(f"model.method={method} needs clips of at least {needed} frames with these "
                          f"model.method_args; {source} gives {frames}: raise data.clip_frames (re-prep with a "
                          f"larger --clip-frames if the shards' clips are shorter) or lower the method's frame needs")


def validate_eval(e: EvalConfig) -> None:
    """The linear probe's sweep, the fine-tuning recipe's crop scale, and the gate's metric (the
    other eval.* numbers: NUMBER_RANGES)."""
    lp = e.linear
    if not lp.lrs or any(lr <= 0 for lr in lp.lrs):
        raise ConfigError(f"eval.linear.lrs must be a non-empty list of positive learning rates, got {lp.lrs}")
    if lp.optimizer not in ("sgd", "lars"):
        raise ConfigError(f"eval.linear.optimizer: '{lp.optimizer}' is not one of sgd, lars")
    ft = e.finetune
    if ft.optimizer not in ("adamw", "sgd", "lars"):
        raise ConfigError(f"eval.finetune.optimizer: '{ft.optimizer}' is not one of adamw, sgd, lars")
    if len(ft.crop_scale) != 2 or not 0 < ft.crop_scale[0] <= ft.crop_scale[1] <= 1:
        raise ConfigError(f"eval.finetune.crop_scale must be [min, max] with 0 < min <= max <= 1, got {ft.crop_scale}")
    if e.gate.metric and e.gate.metric not in GATE_METRICS:
        raise ConfigError(f"eval.gate.metric: '{e.gate.metric}' is not one of {', '.join(GATE_METRICS)} "
                          f"(empty: no gate)")


def validate_views(data: DataConfig) -> None:
    """The loader features the chosen backend lacks (the augmentation spec itself was checked when
    it was built, op by op; whether a backend has every op, when its loader is built:
    ``data.backend=auto`` picks it by device)."""
    for key, value in (("data.backend", data.backend), ("data.video_decoder", data.video_decoder)):
        if value == "dali":
            require("nvidia.dali", f"{key}=dali")
    if data.backend == "batched":
        compile_views(data.views)
    if data.backend == "dali":
        for key, value in (("data.readers", data.readers), ("data.resampled", data.resampled)):
            if value:
                raise ConfigError(f"{key}={value} is a feature of the torch loader; data.backend=dali does not "
                                  f"have it: unset it or use data.backend=torch")


def slurm_time_minutes(value: str) -> int:
    """Slurm's time formats (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) -> whole minutes
    (rounded up). Raises ValueError for anything else."""
    text = str(value).strip()
    days = 0
    if "-" in text:
        day_text, text = text.split("-", 1)
        days = int(day_text)
        parts = [int(p) for p in text.split(":")]
        if not 1 <= len(parts) <= 3:
            raise ValueError(value)
        hours, minutes, seconds = (parts + [0, 0])[:3]
    else:
        parts = [int(p) for p in text.split(":")]
        if len(parts) == 1:
            hours, minutes, seconds = 0, parts[0], 0
        elif len(parts) == 2:
            hours, minutes, seconds = 0, parts[0], parts[1]
        elif len(parts) == 3:
            hours, minutes, seconds = parts
        else:
            raise ValueError(value)
    if min(days, hours, minutes, seconds) < 0:
        raise ValueError(value)
    total_s = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    if total_s <= 0:
        raise ValueError(value)
    return -(-total_s // 60)


def validate_slurm(launch: LaunchConfig) -> None:
    """The launch.* keys of `foundry submit`: GPUs vs tasks, the time limit, the memory size (the
    counts: NUMBER_RANGES)."""
    if launch.gpus_per_node and launch.tasks_per_node not in (0, launch.gpus_per_node):
        raise ConfigError(
            f"launch.tasks_per_node={launch.tasks_per_node} with launch.gpus_per_node={launch.gpus_per_node}: "
            f"one task (rank) per GPU; leave tasks_per_node=0 or set it to gpus_per_node")
    try:
        slurm_time_minutes(launch.time)
    except ValueError:
        raise ConfigError(
            f"launch.time: '{launch.time}' is not a Slurm time limit (minutes, MM:SS, HH:MM:SS, D-HH, "
            f"D-HH:MM or D-HH:MM:SS, e.g. 90 or 1:30:00 or 2-00:00:00)") from None
    if launch.mem and not re.fullmatch(r"\d+[KMGT]?", launch.mem):
        raise ConfigError(f"launch.mem: '{launch.mem}' is not a Slurm memory size (e.g. 64G, 500M, 16000)")


def uses_cuda(launch: LaunchConfig) -> bool:
    return launch.device == "cuda" or (launch.device == "auto" and torch.cuda.is_available())


# --------------------------------------------------------------------------- deepspeed section


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


def deepspeed_config(d: DeepSpeedConfig, t: TrainConfig, micro_batch: int, amp_dtype: torch.dtype | None,
                     cuda: bool) -> dict[str, Any]:
    """The DeepSpeed JSON of a run whose ranks take ``micro_batch`` samples per forward pass
    (``split_batch``): generated from deepspeed.* and train.*, then the user's
    ``deepspeed.config_json`` merged over it."""
    zero: dict[str, Any] = {"stage": d.zero_stage}
    if d.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": d.offload_optimizer, "pin_memory": cuda}
    if d.offload_params != "none":
        zero["offload_param"] = {"device": d.offload_params, "pin_memory": cuda}
    generated = {
        # DeepSpeed derives train_batch_size = micro x accumulation x world size (= train.batch_size).
        "train_micro_batch_size_per_gpu": micro_batch,
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
    from deepspeed.runtime.config import DeepSpeedConfig as DeepSpeedParser  # optional: train.strategy=deepspeed only

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
    require("deepspeed", "train.strategy=deepspeed")
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
    ds_config = deepspeed_config(d, t, split_batch(t.batch_size, 1, t.grad_accum_steps), amp_dtype=None, cuda=False)
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


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{path}.tmp")
    tmp.write_text(yaml.safe_dump(public_dict(cfg), sort_keys=False))
    os.replace(tmp, path)

